public import CairnCore

/// One message enum for client and internode traffic. Every frame carries exactly one.
/// Byte grammar: Docs/wire-protocol.md.
public enum Message: Hashable, Sendable {
    // Client requests (any node accepts them).
    case get(GetRequest)
    case put(PutRequest)
    case delete(DeleteRequest)
    case members
    case ping
    /// A cluster administration verb (`cairn cluster ...`, `transfers`, `preflist`), answered
    /// with `adminReply`; a node forwards verbs that need the claimant to it.
    case admin(AdminRequest)
    // Replies to clients.
    case getReply(GetReply)
    case writeReply(WriteReply)
    case membersReply([MemberInfo])
    case pong
    /// The verb's result as a JSON document (UTF-8); errors come as `error`.
    case adminReply([UInt8])
    case error(ErrorReply)
    // Internode (only after a completed handshake on the connection: `hello`, `helloAck`,
    // `helloProof`; Docs/wire-protocol.md §8).
    case hello(Hello)
    case helloAck(HelloAck)
    case helloProof(HelloProof)
    case replicaGet(ReplicaGet)
    case replicaGetReply(ReplicaGetReply)
    case replicaPut(ReplicaPut)
    /// `durable`: the replica's copy was synced to its disk when it acknowledged.
    case replicaPutAck(durable: Bool)
    // Membership (Docs/wire-protocol.md §10).
    /// One-way: a gossip packet (a SWIM message and a ring-state summary; CairnMembership's
    /// `GossipPacket` encoding).
    case gossip([UInt8])
    /// One-way: the sender's whole ring state (Docs/cluster-state.md), for a peer whose gossip
    /// showed an older one.
    case clusterStatePush([UInt8])
    /// Asks for the receiver's ring state, answered with `clusterState`.
    case clusterStatePull
    case clusterState([UInt8])
    // Anti-entropy (Docs/anti-entropy.md, "Wire"): a request and its reply, each one
    // CairnAntiEntropy payload (`AntiEntropyCodec`).
    case antiEntropy([UInt8])
    case antiEntropyReply([UInt8])
    // Streams (data link, after `hello`; Docs/wire-protocol.md §9).
    case streamOpen(StreamOpen)
    case streamAccept
    case streamChunk(StreamChunk)
    case streamEnd(StreamEnd)
    case streamCancel(StreamCancel)
    case streamAck(StreamAck)
    case streamAbort(StreamCancel)

    public var type: MessageType {
        switch self {
        case .get: .get
        case .put: .put
        case .delete: .delete
        case .members: .members
        case .ping: .ping
        case .admin: .admin
        case .adminReply: .adminReply
        case .gossip: .gossip
        case .clusterStatePush: .clusterStatePush
        case .clusterStatePull: .clusterStatePull
        case .clusterState: .clusterState
        case .antiEntropy: .antiEntropy
        case .antiEntropyReply: .antiEntropyReply
        case .getReply: .getReply
        case .writeReply: .writeReply
        case .membersReply: .membersReply
        case .pong: .pong
        case .error: .error
        case .hello: .hello
        case .helloAck: .helloAck
        case .helloProof: .helloProof
        case .replicaGet: .replicaGet
        case .replicaGetReply: .replicaGetReply
        case .replicaPut: .replicaPut
        case .replicaPutAck: .replicaPutAck
        case .streamOpen: .streamOpen
        case .streamAccept: .streamAccept
        case .streamChunk: .streamChunk
        case .streamEnd: .streamEnd
        case .streamCancel: .streamCancel
        case .streamAck: .streamAck
        case .streamAbort: .streamAbort
        }
    }
}

/// The message type byte. 0x01–0x1F client requests, 0x20–0x3F internode requests,
/// 0x40–0x7F replies.
public enum MessageType: UInt8, Sendable, CaseIterable {
    case get = 0x01, put = 0x02, delete = 0x03, members = 0x04, ping = 0x05, admin = 0x06
    case gossip = 0x2A, clusterStatePush = 0x2B, clusterStatePull = 0x2C, antiEntropy = 0x2D
    case adminReply = 0x46, clusterState = 0x68, antiEntropyReply = 0x69
    case hello = 0x20, replicaGet = 0x21, replicaPut = 0x22
    case streamOpen = 0x23, streamChunk = 0x24, streamEnd = 0x25, streamCancel = 0x26, helloProof = 0x27
    case getReply = 0x41, writeReply = 0x42, membersReply = 0x44, pong = 0x45
    case helloAck = 0x60, replicaGetReply = 0x61, replicaPutAck = 0x62
    case streamAccept = 0x63, streamAck = 0x64, streamAbort = 0x65
    case error = 0x7F

