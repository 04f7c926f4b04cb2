#if canImport(Glibc)
import Glibc
#endif
import CStorageSupport
import Dispatch
import Synchronization

/// A serial executor that also runs plain closures, serialized with its jobs: a closure it runs
/// is isolated to every actor on the executor (`Actor.assumeIsolated` holds in it).
public protocol ClosureExecutor: SerialExecutor {
    /// Runs `work` on the executor, after the jobs and closures queued before it.
    func execute(_ work: @escaping @Sendable () -> Void)
}

/// A serial executor with one thread of its own, outside Swift's cooperative pool and Dispatch's:
/// its jobs run one at a time, in enqueue order, on that thread. Actors that make blocking engine
/// calls on the request path (a partition store's vnodes) run on it, so a read that misses the
/// block cache or a log append never occupies a thread that serves requests.
///
/// The thread parks on a semaphore when idle (a wake-up is one futex call) and exits once the
/// executor is released and its queue is empty. `isIsolatingCurrentContext()` answers whether
/// the caller runs on the thread (so `Actor.assumeIsolated` works there). It also runs plain
/// closures (`execute`), in one order with its jobs: an event loop hands a vnode's work straight
/// to the vnode's thread without making a task. Thread-safe.
public final class ThreadExecutor: ClosureExecutor {
    /// What the thread and the enqueuers share; the thread holds it, not the executor.
    private final class Core: Sendable {
        enum Work {
            case job(UnownedJob)
            case closure(@Sendable () -> Void)
        }
        struct State {
            var jobs: [Work] = []
            /// `runAfterBatch` work: runs once the batch being run ends, before the next one.
            /// Bounded by its callers: group commit queues at most one sync per log committer
            /// (a committer leads one sync at a time).
            var afterBatch: [@Sendable () -> Void] = []
            var sleeping = false
            var stopping = false
        }
        let state = Mutex(State())
        /// The thread's id once it runs (0 before): read by `isCurrent` on every `…Soon` call of
        /// a vnode, so outside the lock every enqueue and dequeue takes.
        let thread = Atomic<UInt>(0)
        let wake = DispatchSemaphore(value: 0)
        /// The executor the jobs run on; set once, before the first job can be enqueued.
        let executor = Mutex<UnownedSerialExecutor?>(nil)
        let name: String
        /// The thread's nice value (0: as the process).
        let nice: Int32
        /// Whether `runAfterBatch` may queue work here (request executors: a log sync led here).
        let runsAfterBatchWork: Bool

        init(name: String, nice: Int32, runsAfterBatchWork: Bool) {
            self.name = name
            self.nice = nice
            self.runsAfterBatchWork = runsAfterBatchWork
        }

        /// `ownThread`: the loop runs on a thread made for it (not one borrowed from Dispatch,
        /// which would keep a lowered priority after the loop ends).
        func loop(ownThread: Bool) {
            cairn_set_thread_name(name)
            // Best effort: a refused change (a container's limits) leaves the thread as it was.
            if ownThread, nice != 0 { _ = cairn_set_thread_nice(nice) }
            thread.store(UInt(pthread_self()), ordering: .releasing)
            // After-batch work given on this thread joins `afterBatch`, run before the next batch.
            if runsAfterBatchWork {
                ThreadExecutor.installAfterBatch(onCurrentThread: { work in self.state.withLock { $0.afterBatch.append(work) } })
            }
            defer { if runsAfterBatchWork { ThreadExecutor.removeAfterBatch() } }
            while true {
                enum Step { case work([Work]), afterBatch([@Sendable () -> Void]), sleep, stop }
                let step: Step = state.withLock { s in
                    // Work queued by `runAfterBatch` runs before the next batch: it waits for at
                    // most the batch that queued it, never for a queue that keeps filling.
                    if !s.afterBatch.isEmpty {
                        defer { s.afterBatch = [] }
                        return .afterBatch(s.afterBatch)
                    }
                    if s.jobs.isEmpty {
                        if s.stopping { return .stop }
                        s.sleeping = true
                        return .sleep
                    }
                    defer { s.jobs = [] }
                    return .work(s.jobs)
                }
                let next: [Work]
                switch step {
                case .sleep:
                    wake.wait()
                    continue
                case .stop:
                    return
                case .afterBatch(let work):
                    for w in work { w() }
                    continue
                case .work(let w):
                    next = w
                }
                guard let executor = executor.withLock({ $0 }) else { continue }
                for work in next {
                    switch work {
                    case .job(let job): job.runSynchronously(on: executor)
                    case .closure(let body): body()
                    }
                }
            }
        }

