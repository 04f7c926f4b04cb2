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
        var out: [NodeName] = []
        out.reserveCapacity(max(min(n, members.count), 0))
        visitPrimaries(for: p, n: n) { o in
            out.append(members[o])
            return true
        }
        return out
    }

    /// `preferenceList(for: p, n: n).contains(name)`, without building the list (a check on every
    /// write's path).
    public func preferenceList(for p: PartitionID, n: Int, contains name: NodeName) -> Bool {
        guard let target = members.firstIndex(of: name) else { return false }
        var found = false
        visitPrimaries(for: p, n: n) { o in
            found = o == target
            return !found
        }
        return found
    }

    /// Calls `visit` with the member index of each of `p`'s first `n` distinct owners, in
    /// preference order, until it returns false. Distinctness is checked in a stack buffer of
    /// the (short) result; the walk stops after one lap of the ring.
    private func visitPrimaries(for p: PartitionID, n: Int, _ visit: (Int) -> Bool) {
        let want = min(n, members.count)
        guard !owners.isEmpty, want > 0 else { return }
        withUnsafeTemporaryAllocation(of: Int.self, capacity: want) { picked in
            var count = 0
            var i = Int(p.index) % partitionCount
            var steps = 0
            while count < want && steps < partitionCount {
                let o = owners[i]
                if !picked[..<count].contains(o) {
                    picked[count] = o
                    count += 1
                    if !visit(o) { return }
                }
                i = (i + 1) % partitionCount
                steps += 1
            }
        }
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
    /// than it. Of the donor's partitions farthest from those it already holds (the first
    /// `claimCandidates` by distance, then lowest index) it takes the one that keeps the replica
    /// load — how many preference lists of `targetN` replicas each member is in — closest to even
    /// (least sum of squared distances from Q·N/S). Owning a fair share is not enough: where the
    /// walk to N distinct nodes skips repeats, a member can be in far more lists than N per
    /// partition owned (a new node of four on Q = 64 was in 58 of 64).
    ///
    /// Guarantees: counts end within 1 of each other; only partitions that move to `node` change
    /// owner, and at most ⌈Q/S⌉ of them move (S = members after the join).
    public func adding(_ node: NodeName, targetN: Int = 3) -> Ring {
        guard !members.contains(node) else { return self }
        var next = self
        next.members.append(node)
        let x = next.members.count - 1
        if owners.isEmpty {
            next.owners = Array(repeating: x, count: partitionCount)
            return next
        }
        let n = max(1, targetN)
        var counts = Array(repeating: 0, count: next.members.count)
        for o in next.owners { counts[o] += 1 }
        var load = next.members.count > n ? Self.replicaLoad(next.owners, members: next.members.count, n: n)
                                          : Array(repeating: 0, count: next.members.count)
        let target = Double(partitionCount * min(n, next.members.count)) / Double(next.members.count)
        var mine: [Int] = []   // sorted partitions held by x
        while true {
            var donor = 0
            for m in 0..<x where counts[m] > counts[donor] { donor = m }
            if counts[donor] <= counts[x] + 1 { break }
            // With no more members than N, every member is in every list: nothing to balance.
            let balancing = next.members.count > n
            // The donor's partitions farthest from those `node` holds (ties: lowest index); of
            // the first `claimCandidates`, the one whose move keeps the load most even.
            let candidates = next.owners.indices.filter { next.owners[$0] == donor }
                .map { (p: $0, distance: Self.circularDistance(from: $0, toNearestIn: mine, q: partitionCount)) }
                .sorted { $0.distance != $1.distance ? $0.distance > $1.distance : $0.p < $1.p }
                .prefix(balancing ? Self.claimCandidates : 1)
            var best: (p: Int, score: Double, delta: [(member: Int, change: Int)])?
            for c in candidates {
                let delta = balancing ? Self.loadDelta(next.owners, moving: c.p, to: x, n: n) : []
                // The change in the sum of squared distances from the target (only the members
                // whose load changes count).
                var score = 0.0
                for change in delta {
                    let was = Double(load[change.member]) - target
                    let will = was + Double(change.change)
                    score += will * will - was * was
                }
                if let b = best, score >= b.score { continue }
                best = (c.p, score, delta)
            }
            guard let chosen = best else { break }
            next.owners[chosen.p] = x
            for (m, d) in chosen.delta { load[m] += d }
            counts[donor] -= 1
            counts[x] += 1
            mine.insert(chosen.p, at: Self.insertionIndex(mine, chosen.p))
        }
        return next
    }

    /// How many of the spread-out candidate partitions a join weighs by replica load per step.
    static let claimCandidates = 48

    /// How many preference lists of `n` each member index is in.
    static func replicaLoad(_ owners: [Int], members: Int, n: Int) -> [Int] {
        var load = Array(repeating: 0, count: members)
        for p in owners.indices { for m in firstDistinct(owners, from: p, n: n) { load[m] += 1 } }
        return load
    }

    /// The first `n` distinct owners walking clockwise from `p`, reading partition
    /// `override.p` as owned by `override.owner` when given.
    static func firstDistinct(_ owners: [Int], from p: Int, n: Int, override: (p: Int, owner: Int)? = nil) -> [Int] {
        var picked: [Int] = []
        picked.reserveCapacity(n)
        var i = p
        var steps = 0
        while picked.count < n && steps < owners.count {
            let o = i == override?.p ? (override?.owner ?? owners[i]) : owners[i]
            if !picked.contains(o) { picked.append(o) }
            i = i + 1 == owners.count ? 0 : i + 1
            steps += 1
        }
        return picked
    }

    /// The change in each member's replica load if partition `p` moved to `x` (members whose
    /// load does not change are left out): only the lists of partitions whose walk reaches `p`
    /// (fewer than `n` distinct owners between them and `p`) change.
    static func loadDelta(_ owners: [Int], moving p: Int, to x: Int, n: Int) -> [(member: Int, change: Int)] {
        let q = owners.count
        var delta: [(member: Int, change: Int)] = []
        func add(_ m: Int, _ d: Int) {
            if let i = delta.firstIndex(where: { $0.member == m }) { delta[i].change += d } else { delta.append((m, d)) }
        }
        var between: [Int] = []   // distinct owners of [j, p)
        var j = p
        for _ in 0..<q {
            let before = firstDistinct(owners, from: j, n: n)
            let after = firstDistinct(owners, from: j, n: n, override: (p, x))
            if before != after {
                for m in before where !after.contains(m) { add(m, -1) }
                for m in after where !before.contains(m) { add(m, 1) }
            }
            j = j == 0 ? q - 1 : j - 1
            if j == p { break }
            if !between.contains(owners[j]) { between.append(owners[j]) }
            if between.count >= n { break }
        }
        return delta.filter { $0.change != 0 }
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