    public var isInternode: Bool { rawValue >= 0x20 && rawValue < 0x40 }
    public var isRequest: Bool { rawValue < 0x40 }
    /// Stream frames that are one-way by definition (never answered, request id 0): chunk, end
    /// and cancel from the sender, ack and abort from the receiver.
    public var isStreamSignal: Bool {
        switch self {
        case .streamChunk, .streamEnd, .streamCancel, .streamAck, .streamAbort: true
        default: false
        }
    }
    /// Requests about keys (client or replica): a node that is not a member of a cluster
    /// refuses them.
    public var isData: Bool {
        switch self {
        case .get, .put, .delete, .replicaGet, .replicaPut: true
        default: false
        }
    }
}

public struct GetRequest: Hashable, Sendable {
    public var key: [UInt8]
    public var options: RequestOptions
    public init(key: [UInt8], options: RequestOptions = .init()) {
        self.key = key
        self.options = options
    }
}

public struct PutRequest: Hashable, Sendable {
    public var key: [UInt8]
    public var value: [UInt8]
    public var context: CausalContext
    public var options: RequestOptions
    /// Set by a node that forwarded the request to a replica: the receiver must coordinate it.
    public var forwarded: Bool
    public init(key: [UInt8], value: [UInt8], context: CausalContext = .empty, options: RequestOptions = .init(), forwarded: Bool = false) {
        self.key = key
        self.value = value
        self.context = context
        self.options = options
        self.forwarded = forwarded
    }
}

public struct DeleteRequest: Hashable, Sendable {
    public var key: [UInt8]
    public var context: CausalContext
    public var options: RequestOptions
    public var forwarded: Bool
    public init(key: [UInt8], context: CausalContext = .empty, options: RequestOptions = .init(), forwarded: Bool = false) {
        self.key = key
        self.context = context
        self.options = options
        self.forwarded = forwarded
    }
}

public struct GetReply: Hashable, Sendable {
    /// False when no replica holds a value or every value is a tombstone.
    public var found: Bool
    /// Every sibling, tombstones included (so a caller can see a delete that raced a write).
    public var siblings: [Sibling]
    public var context: CausalContext
    public init(found: Bool, siblings: [Sibling], context: CausalContext) {
        self.found = found
        self.siblings = siblings
        self.context = context
    }
}

/// A write's acknowledgement (Docs/wire-protocol.md, `write-reply`): the stored object's context,
/// the timestamp the coordinator gave the written value, and every other live value the context
/// covers. `context` never covers a value the writer is not shown here (see
/// `WriteAcknowledgement`).
public struct WriteReply: Hashable, Sendable {
    public var context: CausalContext
    public var writtenTimestampMillis: UInt64
    /// Live values the write did not supersede (concurrent siblings), tombstones included.
    public var concurrent: [Sibling]
    /// The durability receipt: every replica that acknowledged the write by the time the
    /// coordinator answered, the coordinator's own copy first, each with its role and whether
    /// its copy was durable when it acknowledged. At most `WireCodec.maxAcks`.
    public var acks: [ReplicaAck]

    public init(context: CausalContext, writtenTimestampMillis: UInt64, concurrent: [Sibling], acks: [ReplicaAck] = []) {
        self.context = context
        self.writtenTimestampMillis = writtenTimestampMillis
        self.concurrent = concurrent
        self.acks = acks
    }

    public init(_ ack: WriteAcknowledgement, acks: [ReplicaAck] = []) {
        self.init(context: CausalContext(ack.context), writtenTimestampMillis: ack.written.timestampMillis, concurrent: ack.concurrent,
                  acks: acks)
    }
}

