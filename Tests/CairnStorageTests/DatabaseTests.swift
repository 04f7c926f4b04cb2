import Testing
import Foundation
@testable import CairnStorage

@Suite struct DatabaseTests {
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
        #expect(db.get([1]) == nil && db.get([2]) == [21] && db.get([3]) == [30])
        try db.close()
        let again = try Database.open(fs: fs, directory: "/db")
        #expect(again.get([1]) == nil && again.get([2]) == [21] && again.get([3]) == [30])
        #expect(again.statistics.recoveredRecords == 4)
        try await again.put([5], [50])
        try again.close()
        let third = try Database.open(fs: fs, directory: "/db")
        #expect(third.get([5]) == [50] && third.get([2]) == [21])
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
            fs.crash(tearing: Bool.random(using: &rng), rng: &rng)
            let back = try Database.open(fs: fs, directory: "/db")
            for (k, v) in acked.value.withLock({ $0 }) {
                #expect(back.get(k) == v, "seed \(seed): acknowledged key \(k) lost")
            }
            for (i, _, size) in plans {
                let present = (0..<size).map { back.get([UInt8(i), UInt8($0)]) != nil }
                #expect(present.allSatisfy { $0 } || present.allSatisfy { !$0 }, "seed \(seed): batch \(i) partly applied")
                for j in 0..<size {
                    if let v = back.get([UInt8(i), UInt8(j)]) { #expect(v == [UInt8(i), UInt8(j), UInt8(size)]) }
                }
            }
            try back.close()
        }
    }

    @Test func afterAFailedLogSyncEveryWriteIsRefusedUntilReopened() async throws {
        let fs = FaultyFileSystem()
        let db = try Database.open(fs: fs, directory: "/db")
        try await db.put([1], [1])
        fs.failNextSyncs(1)
        await #expect(throws: StorageError.self) { try await db.put([2], [2]) }
        await #expect(throws: StorageError.self) { try await db.put([3], [3]) }
        let reopened = try Database.open(fs: fs, directory: "/db")
        #expect(reopened.get([1]) == [1])
        try await reopened.put([4], [4])
        #expect(reopened.get([4]) == [4])
    }

    @Test func aTornLogTailIsTruncatedAndReported() async throws {
        let fs = FaultyFileSystem()
        let db = try Database.open(fs: fs, directory: "/db")
        try await db.put([1], [1])
        try await db.put([2], Array(repeating: 7, count: 100))
        try db.close()
        // The crash hit the middle of the last append: cut the log 5 bytes short.
        let size = fs.contents("/db/000001.log")?.count ?? 0
        try fs.truncate("/db/000001.log", to: UInt64(size - 5))
        let back = try Database.open(fs: fs, directory: "/db")
        #expect(back.get([1]) == [1])
        #expect(back.get([2]) == nil)
        #expect(back.statistics.recoveredRecords == 1)
        #expect(back.statistics.tornTailBytes > 0)
        // The tail was truncated: the next open finds a clean log.
        try back.close()
        let clean = try Database.open(fs: fs, directory: "/db")
        #expect(clean.statistics.tornTailBytes == 0 && clean.get([1]) == [1])
    }

    @Test func theRealDiskRoundTrips() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-db-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let db = try Database.open(fs: PosixFileSystem(), directory: dir)
        for i in 0..<200 { try await db.put(Array("k\(i)".utf8), Array("v\(i)".utf8)) }
        try db.close()
        let back = try Database.open(fs: PosixFileSystem(), directory: dir)
        for i in 0..<200 { #expect(back.get(Array("k\(i)".utf8)) == Array("v\(i)".utf8)) }
        try back.close()
    }
}
