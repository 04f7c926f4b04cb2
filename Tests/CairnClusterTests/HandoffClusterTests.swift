import Testing
@testable import CairnNode
import CairnRing
import CairnClient
import CairnCore
import CairnWire
import CairnStorage
import CairnMembership
import Foundation
import NIOPosix

/// Living membership with real nodes on loopback in this process: a node joins through a seed,
/// the plan is committed, partitions are handed off, ownership flips; a member leaves, hands its
/// data over and stops. Every key written before is readable at R=all throughout the end states.
@Suite(.timeLimit(.minutes(4)))
struct HandoffClusterTests {
    private func admin(_ node: CairnNode, _ verb: String, _ args: [String] = []) async throws -> [String: Any] {
        switch await node.answer(.admin(AdminRequest(verb: verb, arguments: args))) {
        case .adminReply(let bytes):
            return try #require(try JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any])
        case .error(let e):
            throw ValidationError("\(verb) failed: \(e.message)")
        case let other:
            throw ValidationError("\(verb) answered \(other.type)")
        }
    }

    private func members(_ status: [String: Any]) -> [String: [String: Any]] {
        let list = status["members"] as? [[String: Any]] ?? []
        return Dictionary(uniqueKeysWithValues: list.compactMap { m in (m["name"] as? String).map { ($0, m) } })
    }

    /// Keys not read back at R=all. A read is retried for up to 30 s: on a machine this busy a
    /// replica may be held dead for a while (the read is then refused, nothing is lost).
    private func readAll(_ keys: [String], via client: CairnClient) async -> [String] {
        var missing: [String] = []
        for k in keys {
            let deadline = ContinuousClock.now + .seconds(30)
            var got: GetResult?
            repeat {
                got = try? await client.get(Array(k.utf8), options: RequestOptions(r: .all))
                if got == nil { try? await Task.sleep(for: .milliseconds(100)) }
            } while got == nil && ContinuousClock.now < deadline
            if got?.values != [Array("v-\(k)".utf8)] { missing.append(k) }
        }
        return missing
    }

    /// (key, node) pairs where a replica the ring names for the key does not hold it in its own
    /// store, and where a node that is no longer a replica of the key's partition still does.
    private func placementErrors(_ keys: [String], _ nodes: [CairnNode]) throws -> [String] {
        var errors: [String] = []
        for node in nodes {
            let ring = try #require(node.core.membership?.ring)
            let backend = try #require(node.core.backend)
            for k in keys {
                let p = ring.partition(forKey: Array(k.utf8))
                let held = try backend.get(partition: p, key: Array(k.utf8)) != nil
                let replica = ring.replicas(of: p).contains(node.config.name)
                if held != replica { errors.append("\(k)@\(node.config.name): \(replica ? "missing" : "not dropped")") }
            }
        }
        return errors
    }

