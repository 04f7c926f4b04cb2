import CairnCore
import CStorageSupport
import NIOCore
import NIOPosix

/// The open loop's timetable kept on an event loop, for sessions driven from their event loop:
/// the loop's own timer (a `timerfd`, no slack) wakes it at each intended start, and it sends
/// every request that is due straight from there — no pacer thread to wake and no hand-over to
/// the loop per request, so the generator's CPU per request is close to the closed loop's.
///
/// Same contract as the thread pacer: a request is planned only when a session is free to take
/// it (so nothing queues inside the generator), its latency runs from its intended start (a
/// late start counts against it: no coordinated omission), and the run ends once the budget is
/// spent and every request has answered.
///
/// Isolation: all state lives on `loop` (`NIOLoopBoundBox`); every completion hops there as a task
/// of its own (one that comes back on `start`'s stack never nests). `run` is called once.
final class LoopPacer: Sendable {
    private struct State {
        var rng: SplitMix64
        /// Sessions with nothing in flight.
        var free: [Int]
        var inFlight = 0
        /// The budget is spent: no request is planned any more.
        var ended = false
        /// The intended start (ns after `base`) a timer is armed for, if any.
        var armedFor: UInt64?
        var finished: (@Sendable () -> Void)?
    }

    private let loop: any EventLoop
    private let state: NIOLoopBoundBox<State>
    private let runner: Runner
    private let sessions: [any EventLoopDrivenSession]
    private let schedule: OpenLoopSchedule
    /// The run's start (CLOCK_MONOTONIC ns) and the timetable's offset from it.
    private let base: UInt64
    private let offset: UInt64

    init(loop: any EventLoop, runner: Runner, sessions: [any EventLoopDrivenSession], schedule: OpenLoopSchedule,
         seed: UInt64, base: UInt64, offset: UInt64) {
        self.loop = loop
        self.runner = runner
        self.sessions = sessions
        self.schedule = schedule
        self.base = base
        self.offset = offset
        state = NIOLoopBoundBox.makeBoxSendingValue(State(rng: SplitMix64(seed: seed), free: Array((0..<sessions.count).reversed())),
                                                    eventLoop: loop)
    }

    /// The loop the sessions' connections use unless a target was given a group of its own (the
    /// process's shared group; `cairn-load` sizes it with `--threads`).
    static func defaultLoop() -> any EventLoop { MultiThreadedEventLoopGroup.singleton.any() }

    /// Runs the timetable; returns once the run is over and nothing is in flight.
    func run() async {
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            loop.execute { [self] in
                cairn_precise_timers()
                state.value.finished = { done.resume() }
                fire()
            }
        }
    }

    /// Sends every request due by now while a session is free; then arms the timer for the next
    /// one, or waits for a completion to free a session. On the loop.
    private func fire() {
        while !state.value.ended && !state.value.free.isEmpty {
            let intended = schedule.intendedStartNanos(runner.claimed.load(ordering: .relaxed), after: offset)
            let now = Runner.monotonicNanos() &- base
            if intended > now {
                arm(at: intended, now: now)
                return
            }
            guard let plan = runner.planNext(&state.value.rng, intendedStart: intended) else {
                state.value.ended = true
                break
            }
            guard let s = state.value.free.popLast() else { break }
            state.value.inFlight += 1
            let stats = runner.stats(for: s)
            sessions[s].start(plan) { [self] values, error in
                runner.complete(plan, values: values, error: error, stats: stats)
                // Always a new task: a request that fails before it is sent completes on the
                // stack of `start`, and nesting `fire` there would grow the stack per request.
                loop.execute { self.completed(s) }
            }
        }
        finishIfDone()
    }

    private func completed(_ s: Int) {
        state.value.free.append(s)
        state.value.inFlight -= 1
        fire()
    }

    private func arm(at intended: UInt64, now: UInt64) {
        if state.value.armedFor == intended { return }
        state.value.armedFor = intended
        let wait = intended - now
        loop.scheduleTask(in: .nanoseconds(Int64(clamping: wait))) { [self] in
            if state.value.armedFor == intended { state.value.armedFor = nil }
            fire()
        }
    }

    private func finishIfDone() {
        guard state.value.ended, state.value.inFlight == 0, let finished = state.value.finished else { return }
        state.value.finished = nil
        finished()
    }
}
