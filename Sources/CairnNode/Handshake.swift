#if canImport(Glibc)
import Glibc
#endif
public import CairnCore
public import CairnWire
import Crypto

/// The cluster's shared secret (`cluster.secret_file`): the HMAC key with which nodes prove to
/// each other, in the handshake, that they belong to the cluster. Never sent, logged or printed
/// (`description` is redacted). Empty when no secret is configured: the handshake still runs,
/// but any process can complete it.
public struct ClusterSecret: Sendable, Hashable, CustomStringConvertible {
    /// Largest secret file read.
    public static let maxFileBytes = 4096
    /// Fewest secret bytes accepted from a file: a short secret can be guessed offline from one
    /// observed `hello-ack`.
    public static let minBytes = 16
    public static let empty = ClusterSecret(bytes: [])

    let bytes: [UInt8]
    public init(bytes: [UInt8]) { self.bytes = bytes }

    public var isEmpty: Bool { bytes.isEmpty }
    public var description: String { isEmpty ? "no cluster secret" : "cluster secret (\(bytes.count) bytes, redacted)" }

    /// Reads the secret from `path`: the file's bytes less surrounding whitespace (spaces, tabs,
    /// CR, LF), at most `maxFileBytes` in the file and at least `minBytes` after trimming. A
    /// relative path is relative to the working directory. Errors name the path.
    public static func load(path: String) throws(ValidationError) -> ClusterSecret {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw ValidationError("cannot read cluster secret \(path): \(errnoText())") }
        defer { close(fd) }
        var data: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: maxFileBytes + 1)
        while data.count <= maxFileBytes {
            let want = maxFileBytes + 1 - data.count
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, want) }
            if n < 0 {
                if errno == EINTR { continue }
                throw ValidationError("cannot read cluster secret \(path): \(errnoText())")
            }
            if n == 0 { break }
            data += buffer[0..<n]
        }
        guard data.count <= maxFileBytes else {
            throw ValidationError("cluster secret \(path) is larger than \(maxFileBytes) bytes")
        }
        let isSpace: (UInt8) -> Bool = { $0 == 0x20 || $0 == 0x09 || $0 == 0x0A || $0 == 0x0D }
        let trimmed = Array(data.drop(while: isSpace).reversed().drop(while: isSpace).reversed())
        guard !trimmed.isEmpty else { throw ValidationError("cluster secret \(path) is empty") }
        guard trimmed.count >= minBytes else {
            throw ValidationError("cluster secret \(path) has \(trimmed.count) bytes; use at least \(minBytes) random ones " +
                                  "(e.g. head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n')")
        }
        return ClusterSecret(bytes: trimmed)
    }

    private static func errnoText() -> String { String(cString: strerror(errno)) }
}

/// Why a handshake was refused, as counted in `cairn_handshake_rejections_total{reason}`.
public struct HandshakeRefusal: Error, Sendable, Hashable, CustomStringConvertible {
    public enum Reason: String, Sendable, CaseIterable {
        /// The peer speaks another internode protocol version.
        case protocolVersion = "protocol_version"
        /// The peer belongs to another cluster (`cluster.name`).
        case cluster
        /// The peer's node name is not a valid one, is this node's own, or is not the node dialled.
        case node
        /// The peer could not prove the cluster secret, or refused this node's proof.
        case secret
        /// A handshake message out of order (a proof with no answered hello).
        case unexpected
    }
    public var reason: Reason
    public var message: String
    public init(_ reason: Reason, _ message: String) {
        self.reason = reason
        self.message = message
    }
    public var description: String { message }
    public var errorReply: ErrorReply { ErrorReply(code: .handshakeRejected, message: message) }
}

