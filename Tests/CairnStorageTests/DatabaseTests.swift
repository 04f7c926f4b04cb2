import Testing
import Foundation
@testable import CairnStorage

@Suite struct DatabaseTests {
    /// `logSyncs` counts the syncs of every log since open: a memtable switch (a new log and its
    /// committer) does not take it back.
    @Test func logSyncsKeepCountingAcrossALogSwitch() async throws {
        let db = try Database.open(fs: FaultyFileSystem(), directory: "/db")   // sync: always
        for i in 0..<3 { try await db.put([UInt8(i)], [1]) }
        let before = db.statistics.logSyncs
        #expect(before >= 3)
        try db.flush()   // switches to a new log
        #expect(db.statistics.flushes == 1)
        #expect(db.statistics.logSyncs >= before)
        try await db.put([9], [1])
        #expect(db.statistics.logSyncs > before)
        try await db.close()
    }

    /// Under `always` the log's buffer turns a group commit's records into one file write; a
    /// write acknowledged without a sync (`sync: .none` for it) leaves the buffer at once; a log
    /// switch writes out what the old log's buffer holds; with the buffer off every record is its
    /// own write.
    @Test func theLogBufferWritesOncePerSyncAndNeverHoldsAnAcknowledgedWrite() async throws {
        let fs = FaultyFileSystem()
        var rng = SystemRandomNumberGenerator()
        let db = try Database.open(fs: fs, directory: "/db")   // sync: always, 64 KiB buffer
        let before = db.statistics
        var batch = WriteBatch()
        var last: UInt64 = 0
        for i in 0..<3 {
            batch = WriteBatch()
            batch.put([UInt8(i)], [1])
            last = try db.apply(batch)
        }
        #expect(db.statistics.logWrites == before.logWrites, "records wait in the buffer")
        try await db.waitDurable(upTo: last)
        #expect(db.statistics.logWrites == before.logWrites + 1 && db.statistics.logSyncs == before.logSyncs + 1)

        try await db.put([42], [42], sync: SyncMode.none)
        #expect(db.statistics.logWrites == before.logWrites + 2 && db.statistics.logSyncs == before.logSyncs + 1)

        batch = WriteBatch()
        batch.put([7], [7])
        _ = try db.apply(batch)
        try db.flush()   // switches logs: the old one is written out and synced first
        fs.crash(tearing: true, rng: &rng)
        await db.abandon()
        let again = try Database.open(fs: fs, directory: "/db")
        #expect(try again.get([7]) == [7] && again.get([42]) == [42] && again.get([2]) == [1])
        try await again.close()

        var options = DatabaseOptions()
        options.logBufferBytes = 0
        let unbuffered = try Database.open(fs: FaultyFileSystem(), directory: "/db", options: options)
        batch = WriteBatch()
        batch.put([1], [1])
        let w0 = unbuffered.statistics.logWrites
        _ = try unbuffered.apply(batch)
        _ = try unbuffered.apply(batch)
        #expect(unbuffered.statistics.logWrites == w0 + 2)
        try await unbuffered.close()
    }

    @Test func putGetDeleteAndBatchesSurviveAReopen() async throws {
        let fs = FaultyFileSystem()
        let db = try Database.open(fs: fs, directory: "/db")
        try await db.put([1], [10])
        try await db.put([2], [20])
        try await db.delete([1])
        var b = WriteBatch()
        b.put([3], [30])
        b.put([2], [21])
        b.delete([4])
        try await db.write(b)
        #expect(try db.get([1]) == nil)
        #expect(try db.get([2]) == [21])
        #expect(try db.get([3]) == [30])
        await db.abandon()   // as a crash: the log, not a table, brings the writes back
        let again = try Database.open(fs: fs, directory: "/db")
        #expect(try again.get([1]) == nil)
        #expect(try again.get([2]) == [21])
        #expect(try again.get([3]) == [30])
        #expect(again.statistics.recoveredRecords == 4)
        try await again.put([5], [50])
        try await again.close()
        let third = try Database.open(fs: fs, directory: "/db")
        #expect(try third.get([5]) == [50])
        #expect(try third.get([2]) == [21])
    }

