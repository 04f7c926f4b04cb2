import Testing
import Foundation
import Synchronization
@testable import CairnStorage

@Suite struct GroupCommitTests {
    /// 64 concurrent writers under `always`: every one is acknowledged only after a sync that
    /// covered its record, and they share far fewer syncs than writes.
    @Test func concurrentWritersShareSyncsAndAreAcknowledgedOnlyWhenDurable() async throws {
        let fs = FaultyFileSystem()
        try fs.createDirectory("/db")
        let file = try fs.openAppendable("/db/log", create: true)
        let writer = WALWriter(file: file, path: "/db/log")
        let appendLock = Shared<UInt64>(0)
        let committer = GroupCommitter { () throws(StorageError) in
            usleep(200)   // a sync takes time, as fdatasync does
            try writer.sync()
        }
        let acknowledged = Shared<[UInt64]>([])
        try await withThrowingTaskGroup(of: Void.self) { group in
            for w in 0..<64 {
                group.addTask {
                    for i in 0..<20 {
                        let seq: UInt64 = try appendLock.value.withLock { (last: inout UInt64) throws(StorageError) -> UInt64 in
                            last += 1
                            try writer.append([[UInt8(w), UInt8(i)]], sync: false)
                            committer.noteAppended(upTo: last)
                            return last
                        }
                        try await committer.waitDurable(upTo: seq)
                        // Acknowledged: it must already be durable.
                        #expect(committer.durableSequence >= seq)
                        acknowledged.value.withLock { $0.append(seq) }
                    }
                }
            }
            try await group.waitForAll()
        }
        #expect(acknowledged.value.withLock { $0.count } == 64 * 20)
        #expect(committer.syncCount < 64 * 20 / 4, "\(committer.syncCount) syncs for \(64 * 20) writes")
        // Everything acknowledged survives a crash that drops all unsynced bytes.
        var rng = Seeded(state: 5)
        try fs.syncDirectory("/db")
        fs.crash(tearing: true, rng: &rng)
        let r = try WAL.recover(try fs.openReadable("/db/log"), path: "/db/log")
        #expect(r.records.count >= 64 * 20)
    }