/// The internode handshake's decisions (Docs/wire-protocol.md §8), pure: both sides' checks and
/// MACs, for one node. Randomness comes in as the nonces; nothing here does I/O.
///
/// Three messages, each side proving the cluster secret without sending it:
/// dialer `hello{v, cluster, dialer, nonce_c}` → acceptor `hello-ack{v, cluster, acceptor,
/// nonce_s, mac_s}` → dialer `hello-proof{mac_c}` (or a refusal: an empty MAC), where
/// `mac_x = HMAC-SHA256(secret, macInput(label_x, …))` over both nonces and both names.
///
/// What a caller may rely on: a peer is accepted only if its protocol version and cluster name
/// equal this node's, its node name is valid and not this node's (and, dialling, is the node
/// dialled), and its MAC verifies (compared in constant time). Ring, N and member list are not
/// checked: nodes with different views talk, and a joining node is a member nowhere yet.
public struct ClusterHandshake: Sendable {
    public static let protocolVersion = WireCodec.internodeProtocolVersion
    static let ackLabel = "cairn-hello-ack"
    static let proofLabel = "cairn-hello-proof"

    public let cluster: String
    public let me: NodeName
    private let secret: ClusterSecret
    /// Made per use: `SymmetricKey` is not `Sendable`.
    private var key: SymmetricKey { SymmetricKey(data: secret.bytes) }

    public init(cluster: String, me: NodeName, secret: ClusterSecret) {
        self.cluster = cluster
        self.me = me
        self.secret = secret
    }

    /// From `cluster.name`, `node.name` and the loaded `cluster.secret_file` (none: empty).
    public init(config: NodeConfig) {
        self.init(cluster: config.clusterName, me: config.name, secret: config.clusterSecret ?? .empty)
    }

    /// `WireCodec.nonceBytes` bytes from the system's CSPRNG.
    public static func makeNonce() -> [UInt8] {
        var rng = SystemRandomNumberGenerator()
        return (0..<WireCodec.nonceBytes).map { _ in UInt8.random(in: .min ... .max, using: &rng) }
    }

    // MARK: Dialer

    /// The hello this node opens a connection with; `nonce` must be fresh for each connection.
    public func hello(nonce: [UInt8]) -> Hello {
        Hello(protocolVersion: Self.protocolVersion, cluster: cluster, node: me.value, nonce: nonce)
    }

    /// Checks the acceptor's `ack` to our `hello`, sent to `peer` (the node dialled, at `address`
    /// for messages). Success: the proof to send, after which the link may be used.
    public func proof(for ack: HelloAck, to hello: Hello, dialled peer: NodeName, at address: String) -> Result<HelloProof, HandshakeRefusal> {
        let who = "peer \(peer) at \(address)"
        guard ack.protocolVersion == Self.protocolVersion else {
            return .failure(HandshakeRefusal(.protocolVersion,
                "\(who) speaks internode protocol version \(ack.protocolVersion); this node speaks \(Self.protocolVersion)"))
        }
        guard ack.cluster == cluster else {
            return .failure(HandshakeRefusal(.cluster, "\(who) is of cluster '\(ack.cluster)', not '\(cluster)'; check cluster.name"))
        }
        guard ack.node == peer.value else {
            return .failure(HandshakeRefusal(.node, "\(who) answered as node '\(ack.node)'; check cluster.members"))
        }
        let input = Self.macInput(Self.ackLabel, cluster: cluster, dialer: me.value, acceptor: ack.node, dialerNonce: hello.nonce, acceptorNonce: ack.nonce)
        guard HMAC<SHA256>.isValidAuthenticationCode(ack.mac, authenticating: input, using: key) else {
            return .failure(HandshakeRefusal(.secret, "\(who) failed the cluster secret check (its hello-ack does not verify); check cluster.secret_file"))
        }
        let proofInput = Self.macInput(Self.proofLabel, cluster: cluster, dialer: me.value, acceptor: ack.node, dialerNonce: hello.nonce, acceptorNonce: ack.nonce)
        return .success(HelloProof(mac: Array(HMAC<SHA256>.authenticationCode(for: proofInput, using: key))))
    }

    /// What a dialer sends instead of a proof when the ack's MAC did not verify, so the acceptor
    /// can say why the connection ends.
    public static let refusal = HelloProof(mac: [])

