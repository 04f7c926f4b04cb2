public import CairnCore
import CairnRing

/// The shape of a partition's hash tree: `16^depth` segments (leaves) under a fan-out of 16.
/// Replicas can compare trees of one shape only; `aae.tree_depth` sets it for the whole cluster.
public struct TreeShape: Hashable, Sendable, CustomStringConvertible {
    public static let fanout = 16
    public static let fanoutBits = 4
    /// Depths a node accepts: 2 (256 segments) to 5 (1,048,576 segments).
    public static let depths = 2...5
    /// 4,096 segments: 35 KiB of memory per partition.
    public static let standard = TreeShape(uncheckedDepth: 3)

    /// Levels below the root; the leaves are level `depth`.
    public let depth: Int

    public init(depth: Int) throws(ValidationError) {
        guard Self.depths.contains(depth) else { throw ValidationError("aae.tree_depth \(depth) is outside \(Self.depths)") }
        self.depth = depth
    }

    init(uncheckedDepth: Int) { depth = uncheckedDepth }

    public var segmentBits: Int { depth * Self.fanoutBits }
    public var segments: Int { 1 << segmentBits }
    /// Nodes at `level` (0: the root alone).
    public func width(of level: Int) -> Int { 1 << (level * Self.fanoutBits) }
    /// Every node of every level: what a tree keeps in memory, 8 bytes each.
    public var nodeCount: Int { (0...depth).reduce(0) { $0 + width(of: $1) } }
    public var memoryBytes: Int { nodeCount * 8 }
    public var description: String { "depth \(depth) (\(segments) segments)" }
}

/// A partition's hash tree in the TicTac style: each leaf (segment) holds the XOR of the
/// `KeyVersionHash`es of the keys in it, each inner node the XOR of its 16 children.
///
/// XOR makes the tree order-free and incremental: a write replacing version hash `old` by `new`
/// (0 for "absent") XORs `old ^ new` into one leaf and its ancestors, with nothing read back; two
/// trees built from the same keys at the same versions are equal however the writes arrived; and
/// a tree of changes made after a snapshot XORs onto the tree built from the snapshot.
///
/// Value type, pure. Invariant: every inner node is the XOR of its children.
public struct SegmentTree: Hashable, Sendable {
    public let shape: TreeShape
    /// Every level's nodes in one array, the root first and the leaves last: level l's
    /// `shape.width(of: l)` nodes start at `Self.start(of: l)`. One array, so a write's walk up
    /// the tree checks one buffer's uniqueness once, not two per level.
    private var nodes: [UInt64]

    public init(shape: TreeShape) {
        self.shape = shape
        nodes = [UInt64](repeating: 0, count: shape.nodeCount)
    }

    /// Where level `level` starts in `nodes`: the nodes of the levels above it, (16^l − 1) / 15.
    private static func start(of level: Int) -> Int { ((1 << (level * TreeShape.fanoutBits)) - 1) / (TreeShape.fanout - 1) }

    public var root: UInt64 { nodes[0] }
    public var isEmpty: Bool { nodes[Self.start(of: shape.depth)...].allSatisfy { $0 == 0 } }

    /// XORs `delta` into `segment` and every node above it.
    public mutating func apply(segment: Int, delta: UInt64) {
        guard delta != 0, segment >= 0, segment < shape.segments else { return }
        let depth = shape.depth
        nodes.withUnsafeMutableBufferPointer { n in
            var index = segment
            for level in stride(from: depth, through: 0, by: -1) {
                n[Self.start(of: level) + index] ^= delta
                index >>= TreeShape.fanoutBits
            }
        }
    }

    /// Records that `key`'s version hash went from `old` to `new` (0: absent).
    public mutating func update(key: [UInt8], old: UInt64, new: UInt64) {
        apply(segment: KeyVersionHash.segment(of: key, shape: shape), delta: old ^ new)
    }

