/// The name of a node, unique in a cluster and stable across restarts (e.g. `n1`).
///
/// Invariant: 1...64 bytes of `[A-Za-z0-9._-]`, so it is safe in logs, file names and metric labels.
public struct NodeName: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let value: String

    public static let maxBytes = 64

    public init(_ value: String) throws(ValidationError) {
        guard !value.isEmpty, value.utf8.count <= Self.maxBytes,
              value.utf8.allSatisfy({ Self.allowed($0) })
        else { throw ValidationError("node name '\(value)' must be 1...\(Self.maxBytes) characters of A-Z a-z 0-9 . _ -") }
        self.value = value
    }

    private static func allowed(_ c: UInt8) -> Bool {
        (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || c == 0x2E || c == 0x5F || c == 0x2D
    }

    public static func < (a: NodeName, b: NodeName) -> Bool { a.value < b.value }
    public var description: String { value }
}

/// One of the Q equal arcs of the hash ring, `0 ..< Q`.
public struct PartitionID: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let index: UInt32
    public init(_ index: UInt32) { self.index = index }
    public static func < (a: PartitionID, b: PartitionID) -> Bool { a.index < b.index }
    public var description: String { "p\(index)" }
}

extension PartitionID {
    /// Bit 31 of a storage partition id marks a node's fallback copy of a partition (sloppy
    /// quorum): stored, folded, handed off and dropped apart from its primary copy. Ring sizes
    /// stay below 2^31, so no partition index has it.
    static let fallbackBit: UInt32 = 1 << 31

    /// The storage partition holding this node's fallback copy of this partition.
    public var fallbackSpace: PartitionID { PartitionID(index | Self.fallbackBit) }
    /// Whether this id names a fallback copy (`fallbackSpace`), not a partition of the ring.
    public var isFallbackSpace: Bool { index & Self.fallbackBit != 0 }
    /// The ring's partition this storage partition belongs to.
    public var home: PartitionID { PartitionID(index & ~Self.fallbackBit) }
}

/// The identity that stamps versions: a node name plus an epoch.
///
/// A node takes a fresh epoch whenever it starts without its previous data (first boot, lost disk,
/// in-memory backend), so it never reissues a dot it issued before (the riak_kv#679 lesson).
/// Ordered by name, then epoch; the order is the canonical order of DVV entries.
public struct ActorID: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let node: String
    public let epoch: UInt64

    public init(node: String, epoch: UInt64) {
        self.node = node
        self.epoch = epoch
    }

    public static func < (a: ActorID, b: ActorID) -> Bool {
        if a.node != b.node { return a.node.utf8.lexicographicallyPrecedes(b.node.utf8) }
        return a.epoch < b.epoch
    }

    public var description: String { "\(node)#\(String(epoch, radix: 16))" }

    static let maxNameBytes = NodeName.maxBytes

    func encode(into w: inout ByteWriter) {
        w.writeString(node)
        w.writeU64(epoch)
    }

    static func decode(from r: inout ByteReader) throws(DecodeError) -> ActorID {
        let node = try r.readString("actor name", limit: maxNameBytes)
        guard (try? NodeName(node)) != nil else { throw DecodeError("actor name '\(node)' is not a valid node name") }
        let epoch = try r.readU64("actor epoch")
        return ActorID(node: node, epoch: epoch)
    }
}

/// A caller supplied something out of range (a count, a size, a name).
public struct ValidationError: Error, Sendable, Hashable, CustomStringConvertible {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}
