import Testing
import Foundation
@testable import CairnNode
import CairnCore
import CairnWire

/// `ClusterHandshake` alone: both sides' checks and MACs, with fixed nonces. No sockets.
@Suite struct HandshakeTests {
    let secret = ClusterSecret(bytes: Array("3f9a0c1d2e4b5a69788796a5b4c3d2e1".utf8))
    let n1: NodeName
    let n2: NodeName
    let nonceC = [UInt8](repeating: 0xC1, count: 32)
    let nonceS = [UInt8](repeating: 0x5E, count: 32)

    init() throws {
        n1 = try NodeName("n1")
        n2 = try NodeName("n2")
    }

    func node(_ name: NodeName, cluster: String = "prod", secret: ClusterSecret? = nil) -> ClusterHandshake {
        ClusterHandshake(cluster: cluster, me: name, secret: secret ?? self.secret)
    }

    /// Runs the three messages from `dialer` to `acceptor`; the acceptor's verdict on the proof
    /// (or the refusal that ended the exchange earlier, from whichever side).
    func run(_ dialer: ClusterHandshake, _ acceptor: ClusterHandshake) -> Result<NodeName, HandshakeRefusal> {
        let hello = dialer.hello(nonce: nonceC)
        let pending: PendingHello
        switch acceptor.answer(hello, nonce: nonceS, remote: "127.0.0.1:50000") {
        case .success(let p): pending = p
        case .failure(let r): return .failure(r)
        }
        switch dialer.proof(for: pending.ack, to: hello, dialled: acceptor.me, at: "127.0.0.1:7402") {
        case .success(let proof): return acceptor.verify(proof, for: pending, remote: "127.0.0.1:50000")
        case .failure(let r): return .failure(r)
        }
    }

    @Test func theRightSecretIsAcceptedBothWays() throws {
        #expect(try run(node(n1), node(n2)).get() == n1)
        #expect(try run(node(n2), node(n1)).get() == n2)
    }

    @Test func noSecretOnEitherSideStillHandshakes() throws {
        #expect(try run(node(n1, secret: .empty), node(n2, secret: .empty)).get() == n1)
    }

    /// The dialer finds the acceptor's ack does not verify (whichever side has the wrong secret);
    /// its refusal proof then fails at the acceptor too, so both sides log the secret check.
    @Test(arguments: [true, false])
    func aWrongSecretIsRefusedOnEachSide(dialerIsWrong: Bool) throws {
        let other = ClusterSecret(bytes: Array("another secret entirely, 32 bytes".utf8))
        let dialer = node(n1, secret: dialerIsWrong ? other : secret)
        let acceptor = node(n2, secret: dialerIsWrong ? secret : other)
        let hello = dialer.hello(nonce: nonceC)
        let pending = try acceptor.answer(hello, nonce: nonceS, remote: "127.0.0.1:50000").get()
        guard case .failure(let atDialer) = dialer.proof(for: pending.ack, to: hello, dialled: n2, at: "127.0.0.1:7402") else {
            Issue.record("the dialer accepted an ack made with another secret")
            return
        }
        #expect(atDialer.reason == .secret)
        #expect(atDialer.message == "peer n2 at 127.0.0.1:7402 failed the cluster secret check (its hello-ack does not verify); check cluster.secret_file")
        guard case .failure(let atAcceptor) = acceptor.verify(ClusterHandshake.refusal, for: pending, remote: "127.0.0.1:50000") else {
            Issue.record("the acceptor accepted a refusal")
            return
        }
        #expect(atAcceptor.reason == .secret)
        #expect(atAcceptor.message.hasPrefix("peer n1 (from 127.0.0.1:50000) failed the cluster secret check"))
        #expect(atAcceptor.message.hasSuffix("check cluster.secret_file"))
        // A proof made with the dialer's secret over the very same nonces (as a dialer that skipped
        // its check would send) is refused by the acceptor.
        let lookalike = try ClusterHandshake(cluster: "prod", me: n2, secret: dialerIsWrong ? other : secret)
            .answer(hello, nonce: pending.ack.nonce, remote: nil).get().ack
        let forged = try dialer.proof(for: lookalike, to: hello, dialled: n2, at: "127.0.0.1:7402").get()
        #expect(acceptor.verify(forged, for: pending, remote: nil).refusal?.reason == .secret)
    }

