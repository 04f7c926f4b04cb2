import Testing
@testable import CairnWire
import CairnCore

private let actor1 = ActorID(node: "n1", epoch: 42)

func sampleObject() throws -> VersionedObject {
    var o = VersionedObject()
    try o.update(context: VersionVector(), value: Sibling(value: [1, 2, 3], timestampMillis: 99), actor: actor1)
    try o.update(context: VersionVector(), value: .tombstone(timestampMillis: 100), actor: ActorID(node: "n2", epoch: 1))
    return o
}

func allMessages() throws -> [Message] {
    let ctx = CausalContext(VersionVector([(actor1, 3)]))
    let opts = RequestOptions(r: .count(2), w: .all, pr: .quorum, pw: nil, timeoutMillis: 1500, sloppy: false, readRepair: .blocking)
    let failure = QuorumFailure(kind: .notReached, operation: .put, requirement: "W", required: 3, achieved: 2, candidates: 3, replicas: [
        ReplicaReport(node: "n1", address: "127.0.0.1:7401", isPrimary: true, outcome: .acknowledged, durable: true),
        ReplicaReport(node: "n2", address: "127.0.0.1:7402", isPrimary: true, outcome: .notSent("down")),
        ReplicaReport(node: "n8", address: "127.0.0.1:7408", role: .fallback(for: "n2"), outcome: .acknowledged),
        ReplicaReport(node: "n3", address: "127.0.0.1:7403", isPrimary: true, outcome: .timedOut(afterMillis: 1000)),
        ReplicaReport(node: "n4", address: "[::1]:7404", isPrimary: false, outcome: .connectionLost("reset")),
        ReplicaReport(node: "n5", address: "h:1", isPrimary: false, outcome: .failed("disk")),
        ReplicaReport(node: "n6", address: "h:2", isPrimary: false, outcome: .noAnswerYet),
        ReplicaReport(node: "n7", address: "h:3", isPrimary: false, outcome: .failed(String(repeating: "x", count: 10_000))),
    ])
    return [
        .get(GetRequest(key: Array("k".utf8), options: opts)),
        .get(GetRequest(key: Array("k".utf8), options: RequestOptions(sloppy: true))),
        .put(PutRequest(key: Array("k".utf8), value: [0, 255], context: ctx, options: opts, forwarded: true)),
        .put(PutRequest(key: Array("k".utf8), value: [])),
        .delete(DeleteRequest(key: Array("k".utf8), context: ctx)),
        .members, .ping, .pong, .replicaPutAck(durable: true), .replicaPutAck(durable: false), .clusterStatePull,
        .admin(AdminRequest(verb: "leave", arguments: ["n2"])),
        .admin(AdminRequest(verb: "status")),
        .adminReply(Array("{\"ring_version\":3}".utf8)),
        .gossip([1, 2, 3]),
        .clusterStatePush([4, 5]),
        .clusterState([]),
        .getReply(GetReply(found: true, siblings: [Sibling(value: [9], timestampMillis: 1), .tombstone(timestampMillis: 2)], context: ctx)),
        .getReply(GetReply(found: false, siblings: [], context: .empty)),
        .writeReply(WriteReply(context: ctx, writtenTimestampMillis: 7, concurrent: [])),
        .writeReply(WriteReply(context: ctx, writtenTimestampMillis: 8, concurrent: [], acks: [
            ReplicaAck(node: "n1", role: .primary, durable: true), ReplicaAck(node: "n4", role: .fallback(for: "n3"), durable: false),
        ])),
        .writeReply(WriteReply(context: ctx, writtenTimestampMillis: 1 << 40, concurrent: [Sibling(value: [1, 2], timestampMillis: 3), .tombstone(timestampMillis: 4)])),
        .membersReply([MemberInfo(name: "n1", address: "127.0.0.1:7401", ownedPartitions: 85, replicatedPartitions: 256, state: .this)]),
        .error(ErrorReply(failure)),
        .error(ErrorReply(code: .overloaded, message: "busy")),
        .hello(Hello(cluster: "c", node: "n1", nonce: Array(0..<32))),
        .helloAck(HelloAck(cluster: "c", node: "n2", nonce: Array(repeating: 9, count: 16), mac: Array(repeating: 0xAB, count: 32))),
        .helloProof(HelloProof(mac: Array(repeating: 0xCD, count: 32))),
        .helloProof(HelloProof(mac: [])),
        .replicaGet(ReplicaGet(partition: PartitionID(17), key: [1])),
        .replicaGet(ReplicaGet(partition: PartitionID(17), key: [1], fallback: true)),
        .replicaGetReply(ReplicaGetReply(object: try sampleObject())),
        .replicaGetReply(ReplicaGetReply(object: nil)),
        .replicaGetReply(ReplicaGetReply(object: nil, refilling: true)),
        .replicaGetReply(ReplicaGetReply(object: try sampleObject(), refilling: true)),
        .antiEntropy([1, 3, 0, 0, 0, 7, 1]),
        .antiEntropyReply([1, 0, 0, 0, 0, 0, 0, 0, 9, 0]),
        .replicaPut(ReplicaPut(partition: PartitionID(255), key: [1, 2], object: try sampleObject())),
        .replicaPut(ReplicaPut(partition: PartitionID(3), key: [1], object: try sampleObject(), fallback: true)),
        .streamOpen(StreamOpen(streamID: 3, kind: .handoff, header: [0, 0, 0, 9, 1])),
        .streamOpen(StreamOpen(streamID: 4, kind: StreamKind(rawValue: 200), header: [])),
        .streamAccept,
        .streamChunk(StreamChunk(streamID: 3, data: [1, 2, 3])),
        .streamEnd(StreamEnd(streamID: 3, chunkCount: 300)),
        .streamCancel(StreamCancel(streamID: 3, reason: "superseded")),
        .streamAck(StreamAck(streamID: 3, acknowledged: 299, final: false)),
        .streamAck(StreamAck(streamID: 3, acknowledged: 300, final: true)),
        .streamAbort(StreamCancel(streamID: UInt64.max, reason: "disk")),
    ]
}

