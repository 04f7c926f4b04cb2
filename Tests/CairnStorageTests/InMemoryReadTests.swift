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
        var o = options()
        o.cacheFlushedBlocks = false
        let db = try Database.open(fs: fs, directory: "/db", options: o)
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

    /// A flush caches the blocks it writes: reads of what was just flushed stay in memory.
    @Test func aFlushCachesTheBlocksItWrites() async throws {
        let db = try Database.open(fs: FaultyFileSystem(), directory: "/db", options: Self.options())
        for i in 0..<100 { try await db.put(key(i), [UInt8(i)]) }
        try db.flush()
        let misses = db.statistics.blockCache.misses
        for i in 0..<100 { #expect(db.getDurableInMemory(key(i)) == .answered([UInt8(i)]), "key \(i)") }
        #expect(db.statistics.blockCache.misses == misses)
        await db.abandon()
    }

    /// A compaction caches the output blocks whose keys readers were using in its inputs, and
    /// only those: a merge of everything would push out what readers use.
    @Test func aCompactionCachesTheBlocksReadersWereUsing() async throws {
        var o = Self.options()
        o.cacheFlushedBlocks = false   // only what readers read is cached before the compaction
        let db = try Database.open(fs: FaultyFileSystem(), directory: "/db", options: o)
        let value = { (i: Int, round: UInt8) in [round] + Array(repeating: UInt8(i), count: 100) }
        for i in 0..<100 { try await db.put(key(i), value(i, 1)) }
        try db.flush()
        for i in 0..<20 { #expect(try db.getDurable(key(i)) == value(i, 1)) }   // a reader's keys
        #expect(db.getDurableInMemory(key(60)) == .needsDisk)
        for i in 50..<100 { try await db.put(key(i), value(i, 2)) }
        try db.compactUntilSettled()   // the second table makes level 0 compact (trigger 2)
        #expect(db.statistics.compactions > 0)
        for i in 0..<16 { #expect(db.getDurableInMemory(key(i)) == .answered(value(i, 1)), "read key \(i)") }
        for i in 40..<100 { #expect(db.getDurableInMemory(key(i)) == .needsDisk, "never read: key \(i)") }
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