    /// The callback wait (`whenDurable`): each write it reported durable survives a crash that
    /// drops everything unsynced.
    @Test func whatWhenDurableReportsSurvivesACrash() async throws {
        let fs = FaultyFileSystem()
        let db = try Database.open(fs: fs, directory: "/db")
        let reported = Shared<[UInt8]>([])
        for k in UInt8(1)...20 {
            var b = WriteBatch()
            b.put([k], [k, k])
            let sequence = try db.apply(b)
            db.whenDurable(upTo: sequence) { error in
                if error == nil { reported.value.withLock { $0.append(k) } }
            }
        }
        try await settleStorage("every write reported") { reported.value.withLock { $0.count } == 20 }
        await db.abandon()
        var rng = Seeded(state: 11)
        fs.crash(tearing: true, rng: &rng)
        let back = try Database.open(fs: fs, directory: "/db")
        for k in reported.value.withLock({ $0 }) { #expect(try back.get([k]) == [k, k]) }
    }

    /// For many seeds: concurrent writers put unique keys, some acknowledged under `always`,
    /// some written with no sync; then a crash drops (or tears) everything unsynced. After reopen,
    /// every acknowledged key holds its exact value, every key present was written, and each batch
    /// is all there or all gone.
    @Test func acknowledgedWritesSurviveCrashesAndBatchesStayAtomic() async throws {
        for seed in 1...60 {
            var rng = Seeded(state: UInt64(seed) &* 7919)
            let fs = FaultyFileSystem()
            let db = try Database.open(fs: fs, directory: "/db")
            let acked = Shared<[([UInt8], [UInt8])]>([])
            let writes = Int.random(in: 1...40, using: &rng)
            let plans: [(Int, Bool, Int)] = (0..<writes).map { i in (i, Bool.random(using: &rng), Int.random(in: 1...3, using: &rng)) }
            try await withThrowingTaskGroup(of: Void.self) { group in
                for (i, durable, size) in plans {
                    group.addTask {
                        var b = WriteBatch()
                        var pairs: [([UInt8], [UInt8])] = []
                        for j in 0..<size {
                            let k: [UInt8] = [UInt8(i), UInt8(j)]
                            let v: [UInt8] = [UInt8(i), UInt8(j), UInt8(size)]
                            b.put(k, v)
                            pairs.append((k, v))
                        }
                        try await db.write(b, sync: durable ? .always : SyncMode.none)
                        if durable { acked.value.withLock { $0 += pairs } }
                    }
                }
                try await group.waitForAll()
            }
            await db.abandon()
            fs.crash(tearing: Bool.random(using: &rng), rng: &rng)
            let back = try Database.open(fs: fs, directory: "/db")
            for (k, v) in acked.value.withLock({ $0 }) {
                #expect(try back.get(k) == v, "seed \(seed): acknowledged key \(k) lost")
            }
            for (i, _, size) in plans {
                let present = try (0..<size).map { j throws in try back.get([UInt8(i), UInt8(j)]) != nil }
                #expect(present.allSatisfy { $0 } || present.allSatisfy { !$0 }, "seed \(seed): batch \(i) partly applied")
                for j in 0..<size {
                    if let v = try back.get([UInt8(i), UInt8(j)]) { #expect(v == [UInt8(i), UInt8(j), UInt8(size)]) }
                }
            }
            try await back.close()
        }
    }

    @Test func afterAFailedLogSyncEveryWriteIsRefusedUntilReopened() async throws {
        let fs = FaultyFileSystem()
        let db = try Database.open(fs: fs, directory: "/db")
        try await db.put([1], [1])
        fs.failNextSyncs(1)
        await #expect(throws: StorageError.self) { try await db.put([2], [2]) }
        await #expect(throws: StorageError.self) { try await db.put([3], [3]) }
        await db.abandon()
        let reopened = try Database.open(fs: fs, directory: "/db")
        #expect(try reopened.get([1]) == [1])
        try await reopened.put([4], [4])
        #expect(try reopened.get([4]) == [4])
    }

    @Test func aTornLogTailIsTruncatedAndReported() async throws {
        let fs = FaultyFileSystem()
        let db = try Database.open(fs: fs, directory: "/db")
        try await db.put([1], [1])
        try await db.put([2], Array(repeating: 7, count: 100))
        await db.abandon()
        // The crash hit the middle of the last append: cut the log 5 bytes short.
        let size = try #require(fs.contents("/db/000001.log")?.count)
        try #require(size > 5)
        try fs.truncate("/db/000001.log", to: UInt64(size - 5))
        let back = try Database.open(fs: fs, directory: "/db")
        #expect(try back.get([1]) == [1])
        #expect(try back.get([2]) == nil)
        #expect(back.statistics.recoveredRecords == 1)
        #expect(back.statistics.tornTailBytes > 0)
        // The tail was truncated: the next open finds a clean log.
        try await back.close()
        let clean = try Database.open(fs: fs, directory: "/db")
        #expect(clean.statistics.tornTailBytes == 0)
        #expect(try clean.get([1]) == [1])
    }

    /// A log corrupt before its tail is refused, naming the file and offset; with `salvage` the
    /// corrupt record, and a record whose checksum holds but which is not a batch, are skipped,
    /// everything else is kept, and the statistics say what was dropped.
    @Test func salvageSkipsCorruptLogRecordsKeepsTheRestAndReportsWhatItDropped() async throws {
        let fs = FaultyFileSystem()
        let db = try Database.open(fs: fs, directory: "/db")
        for i in 0..<6 { try await db.put([UInt8(i)], [UInt8(i), 1]) }
        await db.abandon()
        let log = "/db/000001.log"
        let frame = try #require(fs.contents(log)).count / 6   // six records of one size
        fs.flipBit(log, byte: 2 * frame + WAL.headerBytes + 3, bit: 2)   // inside record 2's payload
        let f = try fs.openAppendable(log, create: false)
        let notABatch = WAL.frame([9, 9, 9])
        var later = WriteBatch()
        later.put([7], [7, 1])
        try f.append(notABatch + WAL.frame(later.encoded(firstSequence: 7)))
        #expect(throws: StorageError.corruption(path: log, offset: UInt64(2 * frame),
                                                reason: "bad log record followed by valid records at \(3 * frame)")) {
            try Database.open(fs: fs, directory: "/db")
        }
        var o = DatabaseOptions()
        o.salvage = true
        let back = try Database.open(fs: fs, directory: "/db", options: o)
        for i in [0, 1, 3, 4, 5] { #expect(try back.get([UInt8(i)]) == [UInt8(i), 1]) }
        #expect(try back.get([2]) == nil)
        #expect(try back.get([7]) == [7, 1])
        #expect(back.statistics.salvagedBytes == UInt64(frame + notABatch.count))
        #expect(back.statistics.salvagedRegions == 2)
        #expect(back.statistics.recoveredRecords == 6)
        try await back.close()
        // The salvaged state was flushed at open: a plain open now finds nothing to salvage.
        let clean = try Database.open(fs: fs, directory: "/db")
        #expect(try clean.get([7]) == [7, 1] && clean.statistics.salvagedBytes == 0)
        try await clean.close()
    }

    /// Without `salvage`, a record that checks out but is not a batch is refused at its offset.
    @Test func aLogRecordThatIsNotABatchIsRefusedAtItsOffset() async throws {
        let fs = FaultyFileSystem()
        let db = try Database.open(fs: fs, directory: "/db")
        try await db.put([1], [1])
        await db.abandon()
        let log = "/db/000001.log"
        let end = try #require(fs.contents(log)).count
        try fs.openAppendable(log, create: false).append(WAL.frame([9, 9, 9]))
        #expect(throws: StorageError.corruption(path: log, offset: UInt64(end), reason: "a log record with a valid checksum is not a write batch")) {
            try Database.open(fs: fs, directory: "/db")
        }
    }

