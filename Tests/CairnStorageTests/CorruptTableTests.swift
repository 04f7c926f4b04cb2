import Testing
@testable import CairnStorage

/// One corrupt table must not take the database down: it opens, reads of keys the damage may hide
/// fail loudly (`.corruption`, never an older version or nothing), everything else reads and
/// writes, compaction sets the table aside instead of failing forever, and the statistics name it.
@Suite(.serialized) struct CorruptTableTests {
    static func value(_ i: Int) -> [UInt8] { Array("value-\(i)-".utf8) + [UInt8](repeating: UInt8(i & 0xFF), count: 12) }

    static func options() -> DatabaseOptions { explicitFlushOptions() }

    /// The table holding keys 0..<100 (and nothing else), written and closed; returns its path.
    static func oneTable(_ fs: FaultyFileSystem) async throws -> String {
        let db = try Database.open(fs: fs, directory: "/db", options: options())
        for i in 0..<100 { try await db.put(key(i), value(i)) }
        try db.flush()
        try await db.close()
        let tables = try fs.list("/db").filter { $0.hasSuffix(".sst") }
        try #require(tables.count == 1)
        return "/db/" + tables[0]
    }

    static func tableNumber(_ path: String) -> UInt64? { UInt64(path.split(separator: "/").last?.dropLast(4) ?? "") }

    static func expectCorrupt(_ db: Database, _ k: [UInt8], _ path: String, sourceLocation: SourceLocation = #_sourceLocation) {
        do {
            let v = try db.get(k)
            Issue.record("read \(String(decoding: k, as: UTF8.self)) returned \(v.map { String(decoding: $0, as: UTF8.self) } ?? "nil") from a damaged table", sourceLocation: sourceLocation)
        } catch {
            guard case .corruption(let p, _, _) = error else { Issue.record("expected corruption, got \(error)", sourceLocation: sourceLocation); return }
            #expect(p == path, sourceLocation: sourceLocation)
        }
    }

