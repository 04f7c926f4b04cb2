public import CairnCore

/// Why a frame could not be turned into a message. Carries the request id when the header was
/// readable, so the receiver can answer the right request.
public enum WireError: Error, Sendable, Hashable, CustomStringConvertible {
    case frameTooLarge(length: UInt64, limit: Int)
    case frameTooShort(length: Int)
    case truncatedFrame(buffered: Int)
    case unsupportedVersion(UInt8, requestID: UInt64)
    case unknownType(UInt8, requestID: UInt64)
    case malformed(String, requestID: UInt64)

    public var description: String {
        switch self {
        case .frameTooLarge(let n, let limit): "frame of \(n) bytes exceeds limit \(limit)"
        case .frameTooShort(let n): "frame of \(n) bytes is shorter than the \(WireCodec.headerBytes)-byte header"
        case .truncatedFrame(let n): "connection closed inside a frame (\(n) bytes buffered)"
        case .unsupportedVersion(let v, _): "unsupported protocol version \(v) (this node speaks \(WireCodec.protocolVersion))"
        case .unknownType(let t, _): "unknown message type 0x\(String(t, radix: 16))"
        case .malformed(let why, _): "malformed message: \(why)"
        }
    }

    public var requestID: UInt64? {
        switch self {
        case .unsupportedVersion(_, let id), .unknownType(_, let id), .malformed(_, let id): id
        default: nil
        }
    }

    public var errorCode: ErrorCode {
        switch self {
        case .frameTooLarge: .frameTooLarge
        case .frameTooShort, .truncatedFrame, .malformed: .malformed
        case .unsupportedVersion: .unsupportedVersion
        case .unknownType: .unknownMessage
        }
    }
}

/// The hand-written binary codec (Docs/wire-protocol.md). Pure: bytes in, messages out.
public enum WireCodec {
    public static let protocolVersion: UInt8 = 2
    /// The internode protocol a node speaks, carried in `hello` and `hello-ack` (§8); the frame
    /// `version` above moves with any payload change (2: replica flags, the durability receipt,
    /// sloppy and read-repair options). Internode version 1 was the hello without this field (nor
    /// secret proof); 2 had no replica flags; 3 had no anti-entropy messages and no `refilling`
    /// flag in `replica-get-reply`.
    /// Versions stay below 256, so the field's first byte is 0 and a version-1 hello, which starts
    /// with its cluster name's non-zero length, is told apart.
    public static let internodeProtocolVersion: UInt16 = 4
    /// Nonce length nodes send; decoders accept `minNonceBytes ... maxNonceBytes`.
    public static let nonceBytes = 32
    public static let minNonceBytes = 16
    public static let maxNonceBytes = 64
    /// Longest MAC accepted in `hello-ack` and `hello-proof` (HMAC-SHA256's is 32).
    public static let maxMACBytes = 64
    /// version:u8 type:u8 request-id:u64
    public static let headerBytes = 10
    /// The length prefix before each body.
    public static let lengthBytes = 4

    // MARK: Encoding

    /// The whole frame: `length:u32be` then the body, encoded in one buffer (the length patched
    /// in last).
    public static func encodeFrame(_ envelope: Envelope) -> [UInt8] {
        var w = ByteWriter(capacity: frameCapacity)
        w.writeU32(0)
        writeBody(envelope, into: &w)
        w.overwriteU32(at: 0, UInt32(clamping: w.bytes.count - lengthBytes))
        return w.bytes
    }

