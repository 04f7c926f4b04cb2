import Testing
import Foundation
@testable import CairnStorage

/// Deterministic generator for the seeded crash loops.
struct Seeded: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

private func payload(_ i: Int, _ rng: inout Seeded) -> [UInt8] {
    let n = Int.random(in: 0...300, using: &rng)
    return [UInt8(i & 0xFF), UInt8((i >> 8) & 0xFF)] + (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }
}

@Suite struct CRC32CTests {
    @Test func theInstructionAndTheTablesAgree() {
        var rng = Seeded(state: 99)
        for n in [0, 1, 7, 8, 9, 63, 64, 65, 4096, 4099] {
            let bytes = (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }
            // A bit at a time: the definition.
            var c: UInt32 = ~0
            for x in bytes {
                c ^= UInt32(x)
                for _ in 0..<8 { c = c & 1 == 1 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
            }
            let reference = ~c
            #expect(CRC32C.checksum(bytes) == reference, "\(n) bytes")
            #expect(bytes.withUnsafeBufferPointer { CRC32C.software(0, $0) } == reference, "\(n) bytes, tables")
            #expect(CRC32C.update(CRC32C.checksum(Array(bytes.prefix(n / 2))), Array(bytes.dropFirst(n / 2))) == reference)
        }
    }

    @Test func knownVectors() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8]()) == 0)
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
        let bytes = (0..<1000).map { UInt8($0 & 0xFF) }
        #expect(CRC32C.update(CRC32C.checksum(bytes[0..<333]), bytes[333...]) == CRC32C.checksum(bytes))
        #expect(CRC32C.unmask(CRC32C.mask(0x1234_5678)) == 0x1234_5678)
    }
}

@Suite struct WALRecoveryTests {
    func log(_ payloads: [[UInt8]]) -> [UInt8] { payloads.flatMap(WAL.frame) }

    @Test func everyRecordComesBackExactly() throws {
        var rng = Seeded(state: 1)
        let payloads = (0..<50).map { payload($0, &rng) } + [[]]
        let r = try WAL.recover(FaultyReadableFile(bytes: log(payloads)), path: "log")
        #expect(r.records == payloads)
        #expect(r.tornTailBytes == 0 && r.validEnd == UInt64(log(payloads).count))
    }

    /// A crash in the middle of the last append leaves any prefix of it: always a torn tail,
    /// never an error, never a record that was not written.
    @Test func aTornLastRecordIsTruncatedAtEveryPossibleLength() throws {
        var rng = Seeded(state: 2)
        let payloads = (0..<5).map { payload($0, &rng) }
        let whole = log(payloads)
        let lastStart = log(Array(payloads.dropLast())).count
        for cut in lastStart..<whole.count {
            let r = try WAL.recover(FaultyReadableFile(bytes: Array(whole.prefix(cut))), path: "log")
            #expect(r.records == Array(payloads.dropLast()))
            #expect(r.validEnd == UInt64(lastStart) && r.tornTailBytes == UInt64(cut - lastStart))
        }
    }

