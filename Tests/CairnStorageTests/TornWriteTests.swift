import Testing
@testable import CairnStorage

/// Short writes (a full disk, EIO after a prefix) in the log and the manifest: the failed append
/// leaves a fragment; nothing may be appended, let alone acknowledged, after it; the database
/// refuses writes until it is reopened, and then opens with the fragment dropped as a torn tail.
@Suite(.serialized) struct TornWriteTests {
    static func value(_ i: Int) -> [UInt8] { Array("value-\(i)-".utf8) + [UInt8](repeating: UInt8(i & 0xFF), count: 40) }

    @Test func afterAFailedWriteTheLogWriterAppendsNothingMoreButSyncsWhatItWrote() throws {
        let fs = FaultyFileSystem()
        var rng = Seeded(state: 3)
        try fs.createDirectory("/db")
        let writer = WALWriter(file: try fs.openAppendable("/db/000001.log", create: true), path: "/db/000001.log")
        try fs.syncDirectory("/db")
        try writer.append([[1, 2, 3]], sync: true)
        try writer.append([[4, 5]], sync: false)   // appended whole, not yet synced
        fs.setFreeSpace(4)
        #expect(throws: StorageError.io(path: "/db/000001.log", operation: "write", errno: 28)) {
            try writer.append([[UInt8](repeating: 9, count: 20)], sync: true)
        }
        fs.setFreeSpace(nil)
        #expect(throws: StorageError.self) { try writer.append([[6]], sync: true) }
        let size = fs.contents("/db/000001.log")?.count
        #expect(throws: StorageError.self) { try writer.append([[7]], sync: false) }
        #expect(fs.contents("/db/000001.log")?.count == size, "nothing appended after the fragment")
        // What was appended before the failure can still be made durable (its writers acknowledged).
        try writer.sync()
        fs.crash(tearing: false, rng: &rng)
        let r = try WAL.recover(try fs.openReadable("/db/000001.log"), path: "/db/000001.log")
        #expect(r.records == [[1, 2, 3], [4, 5]])
        #expect(r.tornTailBytes == 4)
    }

    @Test func aFailedManifestEditStopsLaterEditsAndTheManifestStillRecovers() throws {
        let fs = FaultyFileSystem()
        try fs.createDirectory("/db")
        let writer = try Manifest.create(fs: fs, directory: "/db", number: 2, version: Version())
        var e = VersionEdit()
        e.lastSequence = 10
        try Manifest.record(e, to: writer)
        fs.failNextWrite(toPathContaining: "MANIFEST", keeping: 3)
        e.lastSequence = 20
        #expect(throws: StorageError.io(path: "/db/MANIFEST-000002", operation: "write", errno: 5)) { try Manifest.record(e, to: writer) }
        e.lastSequence = 30
        #expect(throws: StorageError.self) { try Manifest.record(e, to: writer) }
        let recovered = try #require(try Manifest.recoverReporting(fs: fs, directory: "/db"))
        #expect(recovered.version.lastSequence == 10)
        #expect(recovered.tornTailBytes == 3)
    }

    /// The disk fills during a write: that write fails with ENOSPC, later ones are refused (not
    /// appended after the fragment), space is freed, the database is reopened (the fragment is a
    /// torn tail) and takes writes again; after a crash every acknowledged write is there.
    @Test func aFullDiskDuringALogWriteNeitherLosesAcknowledgedWritesNorBlocksARestart() async throws {
        let fs = FaultyFileSystem()
        var rng = Seeded(state: 21)
        var acked: [[UInt8]: [UInt8]] = [:]
        let db = try Database.open(fs: fs.session(), directory: "/db")
        for i in 0..<20 {
            try await db.put(key(i), Self.value(i))
            acked[key(i)] = Self.value(i)
        }
        let log = try #require(try fs.list("/db").first { $0.hasSuffix(".log") }.map { "/db/" + $0 })
        let before = try #require(fs.contents(log)?.count)
        fs.setFreeSpace(10)
        do {
            try await db.put(key(100), Self.value(100))
            Issue.record("a write that did not fit was acknowledged")
        } catch let e as StorageError {
            #expect(e == .io(path: log, operation: "write", errno: 28))
        }
        fs.setFreeSpace(nil)
        do {
            try await db.put(key(101), Self.value(101))
            Issue.record("a write after a failed log write was acknowledged")
        } catch let e as StorageError {
            guard case .writesRefused = e else { Issue.record("expected writesRefused, got \(e)"); return }
        }
        #expect(fs.contents(log)?.count == before + 10, "only the fragment follows the last good record")
        #expect(try db.get(key(5)) == Self.value(5), "reads still work")
        await db.abandon()

        let back = try Database.open(fs: fs.session(), directory: "/db")
        #expect(back.statistics.tornTailBytes == 10)
        for (k, v) in acked { #expect(try back.get(k) == v) }
        #expect(try back.get(key(100)) == nil && back.get(key(101)) == nil)
        for i in 200..<220 {
            try await back.put(key(i), Self.value(i))
            acked[key(i)] = Self.value(i)
        }
        fs.crash(tearing: true, rng: &rng)
        await back.abandon()
        let third = try Database.open(fs: fs.session(), directory: "/db")
        for (k, v) in acked { #expect(try third.get(k) == v, "acknowledged \(k) lost") }
        try await third.put(key(300), Self.value(300))
        try await third.close()
    }

    /// A manifest edit cut short during a flush or a compaction: no edit follows the fragment, writes
    /// are refused until reopen, the manifest still opens, and every acknowledged write survives
    /// Small tables, flushed only when a test asks.
    static func explicitFlushOptions() -> DatabaseOptions {
        var o = smallOptions()
        o.writeBufferBytes = 8 << 20
        return o
    }

    /// Writes `keys` (each acknowledged) and returns what was written.
    static func write(_ keys: Range<Int>, to db: Database) async throws -> [[UInt8]: [UInt8]] {
        var acked: [[UInt8]: [UInt8]] = [:]
        for i in keys {
            try await db.put(key(i), value(i))
            acked[key(i)] = value(i)
        }
        return acked
    }

    /// a later crash.
    @Test(arguments: ["flush", "compaction"]) func aFailedManifestWriteLeavesADatabaseThatOpens(during job: String) async throws {
        let fs = FaultyFileSystem()
        var rng = Seeded(state: job == "flush" ? 5 : 6)
        let o = Self.explicitFlushOptions()
        let db = try Database.open(fs: fs.session(), directory: "/db", options: o)
        var acked = try await Self.write(0..<100, to: db)
        try db.flush()   // one level-0 table: under the trigger (2)
        // The flush's edit, or (skipping the flush's) the compaction's, is cut after 3 bytes.
        fs.failNextWrite(toPathContaining: "MANIFEST-", skipping: job == "flush" ? 0 : 1, keeping: 3)
        acked.merge(try await Self.write(100..<200, to: db)) { _, new in new }
        if job == "flush" {
            #expect(throws: StorageError.io(path: "/db/MANIFEST-000002", operation: "write", errno: 5)) { try db.flush() }
        } else {
            try db.flush()   // two tables: the compaction starts (here or in the background) and fails
            _ = try? db.compactUntilSettled()
        }
        let manifest = try #require(fs.contents("/db/MANIFEST-000002")?.count)
        do {
            try await db.put(key(500), Self.value(500))
            Issue.record("a write after a failed manifest write was acknowledged")
        } catch let e as StorageError {
            guard case .writesRefused = e else { Issue.record("expected writesRefused, got \(e)"); return }
        }
        _ = try? db.flush()
        _ = try? db.compactUntilSettled()
        #expect(fs.contents("/db/MANIFEST-000002")?.count == manifest, "no edit after the fragment")
        for (k, v) in acked { #expect(try db.get(k) == v) }
        await db.abandon()

        let back = try Database.open(fs: fs.session(), directory: "/db", options: o)
        #expect(back.statistics.tornTailBytes == 3)
        for (k, v) in acked { #expect(try back.get(k) == v) }
        for i in 200..<300 {
            try await back.put(key(i), Self.value(i))
            acked[key(i)] = Self.value(i)
        }
        try back.compactUntilSettled()
        #expect(back.statistics.compactions > 0)
        try await back.put(key(300), Self.value(300))
        acked[key(300)] = Self.value(300)
        fs.crash(tearing: true, rng: &rng)
        await back.abandon()
        let third = try Database.open(fs: fs.session(), directory: "/db", options: o)
        for (k, v) in acked { #expect(try third.get(k) == v, "acknowledged \(k) lost") }
        try await third.close()
    }

    /// A manifest edit appended whole whose sync failed may still be read back by a reopen (the
    /// page cache kept it): the tables it adds must not have been removed, or the reopened
    /// database would reference missing files and have dropped the logs they replaced.
    @Test(arguments: ["flush", "compaction"]) func aFailedManifestSyncKeepsTheTablesItsEditAdds(during job: String) async throws {
        let fs = FaultyFileSystem()
        let o = Self.explicitFlushOptions()
        let db = try Database.open(fs: fs.session(), directory: "/db", options: o)
        var acked = try await Self.write(0..<100, to: db)
        if job == "compaction" { try db.flush() }
        acked.merge(try await Self.write(100..<200, to: db)) { _, new in new }
        fs.failNextSync(toPathContaining: "MANIFEST-", losingData: false)
        if job == "flush" {
            #expect(throws: StorageError.self) { try db.flush() }
        } else {
            try? db.flush()   // a second level-0 table: the compaction (here or in the background) meets the failed sync
            _ = try? db.compactUntilSettled()
        }
        await db.abandon()

        let back = try Database.open(fs: fs.session(), directory: "/db", options: o)
        for (k, v) in acked { #expect(try back.get(k) == v, "\(k)") }
        try await back.close()
    }
}