    // MARK: Acceptor

    /// Answers a dialer's `hello` with this node's ack (`nonce` fresh for each connection), or
    /// refuses it. `remote` names the connection's far end in messages.
    public func answer(_ hello: Hello, nonce: [UInt8], remote: String?) -> Result<PendingHello, HandshakeRefusal> {
        let who = "peer \(hello.node.isEmpty ? "?" : hello.node)\(remote.map { " (from \($0))" } ?? "")"
        guard hello.protocolVersion == Self.protocolVersion else {
            return .failure(HandshakeRefusal(.protocolVersion,
                "\(who) speaks internode protocol version \(hello.protocolVersion); this node (\(me)) speaks \(Self.protocolVersion)"))
        }
        guard hello.cluster == cluster else {
            return .failure(HandshakeRefusal(.cluster, "\(who) is of cluster '\(hello.cluster)', not this node's cluster '\(cluster)'; check cluster.name"))
        }
        guard let node = try? NodeName(hello.node) else {
            return .failure(HandshakeRefusal(.node, "\(who): '\(hello.node)' is not a valid node name"))
        }
        guard node != me else {
            return .failure(HandshakeRefusal(.node, "\(who) claims to be this node (\(me))"))
        }
        let input = Self.macInput(Self.ackLabel, cluster: cluster, dialer: hello.node, acceptor: me.value, dialerNonce: hello.nonce, acceptorNonce: nonce)
        let mac = Array(HMAC<SHA256>.authenticationCode(for: input, using: key))
        return .success(PendingHello(hello: hello, ack: HelloAck(protocolVersion: Self.protocolVersion, cluster: cluster, node: me.value,
                                                                 nonce: nonce, mac: mac)))
    }

    /// Checks the dialer's `proof` against the handshake this node answered: the peer's name, or
    /// why it is refused.
    public func verify(_ proof: HelloProof, for pending: PendingHello, remote: String?) -> Result<NodeName, HandshakeRefusal> {
        let who = "peer \(pending.hello.node)\(remote.map { " (from \($0))" } ?? "")"
        guard let node = try? NodeName(pending.hello.node), pending.ack.node == me.value, pending.hello.cluster == cluster else {
            return .failure(HandshakeRefusal(.unexpected, "\(who): hello-proof for a handshake this node did not answer"))
        }
        guard !proof.isRefusal else {
            return .failure(HandshakeRefusal(.secret,
                "\(who) failed the cluster secret check (it could not verify this node's hello-ack: the secrets differ); check cluster.secret_file"))
        }
        let input = Self.macInput(Self.proofLabel, cluster: cluster, dialer: pending.hello.node, acceptor: me.value,
                                  dialerNonce: pending.hello.nonce, acceptorNonce: pending.ack.nonce)
        guard HMAC<SHA256>.isValidAuthenticationCode(proof.mac, authenticating: input, using: key) else {
            return .failure(HandshakeRefusal(.secret, "\(who) failed the cluster secret check (its hello-proof does not verify); check cluster.secret_file"))
        }
        return .success(node)
    }

    // MARK: MAC input

    /// `label protocol-version cluster dialer acceptor nonce-c nonce-s channel-binding`, each
    /// string and blob length-prefixed as on the wire (varint), so no two field lists encode
    /// alike; the label separates the ack's MAC from the proof's. `channelBinding` is empty until a
    /// TLS transport binds its exporter value here.
    static func macInput(_ label: String, cluster: String, dialer: String, acceptor: String,
                         dialerNonce: [UInt8], acceptorNonce: [UInt8], channelBinding: [UInt8] = []) -> [UInt8] {
        var w = ByteWriter(capacity: 128)
        w.writeString(label)
        w.writeU16(protocolVersion)
        w.writeString(cluster)
        w.writeString(dialer)
        w.writeString(acceptor)
        w.writeBlob(dialerNonce)
        w.writeBlob(acceptorNonce)
        w.writeBlob(channelBinding)
        return w.bytes
    }
}
