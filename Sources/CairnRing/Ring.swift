public import CairnCore

/// The hash ring: Q equal partitions and the node that claims each.
///
/// Pure value type. Partition `i` covers hashes `[i * 2^64/Q, (i+1) * 2^64/Q)`, so a key's
/// partition is the top log2(Q) bits of `KeyHash.hash(key)`. The claim is a deterministic function
/// of Q and the members in join order (see `adding(_:)`), so every node that knows the same
/// members computes the same ring; `fingerprint` lets nodes check that they agree.
public struct Ring: Hashable, Sendable {
    public static let defaultPartitionCount = 256
    public static let maxPartitionCount = 1 << 20

    /// Q, a power of two.
    public let partitionCount: Int
    /// Members in join order.
    public private(set) var members: [NodeName]
    /// `owners[p]` indexes `members`. Empty iff there are no members.
    private var owners: [Int]
    private let shift: UInt64

    /// A ring built by adding `members` one after the other to an empty ring.
    public init(partitionCount: Int = Ring.defaultPartitionCount, members: [NodeName]) throws(ValidationError) {
        guard partitionCount >= 1, partitionCount <= Self.maxPartitionCount, partitionCount & (partitionCount - 1) == 0 else {
            throw ValidationError("ring size \(partitionCount) must be a power of two between 1 and \(Self.maxPartitionCount)")
        }
        guard Set(members).count == members.count else { throw ValidationError("ring members must be distinct") }
        var ring = Ring(emptyWith: partitionCount)
        for m in members { ring = ring.adding(m) }
        self = ring
    }

    /// A ring with an explicit claim (decoded from a peer or disk): `owners[p]` indexes
    /// `members`. Validates everything; never traps on bad input.
    public init(partitionCount: Int, members: [NodeName], owners: [Int]) throws(ValidationError) {
        guard partitionCount >= 1, partitionCount <= Self.maxPartitionCount, partitionCount & (partitionCount - 1) == 0 else {
            throw ValidationError("ring size \(partitionCount) must be a power of two between 1 and \(Self.maxPartitionCount)")
        }
        guard Set(members).count == members.count else { throw ValidationError("ring members must be distinct") }
        if members.isEmpty {
            guard owners.isEmpty else { throw ValidationError("a ring without members owns nothing") }
        } else {
            guard owners.count == partitionCount else { throw ValidationError("a ring of \(partitionCount) partitions needs as many owners, not \(owners.count)") }
            guard owners.allSatisfy({ $0 >= 0 && $0 < members.count }) else { throw ValidationError("a ring owner is not one of its members") }
        }
        self.init(emptyWith: partitionCount)
        self.members = members
        self.owners = owners
    }

    /// The claim: `ownerIndexes[p]` indexes `members` (empty iff there are no members).
    public var ownerIndexes: [Int] { owners }

    private init(emptyWith partitionCount: Int) {
        self.partitionCount = partitionCount
        self.members = []
        self.owners = []
        self.shift = UInt64(64 - partitionCount.trailingZeroBitCount)
    }

    // MARK: Placement

    public func partition(forHash h: UInt64) -> PartitionID {
        shift >= 64 ? PartitionID(0) : PartitionID(UInt32(truncatingIfNeeded: h >> shift))
    }

    public func partition(forKey key: [UInt8]) -> PartitionID { partition(forHash: KeyHash.hash(key)) }

    public var partitions: [PartitionID] { (0..<partitionCount).map { PartitionID(UInt32($0)) } }

    public func owner(of p: PartitionID) -> NodeName? {
        let i = Int(p.index)
        guard i < owners.count else { return nil }
        return members[owners[i]]
    }

    /// Nodes in ring order starting at `p`'s owner, each listed once: the first `n` are the
    /// preference list's primaries, the rest are its fallbacks, in order.
    public func walk(from p: PartitionID) -> [NodeName] {
        guard !owners.isEmpty else { return [] }
        var seen = Set<Int>()
        var out: [NodeName] = []
        var i = Int(p.index) % partitionCount
        for _ in 0..<partitionCount {
            let o = owners[i]
            if seen.insert(o).inserted {
                out.append(members[o])
                if out.count == members.count { break }
            }
            i = (i + 1) % partitionCount
        }
        return out
    }

