#if canImport(Glibc)
import Glibc
#endif
import CairnCore

/// The node's time: monotonic instants, sleeps, and wall-clock timestamps. Deadlines, backoffs,
/// drain and readiness waits, the watchdog and write timestamps read it, so a node can run on
/// virtual time (`ManualClock`) as well as on the machine's (`SystemClock`).
///
/// Contract: `now()` never goes backwards; `sleep(until:)` returns at or after `deadline` as this
/// clock measures it, and throws `CancellationError` promptly when the calling task is cancelled.
/// Thread-safe.
public protocol NodeClock: Sendable {
    func now() -> ContinuousClock.Instant
    func sleep(until deadline: ContinuousClock.Instant) async throws
    /// Milliseconds since the Unix epoch (write timestamps: informational, never decide a winner).
    func wallMillis() -> UInt64
}

extension NodeClock {
    public func sleep(for duration: Duration) async throws {
        try await sleep(until: now().advanced(by: duration))
    }
}

/// The machine's clocks: `ContinuousClock` and `CLOCK_REALTIME`.
public struct SystemClock: NodeClock {
    public init() {}

    public func now() -> ContinuousClock.Instant { .now }

    /// On the process's `TimerQueue`: one thread and one heap for every sleep, not a Dispatch
    /// timer per sleep (request deadlines are armed and cancelled at the request rate).
    public func sleep(until deadline: ContinuousClock.Instant) async throws {
        try await TimerQueue.shared.sleep(until: deadline)
    }

    public func wallMillis() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return UInt64(max(ts.tv_sec, 0)) * 1000 + UInt64(max(ts.tv_nsec, 0)) / 1_000_000
    }
}

/// Virtual time that moves only when told (`advance(by:)`): sleepers whose deadline is reached
/// resume, in deadline order (ties: the order they went to sleep). For tests and the simulator.
///
/// Invariant: a sleeper is resumed exactly once — by `advance`, or with `CancellationError` when
/// its task is cancelled. Thread-safe.
public final class ManualClock: NodeClock {
    /// Sleepers by (deadline, id) in a binary min-heap; `waiting` holds the live ones (a
    /// cancelled sleeper leaves its heap entry behind, skipped when it surfaces).
    private struct State {
        var now: ContinuousClock.Instant
        var wallOrigin: UInt64
        var heap: [(deadline: ContinuousClock.Instant, id: UInt64)] = []
        var waiting: [UInt64: CheckedContinuation<Void, any Error>] = [:]
        var nextID: UInt64 = 0

        static func before(_ a: (deadline: ContinuousClock.Instant, id: UInt64), _ b: (deadline: ContinuousClock.Instant, id: UInt64)) -> Bool {
            a.deadline < b.deadline || (a.deadline == b.deadline && a.id < b.id)
        }

        mutating func push(_ e: (deadline: ContinuousClock.Instant, id: UInt64)) {
            heap.append(e)
            var i = heap.count - 1
            while i > 0 {
                let parent = (i - 1) / 2
                guard Self.before(heap[i], heap[parent]) else { break }
                heap.swapAt(i, parent)
                i = parent
            }
        }

        mutating func popMin() -> (deadline: ContinuousClock.Instant, id: UInt64)? {
            guard let last = heap.popLast() else { return nil }
            guard !heap.isEmpty else { return last }
            let top = heap[0]
            heap[0] = last
            var i = 0
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                if l < heap.count, Self.before(heap[l], heap[m]) { m = l }
                if r < heap.count, Self.before(heap[r], heap[m]) { m = r }
                if m == i { break }
                heap.swapAt(i, m)
                i = m
            }
            return top
        }

        /// Drops cancelled entries from the top; returns the earliest live one.
        mutating func peekLive() -> (deadline: ContinuousClock.Instant, id: UInt64)? {
            while let top = heap.first {
                if waiting[top.id] != nil { return top }
                _ = popMin()
            }
            return nil
        }
    }

    private let origin: ContinuousClock.Instant
    private let state: Locked<State>

    /// Starts at the machine's current instant (any origin works: only differences matter) and
    /// at `wallMillis` on the wall clock.
    public init(wallMillis: UInt64 = 1_700_000_000_000) {
        let start = ContinuousClock.now
        origin = start
        state = Locked(State(now: start, wallOrigin: wallMillis))
    }

    public func now() -> ContinuousClock.Instant { state.withLock { $0.now } }

    public func wallMillis() -> UInt64 {
        state.withLock { s in
            let elapsed = origin.duration(to: s.now).components
            return s.wallOrigin &+ UInt64(max(elapsed.seconds, 0)) &* 1000 &+ UInt64(max(elapsed.attoseconds, 0) / 1_000_000_000_000_000)
        }
    }

    /// Virtual time elapsed since this clock was made.
    public var elapsed: Duration { origin.duration(to: now()) }

    /// Sleepers waiting now.
    public var sleeping: Int { state.withLock { $0.waiting.count } }

    /// The earliest deadline anyone sleeps until, if anyone sleeps.
    public var nextDeadline: ContinuousClock.Instant? { state.withLock { $0.peekLive()?.deadline } }

    public func sleep(until deadline: ContinuousClock.Instant) async throws {
        let id: UInt64 = state.withLock { s in
            defer { s.nextID += 1 }
            return s.nextID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
                // A task cancelled before this point ran `onCancel` with nothing to resume: it
                // must not go to sleep (it would sleep to its deadline, however far).
                let (resumeNow, cancelled): (Bool, Bool) = state.withLock { s in
                    if Task.isCancelled { return (false, true) }
                    if deadline <= s.now { return (true, false) }
                    s.waiting[id] = c
                    s.push((deadline, id))
                    return (false, false)
                }
                if cancelled { c.resume(throwing: CancellationError()) } else if resumeNow { c.resume() }
            }
        } onCancel: {
            state.withLock { $0.waiting.removeValue(forKey: id) }?.resume(throwing: CancellationError())
        }
    }

    /// Moves time forward to `instant` (no-op if it has passed) and resumes every sleeper whose
    /// deadline it reaches.
    public func advance(to instant: ContinuousClock.Instant) {
        advance(by: now().duration(to: instant))
    }

    /// Moves time forward by `duration` and resumes every sleeper whose deadline it reaches.
    public func advance(by duration: Duration) {
        let due: [CheckedContinuation<Void, any Error>] = state.withLock { s in
            s.now = s.now.advanced(by: max(duration, .zero))
            var ready: [CheckedContinuation<Void, any Error>] = []
            while let top = s.peekLive(), top.deadline <= s.now {
                _ = s.popMin()
                if let c = s.waiting.removeValue(forKey: top.id) { ready.append(c) }
            }
            return ready
        }
        for c in due { c.resume() }
    }
}