    /// Appends `envelope`'s whole frame to `w`; when its body would exceed `maxFrameBytes`, an
    /// error frame for the same request takes its place (the peer would refuse the frame).
    /// Returns false then.
    @discardableResult
    public static func appendFrame(_ envelope: Envelope, maxFrameBytes: Int, into w: inout ByteWriter) -> Bool {
        let start = w.count
        w.writeU32(0)
        writeBody(envelope, into: &w)
        let body = w.count - start - lengthBytes
        if body <= maxFrameBytes {
            w.overwriteU32(at: start, UInt32(clamping: body))
            return true
        }
        w.truncate(to: start)
        w.writeU32(0)
        writeBody(Envelope(requestID: envelope.requestID, message: .error(ErrorReply(
            code: .internalError, message: "reply of \(body + lengthBytes) bytes exceeds limits.max_frame_bytes \(maxFrameBytes)"))), into: &w)
        w.overwriteU32(at: start, UInt32(clamping: w.count - start - lengthBytes))
        return false
    }

    public static func encodeBody(_ envelope: Envelope) -> [UInt8] {
        var w = ByteWriter(capacity: frameCapacity)
        writeBody(envelope, into: &w)
        return w.bytes
    }

    /// What a frame's buffer starts with: room for a key request or reply with a small value,
    /// so most frames are encoded without growing it.
    static let frameCapacity = 512

    private static func writeBody(_ envelope: Envelope, into w: inout ByteWriter) {
        w.writeU8(protocolVersion)
        w.writeU8(envelope.message.type.rawValue)
        w.writeU64(envelope.requestID)
        encodePayload(envelope.message, into: &w)
    }

    static func encodePayload(_ m: Message, into w: inout ByteWriter) {
        switch m {
        case .get(let g):
            w.writeBlob(g.key)
            encode(g.options, into: &w)
        case .put(let p):
            w.writeU8(p.forwarded ? 1 : 0)
            w.writeBlob(p.key)
            p.context.writeBlob(into: &w)
            w.writeBlob(p.value)
            encode(p.options, into: &w)
        case .delete(let d):
            w.writeU8(d.forwarded ? 1 : 0)
            w.writeBlob(d.key)
            d.context.writeBlob(into: &w)
            encode(d.options, into: &w)
        case .members, .ping, .pong, .streamAccept, .clusterStatePull:
            break
        case .replicaPutAck(let durable):
            w.writeU8(durable ? 1 : 0)
        case .admin(let a):
            w.writeString(truncated(a.verb, toBytes: maxShortString))
            let args = a.arguments.prefix(AdminRequest.maxArguments)
            w.writeVarint(args.count)
            for arg in args { w.writeString(truncated(arg, toBytes: maxShortString)) }
        case .adminReply(let bytes), .gossip(let bytes), .clusterStatePush(let bytes), .clusterState(let bytes), .antiEntropy(let bytes),
             .antiEntropyReply(let bytes):
            w.writeBlob(bytes)
        case .streamOpen(let o):
            w.writeU64(o.streamID)
            w.writeU8(o.kind.rawValue)
            w.writeBlob(o.header)
        case .streamChunk(let c):
            w.writeU64(c.streamID)
            w.writeBlob(c.data)
        case .streamEnd(let e):
            w.writeU64(e.streamID)
            w.writeVarint(e.chunkCount)
        case .streamCancel(let c), .streamAbort(let c):
            w.writeU64(c.streamID)
            w.writeString(truncated(c.reason, toBytes: maxShortString))
        case .streamAck(let a):
            w.writeU64(a.streamID)
            w.writeVarint(a.acknowledged)
            w.writeU8(a.final ? 1 : 0)
        case .getReply(let r):
            w.writeU8(r.found ? 1 : 0)
            r.context.writeBlob(into: &w)
            writeSiblings(r.siblings, into: &w)
        case .writeReply(let r):
            r.context.writeBlob(into: &w)
            w.writeVarint(r.writtenTimestampMillis)
            writeSiblings(r.concurrent, into: &w)
            let acks = r.acks.prefix(maxAcks)
            w.writeVarint(acks.count)
            for a in acks {
                w.writeString(truncated(a.node, toBytes: maxShortString))
                writeRole(a.role, into: &w)
                w.writeU8(a.durable ? 1 : 0)
            }
        case .membersReply(let members):
            w.writeVarint(members.count)
            for m in members {
                w.writeString(m.name)
                w.writeString(m.address)
                w.writeVarint(m.ownedPartitions)
                w.writeVarint(m.replicatedPartitions)
                w.writeU8(m.state.rawValue)
            }
        case .error(let e):
            w.writeU16(e.code.rawValue)
            w.writeString(truncated(e.message, toBytes: maxErrorMessageBytes))
            if let q = e.quorum {
                w.writeU8(1)
                encode(q, into: &w)
            } else {
                w.writeU8(0)
            }
        case .hello(let h):
            w.writeU16(h.protocolVersion)
            w.writeString(h.cluster)
            w.writeString(h.node)
            w.writeBlob(h.nonce)
        case .helloAck(let a):
            w.writeU16(a.protocolVersion)
            w.writeString(a.cluster)
            w.writeString(a.node)
            w.writeBlob(a.nonce)
            w.writeBlob(a.mac)
        case .helloProof(let p):
            w.writeBlob(p.mac)
        case .replicaGet(let g):
            w.writeU32(g.partition.index)
            w.writeU8(g.fallback ? 1 : 0)
            w.writeBlob(g.key)
        case .replicaGetReply(let r):
            w.writeU8((r.object == nil ? 0 : 1) | (r.refilling ? 2 : 0) | (r.stale ? 4 : 0))
            if let o = r.object { w.writeBlob(o.encoded()) }
        case .replicaPut(let p):
            w.writeU32(p.partition.index)
            w.writeU8(p.fallback ? 1 : 0)
            w.writeBlob(p.key)
            w.writeBlob(p.object.encoded())
        }
    }

