import Testing
import Foundation
import CairnNode
import CairnClient
import CairnCore
import CairnWire
import CairnRing
import NIOPosix

private let key = Array("handshake:1".utf8)
private let value = Array("v".utf8)

/// The internode handshake between real nodes on loopback sockets: the cluster secret, and the
/// relaxed contract (no ring, N or member-list check).
@Suite(.timeLimit(.minutes(2)))
struct HandshakeClusterTests {
    static let secret = ClusterSecret(bytes: Array("0f1e2d3c4b5a69788796a5b4c3d2e1f0".utf8))
    static let otherSecret = ClusterSecret(bytes: Array("a completely different secret!!!".utf8))

    /// "cairn_handshake_rejections_total{…side="<side>"…reason="<reason>"…} N", summed.
    static func rejections(_ node: CairnNode, side: String, reason: String) -> Double {
        node.metrics.exposition().split(separator: "\n").filter {
            $0.hasPrefix("cairn_handshake_rejections_total{") && $0.contains("side=\"\(side)\"") && $0.contains("reason=\"\(reason)\"")
        }.compactMap { $0.split(separator: " ").last.flatMap { Double($0) } }.reduce(0, +)
    }

    @Test func nodesWithTheSameSecretConnectAndReplicate() async throws {
        let cluster = try await TestCluster.start(count: 2, nVal: 2) { $0.clusterSecret = Self.secret }
        let writer = try await cluster.client([0])
        let reader = try await cluster.client([1])
        // W=2: the peer's acknowledgement came over the authenticated link.
        let written = try await writer.put(key, value: value, options: RequestOptions(w: .all))
        let got = try await reader.get(key, options: RequestOptions(r: .all))
        #expect(got.values == [value] && got.context == written.context)
        for node in cluster.nodes {
            for side in ["in", "out"] { #expect(Self.rejections(node, side: side, reason: "secret") == 0) }
        }
        writer.close(); reader.close()
        await cluster.stop()
    }

    /// What the old handshake refused as a ring mismatch: n2 has another ring size and N. The
    /// nodes still connect (the hello no longer carries the ring).
    @Test func nodesWithDifferentRingsStillConnect() async throws {
        let cluster = try await TestCluster.start(count: 2, nVal: 2) { c in
            c.clusterSecret = Self.secret
            if c.name.value == "n2" {
                c.ringSize = 128
                c.nVal = 1
            }
        }
        #expect(cluster.nodes.allSatisfy { $0.connectedPeers == 1 })
        await cluster.stop()
    }

    /// n1 and n2 share a secret, n3 has another: n3's links never come up, both sides log and
    /// count why, and the two others keep serving W=2 writes among themselves.
    @Test func aNodeWithAnotherSecretIsRefused() async throws {
        let logs = (0..<3).map { _ in CapturedLogs() }
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-secret-\(UInt64.random(in: 0...UInt64.max))").path
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        var nodes: [CairnNode] = []
        var members: [MemberAddress] = []
        let host = TestLoopback.host()
        for i in 1...3 {
            var c = NodeConfig(name: try NodeName("n\(i)"))
            c.listen = HostPort(host: host, port: 0)
            c.http = nil
            c.clusterName = "test"
            c.ringSize = 64
            c.nVal = 3
            c.reconnectMinMillis = 20
            c.reconnectMaxMillis = 200
            c.requestTimeoutMillis = 10_000
            c.drainTimeoutMillis = 2000
            c.dataDirectory = scratch + "/n\(i)"
            c.clusterSecret = i == 3 ? Self.otherSecret : Self.secret
            let node = CairnNode(config: c, logger: logs[i - 1].logger)
            members.append(MemberAddress(name: c.name, address: try await node.bind().client))
            nodes.append(node)
        }
        for n in nodes { try n.start(members: members) }
        let tasks = nodes.map { n in Task { try await n.run() } }
        defer { for t in tasks { t.cancel() } }
        let deadline = ContinuousClock.now + .seconds(15)
        func waitUntil(_ what: String, _ condition: () -> Bool) async throws {
            while !condition() {
                guard ContinuousClock.now < deadline else { Issue.record("timed out waiting until \(what)"); throw HarnessError.timeout(what) }
                try await Task.sleep(for: .milliseconds(5))
            }
        }
        // Each side refuses (n3 dialling n1 and n2; n1 and n2 dialling n3), and each side's acceptor
        // hears the dialer's refusal.
        try await waitUntil("every refusal counted on both sides") {
            Self.rejections(nodes[2], side: "out", reason: "secret") >= 2 && Self.rejections(nodes[2], side: "in", reason: "secret") >= 2
                && (0..<2).allSatisfy { Self.rejections(nodes[$0], side: "out", reason: "secret") >= 1 && Self.rejections(nodes[$0], side: "in", reason: "secret") >= 1 }
        }
        try await waitUntil("n1 and n2 connected to each other") { nodes[0].connectedPeers == 1 && nodes[1].connectedPeers == 1 }
        #expect(nodes[2].connectedPeers == 0, "n3's links never come up")
        #expect(nodes[0].connectedPeers == 1 && nodes[1].connectedPeers == 1, "n3 is not among n1's and n2's peers")
        let n3Address = members[2].address.description
        let n3Says = logs[2].entries.withLock { $0 }.filter { $0.level == .error }.map(\.message)
        #expect(n3Says.contains { $0.hasPrefix("peer n1 at ") && $0.contains("failed the cluster secret check") && $0.hasSuffix("check cluster.secret_file") },
                "n3 says why it refused n1: \(n3Says)")
        let n1Says = logs[0].entries.withLock { $0 }.filter { $0.level == .error }.map(\.message)
        #expect(n1Says.contains { $0.hasPrefix("peer n3 (from 127.") && $0.contains("failed the cluster secret check") },
                "n1 says why it refused n3: \(n1Says)")
        #expect(n1Says.contains { $0 == "peer n3 at \(n3Address) failed the cluster secret check (its hello-ack does not verify); check cluster.secret_file" },
                "n1 says why its own link to n3 stays down: \(n1Says)")
        for n in nodes { n.shutdown() }
        for t in tasks { _ = try? await t.value }
    }

    /// A connection that claims to be n3 but cannot prove the secret is never served as a peer's:
    /// not before its proof, not with a proof made with another secret (after which the node
    /// closes the connection).
    @Test func nothingAnUnprovenPeerSendsIsServed() async throws {
        let cluster = try await TestCluster.start(count: 2, nVal: 2) { $0.clusterSecret = Self.secret }
        let target = cluster.members[0]
        let partition = try Ring(partitionCount: 64, members: cluster.members.map(\.name)).partition(forKey: key)
        var object = VersionedObject()
        try object.update(context: VersionVector(), value: Sibling(value: value, timestampMillis: 1), actor: ActorID(node: "n3", epoch: 1))
        let put = Message.replicaPut(ReplicaPut(partition: partition, key: key, object: object))

        // Hello answered, no proof yet: internode requests are refused as before any hello.
        let conn = try await Connection.connect(host: target.address.host, port: target.address.port, group: MultiThreadedEventLoopGroup.singleton, limits: Limits())
        let impostor = ClusterHandshake(cluster: cluster.name, me: try NodeName("n3"), secret: Self.otherSecret)
        let hello = impostor.hello(nonce: ClusterHandshake.makeNonce())
        guard case .helloAck(let ack) = try await conn.request(.hello(hello), timeoutMillis: 10_000) else {
            Issue.record("the hello itself should be answered")
            return
        }
        guard case .error(let early) = try await conn.request(put, timeoutMillis: 10_000) else {
            Issue.record("a replica put before the proof was served")
            return
        }
        #expect(early.code == .handshakeRequired)
        #expect(impostor.proof(for: ack, to: hello, dialled: target.name, at: conn.remote).refusal?.reason == .secret,
                "the impostor cannot verify the node's ack")

        // A proof made with the other secret over this very exchange: refused, connection closed.
        let lookalike = try ClusterHandshake(cluster: cluster.name, me: target.name, secret: Self.otherSecret).answer(hello, nonce: ack.nonce, remote: nil).get().ack
        try await conn.cast(.helloProof(try impostor.proof(for: lookalike, to: hello, dialled: target.name, at: conn.remote).get())).get()
        do {
            let reply = try await conn.request(put, timeoutMillis: 10_000)
            guard case .error(let e) = reply, e.code == .handshakeRequired else {
                Issue.record("a replica put after a failed proof got \(reply)")
                return
            }
        } catch {
            // The node closed the connection: the request was not served.
        }
        try await cluster.waitUntil("the node closed the connection") { !conn.isActive }
        #expect(Self.rejections(cluster.nodes[0], side: "in", reason: "secret") == 1)

        // Nothing reached storage: the key is unknown on both nodes.
        let c = try await cluster.client([0])
        let e = await failure("reading the key the impostor sent") { () async throws(CairnError) in
            try await c.get(key, options: RequestOptions(r: .all))
        }
        guard case .notFound? = e else { Issue.record("expected not found, got \(String(describing: e))"); return }
        c.close()
        await cluster.stop()
    }
}

private extension Result where Failure == HandshakeRefusal {
    var refusal: HandshakeRefusal? {
        if case .failure(let r) = self { return r }
        return nil
    }
}
