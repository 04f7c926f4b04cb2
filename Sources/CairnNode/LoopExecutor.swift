import CairnStorage
import NIOCore

/// A NIO event loop as a vnode's executor (`storage.request_threads = 0`): the vnodes of a
/// partition run their jobs and closures on the loop's thread, in one order with the loop's
/// other tasks, so a request whose vnode lives on the loop that read it never changes thread.
///
/// Invariant: jobs and closures go through the loop's task queue (never run on the caller's
/// stack), so a closure queued from inside a vnode job runs after that job. Thread-safe.
final class LoopExecutor: ClosureExecutor {
    let loop: any EventLoop

    init(_ loop: any EventLoop) { self.loop = loop }

    /// Runs the job as this executor's (not the loop's own), so the runtime sees a vnode's jobs
    /// on the vnode's executor.
    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        let me = asUnownedSerialExecutor()
        loop.execute { job.runSynchronously(on: me) }
    }

    func execute(_ work: @escaping @Sendable () -> Void) { loop.execute(work) }

    func asUnownedSerialExecutor() -> UnownedSerialExecutor { UnownedSerialExecutor(complexEquality: self) }

    func isSameExclusiveExecutionContext(other: LoopExecutor) -> Bool { loop === other.loop }

    /// Whether the caller runs on the loop's thread.
    func isIsolatingCurrentContext() -> Bool? { loop.inEventLoop }

    func checkIsolated() { loop.preconditionInEventLoop() }
}

/// The machine's storage environment with the event loops as request executors
/// (`storage.request_threads = 0`): engine point calls (reads that miss the block cache, log
/// appends) run on the loops and block them while they run, as Redis's do; background work
/// stays on threads of its own (`base`).
///
/// On each loop, a log sync a vnode leads (group commit) runs after the loop's current tasks
/// (`ThreadExecutor.installAfterBatch`): the writes the loop read in one pass share one
/// `fdatasync`, and no other thread is woken for it or for the replies. The loop serves nothing
/// else while the sync runs, so the sync waits one more hop: past every task queued before it
/// ran, the reply batches of the whole pass among them (a write stamped early in a pass leads
/// the sync, and the replies to reads read later in the same pass would otherwise wait for the
/// disk). The hook stays with the loop's thread for its life: any group
/// commit led there later syncs on it too. The vnodes must stop before the loops do (a job
/// queued to a loop that has shut down never runs); `CairnNode.run` closes the store first.
struct EventLoopStorageEnvironment: StorageEnvironment {
    let base: ThreadEnvironment
    let loops: [any EventLoop]

    func makeWorkerExecutor(label: String) -> any SerialExecutor { base.makeWorkerExecutor(label: label) }

    /// One per loop. Each loop's after-batch hook is installed by a task queued ahead of any job
    /// an executor returned here can receive.
    func makeRequestExecutors(label: String) -> [any SerialExecutor] {
        loops.map { loop in
            loop.execute { ThreadExecutor.installAfterBatch(onCurrentThread: { work in loop.execute { loop.execute(work) } }) }
            return LoopExecutor(loop)
        }
    }

    func makeQueue(label: String) -> any BlockingQueue { base.makeQueue(label: label) }
    func spawn(_ body: @escaping @Sendable () async -> Void) -> Task<Void, Never> { base.spawn(body) }
    func sleep(for duration: Duration) async throws { try await base.sleep(for: duration) }
    func releaseFreeMemory() { base.releaseFreeMemory() }
}
