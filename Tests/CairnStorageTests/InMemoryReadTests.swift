import Testing
@testable import CairnStorage

/// `getDurableInMemory` answers what `getDurable` would, from memtables, filters and cached
/// blocks only; anything that would read a file, or meets damage, is `.needsDisk`.
@Suite struct InMemoryReadTests {
    static func options() -> DatabaseOptions { explicitFlushOptions() }

    @Test func memtableEntriesAnswerAsGetDurableDoes() async throws {
        let fs = FaultyFileSystem()
        let db = try Database.open(fs: fs, directory: "/db", options: Self.options())
        try await db.put([1], [1])
        try await db.put([2], [2])
        try await db.delete([2])
        var b = WriteBatch()
        b.put([1], [9])
        b.put([3], [3])
        _ = try db.apply(b)   // applied, not synced: invisible to durable reads
        #expect(db.getDurableInMemory([1]) == .answered([1]))
        #expect(db.getDurableInMemory([2]) == .answered(nil), "a deletion")
        #expect(db.getDurableInMemory([3]) == .answered(nil), "not durable yet")
        #expect(db.getDurableInMemory([4]) == .answered(nil), "no table to consult")
        await db.abandon()
    }

    /// A database whose keys 0..<100 (value: the key's number) are in one table, none cached.
    static func oneTable(_ fs: FaultyFileSystem) async throws -> Database {
        let db = try Database.open(fs: fs, directory: "/db", options: options())
        for i in 0..<100 { try await db.put(key(i), [UInt8(i)]) }
        try db.flush()
        return db
    }

    @Test func aTableAnswersOnlyFromCachedBlocksAndNeverReadsItsFile() async throws {
        let fs = FaultyFileSystem()
        let db = try await Self.oneTable(fs)
        let missesBefore = db.statistics.blockCache.misses
        #expect(db.getDurableInMemory(key(5)) == .needsDisk, "its block was never read")
        #expect(db.statistics.blockCache.misses == missesBefore, "a probe counts no miss")
        #expect(try db.getDurable(key(5)) == [5])   // reads and caches the block
        #expect(db.getDurableInMemory(key(5)) == .answered([5]))

        // The file is damaged under the cached block: memory still answers, so it read nothing.
        let table = try #require(try fs.list("/db").first { $0.hasSuffix(".sst") })
        fs.flipBit("/db/" + table, byte: 40, bit: 3)
        #expect(db.getDurableInMemory(key(5)) == .answered([5]))
        #expect(db.getDurableInMemory(key(6)) == .answered([6]), "same block")

        // A newer memtable version wins over the table's.
        try await db.put(key(5), [55])
        #expect(db.getDurableInMemory(key(5)) == .answered([55]))
        await db.abandon()
    }

    @Test func aDamagedTableIsLeftToGetDurableToReport() async throws {
        let fs = FaultyFileSystem()
        try await Self.oneTable(fs).close()
        let table = try #require(try fs.list("/db").first { $0.hasSuffix(".sst") })
        // The footer's magic number: the table cannot be opened at all.
        let size = try #require(fs.contents("/db/" + table)?.count)
        fs.flipBit("/db/" + table, byte: size - 1)
        let reopened = try Database.open(fs: fs.session(), directory: "/db", options: Self.options())
        #expect(reopened.getDurableInMemory(key(5)) == .needsDisk)
        #expect(throws: StorageError.self) { try reopened.getDurable(key(5)) }
        await reopened.abandon()
    }
}
