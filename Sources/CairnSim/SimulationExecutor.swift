public import CairnNode
import CairnCore
import Synchronization

/// A single-threaded task executor whose next job is chosen by a seeded generator: with it as the
/// task executor preference, default actors and structured child tasks run one job at a time in
/// an order the seed fixes, so the same seed replays the same interleaving.
///
/// Jobs may be enqueued from any thread (a resumed continuation, a timer); they run only inside
/// `runUntilIdle`, on the calling thread. Thread-safe.
///
/// Lanes: each simulated node runs on a lane of its own (`lane(_:)`, a task executor that queues
/// here under the lane's number; lane 0 is the executor itself). A paused lane's jobs wait, in
/// order, until it is resumed: a node stopped as SIGSTOP stops a process, timers and all.
public final class SimulationExecutor: TaskExecutor, @unchecked Sendable {
    /// A job, the lane it belongs to, and the serial executor it was enqueued on (nil: a
    /// task-executor job).
    private struct Pending {
        let job: UnownedJob
        let lane: Int
        let serial: UnownedSerialExecutor?
    }

    // @unchecked: `pending`, `paused` and `lanes` are only touched under `lock`; `UnownedJob` is
    // not Sendable by type.
    private let lock = Mutex(SplitMix64(seed: 0))
    private var pending: [Pending] = []
    private var paused: Set<Int> = []
    private var lanes: [Int: SimulationLane] = [:]

    public init(seed: UInt64) {
        lock.withLock { $0 = SplitMix64(seed: seed) }
    }

    public func enqueue(_ job: UnownedJob) {
        enqueue(job, lane: 0, isolatedTo: nil)
    }

    /// A job of lane `lane`; `executor`: the actor's serial executor, for actor jobs.
    func enqueue(_ job: UnownedJob, lane: Int, isolatedTo executor: UnownedSerialExecutor?) {
        lock.withLock { _ in pending.append(Pending(job: job, lane: lane, serial: executor)) }
    }

    /// The task executor of lane `n` (n > 0; the same object for the same n).
    public func lane(_ n: Int) -> SimulationLane {
        lock.withLock { _ in
            if let l = lanes[n] { return l }
            let l = SimulationLane(simulation: self, number: n)
            lanes[n] = l
            return l
        }
    }

    /// Holds lane `n`'s jobs (queued and future) until `resume(n)`.
    public func pause(_ n: Int) { lock.withLock { _ in _ = paused.insert(n) } }

    public func resume(_ n: Int) { lock.withLock { _ in _ = paused.remove(n) } }

    public func isPaused(_ n: Int) -> Bool { lock.withLock { _ in paused.contains(n) } }

    /// Runs runnable jobs, each picked by the seed among those waiting, until none is left.
    /// Returns how many ran.
    @discardableResult
    public func runUntilIdle() -> Int {
        var ran = 0
        while let (next, executor) = lock.withLock({ rng -> (Pending, UnownedTaskExecutor)? in
            let index: Int
            if paused.isEmpty {
                guard !pending.isEmpty else { return nil }
                index = Int(rng.next(below: UInt64(pending.count)))
            } else {
                let runnable = pending.indices.filter { !paused.contains(pending[$0].lane) }
                guard !runnable.isEmpty else { return nil }
                index = runnable[Int(rng.next(below: UInt64(runnable.count)))]
            }
            let p = pending.remove(at: index)
            return (p, p.lane == 0 ? asUnownedTaskExecutor() : (lanes[p.lane]?.asUnownedTaskExecutor() ?? asUnownedTaskExecutor()))
        }) {
            if let serial = next.serial {
                next.job.runSynchronously(isolatedTo: serial, taskExecutor: executor)
            } else {
                next.job.runSynchronously(on: executor)
            }
            ran += 1
        }
        return ran
    }
}

/// One lane of a `SimulationExecutor`: a task executor whose jobs run on the simulation's thread
/// in seed order, held while the lane is paused. Thread-safe.
public final class SimulationLane: TaskExecutor, @unchecked Sendable {
    // @unchecked: immutable after init.
    unowned let simulation: SimulationExecutor
    public let number: Int

    init(simulation: SimulationExecutor, number: Int) {
        self.simulation = simulation
        self.number = number
    }

    public func enqueue(_ job: UnownedJob) {
        simulation.enqueue(job, lane: number, isolatedTo: nil)
    }
}

/// Why a simulation ended without its body finishing.
public enum SimulationStop: Error, Sendable, Equatable {
    /// Nothing was runnable and nobody slept on the clock: the body waits for something that
    /// cannot happen (or happens outside the simulation).
    case stuck(after: Duration)
    /// The body was still running when virtual time reached the limit.
    case timeLimit(Duration)
}

/// Runs `body` on `executor`, on `clock`: runnable jobs run until none is left, then virtual time
/// jumps to the next deadline anyone sleeps until, and so on, until `body` returns. Blocks the
/// calling thread (it is the simulation's only thread). Everything the body starts must prefer
/// `executor` (structured child tasks do; unstructured ones must be created with it).
public func simulate<T: Sendable>(on executor: SimulationExecutor, clock: ManualClock, limit: Duration,
                                  _ body: @escaping @Sendable () async -> T) throws(SimulationStop) -> T {
    let result = Mutex<T?>(nil)
    let task = Task(executorPreference: executor) {
        let value = await body()
        result.withLock { $0 = value }
    }
    _ = task
    while true {
        executor.runUntilIdle()
        if let value = result.withLock({ $0 }) { return value }
        guard let next = clock.nextDeadline else { throw .stuck(after: clock.elapsed) }
        guard clock.elapsed < limit else { throw .timeLimit(limit) }
        clock.advance(to: next)
    }
}