public struct MemberInfo: Hashable, Sendable {
    public enum State: UInt8, Sendable { case up = 1, down = 2, this = 3 }
    public var name: String
    public var address: String
    /// Partitions this node claims (owns as first in the preference list).
    public var ownedPartitions: Int
    /// Partitions whose preference list includes this node (its vnodes).
    public var replicatedPartitions: Int
    public var state: State
    public init(name: String, address: String, ownedPartitions: Int, replicatedPartitions: Int, state: State) {
        self.name = name
        self.address = address
        self.ownedPartitions = ownedPartitions
        self.replicatedPartitions = replicatedPartitions
        self.state = state
    }
}

/// Error codes on the wire. Clients map them to typed errors.
public enum ErrorCode: UInt16, Sendable, Hashable {
    case malformed = 1
    case unsupportedVersion = 2
    case frameTooLarge = 3
    case unknownMessage = 4
    case invalidArgument = 5
    case unavailable = 6
    case notReached = 7
    case timeout = 8
    case overloaded = 9
    case notReady = 10
    case handshakeRequired = 11
    case handshakeRejected = 12
    case notAReplica = 13
    case storage = 14
    case shuttingDown = 15
    case internalError = 16

    /// The node refused the request before doing anything (overloaded, starting, shutting down):
    /// it certainly applied nothing, so another node may be asked. The one rule for clients and
    /// forwarding nodes alike.
    public var isRefusal: Bool {
        switch self {
        case .overloaded, .notReady, .shuttingDown: true
        default: false
        }
    }
}

public struct ErrorReply: Hashable, Sendable, Error, CustomStringConvertible {
    public var code: ErrorCode
    public var message: String
    /// Present for `unavailable` and `notReached`.
    public var quorum: QuorumFailure?
    public init(code: ErrorCode, message: String, quorum: QuorumFailure? = nil) {
        self.code = code
        self.message = message
        self.quorum = quorum
    }

    public init(_ failure: QuorumFailure) {
        self.init(code: failure.kind == .unavailable ? .unavailable : .notReached, message: failure.description, quorum: failure)
    }

    public var description: String { message }
}

/// A cluster administration verb and its arguments (Docs/wire-protocol.md §10).
public struct AdminRequest: Hashable, Sendable {
    public static let maxArguments = 16
    public var verb: String
    public var arguments: [String]
    public init(verb: String, arguments: [String] = []) {
        self.verb = verb
        self.arguments = arguments
    }
}

/// The dialer's opening of the internode handshake (Docs/wire-protocol.md §8): who it is and a
/// fresh challenge for the acceptor. A hello of another protocol version decodes with only
/// `protocolVersion`, `cluster` and `node` (its `nonce` empty), so it can be refused by name.
public struct Hello: Hashable, Sendable {
    public var protocolVersion: UInt16
    public var cluster: String
    public var node: String
    /// The dialer's challenge: `WireCodec.nonceBytes` bytes for the current version.
    public var nonce: [UInt8]
    public init(protocolVersion: UInt16 = WireCodec.internodeProtocolVersion, cluster: String, node: String, nonce: [UInt8]) {
        self.protocolVersion = protocolVersion
        self.cluster = cluster
        self.node = node
        self.nonce = nonce
    }
}

/// The acceptor's answer to a `Hello`: who it is, its own challenge, and `mac`, its proof of the
/// cluster secret over both challenges.
public struct HelloAck: Hashable, Sendable {
    public var protocolVersion: UInt16
    public var cluster: String
    public var node: String
    public var nonce: [UInt8]
    public var mac: [UInt8]
    public init(protocolVersion: UInt16 = WireCodec.internodeProtocolVersion, cluster: String, node: String, nonce: [UInt8], mac: [UInt8]) {
        self.protocolVersion = protocolVersion
        self.cluster = cluster
        self.node = node
        self.nonce = nonce
        self.mac = mac
    }
}

/// The dialer's last handshake message, one-way: its proof of the cluster secret, or (`mac`
/// empty) its refusal because the `HelloAck`'s proof did not verify.
public struct HelloProof: Hashable, Sendable {
    public var mac: [UInt8]
    public init(mac: [UInt8]) { self.mac = mac }
    public var isRefusal: Bool { mac.isEmpty }
}