    @Test func theRealDiskRoundTrips() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-db-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let db = try Database.open(fs: PosixFileSystem(), directory: dir)
        for i in 0..<200 { try await db.put(Array("k\(i)".utf8), Array("v\(i)".utf8)) }
        try await db.close()
        let back = try Database.open(fs: PosixFileSystem(), directory: dir)
        for i in 0..<200 { #expect(try back.get(Array("k\(i)".utf8)) == Array("v\(i)".utf8)) }
        try await back.close()
    }

    /// A log on the real disk is written ahead in zeroed chunks: its file is a whole number of
    /// chunks longer than its records, and every record written comes back from it, before and
    /// after a reopen (which replays a log with a zero tail as a clean one).
    @Test func theRealDiskLogIsZeroedAheadAndReadsBack() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-log-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let fs = PosixFileSystem()
        try fs.createDirectory(dir)
        let path = dir + "/000001.log"
        let writer = WALWriter(file: try fs.createLog(path, preallocateBytes: 4096), path: path)
        let payloads = (0..<100).map { i in [UInt8](repeating: UInt8(i), count: 100 + i) }
        for p in payloads { try writer.append([p], sync: true) }
        let logical = writer.size
        try writer.close()
        let file = try fs.openReadable(path)
        #expect(file.size % 4096 == 0 && file.size > logical, "\(file.size) bytes on disk for \(logical) appended")
        let r = try WAL.recover(file, path: path)
        #expect(r.records == payloads)
        #expect(r.validEnd == logical && r.tornTailBytes == 0 && r.zeroTailBytes == file.size - logical)
        file.close()