        /// Queues `job`; wakes the thread if it sleeps.
        func push(_ job: Work) {
            let signal: Bool = state.withLock { s in
                s.jobs.append(job)
                defer { s.sleeping = false }
                return s.sleeping
            }
            if signal { wake.signal() }
        }

        func stop() {
            let signal: Bool = state.withLock { s in
                s.stopping = true
                defer { s.sleeping = false }
                return s.sleeping
            }
            if signal { wake.signal() }
        }

        var isCurrent: Bool {
            let t = thread.load(ordering: .acquiring)
            return t != 0 && pthread_equal(pthread_t(t), pthread_self()) != 0
        }
    }

    private let core: Core

    /// Queues `work` to run on the calling thread as soon as the batch of jobs it is running
    /// ends (the jobs that were queued when the batch began), before any job queued since —
    /// when the caller runs on a `ThreadExecutor` made with `runsAfterBatchWork` or on a thread
    /// given a hook (`installAfterBatch`: an event loop vnodes run on); returns false (and does
    /// nothing) anywhere else. Group commit uses it so the thread that appended a batch of
    /// log records syncs them itself after the batch, with no hand-off to a sync thread and back;
    /// a queue that keeps filling never postpones it past one batch.
    public static func runAfterBatch(_ work: @escaping @Sendable () -> Void) -> Bool {
        guard let hook = pthread_getspecific(hookKey) else { return false }
        Unmanaged<AfterBatchHook>.fromOpaque(hook).takeUnretainedValue().schedule(work)
        return true
    }

    /// Makes `runAfterBatch` on the calling thread hand its work to `schedule` (replacing an
    /// earlier hook of the thread). A request `ThreadExecutor` sets its own while its loop runs;
    /// an event loop that vnodes run on is given one: `schedule` must run the work on this thread
    /// after the work it is running now (the loop's `execute`).
    public static func installAfterBatch(onCurrentThread schedule: @escaping @Sendable (@escaping @Sendable () -> Void) -> Void) {
        removeAfterBatch()
        pthread_setspecific(hookKey, Unmanaged.passRetained(AfterBatchHook(schedule)).toOpaque())
    }

    /// Removes the calling thread's hook, if any.
    static func removeAfterBatch() {
        guard let old = pthread_getspecific(hookKey) else { return }
        pthread_setspecific(hookKey, nil)
        Unmanaged<AfterBatchHook>.fromOpaque(old).release()
    }

    /// The thread-specific slot holding a thread's after-batch hook (released when the thread
    /// exits).
    private static let hookKey: pthread_key_t = {
        var key = pthread_key_t()
        _ = pthread_key_create(&key) { hook in
            guard let hook else { return }
            Unmanaged<AfterBatchHook>.fromOpaque(hook).release()
        }
        return key
    }()

    private final class AfterBatchHook: Sendable {
        let schedule: @Sendable (@escaping @Sendable () -> Void) -> Void
        init(_ schedule: @escaping @Sendable (@escaping @Sendable () -> Void) -> Void) { self.schedule = schedule }
    }

    /// Starts the thread, named `label` (truncated to 15 bytes in the OS's thread list), at
    /// `nice` (0: the process's priority; higher: the scheduler favours other threads).
    /// `runsAfterBatchWork`: `runAfterBatch` called on the thread queues its work here.
    public init(label: String, nice: Int32 = 0, runsAfterBatchWork: Bool = false) {
        core = Core(name: label, nice: nice, runsAfterBatchWork: runsAfterBatchWork)
        core.executor.withLock { $0 = UnownedSerialExecutor(ordinary: self) }
        let box = Unmanaged.passRetained(core).toOpaque()
        var thread = pthread_t()
        let started = pthread_create(&thread, nil, { arg in
            guard let arg else { return nil }
            Unmanaged<Core>.fromOpaque(arg).takeRetainedValue().loop(ownThread: true)
            return nil
        }, box)
        if started == 0 {
            pthread_detach(thread)
        } else {
            // No thread to be had (a process at its limit): run jobs on Dispatch's pool instead,
            // still one at a time, still off the cooperative pool.
            Unmanaged<Core>.fromOpaque(box).release()
            let core = core
            DispatchQueue(label: label).async { core.loop(ownThread: false) }
        }
    }

    deinit { core.stop() }

    public func enqueue(_ job: consuming ExecutorJob) { core.push(.job(UnownedJob(job))) }

    public func execute(_ work: @escaping @Sendable () -> Void) { core.push(.closure(work)) }

    public func asUnownedSerialExecutor() -> UnownedSerialExecutor { UnownedSerialExecutor(ordinary: self) }

    /// Whether the caller runs on this executor's thread.
    public func isIsolatingCurrentContext() -> Bool? { core.isCurrent }
}