    /// A proof is bound to the acceptor's nonce of its connection: replayed on another handshake
    /// (another acceptor nonce), it fails, even with the same dialer nonce.
    @Test func aReplayedProofIsRefused() throws {
        let dialer = node(n1), acceptor = node(n2)
        let hello = dialer.hello(nonce: nonceC)
        let first = try acceptor.answer(hello, nonce: nonceS, remote: nil).get()
        let proof = try dialer.proof(for: first.ack, to: hello, dialled: n2, at: "a").get()
        #expect(try acceptor.verify(proof, for: first, remote: nil).get() == n1)
        let second = try acceptor.answer(hello, nonce: [UInt8](repeating: 0x77, count: 32), remote: nil).get()
        guard case .failure(let r) = acceptor.verify(proof, for: second, remote: nil) else {
            Issue.record("a replayed proof was accepted")
            return
        }
        #expect(r.reason == .secret)
        // And an ack replayed to a new hello (another dialer nonce) fails at the dialer.
        let newHello = dialer.hello(nonce: [UInt8](repeating: 0x99, count: 32))
        #expect((try? dialer.proof(for: first.ack, to: newHello, dialled: n2, at: "a").get()) == nil)
    }

    enum Tamper: CaseIterable, Sendable { case ackNonce, ackMAC, proofMAC, dialerName, dialerNonce, truncatedMAC }

    /// Changing any field the MACs cover breaks the exchange.
    @Test(arguments: Tamper.allCases)
    func tamperedFieldsAreRefused(field: Tamper) throws {
        let dialer = node(n1), acceptor = node(n2)
        let hello = dialer.hello(nonce: nonceC)
        var pending = try acceptor.answer(hello, nonce: nonceS, remote: nil).get()
        var ack = pending.ack
        switch field {
        case .ackNonce: ack.nonce[5] ^= 0x01
        case .ackMAC: ack.mac[0] ^= 0x80
        case .truncatedMAC: ack.mac.removeLast()
        default: break
        }
        let proofResult = dialer.proof(for: ack, to: hello, dialled: n2, at: "a")
        switch field {
        case .ackNonce, .ackMAC, .truncatedMAC:
            #expect((try? proofResult.get()) == nil, "the dialer accepted a tampered ack")
            return
        default: break
        }
        var proof = try proofResult.get()
        switch field {
        case .proofMAC: proof.mac[31] ^= 0x01
        case .dialerName: pending.hello.node = "n3"   // the proof of n1 presented as n3's
        case .dialerNonce: pending.hello.nonce[0] ^= 0x01
        default: break
        }
        guard case .failure(let r) = acceptor.verify(proof, for: pending, remote: nil) else {
            Issue.record("the acceptor accepted a proof after \(field) was changed")
            return
        }
        #expect(r.reason == .secret)
    }

    @Test func anotherClusterNameIsRefusedByBothSides() throws {
        let atAcceptor = node(n2).answer(node(n1, cluster: "staging").hello(nonce: nonceC), nonce: nonceS, remote: "10.0.0.9:4000")
        #expect(atAcceptor.refusal?.reason == .cluster)
        #expect(atAcceptor.refusal?.message == "peer n1 (from 10.0.0.9:4000) is of cluster 'staging', not this node's cluster 'prod'; check cluster.name")
        let dialer = node(n1)
        let hello = dialer.hello(nonce: nonceC)
        var ack = try node(n2).answer(hello, nonce: nonceS, remote: nil).get().ack
        ack.cluster = "staging"
        let atDialer = dialer.proof(for: ack, to: hello, dialled: n2, at: "127.0.0.1:7402")
        #expect(atDialer.refusal?.reason == .cluster)
        #expect(atDialer.refusal?.message == "peer n2 at 127.0.0.1:7402 is of cluster 'staging', not 'prod'; check cluster.name")
    }

