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

    public func sleep(until deadline: ContinuousClock.Instant) async throws {
        try await Task.sleep(until: deadline, clock: .continuous)
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
    private struct Sleeper {
        let id: UInt64
        let deadline: ContinuousClock.Instant
        let continuation: CheckedContinuation<Void, any Error>
    }

    private struct State {
        var now: ContinuousClock.Instant
        var wallOrigin: UInt64
        var sleepers: [Sleeper] = []
        var nextID: UInt64 = 0
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
    public var sleeping: Int { state.withLock { $0.sleepers.count } }

    /// The earliest deadline anyone sleeps until, if anyone sleeps.
    public var nextDeadline: ContinuousClock.Instant? { state.withLock { $0.sleepers.map(\.deadline).min() } }

    public func sleep(until deadline: ContinuousClock.Instant) async throws {
        let id: UInt64 = state.withLock { s in
            defer { s.nextID += 1 }
            return s.nextID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
                let resumeNow: Bool = state.withLock { s in
                    if deadline <= s.now { return true }
                    s.sleepers.append(Sleeper(id: id, deadline: deadline, continuation: c))
                    return false
                }
                if resumeNow { c.resume() }
            }
        } onCancel: {
            let cancelled: Sleeper? = state.withLock { s in
                guard let i = s.sleepers.firstIndex(where: { $0.id == id }) else { return nil }
                return s.sleepers.remove(at: i)
            }
            cancelled?.continuation.resume(throwing: CancellationError())
        }
    }

    /// Moves time forward to `instant` (no-op if it has passed) and resumes every sleeper whose
    /// deadline it reaches.
    public func advance(to instant: ContinuousClock.Instant) {
        advance(by: now().duration(to: instant))
    }

    /// Moves time forward by `duration` and resumes every sleeper whose deadline it reaches.
    public func advance(by duration: Duration) {
        let due: [Sleeper] = state.withLock { s in
            s.now = s.now.advanced(by: max(duration, .zero))
            let now = s.now
            let ready = s.sleepers.filter { $0.deadline <= now }
            s.sleepers.removeAll { $0.deadline <= now }
            return ready.sorted { ($0.deadline, $0.id) < ($1.deadline, $1.id) }
        }
        for sleeper in due { sleeper.continuation.resume() }
    }
}