    /// Writers on a request thread: the first to wait leads, and its sync runs on that thread
    /// once the writes queued behind it have run — one sync for all of them, no sync thread.
    @Test func writersOnARequestThreadShareOneSyncRunOnThatThread() async throws {
        let syncThreads = Shared<[String]>([])
        let committer = GroupCommitter { () throws(StorageError) in
            let name = (try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8)) ?? "?"
            syncThreads.value.withLock { $0.append(name.trimmingCharacters(in: .whitespacesAndNewlines)) }
        }
        let executor = ThreadExecutor(label: "t-leader", runsAfterBatchWork: true)
        let gate = DispatchSemaphore(value: 0)
        executor.execute { gate.wait() }   // holds the thread until every writer is queued
        let acks = Shared<[(sequence: UInt64, durable: UInt64)]>([])
        await withCheckedContinuation { (all: CheckedContinuation<Void, Never>) in
            for sequence in UInt64(1)...10 {
                executor.execute {
                    committer.noteAppended(upTo: sequence)
                    committer.whenDurable(upTo: sequence) { error in
                        #expect(error == nil)
                        let done = acks.value.withLock { a in
                            a.append((sequence, committer.durableSequence))
                            return a.count == 10
                        }
                        if done { all.resume() }
                    }
                }
            }
            gate.signal()
        }
        #expect(syncThreads.value.withLock { $0 } == ["t-leader"])
        #expect(committer.syncCount == 1)
        #expect(acks.value.withLock { $0 }.allSatisfy { $0.durable >= $0.sequence })
        // Elsewhere (a plain thread, an executor that runs no after-batch work) nothing is queued.
        #expect(!ThreadExecutor.runAfterBatch {})
        let plain = ThreadExecutor(label: "t-plain")
        let queuedThere = await withCheckedContinuation { c in plain.execute { c.resume(returning: ThreadExecutor.runAfterBatch {}) } }
        #expect(!queuedThere)
    }

    @Test func aFailedSyncFailsEveryWaiterAndRefusesLaterOnes() async throws {
        let fails = Shared<Bool>(true)
        let committer = GroupCommitter { () throws(StorageError) in
            if fails.value.withLock({ $0 }) { throw StorageError.syncFailed(path: "/db/log", errno: 5) }
        }
        committer.noteAppended(upTo: 3)
        await #expect(throws: StorageError.syncFailed(path: "/db/log", errno: 5)) { try await committer.waitDurable(upTo: 3) }
        fails.value.withLock { $0 = false }
        committer.noteAppended(upTo: 4)
        await #expect(throws: StorageError.self) { try await committer.waitDurable(upTo: 4) }
        #expect(committer.durableSequence == 0)
    }

    /// The callback form: at once, on the caller's thread, when already durable; otherwise once
    /// a sync covered the sequence (never before); a failed sync fails it and every later one.
    @Test func whenDurableCallsBackOnceCoveredOrFailed() async throws {
        let fails = Shared<Bool>(false)
        let syncs = Shared<Int>(0)
        let committer = GroupCommitter(durable: 2) { () throws(StorageError) in
            syncs.value.withLock { $0 += 1 }
            if fails.value.withLock({ $0 }) { throw StorageError.syncFailed(path: "/db/log", errno: 5) }
        }
        let answers = Shared<[String]>([])
        func record(_ name: String) -> @Sendable ((any Error)?) -> Void {
            { error in answers.value.withLock { $0.append("\(name) \(error == nil ? "durable" : "failed")") } }
        }
        committer.whenDurable(upTo: 2, record("a"))
        #expect(answers.value.withLock { $0 } == ["a durable"], "already durable: answered on the caller's thread")
        #expect(syncs.value.withLock { $0 } == 0)

        committer.noteAppended(upTo: 5)
        committer.whenDurable(upTo: 5, record("b"))
        try await settleStorage("b answered") { answers.value.withLock { $0.count } == 2 }
        #expect(answers.value.withLock { $0 }.last == "b durable")
        #expect(committer.durableSequence >= 5)

        fails.value.withLock { $0 = true }
        committer.noteAppended(upTo: 6)
        committer.whenDurable(upTo: 6, record("c"))
        try await settleStorage("c answered") { answers.value.withLock { $0.count } == 3 }
        fails.value.withLock { $0 = false }
        committer.whenDurable(upTo: 6, record("d"))
        #expect(answers.value.withLock { $0 } == ["a durable", "b durable", "c failed", "d failed"])
        #expect(committer.durableSequence == 5)
    }

    /// The engine marks a log durable while it holds its own locks; a waiter's callback may take
    /// them (Database.whenDurable checks flow control under the state lock), so it must not run
    /// on the marking thread. It did, and a log switch under load trapped: "Recursive call to
    /// lock Mutex" (cairn-torture, membership nemesis).
    @Test func markDurableNeverRunsCallbacksOnTheMarkingThread() async throws {
        let committer = GroupCommitter { () throws(StorageError) in }
        committer.noteAppended(upTo: 3)
        let marking = Atomic<Bool>(false)
        let ranWhileMarking = Shared<[Bool]>([])
        for s in UInt64(1)...3 {
            committer.whenDurable(upTo: s + 10) { _ in ranWhileMarking.value.withLock { $0.append(marking.load(ordering: .relaxed)) } }
        }
        // Held by sequence 13 > 3: nothing runs until the mark covers them.
        marking.store(true, ordering: .relaxed)
        committer.markDurable(upTo: 20)
        marking.store(false, ordering: .relaxed)
        try await settleStorage("every callback ran") { ranWhileMarking.value.withLock { $0.count } == 3 }
        #expect(ranWhileMarking.value.withLock { $0 } == [false, false, false])
    }

    @Test func alreadyDurableReturnsAtOnce() async throws {
        let committer = GroupCommitter(durable: 10) { () throws(StorageError) in Issue.record("no sync needed") }
        try await committer.waitDurable(upTo: 7)
        #expect(committer.syncCount == 0)
    }
}

/// Polls `condition` (every millisecond, at most 10 s) until it holds.
func settleStorage(_ what: String, _ condition: () -> Bool) async throws {
    for _ in 0..<10_000 {
        if condition() { return }
        try await Task.sleep(for: .milliseconds(1))
    }
    Issue.record("timed out waiting: \(what)")
}

/// A mutex-guarded value shared by reference between tasks.
final class Shared<T: Sendable>: Sendable {
    let value: Mutex<T>
    init(_ v: T) { value = Mutex(v) }
}
