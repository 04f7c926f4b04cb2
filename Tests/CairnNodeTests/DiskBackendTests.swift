import Testing
import Foundation
import CairnCore
import CairnStorage
@testable import CairnNode

@Suite struct DiskBackendTests {
    func scratch() -> String {
        FileManager.default.temporaryDirectory.appendingPathComponent("cairn-disk-\(UInt64.random(in: 0...UInt64.max))").path
    }

    func options(_ sync: SyncMode) -> DatabaseOptions {
        var o = DatabaseOptions()
        o.syncMode = sync
        return o
    }

    @Test func partitionsAreSeparateRangesAndOneCanBeDropped() async throws {
        let dir = scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let b = try await DiskBackend.open(directory: dir, options: options(.always))
        for p in [PartitionID(1), PartitionID(2), PartitionID(0x0100_0000)] {
            for i in 0..<10 { try await b.waitDurable(try b.apply(partition: p, key: [UInt8(i)], value: [UInt8(p.index & 0xFF), UInt8(i)])) }
        }
        #expect(try b.get(partition: PartitionID(2), key: [3]) == [2, 3])
        #expect(try b.get(partition: PartitionID(3), key: [3]) == nil)
        #expect(try b.count(partition: PartitionID(1)) == 10)
        try await b.drop(partition: PartitionID(1))
        #expect(try b.count(partition: PartitionID(1)) == 0)
        #expect(try b.count(partition: PartitionID(2)) == 10)
        #expect(try b.count(partition: PartitionID(0x0100_0000)) == 10)
        try await b.close()
    }

    /// The actor epoch survives a clean shutdown, and a crash under `always`; a crash under
    /// `none` may have lost dots a peer holds, so the node must take a new epoch.
    @Test func theActorEpochIsKeptOnlyWhenNoIssuedDotCanHaveBeenLost() async throws {
        let dir = scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let first = try await DiskBackend.open(directory: dir, options: options(.always))
        let epoch = try #require(first.persistentEpoch)
        try await first.close()
        let clean = try await DiskBackend.open(directory: dir, options: options(.always))
        #expect(clean.persistentEpoch == epoch, "clean shutdown keeps the epoch")
        await clean.database.abandon()   // a crash
        let afterCrash = try await DiskBackend.open(directory: dir, options: options(.always))
        #expect(afterCrash.persistentEpoch == epoch, "under always, a crash keeps the epoch")
        await afterCrash.database.abandon()
        let unsafe = try await DiskBackend.open(directory: dir, options: options(SyncMode.none))
        #expect(unsafe.persistentEpoch != epoch, "a crash without always takes a new epoch")
        let next = try #require(unsafe.persistentEpoch)
        try await unsafe.close()
        let again = try await DiskBackend.open(directory: dir, options: options(SyncMode.none))
        #expect(again.persistentEpoch == next, "a clean shutdown under none keeps it")
        try await again.close()
    }
}