    @Test func corruptionBeforeTheTailNamesTheFileAndOffsetOrIsSalvaged() throws {
        var rng = Seeded(state: 3)
        let payloads = (0..<10).map { payload($0, &rng) + [1, 2, 3] }
        var bytes = log(payloads)
        let third = log(Array(payloads.prefix(2))).count
        bytes[third + WAL.headerBytes + 1] ^= 0x40   // a bit flip inside record 3's payload
        #expect(throws: StorageError.corruption(path: "wal-7", offset: UInt64(third),
                                                reason: "bad log record followed by valid records at \(log(Array(payloads.prefix(3))).count)")) {
            try WAL.recover(FaultyReadableFile(bytes: bytes), path: "wal-7")
        }
        let salvaged = try WAL.recover(FaultyReadableFile(bytes: bytes), path: "wal-7", salvage: true)
        #expect(salvaged.records == Array(payloads.prefix(2)) + Array(payloads.dropFirst(3)))
        #expect(salvaged.salvagedBytes == UInt64(WAL.frame(payloads[2]).count))
    }

    /// Zeros written ahead of appends end the log: not torn, not corrupt. A torn record in
    /// front of them is still torn, and a zeroed stretch with records after it is corruption.
    @Test func aZeroTailEndsTheLogAndIsNotTorn() throws {
        var rng = Seeded(state: 5)
        let payloads = (0..<6).map { payload($0, &rng) + [7] }
        let whole = log(payloads)
        let zeros = [UInt8](repeating: 0, count: 4096)
        let r = try WAL.recover(FaultyReadableFile(bytes: whole + zeros), path: "log")
        #expect(r.records == payloads)
        #expect(r.validEnd == UInt64(whole.count) && r.tornTailBytes == 0 && r.zeroTailBytes == 4096)

        let lastStart = log(Array(payloads.dropLast())).count
        let torn = Array(whole.prefix(lastStart + 5)) + zeros
        let t = try WAL.recover(FaultyReadableFile(bytes: torn), path: "log")
        #expect(t.records == Array(payloads.dropLast()))
        #expect(t.validEnd == UInt64(lastStart) && t.tornTailBytes == UInt64(5 + zeros.count) && t.zeroTailBytes == 0)

        var hole = whole
        let second = log(Array(payloads.prefix(1))).count
        for i in second..<log(Array(payloads.prefix(2))).count { hole[i] = 0 }
        #expect(throws: StorageError.self) { try WAL.recover(FaultyReadableFile(bytes: hole), path: "log") }
    }

    @Test func aFlippedBitInTheLastRecordIsNeverReturnedAsData() throws {
        var rng = Seeded(state: 4)
        let payloads = (0..<3).map { payload($0, &rng) + [9] }
        let clean = log(payloads)
        let lastStart = log(Array(payloads.prefix(2))).count
        for i in lastStart..<clean.count {
            var bytes = clean
            bytes[i] ^= 0x01
            let r = try WAL.recover(FaultyReadableFile(bytes: bytes), path: "log")
            #expect(r.records == Array(payloads.prefix(2)), "flip at \(i) produced \(r.records.count) records")
        }
    }
}

@Suite struct WALCrashTests {
    /// For many seeds: append records under `always` (each acknowledged after its sync) and under
    /// no sync, crash at a random point with unsynced bytes dropped or torn, recover, and check
    /// that every acknowledged record is present, in order, with its exact bytes, and that nothing
    /// was invented (the recovered log is a prefix of what was written).
    /// `buffered`: the same with a log buffer of random size, where a record may sit in memory
    /// until a sync, a full buffer or `writeOut` (also called at random points).
    @Test(arguments: [false, true]) func acknowledgedRecordsSurviveEveryCrash(buffered: Bool) throws {
        for seed in 1...300 {
            var rng = Seeded(state: UInt64(seed))
            let fs = FaultyFileSystem()
            try fs.createDirectory("/db")
            let file = try fs.openAppendable("/db/000001.log", create: true)
            try fs.syncDirectory("/db")
            let writer = WALWriter(file: file, path: "/db/000001.log", bufferLimit: buffered ? Int.random(in: 1...600, using: &rng) : 0)
            var written: [[UInt8]] = []
            var acknowledged = 0
            for i in 0..<Int.random(in: 1...60, using: &rng) {
                let p = payload(i, &rng)
                let sync = Bool.random(using: &rng)
                try writer.append([p], sync: sync)
                written.append(p)
                if sync { acknowledged = written.count }
                if buffered, Int.random(in: 0..<8, using: &rng) == 0 { try writer.writeOut() }
            }
            fs.crash(tearing: Bool.random(using: &rng), rng: &rng)
            let r = try WAL.recover(try fs.openReadable("/db/000001.log"), path: "/db/000001.log")
            #expect(r.records.count >= acknowledged, "seed \(seed): lost acknowledged records")
            #expect(r.records == Array(written.prefix(r.records.count)), "seed \(seed): recovered records are not a prefix of what was written")
        }
    }

    /// Buffered records reach the file at the sync, in one write; a full buffer goes at once;
    /// `close` writes out what is left; `size` counts buffered bytes.
    @Test func aBufferedWriterWritesOncePerSyncOrFullBuffer() throws {
        let fs = FaultyFileSystem()
        try fs.createDirectory("/db")
        let writer = WALWriter(file: try fs.openAppendable("/db/log", create: true), path: "/db/log", bufferLimit: 100)
        let records: [[UInt8]] = [[1, 2, 3], [4, 5], [6]]
        for r in records { try writer.append([r], sync: false) }
        #expect(fs.contents("/db/log") == [] && writer.fileWrites == 0)
        #expect(writer.size == UInt64(records.map { WAL.frame($0).count }.reduce(0, +)))
        try writer.sync()
        #expect(fs.contents("/db/log") == records.flatMap(WAL.frame) && writer.fileWrites == 1)
        try writer.sync()
        #expect(writer.fileWrites == 1, "an empty buffer is not written")

        let big = [UInt8](repeating: 7, count: 120)
        try writer.append([big], sync: false)
        #expect(writer.fileWrites == 2, "a record that fills the buffer goes at once")
        try writer.append([[9]], sync: false)
        try writer.close()
        #expect(fs.contents("/db/log") == (records + [big, [9]]).flatMap(WAL.frame) && writer.fileWrites == 3)

        let unbuffered = WALWriter(file: try fs.openAppendable("/db/log2", create: true), path: "/db/log2")
        for r in records { try unbuffered.append([r], sync: false) }
        #expect(fs.contents("/db/log2") == records.flatMap(WAL.frame) && unbuffered.fileWrites == 3)
    }

