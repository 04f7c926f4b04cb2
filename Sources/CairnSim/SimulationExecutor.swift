public import CairnNode
import CairnCore
import Synchronization

/// A single-threaded task executor whose next job is chosen by a seeded generator: with it as the
/// task executor preference, default actors and structured child tasks run one job at a time in
/// an order the seed fixes, so the same seed replays the same interleaving.
///
/// Jobs may be enqueued from any thread (a resumed continuation, a timer); they run only inside
/// `runUntilIdle`, on the calling thread. Thread-safe.
public final class SimulationExecutor: TaskExecutor, @unchecked Sendable {
    /// A job and the serial executor it was enqueued on (nil: a task-executor job).
    private struct Pending {
        let job: UnownedJob
        let serial: UnownedSerialExecutor?
    }

    // @unchecked: `pending` is only touched under `lock`; `UnownedJob` is not Sendable by type.
    private let lock = Mutex(SplitMix64(seed: 0))
    private var pending: [Pending] = []

    public init(seed: UInt64) {
        lock.withLock { $0 = SplitMix64(seed: seed) }
    }

    public func enqueue(_ job: UnownedJob) {
        lock.withLock { _ in pending.append(Pending(job: job, serial: nil)) }
    }

    /// A job of an actor whose serial executor is `executor` (a `SimulatedSerialExecutor`).
    func enqueue(_ job: UnownedJob, isolatedTo executor: UnownedSerialExecutor) {
        lock.withLock { _ in pending.append(Pending(job: job, serial: executor)) }
    }

    /// Runs runnable jobs, each picked by the seed among those waiting, until none is left.
    /// Returns how many ran.
    @discardableResult
    public func runUntilIdle() -> Int {
        var ran = 0
        while let next = lock.withLock({ rng -> Pending? in
            guard !pending.isEmpty else { return nil }
            return pending.remove(at: Int(rng.next(below: UInt64(pending.count))))
        }) {
            if let serial = next.serial {
                next.job.runSynchronously(isolatedTo: serial, taskExecutor: asUnownedTaskExecutor())
            } else {
                next.job.runSynchronously(on: asUnownedTaskExecutor())
            }
            ran += 1
        }
        return ran
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
