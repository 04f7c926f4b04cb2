import Testing
import Foundation
import Synchronization
@testable import CairnStorage

/// `getDurable` reads as of the newest sequence whose log record is durable (under `always`):
/// a write applied but not yet synced is visible to `get` and not to `getDurable`.
@Suite struct GetDurableTests {
    @Test func aWriteIsInvisibleToGetDurableUntilItsSyncCompletes() async throws {
        let fs = FaultyFileSystem()
        let db = try Database.open(fs: fs, directory: "/db")
        try await db.put([1], [1])   // durable
        var b = WriteBatch()
        b.put([1], [2])
        b.put([2], [2])
        let seq = try db.apply(b)    // logged and applied, not synced
        #expect(try db.get([1]) == [2] && db.get([2]) == [2])
        #expect(try db.getDurable([1]) == [1], "the durable version, not the newer one")
        #expect(try db.getDurable([2]) == nil)

        // A sync that is slow: while it runs the write is still not durable.
        fs.holdSyncs()
        let waiter = Task { try await db.waitDurable(upTo: seq) }
        #expect(try db.getDurable([1]) == [1] && db.getDurable([2]) == nil)
        fs.releaseSyncs()
        try await waiter.value
        #expect(try db.getDurable([1]) == [2] && db.getDurable([2]) == [2])
        #expect(try db.get([1]) == [2])

        // A failed sync: the write stays invisible to getDurable (and writes are refused).
        var c = WriteBatch()
        c.put([3], [3])
        c.delete([2])
        let failing = try db.apply(c)
        fs.failNextSyncs(1)
        await #expect(throws: StorageError.self) { try await db.waitDurable(upTo: failing) }
        #expect(try db.get([3]) == [3] && db.get([2]) == nil)
        #expect(try db.getDurable([3]) == nil && db.getDurable([2]) == [2])
        await db.abandon()
    }

    /// A log switch syncs the old log and starts a new committer: what it covered is durable.
    @Test func aLogSwitchMakesEverythingBeforeItDurable() async throws {
        let fs = FaultyFileSystem()
        let db = try Database.open(fs: fs, directory: "/db")
        var b = WriteBatch()
        b.put([7], [7])
        _ = try db.apply(b)
        #expect(try db.getDurable([7]) == nil)
        try db.flush()   // syncs the log, switches to a new one, writes a table
        #expect(try db.getDurable([7]) == [7])
        var c = WriteBatch()
        c.put([7], [8])
        _ = try db.apply(c)
        #expect(try db.getDurable([7]) == [7] && db.get([7]) == [8])
        try await db.close()
    }

    /// Under other sync modes `getDurable` is `get`.
    @Test func withoutAlwaysGetDurableIsGet() async throws {
        var o = DatabaseOptions()
        o.syncMode = SyncMode.none
        let db = try Database.open(fs: FaultyFileSystem(), directory: "/db", options: o)
        var b = WriteBatch()
        b.put([1], [1])
        _ = try db.apply(b)
        #expect(try db.getDurable([1]) == [1])
        try await db.close()
    }

    /// A range deletion is durable through the manifest before its log record syncs, and flushes
    /// and compactions drop what it hides at once: a durable read applies it at once too, never
    /// showing a value a crash would not bring back.
    @Test func aRangeDeletionHidesKeysFromDurableReadsAtOnce() async throws {
        let fs = FaultyFileSystem()
        let db = try Database.open(fs: fs, directory: "/db")
        try await db.put([1], [1])
        try await db.put([5], [5])
        try db.flush()   // one table holding [1] and [5]: not wholly inside the range below
        var b = WriteBatch()
        b.deleteRange(from: [5], to: [6])
        _ = try db.apply(b)   // in the manifest; its log record not synced yet
        #expect(try db.getDurable([5]) == nil, "the deletion is durable: [5] cannot come back")
        #expect(try db.getDurable([1]) == [1])
        await db.abandon()
        let back = try Database.open(fs: fs, directory: "/db")
        #expect(try back.get([5]) == nil)
        try await back.close()
    }
}