    /// A record encoded in place, or on its own first (a large estimate), is the record its
    /// payload array would make, buffered or not; one past the record bound is refused whole
    /// (the buffer as it was) either way and the writer goes on; after a failed sync it is
    /// refused like any append.
    @Test(arguments: [0, 100]) func aRecordEncodedInPlaceIsFramedAsAnArrayIs(bufferLimit: Int) throws {
        let fs = FaultyFileSystem()
        try fs.createDirectory("/db")
        let writer = WALWriter(file: try fs.openAppendable("/db/log", create: true), path: "/db/log", bufferLimit: bufferLimit)
        var rng = Seeded(state: 9)
        let payloads = (0..<20).map { payload($0, &rng) } + [[]]
        for (i, p) in payloads.enumerated() {
            let large = WALWriter.inPlaceRecordBytes + 1
            if i == 7 || i == 8 {
                #expect(throws: StorageError.invalidArgument("log record of \(WAL.maxRecordBytes + 1) bytes exceeds \(WAL.maxRecordBytes)")) {
                    try writer.append(encoding: { $0.append(contentsOf: repeatElement(5, count: WAL.maxRecordBytes + 1)) },
                                      estimatedBytes: i == 7 ? 0 : large, sync: false)
                }
            }
            try writer.append(encoding: { $0 += p }, estimatedBytes: i.isMultiple(of: 3) ? large : p.count, sync: i % 5 == 0)
        }
        try writer.sync()
        #expect(fs.contents("/db/log") == payloads.flatMap(WAL.frame))
        #expect(try WAL.recover(try fs.openReadable("/db/log"), path: "/db/log").records == payloads)
        fs.failNextSyncs(1)
        #expect(throws: StorageError.syncFailed(path: "/db/log", errno: 5)) { try writer.append(encoding: { $0 += [1] }, estimatedBytes: 1, sync: true) }
        #expect(throws: StorageError.self) { try writer.append(encoding: { $0 += [2] }, estimatedBytes: 1, sync: false) }
    }

    /// A buffer that cannot be written (a full disk) fails the sync that writes it: its writers
    /// learn it there, and the writer refuses everything after, as after a failed sync.
    @Test func aFailedWriteOutFailsTheSyncAndRefusesLaterAppends() throws {
        let fs = FaultyFileSystem()
        try fs.createDirectory("/db")
        let writer = WALWriter(file: try fs.openAppendable("/db/log", create: true), path: "/db/log", bufferLimit: 1 << 16)
        try writer.append([[1, 1]], sync: true)
        try writer.append([[2, 2, 2, 2]], sync: false)
        fs.setFreeSpace(3)
        #expect(throws: StorageError.io(path: "/db/log", operation: "write", errno: 28)) { try writer.sync() }
        fs.setFreeSpace(nil)
        #expect(throws: StorageError.self) { try writer.append([[3]], sync: false) }
        #expect(throws: StorageError.self) { try writer.sync() }
        let r = try WAL.recover(try fs.openReadable("/db/log"), path: "/db/log")
        #expect(r.records == [[1, 1]], "the synced record stays; the fragment of the failed one is a torn tail")
    }

    /// A full buffer that cannot be written takes records whose writers still wait for a sync
    /// with it: no later sync may succeed, or they would be told they are durable.
    @Test func aFailedWriteOutOfAFullBufferFailsEveryLaterSync() throws {
        let fs = FaultyFileSystem()
        try fs.createDirectory("/db")
        let writer = WALWriter(file: try fs.openAppendable("/db/log", create: true), path: "/db/log", bufferLimit: 20)
        try writer.append([[1, 1]], sync: true)
        try writer.append([[2, 2]], sync: false)       // waits in the buffer for a sync
        fs.failNextWrite(keeping: 3)
        #expect(throws: StorageError.io(path: "/db/log", operation: "write", errno: 5)) {
            try writer.append([[UInt8](repeating: 3, count: 16)], sync: false)   // fills the buffer
        }
        #expect(throws: StorageError.self) { try writer.sync() }
        #expect(throws: StorageError.self) { try writer.append([[4]], sync: true) }
        let r = try WAL.recover(try fs.openReadable("/db/log"), path: "/db/log")
        #expect(r.records == [[1, 1]])
    }

    @Test func afterAFailedSyncTheWriterRefusesEverything() throws {
        let fs = FaultyFileSystem()
        try fs.createDirectory("/db")
        let writer = WALWriter(file: try fs.openAppendable("/db/log", create: true), path: "/db/log")
        try writer.append([[1]], sync: true)
        fs.failNextSyncs(1)
        #expect(throws: StorageError.syncFailed(path: "/db/log", errno: 5)) { try writer.append([[2]], sync: true) }
        // The retry would succeed at the disk level, but the writer no longer trusts it.
        #expect(throws: StorageError.self) { try writer.append([[3]], sync: true) }
        #expect(throws: StorageError.self) { try writer.sync() }
    }
}

