import CStorageSupport
import Dispatch
#if canImport(Glibc)
import Glibc
#endif

/// Where the engine's work runs and how it waits (LevelDB's `Env`, minus the files: those are
/// `FileSystem`). `ThreadEnvironment` is the machine's: each background worker, the log-sync queue
/// and each request executor get a thread of their own, outside Swift's cooperative pool, and
/// waits are real. A simulation supplies one that runs all of it on its seeded thread and virtual
/// clock, so a database's reads, writes, flushes, compactions and group commits replay in the same
/// order for the same seed.
///
/// Contract: work given to one `BlockingQueue` runs in submission order, never on the caller's
/// stack; a worker or request executor runs its jobs one at a time; `sleep` throws
/// `CancellationError` promptly when its task is cancelled. Thread-safe.
public protocol StorageEnvironment: Sendable {
    /// A serial executor for one background worker (flushes, or compactions). Its jobs block on
    /// file I/O, so on the machine it must not share threads with request handling.
    func makeWorkerExecutor(label: String) -> any SerialExecutor
    /// Serial executors (at least one) for engine calls on the request path: the reads and log
    /// appends of a store's callers, who run on them instead of blocking the cooperative pool.
    /// How many is the environment's choice (the machine's: one per core, up to four).
    func makeRequestExecutors(label: String) -> [any SerialExecutor]
    /// A queue for blocking work submitted by callers that must not block (group-commit syncs).
    func makeQueue(label: String) -> any BlockingQueue
    /// Starts a top-level task for the engine (a worker's loop, the interval-sync timer).
    func spawn(_ body: @escaping @Sendable () async -> Void) -> Task<Void, Never>
    /// Suspends the calling task (retry backoff, the level-0 slowdown, the interval-sync timer).
    func sleep(for duration: Duration) async throws
    /// Hands freed heap pages back to the OS (once, after `open` replayed the logs). Blocks every
    /// thread's allocations while it runs: never on a hot path.
    func releaseFreeMemory()
}

/// Blocking work, run later in submission order. Thread-safe.
public protocol BlockingQueue: Sendable {
    func async(_ work: @escaping @Sendable () -> Void)
}

/// The machine's environment: dispatch queues (threads outside the cooperative pool) for
/// background work, a thread of its own per request executor, `Task.sleep` for waits.
public struct ThreadEnvironment: StorageEnvironment {
    /// Request executors made by `makeRequestExecutors` (each a thread).
    public let requestThreads: Int
    /// The nice value of the worker threads (`makeWorkerExecutor`: flush, compaction, bulk scans).
    public let backgroundNice: Int32

    /// `requestThreads`: default one per online core, at most four. `backgroundNice`: 0…19,
    /// the worker threads' nice value (`storage.background_nice`): on a busy machine the
    /// scheduler then gives request threads the CPU first, and a flush or merge takes longer.
    public init(requestThreads: Int? = nil, backgroundNice: Int32 = 0) {
        self.requestThreads = max(1, requestThreads ?? min(4, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))))
        self.backgroundNice = min(max(backgroundNice, 0), 19)
    }

    /// A thread of its own per worker, at `backgroundNice`.
    public func makeWorkerExecutor(label: String) -> any SerialExecutor { ThreadExecutor(label: label, nice: backgroundNice) }

    public func makeRequestExecutors(label: String) -> [any SerialExecutor] {
        (0..<requestThreads).map { ThreadExecutor(label: "\(label).\($0)", runsAfterBatchWork: true) }
    }

    public func makeQueue(label: String) -> any BlockingQueue { DispatchBlockingQueue(label: label) }

    public func spawn(_ body: @escaping @Sendable () async -> Void) -> Task<Void, Never> { Task { await body() } }

    public func sleep(for duration: Duration) async throws { try await Task.sleep(for: duration) }

    public func releaseFreeMemory() { cairn_release_free_memory() }
}

/// A dispatch queue as a `BlockingQueue`.
struct DispatchBlockingQueue: BlockingQueue {
    let queue: DispatchQueue
    init(label: String) { queue = DispatchQueue(label: label) }
    func async(_ work: @escaping @Sendable () -> Void) { queue.async(execute: work) }
}