    /// `sibling-count:varint *wire-sibling`.
    static func writeSiblings(_ siblings: [Sibling], into w: inout ByteWriter) {
        w.writeVarint(siblings.count)
        for s in siblings {
            w.writeU8(s.isTombstone ? 1 : 0)
            w.writeVarint(s.timestampMillis)
            if !s.isTombstone { w.writeBlob(s.value) }
        }
    }

    static func readSiblings(_ r: inout ByteReader, _ limits: Limits) throws(DecodeError) -> [Sibling] {
        let n = try r.readCount("sibling count", limit: min(limits.maxSiblingsOnDecode, r.remaining / 2))
        var siblings: [Sibling] = []
        siblings.reserveCapacity(n)
        for _ in 0..<n {
            let tombstone = try r.readBool("sibling flags")
            let ts = try r.readVarint("timestamp")
            if tombstone {
                siblings.append(.tombstone(timestampMillis: ts))
            } else {
                siblings.append(Sibling(value: try r.readBlob("value", limit: limits.maxValueBytes), timestampMillis: ts))
            }
        }
        return siblings
    }

    static func encode(_ o: RequestOptions, into w: inout ByteWriter) {
        for q in [o.r, o.w, o.pr, o.pw] {
            switch q {
            case nil: w.writeU8(0)
            case .quorum: w.writeU8(1)
            case .all: w.writeU8(2)
            case .count(let n):
                w.writeU8(3)
                w.writeU8(UInt8(clamping: n))
            }
        }
        w.writeU32(o.timeoutMillis ?? 0)
        w.writeU8(o.sloppy.map { $0 ? 1 : 2 } ?? 0)
        w.writeU8(o.readRepair?.rawValue ?? 0)
    }

    static func encode(_ q: QuorumFailure, into w: inout ByteWriter) {
        w.writeU8(q.kind.rawValue)
        w.writeU8(q.operation.rawValue)
        w.writeString(q.requirement)
        w.writeVarint(q.required)
        w.writeVarint(q.achieved)
        w.writeVarint(q.candidates)
        w.writeVarint(q.replicas.count)
        func short(_ s: String) -> String { truncated(s, toBytes: maxShortString) }
        for r in q.replicas {
            w.writeString(short(r.node))
            w.writeString(short(r.address))
            writeRole(r.role, into: &w)
            w.writeU8(r.durable ? 1 : 0)
            switch r.outcome {
            case .acknowledged: w.writeU8(0)
            case .notSent(let s): w.writeU8(1); w.writeString(short(s))
            case .timedOut(let ms): w.writeU8(2); w.writeU32(ms)
            case .connectionLost(let s): w.writeU8(3); w.writeString(short(s))
            case .failed(let s): w.writeU8(4); w.writeString(short(s))
            case .noAnswerYet: w.writeU8(5)
            }
        }
    }

