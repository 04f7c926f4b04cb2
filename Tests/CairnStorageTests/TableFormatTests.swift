import Testing
@testable import CairnStorage

@Suite struct BloomFilterTests {
    /// 100k keys at 10 bits per key: no false negatives, and a measured false-positive rate within
    /// 2× of the design rate ((1 - e^(-k/10))^k ≈ 0.82 % for k = 7).
    @Test func falsePositiveRateIsWithinTwiceTheDesignRate() {
        let keys = (0..<100_000).map { Array("key-\($0)".utf8) }
        let filter = BloomFilter.build(keys: keys, bitsPerKey: 10)
        #expect(keys.allSatisfy(filter.mayContain))
        var falsePositives = 0
        for i in 0..<100_000 where filter.mayContain(Array("absent-\(i)".utf8)) { falsePositives += 1 }
        let k = 7.0
        let design = pow(1 - exp(-k / 10), k)
        let measured = Double(falsePositives) / 100_000
        #expect(measured < 2 * design, "measured \(measured), design \(design)")
        #expect(measured > design / 4, "suspiciously low: \(measured)")
    }

    @Test func aMalformedFilterNeverHidesAKey() {
        #expect(BloomFilter(bytes: []).mayContain([1]))
        #expect(BloomFilter(bytes: [0, 0, 0, 99]).mayContain([1]))
    }
}

@Suite struct BlockTests {
    func sortedKeys(_ n: Int, _ rng: inout Seeded) -> [[UInt8]] {
        var set = Set<[UInt8]>()
        while set.count < n {
            // Shared prefixes, as real keys have (partition prefix + user key).
            set.insert(Array("p\(Int.random(in: 0...3, using: &rng))/user:".utf8) + (0..<Int.random(in: 0...6, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) })
        }
        return set.sorted { $0.lexicographicallyPrecedes($1) }
    }

    @Test(arguments: [1, 2, 16])
    func roundTripAndSeekAgreeWithAModel(restartInterval: Int) throws {
        var rng = Seeded(state: UInt64(restartInterval))
        let keys = sortedKeys(500, &rng)
        var b = BlockBuilder(restartInterval: restartInterval)
        for (i, k) in keys.enumerated() { try b.add(key: k, value: Array("v\(i)".utf8)) }
        let block = try Block(b.finish(), path: "t", offset: 0)
        let entries = try block.entries(path: "t", offset: 0)
        #expect(entries.map(\.key) == keys)
        #expect(entries.map(\.value) == keys.indices.map { Array("v\($0)".utf8) })
        for _ in 0..<500 {
            let probe = Array("p\(Int.random(in: 0...4, using: &rng))/user:".utf8) + [UInt8.random(in: 0...255, using: &rng)]
            let expected = keys.firstIndex { !$0.lexicographicallyPrecedes(probe) }
            let got = try block.seek(probe, path: "t", offset: 0)
            #expect(got?.key == expected.map { keys[$0] })
        }
        for (i, k) in keys.enumerated() where i % 37 == 0 {
            #expect(try block.seek(k, path: "t", offset: 0)?.value == Array("v\(i)".utf8))
        }
    }

    @Test func keysMustIncrease() throws {
        var b = BlockBuilder()
        try b.add(key: [2], value: [])
        #expect(throws: StorageError.self) { try b.add(key: [2], value: []) }
        #expect(throws: StorageError.self) { try b.add(key: [1], value: []) }
    }

    /// Every single-bit flip anywhere in a block is caught by its checksum: reported as corruption
    /// naming the file and offset, never returned as data.
    @Test func everyBitFlipIsReportedAsCorruption() throws {
        var b = BlockBuilder(restartInterval: 4)
        for i in 0..<20 { try b.add(key: Array("key\(100 + i)".utf8), value: [UInt8(i)]) }
        let bytes = b.finish()
        for i in bytes.indices {
            for bit in [0, 3, 7] {
                var bad = bytes
                bad[i] ^= UInt8(1 << bit)
                #expect(throws: StorageError.self) { try Block(bad, path: "000007.sst", offset: 4096) }
            }
        }
        #expect(throws: StorageError.corruption(path: "000007.sst", offset: 4096, reason: "block checksum mismatch")) {
            var bad = bytes
            bad[0] ^= 1
            return try Block(bad, path: "000007.sst", offset: 4096)
        }
    }
}

import Foundation

@Suite struct TableTests {
    func build(_ fs: any FileSystem, _ path: String, _ n: Int) throws -> [([UInt8], [UInt8])] {
        var rng = Seeded(state: 11)
        var pairs: [([UInt8], [UInt8])] = []
        for i in 0..<n {
            let key = Array(String(format: "p%03d/k%08d", i % 7, i).utf8)
            pairs.append((key, (0..<Int.random(in: 0...200, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }))
        }
        pairs.sort { $0.0.lexicographicallyPrecedes($1.0) }
        let b = try TableBuilder(fs: fs, path: path, blockSize: 4096)
        for (k, v) in pairs { try b.add(key: k, value: v) }
        try b.finish()
        return pairs
    }

    @Test func everyKeyReadsBackAndAbsentKeysAreNotFound() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-table-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        let fs = PosixFileSystem()
        try fs.createDirectory(dir)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let pairs = try build(fs, dir + "/000001.sst", 3_000)
        let t = try TableReader(fs: fs, path: dir + "/000001.sst")
        #expect(t.blockCount > 30)
        for (k, v) in pairs { #expect(try t.get(k) == v) }
        for i in 0..<2000 { #expect(try t.get(Array("p999/absent\(i)".utf8)) == nil) }
        #expect(try t.get([]) == nil)
        #expect(try t.scan().map(\.key) == pairs.map(\.0))
        t.close()
    }

    @Test func corruptTablesAreReportedNeverServed() throws {
        let fs = FaultyFileSystem()
        try fs.createDirectory("/db")
        let pairs = try build(fs, "/db/000002.sst", 500)
        let size = fs.contents("/db/000002.sst")?.count ?? 0
        // A flipped bit in a data block: the read that touches it fails; others still work.
        fs.flipBit("/db/000002.sst", byte: 100, bit: 2)
        let t = try TableReader(fs: fs, path: "/db/000002.sst")
        #expect(throws: StorageError.self) { try t.get(pairs[0].0) }
        #expect(try t.get(pairs[pairs.count - 1].0) == pairs[pairs.count - 1].1)
        fs.flipBit("/db/000002.sst", byte: 100, bit: 2)
        // Footer, index and filter damage is caught at open.
        for byte in [size - 1, size - 10, size - 30, size - 60, size - 200] {
            fs.flipBit("/db/000002.sst", byte: byte, bit: 5)
            #expect(throws: StorageError.self, "flip at \(byte) of \(size)") { try TableReader(fs: fs, path: "/db/000002.sst") }
            fs.flipBit("/db/000002.sst", byte: byte, bit: 5)
        }
        #expect(try TableReader(fs: fs, path: "/db/000002.sst").get(pairs[7].0) == pairs[7].1)
        try fs.truncate("/db/000002.sst", to: UInt64(size - 3))
        #expect(throws: StorageError.self) { try TableReader(fs: fs, path: "/db/000002.sst") }
    }
}
