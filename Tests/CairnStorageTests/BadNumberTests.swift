import Testing
@testable import CairnStorage

/// Numbers read from files (sequences, file numbers, sizes) are checked before any arithmetic: a
/// value out of range is corruption naming the file, or a stray file is ignored; never a trap.
@Suite(.serialized) struct BadNumberTests {
    /// A manifest whose edits check out (valid checksums) but whose version is impossible.
    static func manifest(_ fs: FaultyFileSystem, _ change: (inout Version) -> Void) throws {
        try fs.createDirectory("/db")
        var v = Version()
        v.logNumber = 1
        v.nextFile = 3
        change(&v)
        _ = try Manifest.create(fs: fs, directory: "/db", number: 2, version: v)
    }

    static func table(_ number: UInt64, level: Int = 1, size: UInt64 = 100, low: UInt64 = 1, high: UInt64 = 1) -> TableMeta {
        TableMeta(number: number, level: level, size: size, smallest: [1], largest: [2], smallestSequence: low, largestSequence: high)
    }

    static let impossible: [(String, @Sendable (inout Version) -> Void)] = [
        ("last sequence 2^64-1", { $0.lastSequence = .max }),
        ("last sequence past the engine's bound", { $0.lastSequence = Database.maxSequence }),
        ("next file 2^64-1", { $0.nextFile = .max }),
        ("log number past next file", { $0.logNumber = 1 << 30 }),
        ("a table numbered 2^64-1", { v in v.nextFile = 5; v.tables[1] = [table(.max)] }),
        ("a table numbered at or past next file", { v in v.nextFile = 5; v.tables[1] = [table(7)] }),
        ("a table newer than the last sequence", { v in v.nextFile = 5; v.lastSequence = 10; v.tables[1] = [table(4, high: 11)] }),
        ("a tombstone newer than the last sequence", { v in v.lastSequence = 10; v.tombstones = [RangeTombstone(lower: [1], upper: [2], sequence: .max)] }),
    ]

    /// Before the fix, "last sequence 2^64-1" opened and the first write trapped (`s.sequence + 1`).
    @Test(arguments: 0..<impossible.count) func anImpossibleManifestIsCorruptionNamingIt(_ i: Int) async throws {
        let (name, change) = Self.impossible[i]
        let fs = FaultyFileSystem()
        try Self.manifest(fs, change)
        do {
            let db = try Database.open(fs: fs, directory: "/db")
            try await db.put([1], [1])
            Issue.record("\(name): opened and wrote")
            await db.abandon()
        } catch let e as StorageError {
            guard case .corruption(let path, _, let reason) = e else { Issue.record("\(name): \(e)"); return }
            #expect(path == "/db/MANIFEST-000002", "\(name): \(reason)")
        }
    }

    /// Table sizes from the manifest are only summed (compaction scores, statistics): huge ones
    /// saturate. Before the fix the compaction worker trapped adding them.
    @Test func hugeTableSizesInTheManifestDoNotTrap() async throws {
        let fs = FaultyFileSystem()
        let o = smallOptions()
        let db = try Database.open(fs: fs, directory: "/db", options: o)
        for i in 0..<1500 { try await db.put(key(i), [UInt8](repeating: 1, count: 100), sync: SyncMode.none) }
        try db.compactUntilSettled()
        try await db.close()
        // Rewrite the manifest with every table claiming 2^63 bytes, and two more levels of them.
        var v = try #require(try Manifest.recover(fs: fs, directory: "/db")).0
        let tables = v.allTables
        try #require((1..<CompactionPolicy.levels).contains { (v.tables[$0]?.count ?? 0) >= 2 }, "two tables in one level")
        var e = VersionEdit()
        e.removed = tables.map { ($0.level, $0.number) }
        e.added = tables.map { t in var t = t; t.size = 1 << 63; return t }
        v.apply(e)
        v.nextFile += 10
        _ = try Manifest.create(fs: fs, directory: "/db", number: v.nextFile - 1, version: v)
        let back = try Database.open(fs: fs, directory: "/db", options: o)
        #expect(back.statistics.bytesPerLevel.contains(UInt64.max) || back.statistics.bytesPerLevel.contains(1 << 63))
        try back.compactUntilSettled()
        for i in 0..<1500 { #expect(try back.get(key(i)) == [UInt8](repeating: 1, count: 100)) }
        try await back.put(key(1), [2])
        try await back.close()
    }

    /// A stray log whose number the engine never issues: ignored, never replayed, never removed.
    /// Before the fix `18446744073709551615.log` trapped at open (`highestLog + 1`).
    @Test(arguments: ["18446744073709551615.log", "99999999999999.log"]) func aStrayLogWithAHugeNumberIsIgnored(_ stray: String) async throws {
        let fs = FaultyFileSystem()
        let db = try Database.open(fs: fs, directory: "/db")
        try await db.put([1], [1])
        try await db.close()
        var garbage = WriteBatch()
        garbage.put([1], [9])
        try fs.openAppendable("/db/" + stray, create: true).append(WAL.frame(garbage.encoded(firstSequence: 1000)))
        let back = try Database.open(fs: fs, directory: "/db")
        #expect(try back.get([1]) == [1], "the stray file was not replayed")
        try await back.put([2], [2])
        try await back.close()
        let third = try Database.open(fs: fs, directory: "/db")
        #expect(try third.get([2]) == [2])
        #expect(fs.exists("/db/" + stray))
        try await third.close()
    }
}