@Suite struct WireCodecTests {
    @Test func everyMessageRoundTrips() throws {
        let messages = try allMessages()
        #expect(Set(messages.map(\.type)) == Set(MessageType.allCases))
        for (i, m) in messages.enumerated() {
            let frame = WireCodec.encodeFrame(Envelope(requestID: UInt64(i) * 1_000_003, message: m))
            let length = Int(frame[0]) << 24 | Int(frame[1]) << 16 | Int(frame[2]) << 8 | Int(frame[3])
            #expect(length == frame.count - 4)
            let decoded = try WireCodec.decodeBody(Array(frame.dropFirst(4)), limits: Limits())
            if case .error(let e) = m, let q = e.quorum, q.replicas.contains(where: { $0.node == "n7" }) {
                // Over-long reasons are cut to 4 KiB on encode, so the reply stays decodable.
                guard case .error(let d) = decoded.message, let dq = d.quorum else { Issue.record("not an error"); continue }
                #expect(dq.replicas.last?.outcome == .failed(String(repeating: "x", count: 4096)))
                continue
            }
            #expect(decoded == Envelope(requestID: UInt64(i) * 1_000_003, message: m))
        }
    }

    /// A frame is its body's length (4 bytes, big-endian) and the body, small messages and
    /// those past the initial buffer alike.
    @Test func aFrameIsTheBodyLengthThenTheBody() throws {
        for m in try allMessages() + [.put(PutRequest(key: [1], value: Array(repeating: 9, count: 70_000)))] {
            let envelope = Envelope(requestID: 42, message: m)
            let body = WireCodec.encodeBody(envelope)
            let n = UInt32(body.count)
            #expect(WireCodec.encodeFrame(envelope) == [UInt8(n >> 24), UInt8(n >> 16 & 0xFF), UInt8(n >> 8 & 0xFF), UInt8(n & 0xFF)] + body)
        }
    }

    @Test func everyTruncationOfEveryMessageIsAnErrorNotATrap() throws {
        for m in try allMessages() {
            let body = WireCodec.encodeBody(Envelope(requestID: 7, message: m))
            for n in 0..<body.count {
                #expect(throws: WireError.self) { try WireCodec.decodeBody(Array(body.prefix(n)), limits: Limits()) }
            }
            #expect(throws: WireError.self) { try WireCodec.decodeBody(body + [0], limits: Limits()) }
        }
    }