    @Test func aJoinHandsPartitionsToTheNewNodeAndALeaveHandsThemBack() async throws {
        let cluster = try await TestCluster.start(count: 3)
        let writer = try await cluster.client([0, 1, 2])
        let keys = (0..<200).map { "key-\($0)" }
        for k in keys { _ = try await writer.put(Array(k.utf8), value: Array("v-\(k)".utf8), options: RequestOptions(w: .all)) }

        // n4 knows only a seed; until it joins it refuses key requests.
        var c = NodeConfig(name: try NodeName("n4"))
        c.listen = HostPort(host: cluster.members[0].address.host, port: 0)
        c.http = nil
        c.clusterName = cluster.name
        c.ringSize = 64
        c.reconnectMinMillis = 20
        c.reconnectMaxMillis = 200
        c.requestTimeoutMillis = 10_000
        c.seeds = [cluster.members[0].address]
        c.dataDirectory = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-n4-\(UInt64.random(in: 0...UInt64.max))").path
        let n4 = CairnNode(config: c, logger: quietLogger)
        try await n4.bind()
        try n4.start()
        let n4Run = Task { try await n4.run() }
        try await cluster.waitUntil("n4 serving") { n4.state == .serving }
        guard case .error(let refused) = await n4.answer(.get(GetRequest(key: Array("key-1".utf8)))) else {
            Issue.record("a node that has not joined served a get"); return
        }
        #expect(refused.message.contains("not a member of a cluster yet"))

        let joined = try await admin(n4, "join")
        #expect(joined["status"] as? String == "joining")
        let plan = try await admin(cluster.nodes[1], "plan")
        #expect(plan["changes"] as? [String] == ["join n4"])
        let after = (plan["ownership"] as? [[String: Any]] ?? []).first { $0["name"] as? String == "n4" }
        #expect(after?["after"] as? Int == 16)
        let committed = try await admin(cluster.nodes[2], "commit")
        #expect((committed["transfers"] as? Int ?? 0) > 0)

        try await cluster.waitUntil("every transfer to n4 done", seconds: 120) {
            guard let s = try? await admin(cluster.nodes[0], "status") else { return false }
            return s["pending_transfers"] as? Int == 0 && members(s)["n4"]?["status"] as? String == "valid"
        }
        let grown = try await admin(cluster.nodes[0], "status")
        #expect(members(grown)["n4"]?["owned"] as? Int == 16)
        #expect(members(grown).values.allSatisfy { $0["status"] as? String == "valid" })
        try await cluster.waitUntil("n4 has the ring state with every transfer done") {
            (try? await admin(n4, "status"))?["pending_transfers"] as? Int == 0
        }
        // The old owners drop a partition once they see its flip: wait for the last of them.
        try await cluster.waitUntil("every replica holds its keys and the old owners dropped theirs", seconds: 60) {
            (try? placementErrors(keys, cluster.nodes + [n4]))?.isEmpty == true
        }
        try await aCoordinatorOnTheOldRingStillReachesTheCopy(cluster, n4: n4)
        let viaN4 = try await CairnClient.connect(seeds: [n4.boundAddresses?.client.description ?? ""])
        #expect(await readAll(keys, via: viaN4) == [], "every key at R=all through the new node")
        let preflists = try await (0..<20).asyncMap { try await admin(n4, "preflist", ["key-\($0)"]) }
        #expect(preflists.contains { ($0["primaries"] as? [[String: Any]] ?? []).contains { $0["node"] as? String == "n4" } })

        // n2 leaves: its data moves to the others; it stops by itself (run returns, no error).
        _ = try await admin(cluster.nodes[0], "leave", ["n2"])
        _ = try await admin(cluster.nodes[0], "commit")
        try await cluster.waitUntil("n2 handed off and exited", seconds: 120) {
            cluster.nodes[1].state == .stopped
        }
        if case .failure(let e) = await cluster.runResult(1) { Issue.record("n2's run() failed: \(e)") }
        try await cluster.waitUntil("n2 forgotten by the claimant", seconds: 60) {
            guard let s = try? await admin(cluster.nodes[0], "status") else { return false }
            return members(s)["n2"] == nil && s["pending_transfers"] as? Int == 0
        }
        let shrunk = try await admin(cluster.nodes[0], "status")
        let owned = members(shrunk).values.compactMap { $0["owned"] as? Int }
        #expect(owned.reduce(0, +) == 64 && (owned.max() ?? 0) - (owned.min() ?? 0) <= 1)
        let n2 = try NodeName("n2")
        try await cluster.waitUntil("every node has the final ring state") {
            [cluster.nodes[0], cluster.nodes[2], n4].allSatisfy { $0.core.membership?.ring?.member(n2) == nil }
        }
        try await cluster.waitUntil("the leaver's partitions are held by their new replicas", seconds: 60) {
            (try? placementErrors(keys, [cluster.nodes[0], cluster.nodes[2], n4]))?.isEmpty == true
        }
        let remaining = try await CairnClient.connect(seeds: [cluster.address(0), cluster.address(2)])
        #expect(await readAll(keys, via: remaining) == [], "every key at R=all after the leave")

        writer.close()
        viaN4.close()
        remaining.close()
        n4.shutdown()
        _ = try? await n4Run.value
        await cluster.stop()
    }
}

