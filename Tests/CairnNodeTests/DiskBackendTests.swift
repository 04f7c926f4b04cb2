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

    /// The actor epoch survives a clean shutdown, and a crash of a run under `always`; a crash of
    /// a run under `interval` or `none` may have lost dots a peer holds, so the node must take a
    /// new epoch — whatever sync mode the restarted run uses (issue 10 item 2).
    @Test func theActorEpochIsKeptOnlyWhenNoIssuedDotCanHaveBeenLost() async throws {
        let dir = scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let first = try await DiskBackend.open(directory: dir, options: options(.always))
        let epoch = try #require(first.persistentEpoch)
        try await first.close()
        let clean = try await DiskBackend.open(directory: dir, options: options(.always))
        #expect(clean.persistentEpoch == epoch, "clean shutdown keeps the epoch")
        await clean.database.abandon()   // a crash
        let afterCrash = try await DiskBackend.open(directory: dir, options: options(SyncMode.none))
        #expect(afterCrash.persistentEpoch == epoch, "a crash of a run under always keeps the epoch, whatever this run uses")
        await afterCrash.database.abandon()   // a crash of a run under none
        let unsafe = try await DiskBackend.open(directory: dir, options: options(.always))
        #expect(unsafe.persistentEpoch != epoch, "a crash of a run under none takes a new epoch, even when restarted under always")
        let next = try #require(unsafe.persistentEpoch)
        try await unsafe.close()
        let again = try await DiskBackend.open(directory: dir, options: options(.interval(milliseconds: 100)))
        #expect(again.persistentEpoch == next, "a clean shutdown keeps it")
        await again.database.abandon()   // a crash of a run under interval
        let last = try await DiskBackend.open(directory: dir, options: options(.always))
        #expect(last.persistentEpoch != next, "a crash of a run under interval takes a new epoch")
        try await last.close()
    }

    /// Under `always`, the backend's durable read does not show a write before its log sync.
    @Test func durableReadsSkipUnsyncedWrites() async throws {
        let dir = scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let b = try await DiskBackend.open(directory: dir, options: options(.always))
        let p = PartitionID(4)
        let token = try b.apply(partition: p, key: [1], value: [7])
        #expect(try b.get(partition: p, key: [1]) == [7])
        #expect(try b.getDurable(partition: p, key: [1]) == nil)
        #expect(b.lastApplied == token)
        try await b.waitDurable(token)
        #expect(try b.getDurable(partition: p, key: [1]) == [7])
        try await b.close()
    }
}