    // MARK: Decoding

    /// Decodes one frame body (everything after the length prefix). Throws `WireError`, never traps.
    public static func decodeBody(_ body: [UInt8], limits: Limits) throws(WireError) -> Envelope {
        guard body.count >= headerBytes else { throw .frameTooShort(length: body.count) }
        let version = body[0]
        let rawType = body[1]
        let id = body[2..<headerBytes].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        guard version == protocolVersion else { throw .unsupportedVersion(version, requestID: id) }
        guard let type = MessageType(rawValue: rawType) else { throw .unknownType(rawType, requestID: id) }
        var r = ByteReader(body, from: headerBytes)
        do {
            let message = try decodePayload(type, &r, limits)
            try r.expectEnd("\(type) message")
            return Envelope(requestID: id, message: message)
        } catch {
            throw .malformed(error.reason, requestID: id)
        }
    }

    static let maxShortString = 4096
    /// Bound on one gossip packet (a SWIM message with at most 64 updates fits in far less).
    static let maxGossipBytes = 64 << 10
    static let maxMembers = 4096

    static func decodePayload(_ type: MessageType, _ r: inout ByteReader, _ limits: Limits) throws(DecodeError) -> Message {
        switch type {
        case .get:
            let key = try readKey(&r, limits)
            return .get(GetRequest(key: key, options: try decodeOptions(&r)))
        case .put:
            let flags = try readRequestFlags(&r)
            let key = try readKey(&r, limits)
            let ctx = try CausalContext(bytes: r.readBlob("context", limit: limits.maxContextBytes), limits: limits)
            let value = try r.readBlob("value", limit: limits.maxValueBytes)
            return .put(PutRequest(key: key, value: value, context: ctx, options: try decodeOptions(&r), forwarded: flags & 1 == 1))
        case .delete:
            let flags = try readRequestFlags(&r)
            let key = try readKey(&r, limits)
            let ctx = try CausalContext(bytes: r.readBlob("context", limit: limits.maxContextBytes), limits: limits)
            return .delete(DeleteRequest(key: key, context: ctx, options: try decodeOptions(&r), forwarded: flags & 1 == 1))
        case .members: return .members
        case .ping: return .ping
        case .clusterStatePull: return .clusterStatePull
        case .admin:
            let verb = try r.readString("verb", limit: maxShortString)
            let n = try r.readCount("argument count", limit: AdminRequest.maxArguments)
            var args: [String] = []
            for _ in 0..<n { args.append(try r.readString("argument", limit: maxShortString)) }
            return .admin(AdminRequest(verb: verb, arguments: args))
        case .adminReply: return .adminReply(try r.readBlob("admin reply", limit: limits.maxFrameBytes))
        case .gossip: return .gossip(try r.readBlob("gossip", limit: maxGossipBytes))
        case .clusterStatePush: return .clusterStatePush(try r.readBlob("cluster state", limit: limits.maxFrameBytes))
        case .clusterState: return .clusterState(try r.readBlob("cluster state", limit: limits.maxFrameBytes))
        case .antiEntropy: return .antiEntropy(try r.readBlob("anti-entropy request", limit: limits.maxFrameBytes))
        case .antiEntropyReply: return .antiEntropyReply(try r.readBlob("anti-entropy reply", limit: limits.maxFrameBytes))
        case .pong: return .pong
        case .replicaPutAck: return .replicaPutAck(durable: try r.readBool("durable"))
        case .streamAccept: return .streamAccept
        case .streamOpen:
            let id = try r.readU64("stream id")
            let kind = StreamKind(rawValue: try r.readU8("stream kind"))
            return .streamOpen(StreamOpen(streamID: id, kind: kind, header: try r.readBlob("stream header", limit: StreamSettings.maxHeaderBytes)))
        case .streamChunk:
            let id = try r.readU64("stream id")
            return .streamChunk(StreamChunk(streamID: id, data: try r.readBlob("chunk", limit: limits.maxFrameBytes)))
        case .streamEnd:
            let id = try r.readU64("stream id")
            return .streamEnd(StreamEnd(streamID: id, chunkCount: try r.readVarint("chunk count")))
        case .streamCancel, .streamAbort:
            let c = StreamCancel(streamID: try r.readU64("stream id"), reason: try r.readString("reason", limit: maxShortString))
            return type == .streamCancel ? .streamCancel(c) : .streamAbort(c)
        case .streamAck:
            let id = try r.readU64("stream id")
            let n = try r.readVarint("acknowledged")
            return .streamAck(StreamAck(streamID: id, acknowledged: n, final: try r.readBool("final")))
        case .getReply:
            let found = try r.readBool("found")
            let ctx = try CausalContext(bytes: r.readBlob("context", limit: limits.maxContextBytes), limits: limits)
            return .getReply(GetReply(found: found, siblings: try readSiblings(&r, limits), context: ctx))
        case .writeReply:
            let ctx = try CausalContext(bytes: r.readBlob("context", limit: limits.maxContextBytes), limits: limits)
            let ts = try r.readVarint("written timestamp")
            let concurrent = try readSiblings(&r, limits)
            let n = try r.readCount("ack count", limit: min(maxAcks, r.remaining / 3))
            var acks: [ReplicaAck] = []
            for _ in 0..<n {
                let node = try r.readString("node", limit: maxShortString)
                let role = try readRole(&r)
                acks.append(ReplicaAck(node: node, role: role, durable: try r.readBool("durable")))
            }
            return .writeReply(WriteReply(context: ctx, writtenTimestampMillis: ts, concurrent: concurrent, acks: acks))
        case .membersReply:
            let n = try r.readCount("member count", limit: min(maxMembers, r.remaining / 5))
            var out: [MemberInfo] = []
            for _ in 0..<n {
                let name = try r.readString("name", limit: maxShortString)
                let address = try r.readString("address", limit: maxShortString)
                let owned = try r.readCount("owned", limit: Int(Int32.max))
                let replicated = try r.readCount("replicated", limit: Int(Int32.max))
                guard let state = MemberInfo.State(rawValue: try r.readU8("state")) else { throw DecodeError("unknown member state") }
                out.append(MemberInfo(name: name, address: address, ownedPartitions: owned, replicatedPartitions: replicated, state: state))
            }
            return .membersReply(out)
        case .error:
            let raw = try r.readU16("error code")
            let code = ErrorCode(rawValue: raw) ?? .internalError
            let message = try r.readString("error message", limit: maxErrorMessageBytes)
            let quorum = try r.readBool("quorum flag") ? try decodeQuorumFailure(&r) : nil
            return .error(ErrorReply(code: code, message: message, quorum: quorum))
        case .hello, .helloAck:
            return try decodeHandshake(type, &r)
        case .helloProof:
            return .helloProof(HelloProof(mac: try r.readBlob("mac", limit: maxMACBytes)))
        case .replicaGet:
            let p = PartitionID(try r.readU32("partition"))
            let fallback = try readReplicaFlags(&r)
            return .replicaGet(ReplicaGet(partition: p, key: try readKey(&r, limits), fallback: fallback))
        case .replicaGetReply:
            let flags = try r.readU8("replica-get-reply flags")
            guard flags & ~7 == 0 else { throw DecodeError("unknown replica-get-reply flags \(flags)") }
            let (refilling, stale) = (flags & 2 != 0, flags & 4 != 0)
            if flags & 1 != 0 {
                let raw = try r.readBlob("object", limit: limits.maxFrameBytes)
                return .replicaGetReply(ReplicaGetReply(object: try VersionedObject.decode(raw, limits: limits), refilling: refilling, stale: stale))
            }
            return .replicaGetReply(ReplicaGetReply(object: nil, refilling: refilling, stale: stale))
        case .replicaPut:
            let p = PartitionID(try r.readU32("partition"))
            let fallback = try readReplicaFlags(&r)
            let key = try readKey(&r, limits)
            let raw = try r.readBlob("object", limit: limits.maxFrameBytes)
            return .replicaPut(ReplicaPut(partition: p, key: key, object: try VersionedObject.decode(raw, limits: limits), fallback: fallback))
        }
    }

