public import CairnCore

/// What one gossip message carries: a SWIM message and a summary of the sender's ring state, so
/// a receiver that holds an older state pulls the newer one (Docs/wire-protocol.md §10).
public struct GossipPacket: Hashable, Sendable {
    public static let formatVersion: UInt8 = 1
    /// Bound on the updates one packet may carry when decoded.
    public static let maxUpdates = 64

    /// The member that sent it (the SWIM message's origin).
    public var sender: NodeName
    public var message: SWIMMessage
    /// The sender's ring state: its version, claimant and digest (version 0, no claimant: the
    /// sender has not joined a cluster).
    public var ringVersion: UInt64
    public var ringClaimant: NodeName?
    public var ringDigest: UInt64

    public init(sender: NodeName, message: SWIMMessage, ringVersion: UInt64, ringClaimant: NodeName?, ringDigest: UInt64) {
        self.sender = sender
        self.message = message
        self.ringVersion = ringVersion
        self.ringClaimant = ringClaimant
        self.ringDigest = ringDigest
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: 64)
        w.writeU8(Self.formatVersion)
        w.writeString(sender.value)
        w.writeU64(ringVersion)
        w.writeString(ringClaimant?.value ?? "")
        w.writeU64(ringDigest)
        switch message {
        case .ping(let seq, let updates):
            w.writeU8(1); w.writeVarint(seq); Self.write(updates, &w)
        case .pingRequest(let seq, let target, let updates):
            w.writeU8(2); w.writeVarint(seq); w.writeString(target.value); Self.write(updates, &w)
        case .ack(let seq, let target, let updates):
            w.writeU8(3); w.writeVarint(seq); w.writeString(target.value); Self.write(updates, &w)
        case .nack(let seq, let target):
            w.writeU8(4); w.writeVarint(seq); w.writeString(target.value)
        }
        return w.bytes
    }

    private static func write(_ updates: [MemberUpdate], _ w: inout ByteWriter) {
        let bounded = updates.prefix(maxUpdates)
        w.writeVarint(bounded.count)
        for u in bounded {
            w.writeString(u.name.value)
            w.writeU8(UInt8(u.status.rawValue))
            w.writeVarint(u.incarnation)
            if let by = u.by {
                w.writeU8(1)
                w.writeString(by.value)
            } else {
                w.writeU8(0)
            }
        }
    }

    /// Decodes a packet from a peer; anything malformed throws.
    public init(decoding bytes: [UInt8]) throws(DecodeError) {
        var r = ByteReader(bytes)
        let format = try r.readU8("gossip format")
        guard format == Self.formatVersion else { throw DecodeError("gossip format \(format) is not \(Self.formatVersion)") }
        sender = try Self.name(try r.readString("sender", limit: NodeName.maxBytes))
        ringVersion = try r.readU64("ring version")
        let claimant = try r.readString("ring claimant", limit: NodeName.maxBytes)
        ringClaimant = claimant.isEmpty ? nil : try Self.name(claimant)
        ringDigest = try r.readU64("ring digest")
        let kind = try r.readU8("swim kind")
        let seq = try r.readVarint("sequence")
        switch kind {
        case 1: message = .ping(sequence: seq, updates: try Self.readUpdates(&r))
        case 2: message = .pingRequest(sequence: seq, target: try Self.name(try r.readString("target", limit: NodeName.maxBytes)),
                                       updates: try Self.readUpdates(&r))
        case 3: message = .ack(sequence: seq, target: try Self.name(try r.readString("target", limit: NodeName.maxBytes)),
                               updates: try Self.readUpdates(&r))
        case 4: message = .nack(sequence: seq, target: try Self.name(try r.readString("target", limit: NodeName.maxBytes)))
        default: throw DecodeError("unknown swim message \(kind)")
        }
        try r.expectEnd("gossip packet")
    }

    private static func readUpdates(_ r: inout ByteReader) throws(DecodeError) -> [MemberUpdate] {
        let count = try r.readCount("updates", limit: maxUpdates)
        var out: [MemberUpdate] = []
        out.reserveCapacity(count)
        for _ in 0..<count {
            let name = try name(try r.readString("member", limit: NodeName.maxBytes))
            guard let status = MemberStatus(rawValue: Int(try r.readU8("status"))) else { throw DecodeError("unknown member status") }
            let incarnation = try r.readVarint("incarnation")
            let by: NodeName? = switch try r.readU8("by flag") {
            case 0: nil
            case 1: try Self.name(try r.readString("by", limit: NodeName.maxBytes))
            default: throw DecodeError("bad by flag")
            }
            out.append(MemberUpdate(name: name, status: status, incarnation: incarnation, by: by))
        }
        return out
    }

    private static func name(_ s: String) throws(DecodeError) -> NodeName {
        do { return try NodeName(s) } catch { throw DecodeError(error.reason) }
    }
}
