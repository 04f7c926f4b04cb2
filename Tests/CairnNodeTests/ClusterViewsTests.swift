import Testing
@testable import CairnNode
import CairnCore
import CairnRing
import Logging
import NIOPosix

private func members(_ n: Int) -> [MemberAddress] {
    (1...n).map { MemberAddress(name: try! NodeName("n\($0)"), address: HostPort(host: "127.0.0.1", port: 7400 + $0)) }   // literals
}

private func view(_ n: Int, version: UInt64, me: String = "n1") throws -> ClusterView {
    var c = NodeConfig(name: try NodeName(me))
    c.ringSize = 16
    return try ClusterView(config: c, members: members(n), version: version)
}

/// The cluster view as a versioned stream, and the vnode manager and socket transport following it.
@Suite struct ClusterViewsTests {
    @Test func versionsOnlyGrowAndSubscribersSeeTheCurrentViewFirst() async throws {
        let views = ClusterViews(try view(3, version: 1))
        var updates = views.updates().makeAsyncIterator()
        #expect(await updates.next()?.version == 1)
        #expect(!views.publish(try view(4, version: 1)), "a view of the same version is ignored")
        #expect(views.publish(try view(4, version: 2)))
        #expect(await updates.next()?.addresses.count == 4)
        #expect(views.current.version == 2)
    }

    /// A view's precomputed placements are what the ring computes for each partition: primaries
    /// in preference-list order, then the fallback candidates, this node marked local.
    @Test func precomputedPlacementsAreTheRingsOwn() throws {
        let v = try view(5, version: 1, me: "n2")
        let state = try #require(v.state)
        for p in state.ring.partitions {
            let key = try #require((0..<100_000).lazy.map { Array("k\($0)".utf8) }.first { state.partition(forKey: $0) == p })
            let placement = v.replicas(forKey: key)
            #expect(placement.partition == p)
            #expect(placement.primaries.map(\.node) == state.replicas(of: p))
            #expect(placement.candidates.map(\.node) == state.replicas(of: p) + state.fallbacks(of: p, count: state.nVal))
            let marked = placement.candidates.allSatisfy { $0.isLocal == ($0.node.value == "n2") && $0.address == v.address($0.node) }
            let roles = placement.candidates.map(\.isPrimary) == placement.primaries.map { _ in true } + Array(repeating: false, count: placement.candidates.count - placement.primaries.count)
            #expect(marked && roles)
        }
    }

    @Test func aSlowSubscriberSkipsToTheNewestView() async throws {
        let views = ClusterViews(try view(3, version: 1))
        var updates = views.updates().makeAsyncIterator()
        for v in 2...5 { views.publish(try view(3, version: UInt64(v))) }
        #expect(await updates.next()?.version == 5)
    }

    @Test func thePlanStartsWhatAViewAddsAndRetiresWhatItDrops() {
        let p = (0..<4).map { VnodeKey(partition: PartitionID($0), role: .primary) }
        #expect(VnodePlan.reconcile(running: [p[0], p[1]], desired: [p[1], p[3], p[2]]) == [.retire(p[0]), .start(p[2]), .start(p[3])])
        #expect(VnodePlan.reconcile(running: [p[0], p[1], p[2]], desired: [p[2]]) == [.retire(p[0]), .retire(p[1])])
        #expect(VnodePlan.reconcile(running: [p[0]], desired: [p[0]]).isEmpty)
    }

    /// A node of 3 replicates every partition (N=3); in a view of 6 it replicates only some: the
    /// manager retires the others (their child ids leave the vnode supervisor) and keeps the rest.
    @Test func theManagerFollowsTheViews() throws {
        let first = try view(3, version: 1)
        let views = ClusterViews(first)
        let supervisor = Supervisor(name: "vnodes", policy: RestartPolicy(), logger: Logger(label: "t"))
        let table = VnodeTable()
        let backend = MemoryBackend()
        let manager = VnodeManager(table: table, supervisor: supervisor, views: views, logger: Logger(label: "t")) { key in
            Vnode(partition: key.partition, role: key.role, backend: backend, limits: Limits(), metrics: NodeMetrics(maxInflight: 1),
                  logger: Logger(label: "t"))
        }
        #expect(manager.apply(first).count == 16)
        #expect(table.count == 16 && supervisor.children.count == 16)
        let second = try view(6, version: 2)
        let expected = try #require(second.state?.vnodePartitions(of: second.me))
        let plan = manager.apply(second)
        #expect(plan.allSatisfy { if case .retire = $0 { true } else { false } })
        #expect(Set(table.partitions) == expected && expected.count < 16)
        #expect(Set(supervisor.children) == Set(expected.map { VnodeKey(partition: $0, role: .primary).description }))
        #expect(manager.apply(first).isEmpty, "an older view changes nothing")
    }

    /// A node that handed a partition away relays its replica requests to the successors until
    /// it runs the partition's primary vnode again; standing in for a down primary of it (a
    /// fallback vnode) does not make it a replica.
    @Test func successorsStayUntilThePrimaryVnodeReturns() throws {
        let table = VnodeTable()
        let backend = MemoryBackend()
        let p = PartitionID(5)
        func vnode(_ role: VnodeRole) -> Vnode {
            Vnode(partition: p, role: role, backend: backend, limits: Limits(), metrics: NodeMetrics(maxInflight: 1), logger: Logger(label: "t"))
        }
        let successors = [try NodeName("n4"), try NodeName("n5")]
        table.movedAway(p, to: successors)
        table.insert(vnode(.fallback))
        #expect(table.successors(of: p) == successors)
        table.insert(vnode(.primary))
        #expect(table.successors(of: p).isEmpty)
    }

    @Test func theSocketTransportAddsAndRemovesLinksWithTheViews() throws {
        let first = try view(3, version: 1)
        let views = ClusterViews(first)
        let supervisor = Supervisor(name: "peers", policy: RestartPolicy(), logger: Logger(label: "t"))
        var c = NodeConfig(name: try NodeName("n1"))
        c.ringSize = 16
        let config = c
        let group = MultiThreadedEventLoopGroup.singleton
        let transport = SocketTransport(views: views, supervisor: supervisor) { m in
            PeerLink(peer: m.name, address: m.address, handshake: ClusterHandshake(config: config), config: config, group: group, logger: Logger(label: "t"),
                     clock: SystemClock()) {}
        }
        transport.apply(first)
        #expect(transport.links.keys.map(\.value).sorted() == ["n2", "n3"] && transport.peerCount == 2)
        let shrunk = try ClusterView(config: config, members: members(4).filter { $0.name.value != "n2" }, version: 2)
        transport.apply(shrunk)
        #expect(transport.links.keys.map(\.value).sorted() == ["n3", "n4"])
        #expect(supervisor.children.sorted() == ["peer-n3", "peer-n4"])
        #expect(transport.downReasons([try NodeName("n2")]).count == 1, "a dropped member is not a known peer")
    }
}