extension HandoffClusterTests {
    /// `handoff.transfer_timeout` bounds one run of a transfer: a run past it is stopped,
    /// counted and started again from its checkpoint, so a leave paced far below its data still
    /// completes, batch by batch across runs, and loses nothing.
    @Test func aTransferPastItsTimeoutIsStoppedAndResumesFromItsCheckpoint() async throws {
        let cluster = try await TestCluster.start(count: 4) { c in
            c.handoff.bytesPerSecond = 32 << 10
            c.handoff.transfer.batchMaxBytes = 4 << 10
            c.handoff.transferTimeout = .milliseconds(1500)
        }
        let n4 = cluster.nodes[3]
        let ring = try #require(n4.core.membership?.ring)
        // 120 KiB in one partition n4 replicates: about 4 s of sending at this pace, 30 batches.
        let p = try #require(ring.ring.partitions.first { ring.replicas(of: $0).contains(n4.config.name) })
        let keys = (0..<20_000).map { "key-\($0)" }.filter { ring.partition(forKey: Array($0.utf8)) == p }.prefix(120)
        let padding = String(repeating: "x", count: 1000)
        let writer = try await cluster.client([0, 1, 2])
        for k in keys { _ = try await writer.put(Array(k.utf8), value: Array("v-\(k)\(padding)".utf8), options: RequestOptions(w: .all)) }
        _ = try await admin(cluster.nodes[0], "leave", ["n4"])
        _ = try await admin(cluster.nodes[0], "commit")
        try await cluster.waitUntil("a transfer from n4 timed out", seconds: 60) {
            let text = n4.core.metrics.exposition()
            return text.contains("cairn_handoff_timeouts_total ") && !text.contains("cairn_handoff_timeouts_total 0\n")
        }
        try await cluster.waitUntil("n4 handed off and exited", seconds: 120) { n4.state == .stopped }
        try await cluster.waitUntil("every node forgot n4", seconds: 60) {
            cluster.nodes.prefix(3).allSatisfy { $0.core.membership?.ring?.member(n4.config.name) == nil }
        }
        for k in keys {
            let got = try await writer.get(Array(k.utf8), options: RequestOptions(r: .all))
            #expect(got.values == [Array("v-\(k)\(padding)".utf8)], "\(k) at R=all after the leave")
        }
        writer.close()
        await cluster.stop()
    }
}

extension HandoffClusterTests {
    /// Writes (W = all, through the other nodes) a key of a partition the cluster's first node
    /// does not replicate: its stored object is what that node would hold as an old owner.
    func writeKeyNotOnFirstNode(_ cluster: TestCluster) async throws -> (RingState, CairnClient, [UInt8], PartitionID) {
        let n1 = cluster.nodes[0]
        let ring = try #require(n1.core.membership?.ring)
        let writer = try await cluster.client([1, 2, 3])
        let seed = try #require((0..<1000).map { Array("seed-\($0)".utf8) }.first {
            !ring.replicas(of: ring.partition(forKey: $0)).contains(n1.config.name)
        })
        let p = ring.partition(forKey: seed)
        _ = try await writer.put(seed, value: Array("v".utf8), options: RequestOptions(w: .all))
        return (ring, writer, seed, p)
    }

    /// A write whose forward failed is kept for a later batch; the flip can come first (the
    /// receiver had reported the copy complete). A sender that crashed then still owes that key
    /// and the drop of its copy, though the ring has finished with the transfer: restarted, it
    /// finds the transfer by its checkpoint, delivers the key to the receiver (which accepts a
    /// late stream for a partition it replicates) and drops the partition.
    @Test func aTransferTheRingFinishedWithStillDeliversItsKeptKeysAfterARestart() async throws {
        let cluster = try await TestCluster.start(count: 4)
        let n1 = cluster.nodes[0]
        let (ring, writer, seed, p) = try await writeKeyNotOnFirstNode(cluster)
        let to = ring.replicas(of: p)[0]
        let receiver = try #require(cluster.nodes.first { $0.config.name == to })
        let object = try #require(try receiver.core.backend?.get(partition: p, key: seed))
        // The kept key: in n1's store only, named in a checkpoint whose copy was acknowledged to the end.
        let kept = try #require((0..<100_000).map { Array("kept-\($0)".utf8) }.first { ring.partition(forKey: $0) == p })
        let backend = try #require(n1.core.backend)
        try await backend.waitDurable(try backend.apply(partition: p, key: kept, value: object))
        await cluster.crash(0)
        let directory = try #require(n1.config.dataDirectory) + "/handoff"
        let fs = PosixFileSystem()
        try fs.createDirectory(directory)
        let store = FileHandoffStore(fs: fs, directory: directory)
        let id = TransferID(0x5eed)
        try store.save(TransferCheckpoint(id: id, partition: p, from: n1.config.name, to: to, position: .end, sequence: 1))
        try store.setDirty(id, [kept])

        let (restarted, run) = try await cluster.startAgain(0)
        try await cluster.waitUntil("the kept key reached the receiver and n1 dropped its copy", seconds: 60) {
            let delivered = (try? receiver.core.backend?.get(partition: p, key: kept)) != nil
            let dropped = (try? restarted.core.backend?.get(partition: p, key: kept)) == .some(nil)
            let forgotten = (try? { () throws -> Bool in try store.load(id) == nil }()) ?? false
            return delivered && dropped && forgotten
        }
        #expect(try receiver.core.backend?.get(partition: p, key: kept) == object, "merged as sent: the same object")

        writer.close()
        restarted.shutdown()
        _ = try? await run.value
        await cluster.stop()
    }
}

