import Testing
import Foundation
@testable import CairnStorage

/// Options that make every mechanism run on small data: tiny memtables, tables, blocks and levels.
func smallOptions() -> DatabaseOptions {
    var o = DatabaseOptions()
    o.writeBufferBytes = 48 << 10
    o.blockSize = 512
    o.compaction.level0Trigger = 2
    o.compaction.level0Slowdown = 6
    o.compaction.level0Stop = 10
    o.compaction.levelBaseBytes = 48 << 10
    o.compaction.targetFileBytes = 16 << 10
    o.compactionBytesPerSecond = 0
    o.blockCacheBytes = 256 << 10
    return o
}

/// `smallOptions` with memtables large enough that only explicit flushes write tables.
func explicitFlushOptions() -> DatabaseOptions {
    var o = smallOptions()
    o.writeBufferBytes = 8 << 20
    return o
}

func key(_ i: Int) -> [UInt8] { Array(String(format: "key%06d", i).utf8) }

/// What the database should hold: a sorted dictionary model.
struct Model {
    var data: [[UInt8]: [UInt8]] = [:]
    func range(_ lower: [UInt8], _ upper: [UInt8]?) -> [([UInt8], [UInt8])] {
        data.filter { e in !e.key.lexicographicallyPrecedes(lower) && (upper.map { e.key.lexicographicallyPrecedes($0) } ?? true) }
            .sorted { $0.key.lexicographicallyPrecedes($1.key) }.map { ($0.key, $0.value) }
    }
}