    /// `hello` / `hello-ack` (§4, §8). Every version starts with `protocol-version cluster node`
    /// (version 1: `cluster node`, no version field); of another version only those are decoded
    /// and the rest of the payload is skipped, so the receiver can refuse it naming both versions.
    static func decodeHandshake(_ type: MessageType, _ r: inout ByteReader) throws(DecodeError) -> Message {
        var probe = r
        let version: UInt16 = try probe.readU8("protocol version") == 0 ? try r.readU16("protocol version") : 1
        let cluster = try r.readString("cluster", limit: 255)
        let node = try r.readString("node", limit: 255)
        guard version == internodeProtocolVersion else {
            _ = r.readRemaining()
            return type == .hello ? .hello(Hello(protocolVersion: version, cluster: cluster, node: node, nonce: []))
                : .helloAck(HelloAck(protocolVersion: version, cluster: cluster, node: node, nonce: [], mac: []))
        }
        let nonce = try r.readBlob("nonce", limit: maxNonceBytes)
        guard nonce.count >= minNonceBytes else { throw DecodeError("nonce of \(nonce.count) bytes; at least \(minNonceBytes) required") }
        if type == .hello { return .hello(Hello(protocolVersion: version, cluster: cluster, node: node, nonce: nonce)) }
        let mac = try r.readBlob("mac", limit: maxMACBytes)
        return .helloAck(HelloAck(protocolVersion: version, cluster: cluster, node: node, nonce: nonce, mac: mac))
    }