        var o = DatabaseOptions()
        o.logPreallocateBytes = 8192
        let db = try Database.open(fs: fs, directory: dir + "/db", options: o)
        for i in 0..<300 { try await db.put(Array("k\(i)".utf8), Array("v\(i)".utf8)) }
        await db.abandon()   // no flush: the reopen replays the log
        let back = try Database.open(fs: fs, directory: dir + "/db", options: o)
        for i in 0..<300 { #expect(try back.get(Array("k\(i)".utf8)) == Array("v\(i)".utf8)) }
        #expect(back.statistics.tornTailBytes == 0)
        try await back.close()
    }

    /// A flush writes its table out every `bytesPerSync` bytes (and not at all with 0); a
    /// write-out makes nothing durable, so a crash before the table's sync still loses nothing
    /// acknowledged — the log replays it.
    @Test func flushesWriteTheirTablesOutEveryBytesPerSync() async throws {
        let value = [UInt8](repeating: 7, count: 1000)
        for (bytesPerSync, expected) in [(64 << 10, 4...8), (0, 0...0)] {
            let fs = FaultyFileSystem()
            var o = explicitFlushOptions()
            o.bytesPerSync = bytesPerSync
            let db = try Database.open(fs: fs, directory: "/db", options: o)
            for i in 0..<300 { try await db.put(key(i), value) }
            let before = fs.writeOutCount
            try db.flush()
            // About 300 KB of table: one write-out per 64 KiB of blocks.
            #expect(expected.contains(fs.writeOutCount - before), "\(fs.writeOutCount - before) write-outs at \(bytesPerSync)")
            #expect(db.statistics.tableWriteOuts == fs.writeOutCount - before)
            for i in 0..<300 { #expect(try db.get(key(i)) == value) }
            try await db.close()
        }
    }

    /// The real disk's write-out (`sync_file_range`) covers what was appended since the last one.
    @Test func theRealDiskWritesATableOutAndReadsItBack() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-writeout-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let fs = PosixFileSystem()
        try fs.createDirectory(dir)
        let b = try TableBuilder(fs: fs, path: dir + "/1.sst", blockSize: 4096, bytesPerSync: 16 << 10)
        for i in 0..<10_000 { try b.add(key: key(i), value: Array("value \(i)".utf8)) }
        try b.finish()
        #expect(b.writeOuts >= 5, "\(b.writeOuts) write-outs of 16 KiB for \(b.estimatedSize) bytes")
        let r = try TableReader(fs: fs, path: dir + "/1.sst", number: 1, cache: BlockCache(capacityBytes: 1 << 20))
        for i in stride(from: 0, to: 10_000, by: 97) { #expect(try r.get(key(i)) == Array("value \(i)".utf8)) }
        r.close()
    }

    @Test func flushedTablesAnswerAndTombstonesShadowThem() async throws {
        let fs = FaultyFileSystem()
        var rng = Seeded(state: 8)
        let db = try Database.open(fs: fs, directory: "/db")
        for i in 0..<300 { try await db.put(Array("k\(i)".utf8), Array("v\(i)".utf8)) }
        try db.flush()
        #expect(try fs.list("/db").filter { $0.hasSuffix(".log") }.count == 1)   // the covered log is gone
        #expect(try fs.list("/db").contains { $0.hasSuffix(".sst") })
        for i in stride(from: 0, to: 300, by: 3) { try await db.delete(Array("k\(i)".utf8)) }
        for i in 300..<350 { try await db.put(Array("k\(i)".utf8), Array("v\(i)".utf8)) }
        try await db.put(Array("k1".utf8), Array("new".utf8))
        func check(_ d: Database) throws {
            for i in 0..<350 {
                let expected: [UInt8]? = i == 1 ? Array("new".utf8) : (i < 300 && i % 3 == 0 ? nil : Array("v\(i)".utf8))
                #expect(try d.get(Array("k\(i)".utf8)) == expected, "k\(i)")
            }
        }
        try check(db)
        try db.flush()
        try check(db)
        try await db.put(Array("k2".utf8), Array("memtable".utf8))
        try await db.close()
        // A crash after the flushes: tables, manifest and the last log bring everything back.
        fs.crash(tearing: true, rng: &rng)
        let back = try Database.open(fs: fs, directory: "/db")
        #expect(try back.get(Array("k2".utf8)) == Array("memtable".utf8))
        #expect(try back.get(Array("k1".utf8)) == Array("new".utf8))
        #expect(try back.get(Array("k3".utf8)) == nil)
        #expect(try back.get(Array("k349".utf8)) == Array("v349".utf8))
        try back.flush()
        await back.abandon()
        let third = try Database.open(fs: fs, directory: "/db")
        #expect(try third.get(Array("k2".utf8)) == Array("memtable".utf8))
        #expect(try third.get(Array("k0".utf8)) == nil)
        #expect(try fs.list("/db").filter { $0.hasPrefix("MANIFEST-") }.count == 1)
    }
}