    @Test func headerErrorsCarryTheRequestID() {
        var badVersion = WireCodec.encodeBody(Envelope(requestID: 77, message: .ping))
        badVersion[0] = 9
        #expect(throws: WireError.unsupportedVersion(9, requestID: 77)) { try WireCodec.decodeBody(badVersion, limits: Limits()) }
        var badType = WireCodec.encodeBody(Envelope(requestID: 78, message: .ping))
        badType[1] = 0x3F
        #expect(throws: WireError.unknownType(0x3F, requestID: 78)) { try WireCodec.decodeBody(badType, limits: Limits()) }
    }

    /// The internode protocol version leads the hello; a hello of another version decodes only as
    /// far as `version cluster node`, so the receiver can refuse it by name.
    @Test func helloOfAnotherProtocolVersionDecodesItsVersionAndNames() throws {
        // Version 1 (no version field): cluster:string node:string ring-fingerprint:u64be n-val:varint.
        var v1 = ByteWriter()
        v1.writeU8(WireCodec.protocolVersion); v1.writeU8(MessageType.hello.rawValue); v1.writeU64(5)
        v1.writeString("prod"); v1.writeString("n4"); v1.writeU64(0xDEAD_BEEF); v1.writeVarint(3)
        #expect(try WireCodec.decodeBody(v1.bytes, limits: Limits()).message == .hello(Hello(protocolVersion: 1, cluster: "prod", node: "n4", nonce: [])))
        // A later version, with fields this node does not know after `node`.
        var later = ByteWriter()
        later.writeU8(WireCodec.protocolVersion); later.writeU8(MessageType.helloAck.rawValue); later.writeU64(6)
        later.writeU16(9); later.writeString("prod"); later.writeString("n5"); later.writeRaw([0xFF, 0x00, 0x42])
        #expect(try WireCodec.decodeBody(later.bytes, limits: Limits()).message
                == .helloAck(HelloAck(protocolVersion: 9, cluster: "prod", node: "n5", nonce: [], mac: [])))
    }

    @Test func helloNoncesAreBounded() {
        for n in [0, WireCodec.minNonceBytes - 1, WireCodec.maxNonceBytes + 1] {
            let body = WireCodec.encodeBody(Envelope(requestID: 1, message: .hello(Hello(cluster: "c", node: "n1", nonce: Array(repeating: 1, count: n)))))
            #expect(throws: WireError.self) { try WireCodec.decodeBody(body, limits: Limits()) }
        }
        let longMAC = WireCodec.encodeBody(Envelope(requestID: 0, message: .helloProof(HelloProof(mac: Array(repeating: 1, count: WireCodec.maxMACBytes + 1)))))
        #expect(throws: WireError.self) { try WireCodec.decodeBody(longMAC, limits: Limits()) }
    }

    @Test func limitsAreEnforced() {
        var limits = Limits()
        limits.maxKeyBytes = 4
        limits.maxValueBytes = 8
        let longKey = WireCodec.encodeBody(Envelope(requestID: 1, message: .get(GetRequest(key: Array("12345".utf8)))))
        #expect(throws: WireError.self) { try WireCodec.decodeBody(longKey, limits: limits) }
        let bigValue = WireCodec.encodeBody(Envelope(requestID: 1, message: .put(PutRequest(key: [1], value: Array(repeating: 0, count: 9)))))
        #expect(throws: WireError.self) { try WireCodec.decodeBody(bigValue, limits: limits) }
        let emptyKey = WireCodec.encodeBody(Envelope(requestID: 1, message: .get(GetRequest(key: []))))
        #expect(throws: WireError.self) { try WireCodec.decodeBody(emptyKey, limits: Limits()) }
    }

    @Test func randomBodiesNeverTrap() {
        var rng = SplitMix(seed: 0xCA1B)
        for _ in 0..<20_000 {
            let n = Int(rng.next() % 48)
            var body = (0..<n).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            if body.count > 2, rng.next() % 2 == 0 {
                body[0] = WireCodec.protocolVersion
                body[1] = MessageType.allCases[Int(rng.next() % UInt64(MessageType.allCases.count))].rawValue
            }
            _ = try? WireCodec.decodeBody(body, limits: Limits())
        }
    }
}

/// A small deterministic generator for fuzz-style loops.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