    /// XORs every node of `other` (same shape) into this tree: the changes `other` recorded.
    public mutating func merge(_ other: SegmentTree) {
        guard other.shape == shape else { return }
        other.nodes.withUnsafeBufferPointer { theirs in
            nodes.withUnsafeMutableBufferPointer { mine in
                for i in 0..<min(mine.count, theirs.count) { mine[i] ^= theirs[i] }
            }
        }
    }

    /// The hash of node `index` at `level` (0 for an index out of range).
    public func hash(level: Int, index: Int) -> UInt64 {
        guard (0...shape.depth).contains(level), (0..<shape.width(of: level)).contains(index) else { return 0 }
        return nodes[Self.start(of: level) + index]
    }

    /// The children's hashes of each of `parents` (nodes of `level`), 16 per parent, in order.
    public func children(level: Int, of parents: [Int]) -> [UInt64] {
        var out: [UInt64] = []
        out.reserveCapacity(parents.count * TreeShape.fanout)
        for p in parents {
            for c in 0..<TreeShape.fanout { out.append(hash(level: level + 1, index: p << TreeShape.fanoutBits | c)) }
        }
        return out
    }

    public func segmentHash(_ segment: Int) -> UInt64 { hash(level: shape.depth, index: segment) }

    // MARK: Persistence (Docs/anti-entropy.md, "Tree at rest")

    static let formatVersion: UInt8 = 1

    /// `version:u8 depth:u8 count:varint (gap:varint leaf:u64be)* check:u64be`: the non-zero
    /// leaves in order, each with the distance from the previous one's index (the first: its
    /// index); check is XXH64 of what precedes. A partition with few keys takes few bytes.
    public func encoded() -> [UInt8] {
        let leavesStart = Self.start(of: shape.depth)
        let nonZero = nodes[leavesStart...].withUnsafeBufferPointer { leaves in
            var indexes: [Int] = []
            for i in 0..<leaves.count where leaves[i] != 0 { indexes.append(i) }
            return indexes
        }
        var w = ByteWriter(capacity: 20 + nonZero.count * 11)
        w.writeU8(Self.formatVersion)
        w.writeU8(UInt8(truncatingIfNeeded: shape.depth))
        w.writeVarint(nonZero.count)
        var previous = 0
        for i in nonZero {
            w.writeVarint(i - previous)
            w.writeU64(nodes[leavesStart + i])
            previous = i
        }
        w.writeU64(KeyHash.hash(w.bytes))
        return w.bytes
    }

    /// Decodes a tree written by `encoded()`, rebuilding the inner levels from the leaves.
    public static func decode(_ bytes: [UInt8]) throws(DecodeError) -> SegmentTree {
        guard bytes.count >= 11 else { throw DecodeError("tree of \(bytes.count) bytes is truncated") }
        let body = Array(bytes[..<(bytes.count - 8)])
        guard KeyHash.hash(body) == bytes.suffix(8).reduce(UInt64(0), { $0 << 8 | UInt64($1) }) else {
            throw DecodeError("tree checksum mismatch")
        }
        var r = ByteReader(body)
        let version = try r.readU8("tree format")
        guard version == formatVersion else { throw DecodeError("unknown tree format \(version)") }
        let depth = Int(try r.readU8("tree depth"))
        guard TreeShape.depths.contains(depth) else { throw DecodeError("tree depth \(depth) is outside \(TreeShape.depths)") }
        let shape = TreeShape(uncheckedDepth: depth)
        let count = try r.readCount("leaf count", limit: min(shape.segments, r.remaining / 9))
        var tree = SegmentTree(shape: shape)
        var index = 0
        for i in 0..<count {
            let gap = try r.readVarint("leaf gap")
            guard gap < UInt64(shape.segments), i == 0 || gap > 0 else { throw DecodeError("leaf indexes not ascending") }
            index += Int(gap)
            guard index < shape.segments else { throw DecodeError("leaf index \(index) beyond \(shape.segments)") }
            tree.apply(segment: index, delta: try r.readU64("leaf"))
        }
        try r.expectEnd("tree")
        return tree
    }
}
