import Testing
import CairnNode
import CairnSim
import CairnCore
import CairnWire
import Logging

/// Real nodes (coordinators, vnodes, supervisor) on an `InMemoryNetwork` and a `ManualClock`: no
/// sockets, and time moves only when the test moves it.
@Suite(.timeLimit(.minutes(3)))
struct InMemoryClusterTests {
    final class Cluster: Sendable {
        let clock = ManualClock()
        let network: InMemoryNetwork
        let nodes: [CairnNode]
        let names: [NodeName]
        private let runs: [Task<Void, any Error>]

        init(count: Int = 3, seed: UInt64 = 7) async throws {
            network = InMemoryNetwork(clock: clock, seed: seed)
            let nodes = try await SimulatedNodes.make(count: count, clock: clock, network: network)
            names = nodes.map(\.config.name)
            self.nodes = nodes
            runs = nodes.map { n in Task { try await n.run() } }
            for n in nodes {
                for _ in 0..<100_000 where n.state != .serving { await Task.yield() }
                try #require(n.state == .serving)
            }
        }

        /// Shuts every node down gracefully. A drain waits on the nodes' clock, so virtual time
        /// moves (10 ms steps, at most 1 minute of it) until every node has stopped.
        func stop() async {
            for n in nodes { n.shutdown() }
            for _ in 0..<6000 where nodes.contains(where: { $0.state != .stopped }) {
                clock.advance(by: .milliseconds(10))
                for _ in 0..<20 { await Task.yield() }
            }
            for r in runs { _ = try? await r.value }
        }
    }

    private func put(_ node: CairnNode, _ key: String, _ value: String, w: Quorum, timeout: UInt32? = nil) async -> Message {
        await node.answer(.put(PutRequest(key: Array(key.utf8), value: Array(value.utf8), options: RequestOptions(w: w, timeoutMillis: timeout))))
    }

    @Test func quorumWritesAndReadsCrossTheNetworkWithoutSockets() async throws {
        let cluster = try await Cluster()
        guard case .writeReply(let w) = await put(cluster.nodes[0], "k", "v", w: .all) else { Issue.record("W=all write failed"); return }
        #expect(w.concurrent.isEmpty)
        guard case .getReply(let r) = await cluster.nodes[2].answer(.get(GetRequest(key: Array("k".utf8), options: RequestOptions(r: .all)))) else {
            Issue.record("R=all read failed"); return
        }
        #expect(r.siblings.map(\.value) == [Array("v".utf8)])
        #expect(cluster.network.counts.delivered >= 4)   // two replica puts, two replica gets
        await cluster.stop()
    }

    @Test func aStoppedNodeIsUnavailableAtOnceAndACutOneTimesOutOnVirtualTime() async throws {
        let cluster = try await Cluster()
        let (n1, n2, n3) = (cluster.names[0], cluster.names[1], cluster.names[2])
        // n3 stops: W=all is refused before anything is sent; W=2 succeeds.
        cluster.network.detach(n3)
        guard case .error(let e) = await put(cluster.nodes[0], "a", "1", w: .all) else { Issue.record("W=all with n3 down succeeded"); return }
        #expect(e.code == .unavailable)
        guard case .writeReply = await put(cluster.nodes[0], "a", "2", w: .count(2)) else { Issue.record("W=2 failed"); return }
        // n1 cannot reach n2 (silently): W=2 from n1 waits for its deadline, on the test's clock.
        cluster.network.cut(from: n1, to: n2)
        // Each node's membership agent sleeps on the clock too: count from what sleeps then.
        for _ in 0..<100_000 where cluster.clock.sleeping < cluster.nodes.count { await Task.yield() }
        let agents = cluster.clock.sleeping
        let pending = Task { await put(cluster.nodes[0], "b", "1", w: .count(2), timeout: 500) }
        // In flight: the coordinator's deadline and the lost replica request's wait are armed.
        for _ in 0..<100_000 where cluster.clock.sleeping < agents + 2 { await Task.yield() }
        #expect(cluster.clock.elapsed == .zero)
        cluster.clock.advance(by: .milliseconds(500))
        guard case .error(let f) = await pending.value else { Issue.record("W=2 across a cut succeeded"); return }
        #expect(f.code == .notReached)
        #expect(f.quorum?.replicas.contains { $0.node == n2.value && $0.outcome == .timedOut(afterMillis: 500) } == true)
        await cluster.stop()
    }
}