/// The request path does no disk I/O under the engine's state lock: a log switch whose syncs are
/// slow holds up the next writer, never a reader.
@Suite struct WritePathLockTests {
    /// A database without log syncs whose key [0] holds [42].
    static func holding42(writeBufferBytes: Int) throws -> (FaultyFileSystem, Database) {
        let fs = FaultyFileSystem()
        var options = DatabaseOptions()
        options.writeBufferBytes = writeBufferBytes
        options.syncMode = .none
        let db = try Database.open(fs: fs, directory: "/db", options: options)
        var first = WriteBatch()
        first.put([0], [42])
        _ = try db.apply(first)
        return (fs, db)
    }

    @Test func aReaderDoesNotWaitForALogSwitchsSyncs() async throws {
        let (fs, db) = try Self.holding42(writeBufferBytes: 64 << 10)
        let logsBefore = try fs.list("/db").filter { $0.hasSuffix(".log") }.count
        fs.holdSyncs()
        // Writes until the memtable is half full: that apply switches logs and blocks in the
        // new log's sync.
        let writer = Thread {
            for i in 0..<200 {
                var b = WriteBatch()
                b.put([1, UInt8(i)], Array(repeating: 7, count: 1024))
                _ = try? db.apply(b)
            }
        }
        writer.start()
        var switching = false
        for _ in 0..<5000 where !switching {
            switching = (try fs.list("/db").filter { $0.hasSuffix(".log") }.count) > logsBefore
            if !switching { try await Task.sleep(for: .milliseconds(1)) }
        }
        #expect(switching, "the writer never started a log switch")
        // The switch is now stuck in its held sync. A read must still answer.
        let read = Mutex<[UInt8]??>(nil)
        let reader = Thread { read.withLock { $0 = .some(try? db.get([0])) } }
        reader.start()
        var answered = false
        for _ in 0..<5000 where !answered {
            answered = read.withLock { $0 != nil }
            if !answered { try await Task.sleep(for: .milliseconds(1)) }
        }
        #expect(answered, "a read waited for the log switch's sync")
        fs.releaseSyncs()
        for _ in 0..<5000 where read.withLock({ $0 == nil }) { try await Task.sleep(for: .milliseconds(1)) }
        #expect(read.withLock { $0 } == .some([42]))
        await db.abandon()
    }

    /// A flush appends its manifest edit under the state lock and syncs it after: while that sync
    /// is slow, reads and writes go on, and the log the flush retires stays until the edit is
    /// durable (a crash meanwhile reopens the database as it was before the flush).
    @Test func readsAndWritesDoNotWaitForAFlushsManifestSync() async throws {
        let (fs, db) = try Self.holding42(writeBufferBytes: 8 << 20)
        fs.holdSyncs(toPathContaining: "MANIFEST")
        let flushed = Mutex<Bool?>(nil)
        let flusher = Thread {
            let ok = (try? db.flush()) != nil
            flushed.withLock { $0 = ok }
        }
        flusher.start()
        for _ in 0..<5000 where fs.heldSyncs == 0 { try await Task.sleep(for: .milliseconds(1)) }
        #expect(fs.heldSyncs == 1, "the flush never reached its manifest sync")
        #expect(try fs.list("/db").filter { $0.hasSuffix(".log") }.count == 2, "the retired log went before its edit was durable")
        // The flush is stuck in the manifest's sync. A read and a write must still go through.
        let done = Mutex<(read: [UInt8]??, wrote: Bool)>((nil, false))
        let client = Thread {
            let read = try? db.get([0])
            done.withLock { $0.read = .some(read) }
            var b = WriteBatch()
            b.put([1], [7])
            let wrote = (try? db.apply(b)) != nil
            done.withLock { $0.wrote = wrote }
        }
        client.start()
        for _ in 0..<5000 where !done.withLock({ $0.wrote }) { try await Task.sleep(for: .milliseconds(1)) }
        #expect(done.withLock { $0.read } == .some([42]), "a read waited for the manifest's sync")
        #expect(done.withLock { $0.wrote }, "a write waited for the manifest's sync")
        #expect(flushed.withLock { $0 } == nil)
        fs.releaseSyncs()
        for _ in 0..<5000 where flushed.withLock({ $0 == nil }) { try await Task.sleep(for: .milliseconds(1)) }
        #expect(flushed.withLock { $0 } == true)
        #expect(try fs.list("/db").filter { $0.hasSuffix(".log") }.count == 1)
        #expect(try db.get([0]) == [42] && db.get([1]) == [7])
        await db.abandon()
    }
}