    @Test func aCorruptFirstDataBlockFailsOnlyItsKeysAndCompactionSetsTheTableAside() async throws {
        let fs = FaultyFileSystem()
        let table = try await Self.oneTable(fs)
        let number = try #require(Self.tableNumber(table))
        fs.flipBit(table, byte: 40, bit: 3)   // inside the first data block (keys 0…~12)

        let db = try Database.open(fs: fs.session(), directory: "/db", options: Self.options())
        Self.expectCorrupt(db, key(0), table)
        for i in 50..<100 { #expect(try db.get(key(i)) == Self.value(i)) }
        #expect(db.statistics.corruptTables == [number])
        #expect(db.statistics.corruptionEvents >= 1)
        #expect(db.statistics.lastCorruption?.contains(table) == true)

        // A second table over the same keys: 95 and 96 get newer versions there, 99 is deleted.
        try await db.put(key(95), Array("newer".utf8))
        try await db.put(key(96), Array("newer".utf8))
        try await db.delete(key(99))
        for i in 100..<200 { try await db.put(key(i), Self.value(i)) }
        try db.flush()   // two level-0 tables: past the trigger, so a compaction runs over the corrupt one
        try db.compactUntilSettled()
        let s = db.statistics
        #expect(s.quarantinedTables == [number], "the compaction set the corrupt table aside")
        #expect(s.corruptTables == [number])
        #expect(s.backgroundFailures == 0, "meeting corruption is not a failed job")
        #expect(s.compactions + s.trivialMoves > 0 || s.tablesPerLevel[0] == 1)

        // Writes go on, and flushes and compactions with them.
        for i in 200..<400 { try await db.put(key(i), Self.value(i)) }
        try db.compactUntilSettled()
        // The newer versions win over the set-aside table, the deletion stays, other keys read.
        #expect(try db.get(key(95)) == Array("newer".utf8))
        #expect(try db.get(key(96)) == Array("newer".utf8))
        #expect(try db.get(key(99)) == nil, "a deletion above a set-aside table is never dropped")
        for i in stride(from: 50, to: 95, by: 3) { #expect(try db.get(key(i)) == Self.value(i)) }
        for i in stride(from: 100, to: 400, by: 7) { #expect(try db.get(key(i)) == Self.value(i)) }
        Self.expectCorrupt(db, key(3), table)
        // Rewriting a key repairs it: the newer version is read without touching the bad block.
        try await db.put(key(3), Array("repaired".utf8))
        try db.compactUntilSettled()
        #expect(try db.get(key(3)) == Array("repaired".utf8))
        // A scan over the damage stops with the error; one beside it does not.
        #expect(throws: StorageError.self) { _ = try Self.entries(db, from: key(0), to: key(20)) }
        #expect(Array(try db.iterator(from: key(100), to: key(150))).count == 50)
        try await db.close()

        // The table stays set aside across a restart.
        let back = try Database.open(fs: fs.session(), directory: "/db", options: Self.options())
        #expect(back.statistics.quarantinedTables == [number])
        #expect(back.statistics.corruptTables == [number])
        Self.expectCorrupt(back, key(5), table)
        #expect(try back.get(key(95)) == Array("newer".utf8))
        #expect(try back.get(key(99)) == nil)
        #expect(try back.get(key(3)) == Array("repaired".utf8))
        try await back.put(key(1000), [1])
        try await back.close()
    }

    /// A table whose footer, index or filter is corrupt is opened damaged: the database opens,
    /// every read in the table's key range fails loudly, reads elsewhere work, writes and
    /// compactions go on.
    @Test(arguments: ["footer", "index", "filter", "short"]) func aTableWithABadFooterIndexOrFilterIsOpenedDamaged(_ part: String) async throws {
        let fs = FaultyFileSystem()
        let table = try await Self.oneTable(fs)
        let number = try #require(Self.tableNumber(table))
        let bytes = try #require(fs.contents(table))
        func u64(_ at: Int) -> Int { bytes[at..<at + 8].reduce(0) { $0 << 8 | Int($1) } }
        let footer = bytes.count - Table.footerBytes
        switch part {
        case "footer": fs.flipBit(table, byte: bytes.count - 1)   // the magic number
        case "index": fs.flipBit(table, byte: u64(footer + 16) + 1)
        case "filter": fs.flipBit(table, byte: u64(footer) + 1)
        default: try fs.truncate(table, to: 20)
        }
        let db = try Database.open(fs: fs.session(), directory: "/db", options: Self.options())
        #expect(db.statistics.corruptTables == [number])
        #expect(db.statistics.quarantinedTables == [number])
        for i in [0, 37, 99] { Self.expectCorrupt(db, key(i), table) }
        // Keys outside its range, and writes, compactions, rewritten keys: all fine.
        for i in 100..<300 { try await db.put(key(i), Self.value(i)) }
        try await db.put(key(37), Array("rewritten".utf8))
        try db.compactUntilSettled()
        for i in stride(from: 100, to: 300, by: 9) { #expect(try db.get(key(i)) == Self.value(i)) }
        #expect(try db.get(key(37)) == Array("rewritten".utf8))
        Self.expectCorrupt(db, key(38), table)
        #expect(Array(try db.iterator(from: key(100))).count == 200)
        try await db.close()
        let back = try Database.open(fs: fs.session(), directory: "/db", options: Self.options())
        #expect(back.statistics.quarantinedTables == [number])
        Self.expectCorrupt(back, key(0), table)
        #expect(try back.get(key(37)) == Array("rewritten".utf8))
        try await back.close()
    }

    /// A scan passing over damage (`DamagePolicy.passOver`) holds exactly what point reads
    /// answer: every key a read returns, with that value; no key a read fails on or finds absent.
    /// Older versions under a damaged block never show through. Checked with the damage in a
    /// level-1 table under newer ones, in the newest table, and in a table that opens damaged.
    @Test(arguments: ["level", "newer", "open"]) func aScanPassingOverDamageHoldsExactlyWhatPointReadsAnswer(_ which: String) async throws {
        let fs = FaultyFileSystem()
        var o = smallOptions()
        o.writeBufferBytes = 8 << 20
        o.compaction.level0Trigger = 4
        let db = try Database.open(fs: fs, directory: "/db", options: o)
        // Oldest: every key, in four flushes, compacted into level 1 (several tables).
        for part in 0..<4 {
            for i in stride(from: part * 150, to: part * 150 + 150, by: 1) { try await db.put(key(i), Self.value(i)) }
            try db.flush()
        }
        try db.compactUntilSettled()
        let level1 = db.liveTables.filter { $0.level >= 1 }
        try #require(level1.count >= 2, "\(db.liveTables)")
        // Newer, one level-0 table: every third key rewritten, every seventh deleted.
        for i in stride(from: 0, to: 600, by: 3) { try await db.put(key(i), Array("newer-\(i)".utf8)) }
        for i in stride(from: 0, to: 600, by: 7) { try await db.delete(key(i)) }
        try db.flush()
        let newer = try #require(db.liveTables.first { $0.level == 0 })
        // Newest: every eleventh key (the memtable; written as a table at close).
        for i in stride(from: 0, to: 600, by: 11) { try await db.put(key(i), Array("newest-\(i)".utf8)) }
        try await db.close()

        let victim = which == "newer" ? newer : level1[level1.count / 2]
        let path = "/db/" + Database.tableName(victim.number)
        let reader = try TableReader(fs: fs, path: path)
        if which == "open" {
            let bytes = try #require(fs.contents(path))
            fs.flipBit(path, byte: bytes.count - 1)   // the footer's magic number
        } else {
            try #require(reader.blockCount >= 3)
            let middle = reader.index[reader.blockCount / 2].handle
            fs.flipBit(path, byte: Int(middle.offset) + 7, bit: 2)
        }
        let back = try Database.open(fs: fs.session(), directory: "/db", options: o)
        #expect(throws: StorageError.self) { _ = try Self.entries(back, from: key(0), to: key(600)) }
        let it = try back.snapshot().iterator(from: key(0), to: key(600), damage: .passOver)
        var scanned: [[UInt8]: [UInt8]] = [:]
        var order: [[UInt8]] = []
        while let e = try it.nextEntry() {
            scanned[e.key] = e.value
            order.append(e.key)
        }
        #expect(order == order.sorted { $0.lexicographicallyPrecedes($1) })
        var unreadable = 0
        for i in 0..<600 {
            do {
                let v = try back.get(key(i))
                #expect(scanned[key(i)] == v, "key \(i): read \(v.map { String(decoding: $0, as: UTF8.self) } ?? "nil"), scanned \(scanned[key(i)].map { String(decoding: $0, as: UTF8.self) } ?? "nil")")
            } catch {
                unreadable += 1
                #expect(scanned[key(i)] == nil, "key \(i) cannot be read but the scan holds it")
            }
        }
        #expect(unreadable > 0, "the damage hides some keys")
        #expect(scanned.count > 300)
        #expect(back.damagedTables.map(\.meta.number) == [victim.number])
        try await back.close()
    }

    /// `verify` reads a table through and finds a bad block before any read needs it;
    /// `quarantine` sets the table aside at once (kept across a restart), its intact blocks
    /// still serving.
    @Test func verifyFindsADamagedBlockAndQuarantineSetsTheTableAside() async throws {
        let fs = FaultyFileSystem()
        let table = try await Self.oneTable(fs)
        let number = try #require(Self.tableNumber(table))
        fs.flipBit(table, byte: 40, bit: 3)
        let db = try Database.open(fs: fs.session(), directory: "/db", options: Self.options())
        #expect(db.damagedTables.isEmpty, "nothing read the damaged block yet")
        let found = try db.verify(table: number)
        #expect(found.damage.count == 1)
        #expect(found.bytes > 0)
        #expect(db.damagedTables.map(\.meta.number) == [number])
        #expect(db.damagedTables.first?.quarantined == false)
        #expect(try db.quarantine(table: number))
        #expect(try db.quarantine(table: number) == false, "already set aside")
        #expect(db.statistics.quarantinedTables == [number])
        #expect(db.damagedTables.first?.quarantined == true)
        for i in 50..<100 { #expect(try db.get(key(i)) == Self.value(i)) }
        Self.expectCorrupt(db, key(0), table)
        // A sound table verifies clean.
        for i in 100..<200 { try await db.put(key(i), Self.value(i)) }
        try db.flush()
        let sound = try #require(db.liveTables.map(\.number).first { $0 != number })
        let clean = try db.verify(table: sound)
        #expect(clean.damage.isEmpty && clean.bytes > 0)
        try await db.close()
        let back = try Database.open(fs: fs.session(), directory: "/db", options: Self.options())
        #expect(back.statistics.quarantinedTables == [number])
        try await back.close()
    }

    /// Every entry of `db` in `[lower, upper)`, throwing on the first error.
    static func entries(_ db: Database, from lower: [UInt8], to upper: [UInt8]) throws -> [[UInt8]] {
        let it = try db.iterator(from: lower, to: upper)
        var keys: [[UInt8]] = []
        while let e = try it.nextEntry() { keys.append(e.key) }
        return keys
    }
}
