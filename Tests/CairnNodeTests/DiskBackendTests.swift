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
        #expect(try await b.count(partition: PartitionID(1)) == 10)
        try await b.drop(partition: PartitionID(1))
        #expect(try await b.count(partition: PartitionID(1)) == 0)
        #expect(try await b.count(partition: PartitionID(2)) == 10)
        #expect(try await b.count(partition: PartitionID(0x0100_0000)) == 10)
        try await b.close()
    }

    /// The actor epoch survives a clean shutdown only: after any crash a dot this node issued may
    /// be out (a coordinator replicates while its own log syncs) and lost here, so the node takes
    /// a new epoch, whatever sync mode either run used.
    @Test func theActorEpochIsKeptOnlyAcrossACleanShutdown() async throws {
        let dir = scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let first = try await DiskBackend.open(directory: dir, options: options(.always))
        let epoch = try #require(first.persistentEpoch)
        try await first.close()
        let clean = try await DiskBackend.open(directory: dir, options: options(.always))
        #expect(clean.persistentEpoch == epoch, "clean shutdown keeps the epoch")
        await clean.database.abandon()   // a crash of a run under always
        let afterCrash = try await DiskBackend.open(directory: dir, options: options(SyncMode.none))
        #expect(afterCrash.persistentEpoch != epoch, "a crash of a run under always takes a new epoch")
        let second = try #require(afterCrash.persistentEpoch)
        await afterCrash.database.abandon()   // a crash of a run under none
        let unsafe = try await DiskBackend.open(directory: dir, options: options(.always))
        #expect(unsafe.persistentEpoch != second, "a crash of a run under none takes a new epoch")
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

    /// The node's metadata keys (%x00…) sort first, so they sit in the first data block of the
    /// tables that hold them: a bad first block used to make the epoch read throw and the node
    /// refuse to start. The backend now opens with a fresh epoch (always safe: no dot is ever
    /// reissued) and an unclean shutdown assumed; data keys in other blocks read normally.
    @Test func aCorruptBlockHoldingTheEpochDoesNotKeepTheBackendClosed() async throws {
        let dir = scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let first = try await DiskBackend.open(directory: dir, options: options(.always))
        let epoch = try #require(first.persistentEpoch)
        for i in 0..<400 {
            try await first.waitDurable(try first.apply(partition: PartitionID(1), key: Array("key\(i)".utf8), value: [UInt8](repeating: 7, count: 64)))
        }
        try await first.close()   // flushes: one table, the metadata keys in its first block
        let tables = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".sst") }
        try #require(tables.count == 1)
        let url = URL(fileURLWithPath: dir + "/" + tables[0])
        var bytes = try Data(contentsOf: url)
        bytes[20] ^= 0x08
        try bytes.write(to: url)

        let back = try await DiskBackend.open(directory: dir, options: options(.always))
        #expect(back.persistentEpoch != nil && back.persistentEpoch != epoch, "an unreadable epoch is replaced")
        #expect(try back.get(partition: PartitionID(1), key: Array("key399".utf8)) == [UInt8](repeating: 7, count: 64))
        #expect(back.database.statistics.corruptTables.count == 1)
        let next = try #require(back.persistentEpoch)
        try await back.close()
        // The new epoch and the clean mark shadow the bad block from now on.
        let again = try await DiskBackend.open(directory: dir, options: options(.always))
        #expect(again.persistentEpoch == next)
        try await again.close()
    }

    /// A dot out before it was durable here: the coordinator stamped a write and sent it to a
    /// replica while its log synced, then lost power. The record is gone here, but the replica
    /// holds the dot; the node restarts under a new epoch, so its next write to the key is a new
    /// dot beside the replica's (siblings there), never the lost dot again for another value.
    @Test func aDotOutBeforeItsSyncIsNeverReissuedAfterAPowerCut() async throws {
        let disk = FaultyFileSystem()
        let first = try await DiskBackend.open(directory: "/db", options: options(.always), fs: disk.session())
        let epoch = try #require(first.persistentEpoch)
        let (vnode, sup, task) = try await runningVnode(first)
        disk.holdSyncs()
        let (sent, _, _) = try await vnode.stampWithoutWaiting(key: [1], sibling: Sibling(value: Array("A".utf8), timestampMillis: 1),
                                                               context: VersionVector(), actor: ActorID(node: "n1", epoch: epoch))
        #expect(try await vnode.get([1]) == nil, "a write whose sync has not completed is not shown by this node")
        var rng = SystemRandomNumberGenerator()
        disk.crash(tearing: false, rng: &rng)   // the power cut: the unsynced record is gone
        disk.releaseSyncs()
        sup.finish(); task.cancel(); _ = await task.result

        let second = try await DiskBackend.open(directory: "/db", options: options(.always), fs: disk.session())
        let renewed = try #require(second.persistentEpoch)
        #expect(renewed != epoch, "a crash takes a new epoch")
        let (again, sup2, task2) = try await runningVnode(second)
        #expect(try await again.get([1]) == nil, "the unsynced write is lost here")
        let stored = try await again.coordinate(key: [1], sibling: Sibling(value: Array("B".utf8), timestampMillis: 2),
                                                context: VersionVector(), actor: ActorID(node: "n1", epoch: renewed))
        #expect(Set(stored.entries.map(\.actor)).isDisjoint(with: Set(sent.entries.map(\.actor))), "the new write's dot is not the lost one")
        // The replica that holds the lost write merges the new one beside it: both survive.
        let atReplica = VersionedObject.sync(sent, stored)
        #expect(Set(atReplica.values.map(\.value)) == [Array("A".utf8), Array("B".utf8)])
        sup2.finish(); task2.cancel(); _ = await task2.result
        try await second.close()
    }

    /// Salvage may drop synced, acknowledged log records (dots this node showed), so a salvaged
    /// open takes a fresh epoch even after a crash of a run under `always`.
    @Test func aSalvagedOpenTakesAFreshEpoch() async throws {
        let disk = FaultyFileSystem()
        let first = try await DiskBackend.open(directory: "/db", options: options(.always), fs: disk.session())
        let epoch = try #require(first.persistentEpoch)
        for i in 0..<20 { try await first.waitDurable(try first.apply(partition: PartitionID(1), key: [UInt8(i)], value: [UInt8(i), 1, 2, 3])) }
        await first.database.abandon()   // a crash of a run under always: the epoch would be kept
        let log = try #require(try disk.list("/db").filter { $0.hasSuffix(".log") }.max())
        let size = try #require(disk.contents("/db/" + log)?.count)
        disk.flipBit("/db/" + log, byte: size / 2)
        await #expect(throws: StorageError.self) { try await DiskBackend.open(directory: "/db", options: options(.always), fs: disk.session()) }
        var salvaging = options(.always)
        salvaging.salvage = true
        let salvaged = try await DiskBackend.open(directory: "/db", options: salvaging, fs: disk.session())
        #expect(salvaged.database.statistics.salvagedBytes > 0)
        #expect(salvaged.persistentEpoch != epoch, "records salvage dropped may have carried dots this node showed")
        try await salvaged.close()
    }
}