    /// The `n` distinct primaries for partition `p` (fewer only if the ring has fewer members).
    /// On every request's path: stops at `n` and checks distinctness in the (short) result.
    public func preferenceList(for p: PartitionID, n: Int) -> [NodeName] {
        guard !owners.isEmpty else { return [] }
        let want = min(n, members.count)
        var picked: [Int] = []
        picked.reserveCapacity(want)
        var i = Int(p.index) % partitionCount
        for _ in 0..<partitionCount where picked.count < want {
            if !picked.contains(owners[i]) { picked.append(owners[i]) }
            i = (i + 1) % partitionCount
        }
        return picked.map { members[$0] }
    }

    /// Up to `count` fallbacks: the next distinct nodes after the primaries.
    public func fallbacks(for p: PartitionID, n: Int, count: Int) -> [NodeName] { Array(walk(from: p).dropFirst(n).prefix(count)) }

    public func partitions(ownedBy node: NodeName) -> [PartitionID] {
        guard let idx = members.firstIndex(of: node) else { return [] }
        return owners.indices.filter { owners[$0] == idx }.map { PartitionID(UInt32($0)) }
    }

    /// Partitions whose preference list includes `node`: the vnodes it runs.
    public func replicatedPartitions(of node: NodeName, n: Int) -> [PartitionID] {
        partitions.filter { preferenceList(for: $0, n: n).contains(node) }
    }

    // MARK: Claim

    /// The ring after `node` joins. The new node takes partitions one at a time from the member
    /// holding the most (ties: earliest joined) until no member holds more than one partition more
    /// than it; of the donor's partitions it takes the one farthest from those it already holds
    /// (ties: lowest index), which spreads its partitions around the ring.
    ///
    /// Guarantees: counts end within 1 of each other; only partitions that move to `node` change
    /// owner, and at most ⌈Q/S⌉ of them move (S = members after the join).
    public func adding(_ node: NodeName) -> Ring {
        guard !members.contains(node) else { return self }
        var next = self
        next.members.append(node)
        let x = next.members.count - 1
        if owners.isEmpty {
            next.owners = Array(repeating: x, count: partitionCount)
            return next
        }
        var counts = Array(repeating: 0, count: next.members.count)
        for o in next.owners { counts[o] += 1 }
        var mine: [Int] = []   // sorted partitions held by x
        while true {
            var donor = 0
            for m in 0..<x where counts[m] > counts[donor] { donor = m }
            if counts[donor] <= counts[x] + 1 { break }
            let candidates = next.owners.indices.filter { next.owners[$0] == donor }
            var best = candidates[0]
            var bestDistance = -1
            for p in candidates {
                let d = Self.circularDistance(from: p, toNearestIn: mine, q: partitionCount)
                if d > bestDistance { best = p; bestDistance = d }
            }
            next.owners[best] = x
            counts[donor] -= 1
            counts[x] += 1
            mine.insert(best, at: Self.insertionIndex(mine, best))
        }
        return next
    }

    /// The ring after `node` leaves: each of its partitions goes to the member holding the fewest
    /// (ties: earliest joined). Only the leaver's partitions move.
    public func removing(_ node: NodeName) -> Ring {
        guard let gone = members.firstIndex(of: node) else { return self }
        var next = self
        if members.count == 1 {
            next.members = []
            next.owners = []
            return next
        }
        var counts = Array(repeating: 0, count: members.count)
        for o in owners { counts[o] += 1 }
        counts[gone] = Int.max
        for p in owners.indices where owners[p] == gone {
            var taker = gone == 0 ? 1 : 0
            for m in counts.indices where counts[m] < counts[taker] { taker = m }
            next.owners[p] = taker
            counts[taker] += 1
        }
        next.members.remove(at: gone)
        next.owners = next.owners.map { $0 > gone ? $0 - 1 : $0 }
        return next
    }

    /// A 64-bit digest of Q, the members and the claim: equal on every node that agrees.
    public var fingerprint: UInt64 {
        var w = ByteWriter(capacity: 16 + partitionCount * 2)
        w.writeVarint(partitionCount)
        w.writeVarint(members.count)
        for m in members { w.writeString(m.value) }
        for o in owners { w.writeVarint(o) }
        return KeyHash.hash(w.bytes)
    }

    static func circularDistance(from p: Int, toNearestIn sorted: [Int], q: Int) -> Int {
        guard !sorted.isEmpty else { return q }
        let i = insertionIndex(sorted, p)
        let after = sorted[i % sorted.count]
        let before = sorted[(i + sorted.count - 1) % sorted.count]
        let d1 = (after - p + q) % q
        let d2 = (p - before + q) % q
        return min(d1, d2)
    }

    static func insertionIndex(_ sorted: [Int], _ v: Int) -> Int {
        var lo = 0
        var hi = sorted.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if sorted[mid] < v { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }
}