/// A handshake the acceptor answered and whose `HelloProof` it awaits: the dialer's hello and
/// the ack sent back, which is all the proof is checked against. Kept per connection.
public struct PendingHello: Hashable, Sendable {
    public var hello: Hello
    public var ack: HelloAck
    public init(hello: Hello, ack: HelloAck) {
        self.hello = hello
        self.ack = ack
    }
}

public struct ReplicaGet: Hashable, Sendable {
    public var partition: PartitionID
    public var key: [UInt8]
    /// Read the receiver's fallback copy of the partition (it stands in for a down primary),
    /// not its primary one.
    public var fallback: Bool
    public init(partition: PartitionID, key: [UInt8], fallback: Bool = false) {
        self.partition = partition
        self.key = key
        self.fallback = fallback
    }
}

public struct ReplicaGetReply: Hashable, Sendable {
    public var object: VersionedObject?
    /// The replica lost its data and has not completed an anti-entropy exchange for the
    /// partition since: its "not found" is no evidence (Docs/anti-entropy.md, "Refilling").
    public var refilling: Bool
    /// The replica was away longer than the hint window and has not completed an exchange for
    /// the partition since: its values may be versions whose deletion or overwrite it missed,
    /// so none of its answers is evidence yet.
    public var stale: Bool
    public init(object: VersionedObject?, refilling: Bool = false, stale: Bool = false) {
        self.object = object
        self.refilling = refilling
        self.stale = stale
    }
}

public struct ReplicaPut: Hashable, Sendable {
    public var partition: PartitionID
    public var key: [UInt8]
    public var object: VersionedObject
    /// Merge into the receiver's fallback copy of the partition (sloppy quorum: it stands in for
    /// a down primary and hands the copy to the primaries later), not its primary one.
    public var fallback: Bool
    public init(partition: PartitionID, key: [UInt8], object: VersionedObject, fallback: Bool = false) {
        self.partition = partition
        self.key = key
        self.object = object
        self.fallback = fallback
    }
}

/// A message with its frame header fields.
public struct Envelope: Hashable, Sendable {
    public var requestID: UInt64
    public var message: Message
    public init(requestID: UInt64, message: Message) {
        self.requestID = requestID
        self.message = message
    }
}

/// Opens stream `streamID` on a data connection (a request: answered `stream-accept` or
/// `error`). `kind` picks the receiver's handler; `header` is the handler's (e.g. a partition and
/// the key to resume after), at most `StreamSettings.maxHeaderBytes`.
public struct StreamOpen: Hashable, Sendable {
    public var streamID: UInt64
    public var kind: StreamKind
    public var header: [UInt8]
    public init(streamID: UInt64, kind: StreamKind, header: [UInt8]) {
        self.streamID = streamID
        self.kind = kind
        self.header = header
    }
}

/// One chunk of a stream, in order (one-way).
public struct StreamChunk: Hashable, Sendable {
    public var streamID: UInt64
    public var data: [UInt8]
    public init(streamID: UInt64, data: [UInt8]) {
        self.streamID = streamID
        self.data = data
    }
}

/// The sender has sent `chunkCount` chunks and no more (one-way).
public struct StreamEnd: Hashable, Sendable {
    public var streamID: UInt64
    public var chunkCount: UInt64
    public init(streamID: UInt64, chunkCount: UInt64) {
        self.streamID = streamID
        self.chunkCount = chunkCount
    }
}

/// Ends a stream early: `stream-cancel` from the sender, `stream-abort` from the receiver (one-way).
public struct StreamCancel: Hashable, Sendable {
    public var streamID: UInt64
    public var reason: String
    public init(streamID: UInt64, reason: String) {
        self.streamID = streamID
        self.reason = reason
    }
}

/// The receiver's handler has consumed the first `acknowledged` chunks; `final`: it also
/// consumed the end, so the stream is complete (one-way, receiver to sender).
public struct StreamAck: Hashable, Sendable {
    public var streamID: UInt64
    public var acknowledged: UInt64
    public var final: Bool
    public init(streamID: UInt64, acknowledged: UInt64, final: Bool) {
        self.streamID = streamID
        self.acknowledged = acknowledged
        self.final = final
    }
}