extension HandoffClusterTests {
    /// A node holding data of a partition it does not replicate, with no transfer or checkpoint
    /// to hand it on (it took writes while on an older ring), hands it to a current replica when
    /// it starts and drops its copy: nothing is kept where no owner knows of it.
    @Test func aLeftoverCopyFoundAtStartGoesToAReplicaAndIsDropped() async throws {
        let cluster = try await TestCluster.start(count: 4)
        let n1 = cluster.nodes[0]
        let (ring, writer, seed, p) = try await writeKeyNotOnFirstNode(cluster)
        let replicas = ring.replicas(of: p).compactMap { name in cluster.nodes.first { $0.config.name == name } }
        let object = try #require(try replicas.first?.core.backend?.get(partition: p, key: seed))
        // The leftover: a key of `p` in n1's store only.
        let left = try #require((0..<100_000).map { Array("left-\($0)".utf8) }.first { ring.partition(forKey: $0) == p })
        await cluster.crash(0)
        let restartedBackend = try await DiskBackend.open(directory: try #require(n1.config.dataDirectory) + "/storage", options: n1.config.storage)
        try await restartedBackend.waitDurable(try restartedBackend.apply(partition: p, key: left, value: object))
        try await restartedBackend.close()

        let (restarted, run) = try await cluster.startAgain(0)
        try await cluster.waitUntil("a replica took the leftover key and n1 dropped its copy", seconds: 60) {
            let delivered = replicas.contains { (try? $0.core.backend?.get(partition: p, key: left)) != nil }
            let dropped = (try? restarted.core.backend?.get(partition: p, key: left)) == .some(nil)
            return delivered && dropped
        }
        #expect(try restarted.core.backend?.get(partition: p, key: seed) == nil, "the whole copy is dropped")
        for v in replicas { #expect(try v.core.backend?.get(partition: p, key: seed) == object, "the replicas keep their own") }

        writer.close()
        restarted.shutdown()
        _ = try? await run.value
        await cluster.stop()
    }
}

extension HandoffClusterTests {
    /// A node removed while it was down, started again with its old data, learns from its peers
    /// that the ring no longer lists it and stops by itself: its copies were rebuilt elsewhere,
    /// and serving them (or staying up as a non-member) would only mislead.
    @Test func aRemovedNodeThatComesBackStops() async throws {
        let cluster = try await TestCluster.start(count: 4)
        await cluster.crash(3)
        try await cluster.waitUntil("n4 held dead", seconds: 60) {
            guard let s = try? await admin(cluster.nodes[0], "status") else { return false }
            return members(s)["n4"]?["liveness"] as? String == "dead"
        }
        _ = try await admin(cluster.nodes[0], "remove", ["n4"])
        _ = try await admin(cluster.nodes[0], "commit")
        try await cluster.waitUntil("n4 removed and its partitions rebuilt", seconds: 120) {
            guard let s = try? await admin(cluster.nodes[0], "status") else { return false }
            return members(s)["n4"] == nil && s["pending_transfers"] as? Int == 0
        }
        let (restarted, run) = try await cluster.startAgain(3)
        try await cluster.waitUntil("the removed node stopped by itself", seconds: 60) { restarted.state == .stopped }
        if case .failure(let e) = await run.result { Issue.record("its run() failed: \(e)") }
        let s = try await admin(cluster.nodes[0], "status")
        #expect(members(s)["n4"] == nil, "it did not come back as a member")
        await cluster.stop()
    }

}

extension HandoffClusterTests {
    /// A coordinator a gossip round behind sends a replica write and read for a partition that
    /// moved to n4 to its old replica: the old replica relays both to n4 (which stores the
    /// write) instead of refusing them.
    func aCoordinatorOnTheOldRingStillReachesTheCopy(_ cluster: TestCluster, n4: CairnNode) async throws {
        let n4Name = try NodeName("n4")
        let moved = cluster.nodes.indices.lazy.flatMap { i in (0..<64).lazy.map { (i, PartitionID($0)) } }
            .first { i, p in cluster.nodes[i].core.vnodes.successors(of: p).contains(n4Name) }
        let (old, partition) = try #require(moved, "some partition moved from n1..n3 to n4")
        let ring = try #require(n4.core.membership?.ring)
        let key = try #require((0..<10_000).lazy.map { Array("stale-\($0)".utf8) }.first { ring.partition(forKey: $0) == partition })
        var object = VersionedObject()
        try object.update(context: VersionVector(), value: Sibling(value: [7], timestampMillis: 1), actor: ActorID(node: "n9", epoch: 1))

        let target = cluster.members[old]
        let peer = cluster.members[(old + 1) % cluster.members.count].name
        let conn = try await Connection.connect(host: target.address.host, port: target.address.port,
                                                group: MultiThreadedEventLoopGroup.singleton, limits: Limits())
        defer { conn.close() }
        guard case .helloAck = try await handshake(conn, as: peer.value, to: target.name, cluster: cluster.name) else {
            Issue.record("handshake refused"); return
        }
        let put = try await conn.request(.replicaPut(ReplicaPut(partition: partition, key: key, object: object)), timeoutMillis: 10_000)
        guard case .replicaPutAck = put else { Issue.record("the old replica did not relay the write to n4: \(put)"); return }
        #expect(try n4.core.backend?.get(partition: partition, key: key) != nil, "n4 stored the relayed write")
        #expect(try cluster.nodes[old].core.backend?.get(partition: partition, key: key) == nil, "the old replica kept no copy")
        guard case .replicaGetReply(let got) = try await conn.request(.replicaGet(ReplicaGet(partition: partition, key: key)), timeoutMillis: 10_000) else {
            Issue.record("the relayed read was refused"); return
        }
        #expect(got.object?.values.map(\.value) == [[7]])
        #expect(cluster.nodes[old].metrics.exposition().contains("cairn_relayed_replica_requests_total 2"))

        // A client write forwarded by a node whose ring still names the old replica as a primary:
        // the old replica passes it to the replicas that took its place, which coordinate it.
        let forwarded = Message.put(PutRequest(key: key, value: [8], options: RequestOptions(w: .count(2)), forwarded: true))
        guard case .writeReply = try await conn.request(forwarded, timeoutMillis: 10_000) else {
            Issue.record("the forwarded write was refused by the node that handed the partition away"); return
        }
        // n4 coordinated it; W = 2 can be met by the other two replicas before n4's own copy is
        // durable (its sync overlaps the replication), and a store read shows durable data only.
        try await cluster.waitUntil("n4 holds the forwarded write durably", seconds: 10) {
            guard let stored = try? n4.core.backend?.get(partition: partition, key: key),
                  let object = try? VersionedObject.decode(stored, limits: Limits()) else { return false }
            return object.values.map(\.value).contains([8])
        }
    }
}

extension Sequence {
    func asyncMap<T>(_ transform: (Element) async throws -> T) async rethrows -> [T] {
        var out: [T] = []
        for e in self { out.append(try await transform(e)) }
        return out
    }
}
