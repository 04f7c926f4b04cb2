public import CairnNode
public import CairnStorage
import Synchronization

/// The storage engine's environment inside a simulation: its request executors (the vnodes of a
/// disk store), background workers, group-commit syncs and timers run as jobs of the simulation's executor, and it waits on the simulation's
/// clock, so a database's flushes, compactions and syncs interleave with everything else in the
/// order the seed fixes. The compaction rate limit is the one part still on real time: run
/// simulated databases with `compactionBytesPerSecond = 0`. Thread-safe.
public struct SimulatedStorageEnvironment: StorageEnvironment {
    let executor: SimulationExecutor
    let clock: ManualClock
    /// The lane the engine's work runs on (its node's: pausing the node pauses its disk work).
    let lane: Int

    public init(executor: SimulationExecutor, clock: ManualClock, lane: Int = 0) {
        self.executor = executor
        self.clock = clock
        self.lane = lane
    }

    /// The task executor of `lane`.
    private var preferred: any TaskExecutor { lane == 0 ? executor : executor.lane(lane) }

    public func makeWorkerExecutor(label: String) -> any SerialExecutor { SimulatedSerialExecutor(executor, lane: lane) }

    /// Two, whatever the machine: the same seed gives the same run on any host.
    public func makeRequestExecutors(label: String) -> [any SerialExecutor] {
        [SimulatedSerialExecutor(executor, lane: lane), SimulatedSerialExecutor(executor, lane: lane)]
    }

    public func makeQueue(label: String) -> any BlockingQueue { SimulatedQueue(executor: preferred) }

    public func spawn(_ body: @escaping @Sendable () async -> Void) -> Task<Void, Never> {
        Task(executorPreference: preferred) { await body() }
    }

    public func sleep(for duration: Duration) async throws { try await clock.sleep(for: duration) }

    /// Nothing to hand back that matters to a simulation (and `malloc_trim` is slow).
    public func releaseFreeMemory() {}
}

/// An actor's serial executor whose jobs run on the simulation's thread, picked by its seed.
final class SimulatedSerialExecutor: SerialExecutor {
    let simulation: SimulationExecutor
    let lane: Int
    init(_ simulation: SimulationExecutor, lane: Int = 0) {
        self.simulation = simulation
        self.lane = lane
    }

    func enqueue(_ job: consuming ExecutorJob) {
        simulation.enqueue(UnownedJob(job), lane: lane, isolatedTo: asUnownedSerialExecutor())
    }

    func asUnownedSerialExecutor() -> UnownedSerialExecutor { UnownedSerialExecutor(ordinary: self) }
}

/// A `BlockingQueue` drained, in order, by one simulation task at a time.
final class SimulatedQueue: BlockingQueue {
    private struct State {
        var work: [@Sendable () -> Void] = []
        var draining = false
    }
    private let executor: any TaskExecutor
    private let state = Mutex(State())

    init(executor: any TaskExecutor) { self.executor = executor }

    func async(_ work: @escaping @Sendable () -> Void) {
        let start: Bool = state.withLock { s in
            s.work.append(work)
            defer { s.draining = true }
            return !s.draining
        }
        guard start else { return }
        Task(executorPreference: executor) { self.drain() }
    }

    private func drain() {
        while let next = state.withLock({ s -> (@Sendable () -> Void)? in
            if s.work.isEmpty {
                s.draining = false
                return nil
            }
            return s.work.removeFirst()
        }) {
            next()
        }
    }
}

/// A node's wall-clock offset from the simulation's, in milliseconds; settable while the node
/// runs. Thread-safe.
public final class WallOffset: Sendable {
    private let millis = Atomic<Int64>(0)
    public init() {}
    public func set(_ value: Int64) { millis.store(value, ordering: .relaxed) }
    public var value: Int64 { millis.load(ordering: .relaxed) }
}

/// A node's view of a shared simulation clock whose wall clock is `offset` off (clock skew
/// between machines): monotonic time and sleeps are the shared clock's. Write timestamps read
/// the skewed wall clock; nothing may decide by them. Thread-safe.
public struct SkewedClock: NodeClock {
    let base: ManualClock
    let offset: WallOffset

    public init(base: ManualClock, offset: WallOffset) {
        self.base = base
        self.offset = offset
    }

    public func now() -> ContinuousClock.Instant { base.now() }
    public func sleep(until deadline: ContinuousClock.Instant) async throws { try await base.sleep(until: deadline) }
    public func wallMillis() -> UInt64 {
        let w = base.wallMillis(), o = offset.value
        return o >= 0 ? w &+ UInt64(o) : w &- min(w, o.magnitude)
    }
}