    @Test func anotherProtocolVersionIsRefusedNamingBothVersions() throws {
        var old = node(n1).hello(nonce: nonceC)
        old.protocolVersion = 1
        let atAcceptor = node(n2).answer(old, nonce: nonceS, remote: "10.0.0.9:4000")
        #expect(atAcceptor.refusal?.reason == .protocolVersion)
        #expect(atAcceptor.refusal?.message == "peer n1 (from 10.0.0.9:4000) speaks internode protocol version 1; this node (n2) speaks \(ClusterHandshake.protocolVersion)")
        let dialer = node(n1)
        let hello = dialer.hello(nonce: nonceC)
        var ack = try node(n2).answer(hello, nonce: nonceS, remote: nil).get().ack
        ack.protocolVersion = 9
        let atDialer = dialer.proof(for: ack, to: hello, dialled: n2, at: "127.0.0.1:7402")
        #expect(atDialer.refusal?.reason == .protocolVersion)
        #expect(atDialer.refusal?.message == "peer n2 at 127.0.0.1:7402 speaks internode protocol version 9; this node speaks \(ClusterHandshake.protocolVersion)")
    }

    @Test func theAcceptorChecksTheDialersIdentity() throws {
        let acceptor = node(n2)
        var bad = node(n1).hello(nonce: nonceC)
        bad.node = "not a name!"
        #expect(acceptor.answer(bad, nonce: nonceS, remote: nil).refusal?.reason == .node)
        // A dialer claiming to be the acceptor itself.
        #expect(acceptor.answer(node(n2).hello(nonce: nonceC), nonce: nonceS, remote: nil).refusal?.message == "peer n2 claims to be this node (n2)")
        // Another node than the one dialled answering is refused by the dialer.
        let dialer = node(n1)
        let hello = dialer.hello(nonce: nonceC)
        let ack = try node(try NodeName("n3")).answer(hello, nonce: nonceS, remote: nil).get().ack
        #expect(dialer.proof(for: ack, to: hello, dialled: n2, at: "127.0.0.1:7402").refusal?.reason == .node)
    }

    /// What the old handshake refused as a ring mismatch (other members, ring size or N) now
    /// shakes hands: the hello carries none of it, and the handshake is built from the config.
    @Test func nodesWithDifferentRingsStillShakeHands() throws {
        func config(_ name: String, members: String, ringSize: Int, nVal: Int) throws -> NodeConfig {
            var c = try NodeConfig.parse("""
            node.name = \(name)
            cluster.name = prod
            cluster.members = \(members)
            cluster.ring_size = \(ringSize)
            cluster.n_val = \(nVal)
            """)
            c.clusterSecret = secret
            return c
        }
        let a = try config("n1", members: "n1@h:1, n2@h:2, n3@h:3", ringSize: 64, nVal: 3)
        let b = try config("n2", members: "n2@h:2, n1@h:1", ringSize: 128, nVal: 2)
        #expect(try run(ClusterHandshake(config: a), ClusterHandshake(config: b)).get() == n1)
        // A joining node that no one lists yet is no member anywhere, and is accepted too.
        let joiner = try config("n9", members: "n9@h:9", ringSize: 64, nVal: 1)
        #expect(try run(ClusterHandshake(config: joiner), ClusterHandshake(config: a)).get() == (try NodeName("n9")))
    }

    /// Length prefixes keep field boundaries: moving bytes between adjacent fields changes the
    /// input, and the two labels make the ack's MAC differ from the proof's.
    @Test func theMACInputIsUnambiguous() {
        let a = ClusterHandshake.macInput("cairn-hello-ack", cluster: "ab", dialer: "c", acceptor: "d", dialerNonce: [1], acceptorNonce: [2])
        let b = ClusterHandshake.macInput("cairn-hello-ack", cluster: "a", dialer: "bc", acceptor: "d", dialerNonce: [1], acceptorNonce: [2])
        let c = ClusterHandshake.macInput("cairn-hello-ack", cluster: "ab", dialer: "c", acceptor: "d", dialerNonce: [1, 2], acceptorNonce: [])
        let p = ClusterHandshake.macInput("cairn-hello-proof", cluster: "ab", dialer: "c", acceptor: "d", dialerNonce: [1], acceptorNonce: [2])
        #expect(Set([a, b, c, p]).count == 4)
        let bound = ClusterHandshake.macInput("cairn-hello-ack", cluster: "ab", dialer: "c", acceptor: "d", dialerNonce: [1], acceptorNonce: [2],
                                              channelBinding: [9])
        #expect(bound != a, "a channel binding (a TLS exporter, later) changes what is proven")
    }

