import Testing
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