@Suite struct FileSystemTests {
    @Test func aFileNotCoveredByADirectorySyncDisappearsAtACrash() throws {
        let fs = FaultyFileSystem()
        var rng = Seeded(state: 9)
        try fs.createDirectory("/db")
        let a = try fs.openAppendable("/db/a", create: true)
        try a.append([1, 2, 3])
        try a.sync()
        try fs.syncDirectory("/db")
        let b = try fs.openAppendable("/db/b", create: true)
        try b.append([4])
        try b.sync()                       // data synced, but the directory entry is not
        try fs.rename("/db/a", to: "/db/c")  // not durable either
        fs.crash(tearing: false, rng: &rng)
        #expect(try fs.list("/db") == ["a"])
        #expect(fs.contents("/db/a") == [1, 2, 3])
    }

    /// The fault disk's short writes: a full disk keeps the part of an append that fits and fails
    /// it with ENOSPC until space is freed; an armed fault hits only the matching file's append.
    @Test func aSmallDiskAndAnInjectedFaultWriteAPrefixThenFail() throws {
        let fs = FaultyFileSystem()
        try fs.createDirectory("/db")
        let a = try fs.openAppendable("/db/a", create: true)
        fs.setFreeSpace(5)
        try a.append([1, 2])
        #expect(throws: StorageError.io(path: "/db/a", operation: "write", errno: 28)) { try a.append([3, 4, 5, 6, 7]) }
        #expect(fs.contents("/db/a") == [1, 2, 3, 4, 5] && a.size == 5 && fs.freeSpace == 0)
        #expect(throws: StorageError.io(path: "/db/a", operation: "write", errno: 28)) { try a.append([8]) }
        fs.setFreeSpace(nil)
        try a.append([8])
        #expect(fs.contents("/db/a") == [1, 2, 3, 4, 5, 8])

        let b = try fs.openAppendable("/db/b.log", create: true)
        fs.failNextWrite(toPathContaining: ".log", skipping: 1, keeping: 2)
        try a.append([9])          // another file: not counted
        try b.append([1, 1, 1])    // the one skipped
        #expect(throws: StorageError.io(path: "/db/b.log", operation: "write", errno: 5)) { try b.append([2, 2, 2]) }
        try b.append([3])          // the fault fired once
        #expect(fs.contents("/db/b.log") == [1, 1, 1, 2, 2, 3])
    }

    @Test func posixFileSystemRoundTrip() throws {
        let fs = PosixFileSystem()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-storage-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try fs.createDirectory(dir)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let w = WALWriter(file: try fs.openAppendable(dir + "/000001.log", create: true), path: dir + "/000001.log")
        try w.append([[1, 2, 3], Array("hello".utf8)], sync: true)
        try fs.syncDirectory(dir)
        try w.close()
        let r = try WAL.recover(try fs.openReadable(dir + "/000001.log"), path: dir + "/000001.log")
        #expect(r.records == [[1, 2, 3], Array("hello".utf8)])
        try fs.rename(dir + "/000001.log", to: dir + "/000002.log")
        #expect(try fs.list(dir) == ["000002.log"])
        try fs.truncate(dir + "/000002.log", to: 5)
        let torn = try WAL.recover(try fs.openReadable(dir + "/000002.log"), path: dir + "/000002.log")
        #expect(torn.records.isEmpty && torn.tornTailBytes == 5)
        #expect(throws: StorageError.notFound(path: dir + "/missing")) { try fs.openReadable(dir + "/missing") }
    }
}