    @Test func noncesAreFreshAndLongEnough() {
        let a = ClusterHandshake.makeNonce(), b = ClusterHandshake.makeNonce()
        #expect(a.count == WireCodec.nonceBytes && a.count >= 16)
        #expect(a != b)
    }

    @Test func theSecretIsNeverPrinted() {
        #expect(!"\(secret)".contains("3f9a"))
        #expect("\(ClusterSecret.empty)" == "no cluster secret")
    }

    // MARK: Loading the secret

    func file(_ contents: [UInt8]) throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-secret-\(UInt64.random(in: 0...UInt64.max))").path
        #expect(FileManager.default.createFile(atPath: path, contents: Data(contents), attributes: [.posixPermissions: 0o600]))
        return path
    }

    @Test func aSecretFileIsTrimmed() throws {
        let path = try file(Array(" \t0123456789abcdef0123456789abcdef\r\n\n".utf8))
        defer { try? FileManager.default.removeItem(atPath: path) }
        #expect(try ClusterSecret.load(path: path) == ClusterSecret(bytes: Array("0123456789abcdef0123456789abcdef".utf8)))
    }

    @Test func badSecretFilesAreErrorsNamingThePath() throws {
        let missing = "/nonexistent/cairn/secret"
        #expect(throws: ValidationError("cannot read cluster secret \(missing): No such file or directory")) { try ClusterSecret.load(path: missing) }
        let empty = try file(Array(" \n".utf8))
        let short = try file(Array("short".utf8))
        let huge = try file([UInt8](repeating: 0x61, count: ClusterSecret.maxFileBytes + 1))
        defer { for p in [empty, short, huge] { try? FileManager.default.removeItem(atPath: p) } }
        #expect(throws: ValidationError("cluster secret \(empty) is empty")) { try ClusterSecret.load(path: empty) }
        #expect(throws: ValidationError.self) { try ClusterSecret.load(path: short) }
        #expect((try? ClusterSecret.load(path: short)) == nil)
        do {
            _ = try ClusterSecret.load(path: short)
        } catch {
            #expect(error.reason.contains(short) && error.reason.contains("at least 16"))
        }
        #expect(throws: ValidationError("cluster secret \(huge) is larger than 4096 bytes")) { try ClusterSecret.load(path: huge) }
    }

    /// `cluster.secret_file` only names the file; `loadClusterSecret` reads it (after every
    /// `--set`), and a node whose secret was not loaded refuses to start.
    @Test func theConfigKeyIsLoadedOnRequestAndANodeWillNotStartWithoutIt() async throws {
        let path = try file(Array("0123456789abcdef0123456789abcdef\n".utf8))
        defer { try? FileManager.default.removeItem(atPath: path) }
        var c = try NodeConfig.parse("node.name = n1\ncluster.members = n1@h:1\ncluster.secret_file = \(path)")
        #expect(c.secretFile == path && c.clusterSecret == nil)
        c.dataDirectory = nil
        c.http = nil
        c.listen = HostPort(host: "127.0.0.1", port: 0)
        await #expect(throws: ValidationError.self) { try await CairnNode(config: c).bind() }
        try c.loadClusterSecret()
        #expect(c.clusterSecret == ClusterSecret(bytes: Array("0123456789abcdef0123456789abcdef".utf8)))
        c.secretFile = "/nonexistent/secret"
        #expect(throws: ValidationError("cluster.secret_file: cannot read cluster secret /nonexistent/secret: No such file or directory")) {
            try c.loadClusterSecret()
        }
        #expect(throws: NodeConfig.ParseError.self) { try NodeConfig.parse("node.name = n1\ncluster.members = n1@h:1\ncluster.secret_file =") }
    }
}

extension Result where Failure == HandshakeRefusal {
    var refusal: HandshakeRefusal? {
        if case .failure(let r) = self { return r }
        return nil
    }
}
