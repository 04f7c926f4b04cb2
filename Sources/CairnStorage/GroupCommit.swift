import Synchronization

/// Group commit: writers that need their log records durable share one `fdatasync`.
///
/// Writers append to the log (cheap, in order) and call `noteAppended(upTo:)`; a writer that must
/// not be acknowledged before its record is durable awaits `waitDurable(upTo:)`. The first waiter
/// starts a sync, never on Swift's cooperative pool (`fdatasync` blocks for 0.1–0.2 ms here): on
/// its own thread when that is a request `ThreadExecutor`'s or an event loop its vnodes run on,
/// once the batch of work that thread is running ends (`ThreadExecutor.runAfterBatch`: the
/// appends of the rest of the batch join the same sync, and no thread is woken for it), one sync
/// per turn, else on the sync queue. Everything appended
/// before the sync started becomes durable with it, and writers that arrive while it runs are
/// covered by the next one. So N concurrent writers cost about log2-to-1 syncs instead of N.
///
/// After a failed sync every current and future waiter fails with `writesRefused` (fsyncgate).
/// Thread-safe.
public final class GroupCommitter: Sendable {
    struct Waiter {
        let sequence: UInt64
        /// Called once, outside the lock: nil when durable, else why not.
        let done: @Sendable ((any Error)?) -> Void
    }

    struct State {
        var appended: UInt64 = 0
        var durable: UInt64 = 0
        var syncing = false
        var waiters: [Waiter] = []
        var failure: StorageError?
        var syncs = 0
    }

    private let state: Mutex<State>
    private let sync: @Sendable () throws(StorageError) -> Void
    private let queue: any BlockingQueue

    /// `durable`: the sequence already durable (e.g. after recovery). `sync` makes everything
    /// appended so far durable (the log writer's `fdatasync`); it runs on `queue`.
    public init(durable: UInt64 = 0, queue: any BlockingQueue = ThreadEnvironment().makeQueue(label: "cairn.storage.group-commit"),
                sync: @escaping @Sendable () throws(StorageError) -> Void) {
        state = Mutex(State(appended: durable, durable: durable))
        self.sync = sync
        self.queue = queue
    }

    /// Records that the log holds everything up to `sequence` (not yet durable).
    public func noteAppended(upTo sequence: UInt64) {
        state.withLock { $0.appended = max($0.appended, sequence) }
    }

    /// Records that everything up to `sequence` was made durable by a sync outside this committer
    /// (the engine syncs a log before switching to a new one), releasing its waiters. Their
    /// callbacks run on the sync queue, never on this caller's thread: the engine calls this
    /// holding its own locks, and a callback may take them (`Database.whenDurable` does).
    public func markDurable(upTo sequence: UInt64) {
        let ready: [Waiter] = state.withLock { s in
            s.durable = max(s.durable, sequence)
            let ready = s.waiters.filter { $0.sequence <= s.durable }
            s.waiters.removeAll { $0.sequence <= s.durable }
            return ready
        }
        guard !ready.isEmpty else { return }
        queue.async { for w in ready { w.done(nil) } }
    }

    public var durableSequence: UInt64 { state.withLock { $0.durable } }
    /// Syncs performed so far (for metrics and tests).
    public var syncCount: Int { state.withLock { $0.syncs } }

    /// Returns once everything up to `sequence` is durable; throws if a sync failed.
    ///
    /// `onCallerThread`: when no sync is running, the caller leads: it runs the `fdatasync` (and
    /// any follow-up syncs for writers that queued meanwhile) on its own thread, with no hop to
    /// the sync queue and back (LevelDB's leader-writer). Faster for a lone synchronous writer,
    /// but it blocks a cooperative-pool thread for the length of the sync; the node keeps the
    /// default (off the pool).
    public func waitDurable(upTo sequence: UInt64, onCallerThread: Bool = false) async throws {
        if onCallerThread {
            let lead: Bool = try state.withLock { s throws in
                if let f = s.failure { throw StorageError.writesRefused("an earlier log sync failed (\(f))") }
                if s.durable >= sequence || s.syncing { return false }
                s.syncing = true
                return true
            }
            if lead {
                runSyncs()
                let (done, failure) = state.withLock { ($0.durable >= sequence, $0.failure) }
                if done { return }
                if let failure { throw failure }
            }
        }
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
            whenDurable(upTo: sequence) { error in
                if let error { c.resume(throwing: error) } else { c.resume() }
            }
        }
    }

    /// Calls `done` once everything up to `sequence` is durable (nil), or a sync failed (the
    /// error): at once on the caller's thread when it already is, else on the sync queue after
    /// the sync that covers it. For callers that must not suspend (an event loop's fast path).
    public func whenDurable(upTo sequence: UInt64, _ done: @escaping @Sendable ((any Error)?) -> Void) {
        enum Next { case now((any Error)?), wait, lead }
        let next: Next = state.withLock { s in
            if let f = s.failure { return .now(StorageError.writesRefused("an earlier log sync failed (\(f))")) }
            if s.durable >= sequence { return .now(nil) }
            s.waiters.append(Waiter(sequence: sequence, done: done))
            if s.syncing { return .wait }
            s.syncing = true
            return .lead
        }
        switch next {
        case .now(let error): done(error)
        case .wait: break
        case .lead:
            // On a request thread (or a vnode loop), the sync runs there once its current batch
            // of work ends.
            if !ThreadExecutor.runAfterBatch({ self.runSyncsAfterBatch() }) { queue.async { self.runSyncs() } }
        }
    }

    /// Syncs until no waiter is left; runs on `queue`.
    private func runSyncs() {
        while runSyncRound() {}
    }

    /// One sync on the thread that led it after its batch; while waiters remain, the next round
    /// is queued the same way, so an event loop leading syncs for writers on other threads
    /// serves its own tasks between rounds instead of syncing for as long as they keep writing.
    private func runSyncsAfterBatch() {
        guard runSyncRound() else { return }
        if !ThreadExecutor.runAfterBatch({ self.runSyncsAfterBatch() }) { queue.async { self.runSyncs() } }
    }

    /// Makes everything appended so far durable and releases its waiters; true when waiters
    /// remain (the caller runs another round; `syncing` stays set meanwhile).
    private func runSyncRound() -> Bool {
        let target = state.withLock { $0.appended }
        var error: StorageError?
        do { try sync() } catch let e { error = e }
        let (ready, more): ([Waiter], Bool) = state.withLock { s in
            s.syncs += 1
            if let error {
                s.failure = error
                let all = s.waiters
                s.waiters = []
                s.syncing = false
                return (all, false)
            }
            s.durable = max(s.durable, target)
            let ready = s.waiters.filter { $0.sequence <= s.durable }
            s.waiters.removeAll { $0.sequence <= s.durable }
            if s.waiters.isEmpty { s.syncing = false }
            return (ready, !s.waiters.isEmpty)
        }
        for w in ready { w.done(error) }
        return more
    }
}