/// Serialized: these tests call the engine's synchronous flush and compaction from async code,
/// which holds a cooperative thread; one at a time leaves the other to the rest of the suite.
@Suite(.serialized) struct EngineTests {
    /// Random puts, deletes, range deletions, flushes, compactions and reopens against a model:
    /// every point read and every range scan (from live state and from older snapshots) agrees.
    @Test(arguments: 1...6) func randomOperationsAgreeWithAModel(seed: Int) async throws {
        var rng = Seeded(state: UInt64(seed) &* 104_729)
        let fs = FaultyFileSystem()
        var db = try Database.open(fs: fs, directory: "/db", options: smallOptions())
        var model = Model()
        var snapshots: [(Snapshot, Model)] = []
        for step in 0..<3000 {
            let roll = Int.random(in: 0..<1000, using: &rng)
            let k = key(Int.random(in: 0..<600, using: &rng))
            switch roll {
            case 0..<700:
                let v = Array("v\(step)-".utf8) + [UInt8](repeating: UInt8(step & 0xFF), count: Int.random(in: 0..<120, using: &rng))
                try await db.put(k, v, sync: SyncMode.none)
                model.data[k] = v
            case 700..<900:
                try await db.delete(k, sync: SyncMode.none)
                model.data[k] = nil
            case 900..<915:
                let a = Int.random(in: 0..<600, using: &rng)
                let upper = key(a + Int.random(in: 1..<80, using: &rng))
                try await db.deleteRange(from: key(a), to: upper, sync: SyncMode.none)
                for k in model.data.keys where !k.lexicographicallyPrecedes(key(a)) && k.lexicographicallyPrecedes(upper) { model.data[k] = nil }
            case 915..<935:
                try db.flush()
            case 935..<945:
                try db.compactUntilSettled()
            case 945..<955:
                snapshots.append((db.snapshot(), model))
                if snapshots.count > 4 { snapshots.removeFirst() }
            case 955..<962:
                try await db.close()
                snapshots = []
                db = try Database.open(fs: fs, directory: "/db", options: smallOptions())
            default:
                let lo = key(Int.random(in: 0..<600, using: &rng))
                let hi: [UInt8]? = Bool.random(using: &rng) ? nil : key(Int.random(in: 0..<700, using: &rng))
                let got = Array(try db.iterator(from: lo, to: hi).map { ($0.key, $0.value) })
                let want = model.range(lo, hi)
                #expect(got.map(\.0) == want.map(\.0), "seed \(seed) step \(step): scan keys")
                #expect(got.map(\.1) == want.map(\.1), "seed \(seed) step \(step): scan values")
            }
            if step % 100 == 0 {
                #expect(try db.get(k) == model.data[k], "seed \(seed) step \(step)")
            }
        }
        for i in 0..<600 { #expect(try db.get(key(i)) == model.data[key(i)], "seed \(seed): final \(i)") }
        for (snap, old) in snapshots {
            let got = Array(try snap.iterator().map(\.key))
            #expect(got == old.range([], nil).map(\.0), "seed \(seed): a snapshot changed under later writes")
            for i in stride(from: 0, to: 600, by: 7) { #expect(try snap.get(key(i)) == old.data[key(i)]) }
        }
        let stats = db.statistics
        #expect(stats.compactions + stats.trivialMoves > 0 || seed > 0)
        try await db.close()
    }

    /// Old logs after a switch and tables dropped by compaction close their descriptors: a node
    /// that runs for months must not run out of them.
    @Test func filesDroppedByFlushesAndCompactionsReleaseTheirDescriptors() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-fd-\(UInt64.random(in: 0...UInt64.max))").path
        // Descriptors of this process open on files in `dir` (other tests run alongside and open
        // their own; only ours count).
        func openDescriptors() -> Int {
            let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
            return fds.count { fd in
                (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + fd))?.hasPrefix(dir + "/") ?? false
            }
        }
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let db = try Database.open(fs: PosixFileSystem(), directory: dir, options: smallOptions())
        for i in 0..<6000 { try await db.put(key(i % 1500), [UInt8](repeating: UInt8(i & 0xFF), count: 100), sync: SyncMode.none) }
        try db.compactUntilSettled()
        let s = db.statistics
        #expect(s.flushes > 5 && s.compactions > 0)
        // Three more rounds, each ~30 log switches and several compactions: with a leak the
        // count grows by dozens per round; without, it stays within the live files' number.
        var counts: [Int] = []
        var flushesBefore = s.flushes
        for _ in 0..<3 {
            for i in 0..<3000 { try await db.put(key(i % 1500), [UInt8](repeating: 7, count: 100), sync: SyncMode.none) }
            try db.compactUntilSettled()
            counts.append(openDescriptors())
            #expect(db.statistics.flushes - flushesBefore >= 10)
            flushesBefore = db.statistics.flushes
        }
        let live = try FileManager.default.contentsOfDirectory(atPath: dir).count
        #expect(counts[2] - counts[0] <= live, "descriptors \(counts) with \(live) files in the directory")
        try await db.close()
    }