    /// Error messages longer than this are cut when encoded.
    static let maxErrorMessageBytes = 1 << 16

    /// `s` cut at a character boundary so its UTF-8 form fits in `max` bytes.
    static func truncated(_ s: String, toBytes max: Int) -> String {
        guard s.utf8.count > max else { return s }
        var out = ""
        var used = 0
        for ch in s {
            let n = ch.utf8.count
            if used + n > max { break }
            out.append(ch)
            used += n
        }
        return out
    }

    /// Replica request flags: bit 0 = the receiver's fallback copy; other bits must be zero.
    static func readReplicaFlags(_ r: inout ByteReader) throws(DecodeError) -> Bool {
        let flags = try r.readU8("replica flags")
        guard flags & ~1 == 0 else { throw DecodeError("unknown replica flags \(flags)") }
        return flags == 1
    }

    /// `role = %x01 / %x02 for:string` (primary, or a fallback for the named primary).
    static func writeRole(_ role: ReplicaRole, into w: inout ByteWriter) {
        switch role {
        case .primary: w.writeU8(1)
        case .fallback(let p):
            w.writeU8(2)
            w.writeString(truncated(p, toBytes: maxShortString))
        }
    }

    static func readRole(_ r: inout ByteReader) throws(DecodeError) -> ReplicaRole {
        switch try r.readU8("role") {
        case 1: return .primary
        case 2: return .fallback(for: try r.readString("stands in for", limit: maxShortString))
        case let t: throw DecodeError("unknown replica role \(t)")
        }
    }