    @Test func compactionMovesDataDownAndDropsShadowedVersionsAndDeletions() async throws {
        let fs = FaultyFileSystem()
        let db = try Database.open(fs: fs, directory: "/db", options: smallOptions())
        // Three rounds over the same keys: only the last round's values may remain on disk.
        for round in 0..<3 {
            for i in 0..<2000 { try await db.put(key(i), Array("round\(round)-\(i)".utf8), sync: SyncMode.none) }
        }
        for i in stride(from: 0, to: 2000, by: 2) { try await db.delete(key(i), sync: SyncMode.none) }
        try db.compactUntilSettled()
        let stats = db.statistics
        #expect(stats.compactions > 0)
        #expect(stats.tablesPerLevel[0] < 2, "level 0 stays under its trigger once settled")
        #expect(stats.tablesPerLevel.dropFirst().reduce(0, +) > 0, "data reached deeper levels")
        #expect(stats.droppedEntries > 0)
        for i in 0..<2000 { #expect(try db.get(key(i)) == (i % 2 == 0 ? nil : Array("round2-\(i)".utf8))) }
        // On disk: 7000 entries were written; merges dropped the shadowed and deleted ones (a
        // version shadowed across levels that no compaction has joined yet may remain).
        var onDisk = 0
        for name in try fs.list("/db") where name.hasSuffix(".sst") {
            onDisk += try TableReader(fs: fs, path: "/db/" + name).scan().count
        }
        #expect(onDisk >= 1000 && onDisk < 1500, "\(onDisk) entries on disk")
        try await db.close()
    }

    @Test func deleteRangeHidesAtOnceSurvivesReopenAndIsReclaimed() async throws {
        let fs = FaultyFileSystem()
        var db = try Database.open(fs: fs, directory: "/db", options: smallOptions())
        for i in 0..<3000 { try await db.put(key(i), Array("value-\(i)".utf8), sync: SyncMode.none) }
        try db.compactUntilSettled()
        try await db.put(key(1500), Array("memtable".utf8), sync: SyncMode.none)
        try await db.deleteRange(from: key(1000), to: key(2000), sync: SyncMode.none)
        try await db.put(key(1200), Array("after".utf8), sync: SyncMode.none)
        func check(_ d: Database) throws {
            #expect(try d.get(key(999)) == Array("value-999".utf8))
            #expect(try d.get(key(1000)) == nil)
            #expect(try d.get(key(1500)) == nil)
            #expect(try d.get(key(1999)) == nil)
            #expect(try d.get(key(2000)) == Array("value-2000".utf8))
            #expect(try d.get(key(1200)) == Array("after".utf8))
            let keys = Array(try d.iterator(from: key(990), to: key(2010)).map(\.key))
            #expect(keys == (990..<1000).map(key) + [key(1200)] + (2000..<2010).map(key))
        }
        try check(db)
        try await db.close()
        db = try Database.open(fs: fs, directory: "/db", options: smallOptions())
        try check(db)
        // (The background worker may already have rewritten the tables and retired the tombstone.)
        // Compaction removes the hidden data; then the tombstone hides nothing and retires.
        try db.flush()
        try db.compactUntilSettled()
        try check(db)
        #expect(db.statistics.rangeTombstones == 0)
        var onDisk = 0
        for name in try fs.list("/db") where name.hasSuffix(".sst") {
            onDisk += try TableReader(fs: fs, path: "/db/" + name).scan().count
        }
        #expect(onDisk == 2001)
        try await db.close()
    }

    @Test func aRangeDeletionDropsTablesWhollyInsideItWithoutRewritingThem() async throws {
        let fs = FaultyFileSystem()
        var o = smallOptions()
        o.compaction.level0Trigger = 100   // no background merge of the two tables
        o.writeBufferBytes = 4 << 20       // and no automatic flush: exactly the two below
        let db = try Database.open(fs: fs, directory: "/db", options: o)
        // Two "partitions" flushed to separate tables.
        for i in 0..<200 { try await db.put([1] + key(i), [1], sync: SyncMode.none) }
        try db.flush()
        for i in 0..<200 { try await db.put([2] + key(i), [2], sync: SyncMode.none) }
        try db.flush()
        let before = try fs.list("/db").filter { $0.hasSuffix(".sst") }.count
        try await db.deleteRange(from: [1], to: [2])
        #expect(try fs.list("/db").filter { $0.hasSuffix(".sst") }.count == before - 1)
        #expect(Array(try db.iterator(prefix: [1])).isEmpty)
        #expect(Array(try db.iterator(prefix: [2])).count == 200)
        try await db.close()
    }

    @Test func iterationMergesEverySourceInKeyOrderWithTheNewestVersion() async throws {
        let fs = FaultyFileSystem()
        var o = smallOptions()
        o.compaction.level0Trigger = 100   // keep the tables apart in level 0
        o.compaction.level0Slowdown = 200
        o.compaction.level0Stop = 300
        let db = try Database.open(fs: fs, directory: "/db", options: o)
        // Keys spread over three tables, the memtable, and versions that shadow each other.
        for i in stride(from: 0, to: 90, by: 3) { try await db.put(key(i), Array("t1".utf8)) }
        try db.flush()
        for i in stride(from: 1, to: 90, by: 3) { try await db.put(key(i), Array("t2".utf8)) }
        for i in stride(from: 0, to: 90, by: 9) { try await db.put(key(i), Array("t2-over".utf8)) }
        try db.flush()
        for i in stride(from: 2, to: 90, by: 3) { try await db.put(key(i), Array("mem".utf8)) }
        try await db.delete(key(3))
        let snap = db.snapshot()
        try await db.put(key(4), Array("later".utf8))
        let all = Array(try snap.iterator())
        #expect(all.map(\.key) == (0..<90).filter { $0 != 3 }.map(key))
        for (k, v) in all {
            let i = Int(String(decoding: k.dropFirst(3), as: UTF8.self)) ?? -1
            let want = i % 9 == 0 ? "t2-over" : (i % 3 == 0 ? "t1" : (i % 3 == 1 ? "t2" : "mem"))
            #expect(String(decoding: v, as: UTF8.self) == want, "key \(i)")
        }
        #expect(Array(try db.iterator(prefix: Array("key00001".utf8))).map(\.key) == (10..<20).map(key))
        #expect(try db.get(key(4)) == Array("later".utf8))
        #expect(try snap.get(key(4)) == Array("t2".utf8))
        #expect(DatabaseIterator.upperBound(ofPrefix: [1, 0xFF]) == [2])
        #expect(DatabaseIterator.upperBound(ofPrefix: [0xFF, 0xFF]) == nil)
        try await db.close()
    }

    @Test func writesPastTheLevel0BoundsAreDelayedOrWaitButNeverFail() async throws {
        let fs = FaultyFileSystem()
        var o = smallOptions()
        o.compaction.level0Trigger = 2
        o.compaction.level0Slowdown = 3
        o.compaction.level0Stop = 4
        o.writeBufferBytes = 16 << 10
        o.compactionBytesPerSecond = 4 << 20   // slow compaction: level 0 piles up
        let db = try Database.open(fs: fs, directory: "/db", options: o)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for w in 0..<4 {
                group.addTask {
                    for i in 0..<1500 { try await db.put(key(w * 10_000 + i), [UInt8](repeating: 9, count: 100), sync: SyncMode.none) }
                }
            }
            try await group.waitForAll()
        }
        let s = db.statistics
        #expect(s.delayedWrites + s.stalledWrites > 0, "the bounds were reached")
        #expect(s.writes == 6000)
        for w in 0..<4 { for i in stride(from: 0, to: 1500, by: 37) { #expect(try db.get(key(w * 10_000 + i)) != nil) } }
        try await db.close()
    }

    @Test func aBitFlipInATableIsReportedNeverReturned() async throws {
        let fs = FaultyFileSystem()
        let db = try Database.open(fs: fs, directory: "/db", options: smallOptions())
        for i in 0..<100 { try await db.put(key(i), Array("value-\(i)".utf8)) }
        try db.flush()
        try await db.close()
        let table = try #require(try fs.list("/db").first { $0.hasSuffix(".sst") })
        fs.flipBit("/db/" + table, byte: 40, bit: 3)   // inside the first data block
        let back = try Database.open(fs: fs, directory: "/db", options: smallOptions())
        var corrupt = 0
        for i in 0..<100 {
            do {
                let v = try back.get(key(i))
                #expect(v == Array("value-\(i)".utf8), "a flipped bit came back as data")
            } catch {
                guard case .corruption(let path, _, _) = error else { Issue.record("unexpected \(error)"); continue }
                #expect(path.hasSuffix(table))
                corrupt += 1
            }
        }
        #expect(corrupt > 0)
        // A scan stops with the error, at creation or on the way.
        do {
            let it = try back.iterator()
            _ = Array(it)
            #expect(it.error != nil)
        } catch {
            guard case .corruption = error else { Issue.record("unexpected \(error)"); return }
        }
        try await back.close()
    }

    @Test func aFailedSyncDuringAFlushStopsWrites() async throws {
        let fs = FaultyFileSystem()
        let db = try Database.open(fs: fs, directory: "/db", options: smallOptions())
        for i in 0..<50 { try await db.put(key(i), [1]) }
        fs.failNextSyncs(1)
        #expect(throws: StorageError.self) { try db.flush() }
        // Either the flush's failure or the log's: no write is accepted any more.
        _ = db.backgroundFailed(.syncFailed(path: "/db/table", errno: 5), failures: 1)
        await #expect(throws: StorageError.self) { try await db.put(key(99), [1]) }
        await db.abandon()
        let back = try Database.open(fs: fs, directory: "/db", options: smallOptions())
        for i in 0..<50 { #expect(try back.get(key(i)) == [1]) }
        try await back.close()
    }

    /// Crash at random points of a write-heavy run with background flushes and compactions:
    /// acknowledged (`always`) writes survive with their exact values; nothing invented appears.
    @Test(arguments: 1...12) func crashesDuringFlushesAndCompactionsLoseNothingAcknowledged(seed: Int) async throws {
        var rng = Seeded(state: UInt64(seed) &* 7_777_777)
        let fs = FaultyFileSystem()
        var acked: [[UInt8]: [UInt8]] = [:]
        var written: [[UInt8]: Set<[UInt8]>] = [:]
        for round in 0..<3 {
            // A session dies with the crash: the old database's workers, possibly mid-flush or
            // mid-compaction, can no longer touch the disk.
            let db = try Database.open(fs: fs.session(), directory: "/db", options: smallOptions())
            let n = Int.random(in: 200...1500, using: &rng)
            for i in 0..<n {
                let k = key(Int.random(in: 0..<800, using: &rng))
                let v = Array("r\(round)-\(i)-".utf8) + [UInt8](repeating: 1, count: Int.random(in: 0..<200, using: &rng))
                let durable = Int.random(in: 0..<4, using: &rng) == 0
                written[k, default: []].insert(v)
                try await db.put(k, v, sync: durable ? .always : SyncMode.none)
                if durable { acked[k] = v } else if acked[k] != nil { acked[k] = nil }
            }
            fs.crash(tearing: Bool.random(using: &rng), rng: &rng)
            await db.abandon()
            let back = try Database.open(fs: fs.session(), directory: "/db", options: smallOptions())
            for (k, v) in acked { #expect(try back.get(k) == v, "seed \(seed) round \(round): acknowledged write lost") }
            for (k, v) in Array(try back.iterator()) {
                #expect(written[k]?.contains(v) == true, "seed \(seed): a value that was never written")
            }
            // What survived is now the truth for later rounds.
            for (k, v) in acked where try back.get(k) != v { acked[k] = nil }
            try await back.close()
        }
    }
}

@Suite struct BlockCacheTests {
    func block(_ n: Int) throws -> Block {
        var b = BlockBuilder()
        try b.add(key: [UInt8(n & 0xFF)], value: [UInt8](repeating: 1, count: 10))
        return try Block(b.finish(), path: "t", offset: 0)
    }

    @Test func evictsTheLeastRecentlyUsedAndCounts() throws {
        let cache = BlockCache(capacityBytes: 16 * 300)   // 300 bytes per shard
        let k = { (o: UInt64) in BlockCache.Key(file: 1, offset: o) }
        // Find three keys in the same shard by filling and probing.
        for o in 0..<64 { cache.insert(k(UInt64(o)), try block(o), charge: 100) }
        let c = cache.counters
        #expect(c.bytes <= 16 * 300)
        #expect(c.evictions > 0)
        #expect(c.entries * 100 == c.bytes)
        // The most recent insert of each shard is still there; a fresh get hits.
        #expect(cache.get(k(63)) != nil)
        #expect(cache.counters.hits == 1)
        #expect(cache.get(k(10_000)) == nil)
        #expect(cache.counters.misses == 1)
        cache.evict(file: 1)
        #expect(cache.counters.bytes == 0 && cache.counters.entries == 0)
    }

    @Test func aRecentlyReadBlockOutlivesAnOlderOne() throws {
        let cache = BlockCache(capacityBytes: 16 * 250)   // two 100-byte blocks per shard
        // Three keys of one shard (the cache's placement, recomputed by `shardOf`).
        var sameShard: [BlockCache.Key] = []
        var o: UInt64 = 0
        while sameShard.count < 3 {
            let key = BlockCache.Key(file: 7, offset: o)
            if shardOf(key) == shardOf(BlockCache.Key(file: 7, offset: 0)) { sameShard.append(key) }
            o += 1
        }
        cache.insert(sameShard[0], try block(0), charge: 100)
        cache.insert(sameShard[1], try block(1), charge: 100)
        _ = cache.get(sameShard[0])                       // 0 is now the most recent
        cache.insert(sameShard[2], try block(2), charge: 100)   // evicts 1, not 0
        #expect(cache.get(sameShard[0]) != nil)
        #expect(cache.get(sameShard[1]) == nil)
        #expect(cache.get(sameShard[2]) != nil)
    }

    func shardOf(_ key: BlockCache.Key) -> UInt64 {
        var h = (key.file &* 0x9E37_79B9_7F4A_7C15) ^ (key.offset &* 0xC2B2_AE3D_27D4_EB4F)
        h ^= h >> 29
        return h & 15
    }
}

@Suite struct CompactionPolicyTests {
    func t(_ n: UInt64, _ level: Int, _ lo: UInt8, _ hi: UInt8, size: UInt64 = 1000, seq: UInt64 = 10) -> TableMeta {
        TableMeta(number: n, level: level, size: size, smallest: [lo], largest: [hi], smallestSequence: seq, largestSequence: seq + 5)
    }

    func version(_ tables: [TableMeta], tombstones: [RangeTombstone] = []) -> Version {
        var e = VersionEdit()
        e.added = tables
        e.addedTombstones = tombstones
        var v = Version()
        v.apply(e)
        return v
    }

    @Test func level0PastItsTriggerMergesEveryLevel0TableWithItsOverlapsInLevel1() {
        var p = CompactionPolicy()
        p.level0Trigger = 2
        let v = version([t(1, 0, 10, 20), t(2, 0, 15, 40), t(3, 1, 0, 9), t(4, 1, 12, 30), t(5, 1, 35, 60), t(6, 1, 61, 90)])
        let plan = p.pick(v)
        #expect(plan?.level == 0 && plan?.outputLevel == 1)
        #expect(plan?.inputs.map(\.number).sorted() == [1, 2])
        #expect(plan?.overlaps.map(\.number) == [4, 5])
        #expect(p.pick(version([t(1, 0, 10, 20)])) == nil)
    }

    @Test func anOversizedLevelCompactsRoundRobinAndMovesTriviallyWhenNothingOverlaps() {
        var p = CompactionPolicy()
        p.levelBaseBytes = 1500
        let v = version([t(1, 1, 0, 9), t(2, 1, 10, 19), t(3, 2, 12, 14)])
        let first = p.pick(v)
        #expect(first?.inputs.map(\.number) == [1] && first?.isTrivialMove == true)
        let next = p.pick(v, pointers: [1: [9]])
        #expect(next?.inputs.map(\.number) == [2] && next?.overlaps.map(\.number) == [3] && next?.isTrivialMove == false)
    }

    @Test func aTombstoneOverAnOlderTableAsksForThatTableToBeRewritten() {
        let p = CompactionPolicy()
        let tomb = RangeTombstone(lower: [10], upper: [20], sequence: 50)
        let v = version([t(1, 1, 0, 9, seq: 1), t(2, 1, 12, 30, seq: 1)], tombstones: [tomb])
        let plan = p.pick(v)
        #expect(plan?.inputs.map(\.number) == [2])
        #expect(plan?.outputLevel == 1, "the deepest level is rewritten in place")
        #expect(p.pick(version([t(2, 1, 12, 30, seq: 60)], tombstones: [tomb])) == nil, "newer than the tombstone: nothing to drop")
    }
}