    /// The most acknowledgements a write reply lists (N is at most 255).
    static let maxAcks = 255

    /// Put/delete flags: bit 0 = forwarded; other bits must be zero.
    static func readRequestFlags(_ r: inout ByteReader) throws(DecodeError) -> UInt8 {
        let flags = try r.readU8("flags")
        guard flags & ~1 == 0 else { throw DecodeError("unknown request flags \(flags)") }
        return flags
    }

    static func readKey(_ r: inout ByteReader, _ limits: Limits) throws(DecodeError) -> [UInt8] {
        let key = try r.readBlob("key", limit: limits.maxKeyBytes)
        guard !key.isEmpty else { throw DecodeError("key is empty") }
        return key
    }

    static func decodeOptions(_ r: inout ByteReader) throws(DecodeError) -> RequestOptions {
        let (rq, wq, prq, pwq) = (try readQuorum(&r, "r"), try readQuorum(&r, "w"), try readQuorum(&r, "pr"), try readQuorum(&r, "pw"))
        let timeout = try r.readU32("timeout")
        let sloppy: Bool?
        switch try r.readU8("sloppy") {
        case 0: sloppy = nil
        case 1: sloppy = true
        case 2: sloppy = false
        case let t: throw DecodeError("unknown sloppy tag \(t)")
        }
        let tag = try r.readU8("read repair")
        guard let repair = ReadRepairMode(rawValue: tag) else { throw DecodeError("unknown read repair mode \(tag)") }
        return RequestOptions(r: rq, w: wq, pr: prq, pw: pwq, timeoutMillis: timeout == 0 ? nil : timeout,
                              sloppy: sloppy, readRepair: repair == .async ? nil : repair)
    }

    private static func readQuorum(_ r: inout ByteReader, _ name: StaticString) throws(DecodeError) -> Quorum? {
        switch try r.readU8("\(name)") {
        case 0: return nil
        case 1: return .quorum
        case 2: return .all
        case 3: return .count(Int(try r.readU8("\(name)")))
        case let t: throw DecodeError("unknown quorum tag \(t) for \(name)")
        }
    }

    static func decodeQuorumFailure(_ r: inout ByteReader) throws(DecodeError) -> QuorumFailure {
        guard let kind = QuorumFailure.Kind(rawValue: try r.readU8("quorum kind")) else { throw DecodeError("unknown quorum failure kind") }
        guard let op = OperationKind(rawValue: try r.readU8("operation")) else { throw DecodeError("unknown operation") }
        let requirement = try r.readString("requirement", limit: 8)
        let required = try r.readCount("required", limit: 255)
        let achieved = try r.readCount("achieved", limit: 255)
        let candidates = try r.readCount("candidates", limit: 255)
        let n = try r.readCount("replica count", limit: min(255, r.remaining / 4))
        var replicas: [ReplicaReport] = []
        for _ in 0..<n {
            let node = try r.readString("node", limit: maxShortString)
            let address = try r.readString("address", limit: maxShortString)
            let role = try readRole(&r)
            let durable = try r.readBool("durable")
            let outcome: ReplicaOutcome
            switch try r.readU8("outcome") {
            case 0: outcome = .acknowledged
            case 1: outcome = .notSent(try r.readString("reason", limit: maxShortString))
            case 2: outcome = .timedOut(afterMillis: try r.readU32("timeout"))
            case 3: outcome = .connectionLost(try r.readString("reason", limit: maxShortString))
            case 4: outcome = .failed(try r.readString("reason", limit: maxShortString))
            case 5: outcome = .noAnswerYet
            case let t: throw DecodeError("unknown replica outcome \(t)")
            }
            replicas.append(ReplicaReport(node: node, address: address, role: role, outcome: outcome, durable: durable))
        }
        return QuorumFailure(kind: kind, operation: op, requirement: requirement, required: required, achieved: achieved,
                             candidates: candidates, replicas: replicas)
    }
}
