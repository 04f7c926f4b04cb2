public import CairnCore

/// Where a member stands in the ring (separate from its liveness, which SWIM decides).
public enum MembershipStatus: UInt8, Hashable, Sendable, CustomStringConvertible {
    /// Known to the cluster; owns partitions only once a committed plan moves them to it.
    case joining = 1
    /// Owns its share of the ring.
    case valid = 2
    /// A committed plan moves its partitions away (or, for a removed member, rebuilds them
    /// from the other replicas).
    case leaving = 3
    /// Owns nothing any more; its process exits, then the claimant forgets it.
    case exiting = 4

    public var description: String {
        switch self {
        case .joining: "joining"
        case .valid: "valid"
        case .leaving: "leaving"
        case .exiting: "exiting"
        }
    }
}

public struct RingMember: Hashable, Sendable {
    public var name: NodeName
    public var address: HostPort
    public var status: MembershipStatus

    public init(name: NodeName, address: HostPort, status: MembershipStatus) {
        self.name = name
        self.address = address
        self.status = status
    }
}

/// A change an operator staged; nothing moves until `commit`.
public enum StagedChange: Hashable, Sendable, CustomStringConvertible {
    case join(NodeName)
    /// Hand the member's data to the others, then let it exit.
    case leave(NodeName)
    /// Drop a dead member: its replicas are rebuilt from the surviving ones (no handoff from it).
    case remove(NodeName)

    public var node: NodeName {
        switch self {
        case .join(let n), .leave(let n), .remove(let n): n
        }
    }

    public var description: String {
        switch self {
        case .join(let n): "join \(n)"
        case .leave(let n): "leave \(n)"
        case .remove(let n): "remove \(n)"
        }
    }
}

/// One copy a committed plan implies: `to` becomes a replica of `partition` and gets its data
/// from `from` (a replica in the committed ring).
public struct PartitionTransfer: Hashable, Sendable, Comparable, CustomStringConvertible {
    public let partition: PartitionID
    public let from: NodeName
    public let to: NodeName

    public init(partition: PartitionID, from: NodeName, to: NodeName) {
        self.partition = partition
        self.from = from
        self.to = to
    }

    public static func < (a: PartitionTransfer, b: PartitionTransfer) -> Bool {
        (a.partition, a.from, a.to) < (b.partition, b.from, b.to)
    }

    public var description: String { "\(partition) \(from)→\(to)" }
}

/// What the staged changes would do, for `cluster plan`.
public struct RingPlan: Hashable, Sendable {
    public var changes: [StagedChange]
    /// Partitions each member owns (is first in the preference list of) before and after.
    public var ownedBefore: [NodeName: Int]
    public var ownedAfter: [NodeName: Int]
    public var transfers: [PartitionTransfer]
    /// Partitions with fewer than `min(n_val, members)` replicas that will be alive once the
    /// plan completes, with that number (the plan's `down` members do not count).
    public var atRisk: [PartitionID: Int]
    /// Partitions every replica of which is removed: nothing can be copied; they restart empty.
    public var lost: [PartitionID]
}

/// The cluster's membership and ownership as one versioned value that gossip spreads.
///
/// Single writer: only the claimant makes a new version (`version` + 1, claimant unchanged),
/// except `takingOver`, which makes the caller claimant. The claimant is always a member; when
/// it exits, the first valid member in join order takes the role. Every node keeps the greatest state it
/// has seen under the total order (version, claimant, encoding); `merged` picks it, so merging
/// is commutative, associative and idempotent, and all nodes that exchanged states agree.
///
/// Ownership during a plan: `ring` is the committed claim, `target` where the plan goes. A
/// partition's replicas are those of `ring` until every transfer into it is complete, then those
/// of `target` (each partition flips on its own). When all have flipped, the plan ends: `ring`
/// becomes `target`, joiners become valid, leavers exiting, removed members are forgotten.
///
/// Pure value type; every operation validates and throws `ValidationError` with the reason an
/// operator reads.
public struct RingState: Hashable, Sendable {
    public static let formatVersion: UInt8 = 2
    public static let maxMembers = 1024

    public let cluster: String
    public let partitionCount: Int
    public let nVal: Int
    public private(set) var version: UInt64
    public private(set) var claimant: NodeName
    /// Every member, in join order.
    public private(set) var members: [RingMember]
    /// The committed claim.
    public private(set) var ring: Ring
    /// The claim the committed plan moves to (nil: no plan in progress).
    public private(set) var target: Ring?
    /// The plan's copies, sorted; empty when no plan is in progress.
    public private(set) var transfers: [PartitionTransfer]
    /// Transfers reported complete (a subset of `transfers`).
    public private(set) var completed: Set<PartitionTransfer>
    /// Changes staged for the next plan, in the order staged.
    public private(set) var staged: [StagedChange]
    /// Members the plan in progress removes (dead; forgotten when it completes).
    public private(set) var removals: Set<NodeName>
    /// Members this cluster forgot (they left, or were removed), most recent last, at most
    /// `maxDeparted`: a node listed here that finds itself no longer a member knows it is out
    /// for good and stops. Absence alone is not proof: after a claimant fork a member can be
    /// missing from the state of the side that never saw it join.
    public private(set) var departed: [NodeName]
    public static let maxDeparted = 64

    /// The state of a cluster formed by `members` at once (`cluster.members`), or by one node
    /// alone. The first member is claimant; every node that bootstraps from the same list builds
    /// the same version 1.
    public static func bootstrap(cluster: String, partitionCount: Int, nVal: Int,
                                 members: [(name: NodeName, address: HostPort)]) throws(ValidationError) -> RingState {
        guard let first = members.first else { throw ValidationError("a cluster needs at least one member") }
        guard nVal >= 1, nVal <= 16 else { throw ValidationError("n_val \(nVal) must be 1...16") }
        guard members.count <= maxMembers else { throw ValidationError("at most \(maxMembers) members") }
        guard !cluster.isEmpty, cluster.utf8.count <= 255 else { throw ValidationError("cluster name must be 1...255 bytes") }
        let ring = try Ring(partitionCount: partitionCount, members: members.map(\.name))
        return RingState(cluster: cluster, partitionCount: partitionCount, nVal: nVal, version: 1, claimant: first.name,
                         members: members.map { RingMember(name: $0.name, address: $0.address, status: .valid) },
                         ring: ring, target: nil, transfers: [], completed: [], staged: [], removals: [], departed: [])
    }

    private init(cluster: String, partitionCount: Int, nVal: Int, version: UInt64, claimant: NodeName, members: [RingMember],
                 ring: Ring, target: Ring?, transfers: [PartitionTransfer], completed: Set<PartitionTransfer>,
                 staged: [StagedChange], removals: Set<NodeName>, departed: [NodeName]) {
        self.cluster = cluster
        self.partitionCount = partitionCount
        self.nVal = nVal
        self.version = version
        self.claimant = claimant
        self.members = members
        self.ring = ring
        self.target = target
        self.transfers = transfers
        self.completed = completed
        self.staged = staged
        self.removals = removals
        self.departed = departed
    }

    // MARK: Reading

    public func member(_ name: NodeName) -> RingMember? { members.first { $0.name == name } }

    public func address(of name: NodeName) -> HostPort? { member(name)?.address }

    public var isPlanInProgress: Bool { target != nil }

    /// The transfers not yet complete.
    public var pendingTransfers: [PartitionTransfer] { transfers.filter { !completed.contains($0) } }

    /// Whether `p`'s replicas are the target's already.
    public func hasFlipped(_ p: PartitionID) -> Bool {
        guard target != nil else { return false }
        return transfers.allSatisfy { $0.partition != p || completed.contains($0) }
    }

    /// The ring `p`'s placement follows now.
    public func effectiveRing(for p: PartitionID) -> Ring {
        if let target, hasFlipped(p) { return target }
        return ring
    }

    public func partition(forKey key: [UInt8]) -> PartitionID { ring.partition(forKey: key) }

    /// `p`'s replicas now, in preference-list order (at most `n_val`, distinct).
    public func replicas(of p: PartitionID) -> [NodeName] { effectiveRing(for: p).preferenceList(for: p, n: nVal) }

    /// The nodes after `p`'s replicas, in ring order (fallback candidates).
    public func fallbacks(of p: PartitionID, count: Int) -> [NodeName] { effectiveRing(for: p).fallbacks(for: p, n: nVal, count: count) }

    /// Partitions `name` owns (is first in the preference list of) now.
    public func owned(by name: NodeName) -> Int {
        ring.partitions.count { effectiveRing(for: $0).owner(of: $0) == name }
    }

    /// Partitions whose vnodes `name` runs now: those it replicates, and those a transfer of the
    /// plan in progress copies into it, complete or not (it must accept the copy and the writes
    /// forwarded during it, and keep both until the partition flips: a partition with several
    /// transfers flips only when the last completes).
    public func vnodePartitions(of name: NodeName) -> Set<PartitionID> {
        var out = Set(ring.partitions.filter { replicas(of: $0).contains(name) })
        for t in transfers where t.to == name { out.insert(t.partition) }
        return out
    }

    /// Whether `vnodePartitions(of: name)` holds `p`, without building a preference list (on
    /// every write's path).
    public func runsVnode(of name: NodeName, for p: PartitionID) -> Bool {
        if effectiveRing(for: p).preferenceList(for: p, n: nVal, contains: name) { return true }
        return transfers.contains { $0.partition == p && $0.to == name }
    }

    // MARK: Claimant operations (each makes the next version)

    /// Adds `name` as a joining member and stages its join. Asking again with the same address
    /// changes nothing (returns `self`).
    public func joining(_ name: NodeName, at address: HostPort) throws(ValidationError) -> RingState {
        if let m = member(name) {
            guard m.address == address else { throw ValidationError("\(name) is already a member at \(m.address)") }
            return self
        }
        if let other = members.first(where: { $0.address == address }) {
            throw ValidationError("\(other.name) already uses \(address)")
        }
        guard members.count < Self.maxMembers else { throw ValidationError("the cluster has \(Self.maxMembers) members, its limit") }
        var next = bumped()
        next.members.append(RingMember(name: name, address: address, status: .joining))
        next.staged.append(.join(name))
        next.departed.removeAll { $0 == name }
        return next
    }

    /// Stages `name`'s leave: its data moves to the others before it exits.
    public func stagingLeave(_ name: NodeName) throws(ValidationError) -> RingState {
        try stage(.leave(name))
    }

    /// Stages the removal of `name` (dead; no handoff from it).
    public func stagingRemove(_ name: NodeName) throws(ValidationError) -> RingState {
        try stage(.remove(name))
    }

    private func stage(_ change: StagedChange) throws(ValidationError) -> RingState {
        let name = change.node
        guard let m = member(name) else { throw ValidationError("\(name) is not a member") }
        if let earlier = staged.first(where: { $0.node == name }) {
            if earlier == change { return self }
            throw ValidationError("staged changes conflict: \(earlier) is already staged")
        }
        guard m.status == .valid else { throw ValidationError("\(name) is \(m.status); only a valid member can \(change.description.split(separator: " ")[0])") }
        if case .remove = change, name == claimant {
            throw ValidationError("\(name) is the claimant and cannot remove itself; run the remove on another member")
        }
        var next = bumped()
        next.staged.append(change)
        return next
    }

    /// Drops the staged changes; members whose join was staged are forgotten.
    public func clearingStaged() -> RingState {
        guard !staged.isEmpty else { return self }
        var next = bumped()
        let joins = Set(staged.compactMap { if case .join(let n) = $0 { n } else { nil } })
        next.members.removeAll { joins.contains($0.name) && $0.status == .joining }
        next.staged = []
        return next
    }

    /// What committing the staged changes would do. `down`: members believed dead (for the
    /// partitions at risk).
    public func plan(down: Set<NodeName> = []) throws(ValidationError) -> RingPlan {
        let target = try targetRing()
        var before: [NodeName: Int] = [:]
        var after: [NodeName: Int] = [:]
        for p in ring.partitions {
            if let o = ring.owner(of: p) { before[o, default: 0] += 1 }
            if let o = target.owner(of: p) { after[o, default: 0] += 1 }
        }
        let (transfers, lost) = Self.transfers(from: ring, to: target, n: nVal, removed: removedByStaged)
        var atRisk: [PartitionID: Int] = [:]
        let want = min(nVal, target.members.count)
        for p in target.partitions {
            let live = target.preferenceList(for: p, n: nVal).count { !down.contains($0) }
            if live < want { atRisk[p] = live }
        }
        return RingPlan(changes: staged, ownedBefore: before, ownedAfter: after, transfers: transfers, atRisk: atRisk, lost: lost)
    }

    /// Makes the staged changes the plan in progress: the target claim, the transfers it needs,
    /// leavers and removed members `leaving`. A plan that needs no transfer completes at once.
    public func committing() throws(ValidationError) -> RingState {
        let target = try targetRing()
        let removed = removedByStaged
        var next = bumped()
        next.target = target
        next.transfers = Self.transfers(from: ring, to: target, n: nVal, removed: removed).transfers
        next.completed = []
        next.removals = removed
        for change in staged {
            guard let i = next.members.firstIndex(where: { $0.name == change.node }) else { continue }
            switch change {
            case .join: break
            case .leave, .remove: next.members[i].status = .leaving
            }
        }
        next.staged = []
        next.settle()
        return next
    }

    /// Records that `transfer` finished (the receiver has everything). Unknown or repeated
    /// reports change nothing (returns `self`); the plan ends when the last one arrives.
    public func completing(_ transfer: PartitionTransfer) -> RingState {
        guard transfers.contains(transfer), !completed.contains(transfer) else { return self }
        var next = bumped()
        next.completed.insert(transfer)
        next.settle()
        return next
    }

    /// Forgets an exiting member (its process has exited).
    public func forgetting(_ name: NodeName) throws(ValidationError) -> RingState {
        guard let m = member(name) else { return self }
        guard m.status == .exiting else { throw ValidationError("\(name) is \(m.status), not exiting") }
        guard name != claimant else { throw ValidationError("\(name) is the claimant") }
        var next = bumped()
        next.members.removeAll { $0.name == name }
        next.depart([name])
        return next
    }

    /// Records `names` as departed, keeping the newest `maxDeparted`.
    private mutating func depart(_ names: [NodeName]) {
        guard !names.isEmpty else { return }
        departed.removeAll { names.contains($0) }
        departed += names
        if departed.count > Self.maxDeparted { departed.removeFirst(departed.count - Self.maxDeparted) }
    }

    /// Makes `name` the claimant (the old one is gone, leaving, or unreachable).
    public func takingOver(by name: NodeName) throws(ValidationError) -> RingState {
        guard let m = member(name), m.status == .valid else { throw ValidationError("only a valid member can become claimant") }
        guard name != claimant else { return self }
        var next = bumped()
        next.claimant = name
        return next
    }

    private func bumped() -> RingState {
        var next = self
        next.version &+= 1
        return next
    }

    private var removedByStaged: Set<NodeName> {
        Set(staged.compactMap { if case .remove(let n) = $0 { n } else { nil } })
    }

    /// The claim after the staged changes, in the order staged.
    private func targetRing() throws(ValidationError) -> Ring {
        guard !staged.isEmpty else { throw ValidationError("no changes are staged") }
        guard target == nil else {
            throw ValidationError("a plan is in progress (\(pendingTransfers.count) of \(transfers.count) transfers pending); commit once it completes")
        }
        var next = ring
        for change in staged {
            switch change {
            case .join(let n): next = next.adding(n, targetN: nVal)
            case .leave(let n), .remove(let n): next = next.removing(n)
            }
        }
        guard !next.members.isEmpty else { throw ValidationError("staged changes conflict: no member would be left") }
        return next
    }

    /// For each partition, each new replica gets the data of the old replica it replaces (in
    /// preference-list order), or of a replica that stays when the one it replaces is removed
    /// or there is none. With every old replica removed, the partition is lost.
    static func transfers(from old: Ring, to new: Ring, n: Int, removed: Set<NodeName>) -> (transfers: [PartitionTransfer], lost: [PartitionID]) {
        var out: [PartitionTransfer] = []
        var lost: [PartitionID] = []
        for p in old.partitions {
            let before = old.preferenceList(for: p, n: n)
            let after = new.preferenceList(for: p, n: n)
            let leaving = before.filter { !after.contains($0) }
            let arriving = after.filter { !before.contains($0) }
            guard !arriving.isEmpty else { continue }
            let staying = before.first { after.contains($0) && !removed.contains($0) }
            let anyLive = before.first { !removed.contains($0) }
            for (i, to) in arriving.enumerated() {
                let replaced = i < leaving.count && !removed.contains(leaving[i]) ? leaving[i] : nil
                guard let from = replaced ?? staying ?? anyLive else {
                    if lost.last != p { lost.append(p) }
                    continue
                }
                out.append(PartitionTransfer(partition: p, from: from, to: to))
            }
        }
        return (out.sorted(), lost)
    }

    /// Ends the plan once every transfer is complete.
    private mutating func settle() {
        guard let t = target, completed.count == transfers.count else { return }
        ring = t
        target = nil
        transfers = []
        completed = []
        var gone: [NodeName] = []
        members = members.compactMap { m in
            var m = m
            switch m.status {
            case .joining where t.members.contains(m.name): m.status = .valid
            case .leaving where removals.contains(m.name):
                gone.append(m.name)
                return nil
            case .leaving: m.status = .exiting
            default: break
            }
            return m
        }
        removals = []
        depart(gone)
        // An exiting claimant hands the role to the first valid member (there is one: a plan
        // never leaves the ring empty).
        if member(claimant)?.status != .valid, let heir = members.first(where: { $0.status == .valid }) {
            claimant = heir.name
        }
    }

    // MARK: Merge

    /// The greater of two states under (version, claimant, encoding): what every node converges on.
    public static func merged(_ a: RingState, _ b: RingState) -> RingState {
        if a.version != b.version { return a.version > b.version ? a : b }
        if a.claimant != b.claimant { return a.claimant > b.claimant ? a : b }
        if a == b { return a }
        return a.encoded().lexicographicallyPrecedes(b.encoded()) ? b : a
    }

    /// A 64-bit digest of the whole state (gossip compares it before sending a state).
    public var digest: UInt64 { KeyHash.hash(encoded()) }
}

// MARK: Encoding (Docs/cluster-state.md)

extension RingState {
    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: 64 + partitionCount * 4)
        w.writeU8(Self.formatVersion)
        w.writeString(cluster)
        w.writeVarint(partitionCount)
        w.writeVarint(nVal)
        w.writeU64(version)
        let index = Dictionary(uniqueKeysWithValues: members.enumerated().map { ($1.name, $0) })
        w.writeVarint(members.count)
        for m in members {
            w.writeString(m.name.value)
            w.writeString(m.address.host)
            w.writeVarint(m.address.port)
            w.writeU8(m.status.rawValue)
        }
        w.writeVarint(index[claimant] ?? 0)
        Self.write(ring, index, &w)
        if let target {
            w.writeU8(1)
            Self.write(target, index, &w)
        } else {
            w.writeU8(0)
        }
        w.writeVarint(transfers.count)
        for t in transfers {
            w.writeVarint(Int(t.partition.index))
            w.writeVarint(index[t.from] ?? 0)
            w.writeVarint(index[t.to] ?? 0)
            w.writeU8(completed.contains(t) ? 1 : 0)
        }
        w.writeVarint(staged.count)
        for s in staged {
            switch s {
            case .join(let n): w.writeU8(1); w.writeVarint(index[n] ?? 0)
            case .leave(let n): w.writeU8(2); w.writeVarint(index[n] ?? 0)
            case .remove(let n): w.writeU8(3); w.writeVarint(index[n] ?? 0)
            }
        }
        let removed = removals.compactMap { index[$0] }.sorted()
        w.writeVarint(removed.count)
        for i in removed { w.writeVarint(i) }
        w.writeVarint(departed.count)
        for n in departed { w.writeString(n.value) }
        return w.bytes
    }

    private static func write(_ ring: Ring, _ index: [NodeName: Int], _ w: inout ByteWriter) {
        w.writeVarint(ring.members.count)
        for m in ring.members { w.writeVarint(index[m] ?? 0) }
        for o in ring.ownerIndexes { w.writeVarint(o) }
    }

    /// Decodes and validates a state from a peer or from disk; any inconsistency throws.
    public init(decoding bytes: [UInt8]) throws(DecodeError) {
        var r = ByteReader(bytes)
        let format = try r.readU8("format")
        // Format 1 (before the departed list) is still read: a node upgraded in place keeps its state.
        guard format == Self.formatVersion || format == 1 else { throw DecodeError("cluster state format \(format) is not 1 or \(Self.formatVersion)") }
        let cluster = try r.readString("cluster", limit: 255)
        let q = try r.readCount("ring size", limit: Ring.maxPartitionCount)
        let nVal = try r.readCount("n_val", limit: 16)
        let version = try r.readU64("version")
        let count = try r.readCount("members", limit: Self.maxMembers)
        var members: [RingMember] = []
        members.reserveCapacity(count)
        for _ in 0..<count {
            let name = try Self.name(try r.readString("member name", limit: NodeName.maxBytes))
            let host = try r.readString("member host", limit: 255)
            let port = try r.readCount("member port", limit: 65535)
            guard let status = MembershipStatus(rawValue: try r.readU8("member status")) else { throw DecodeError("unknown member status") }
            members.append(RingMember(name: name, address: HostPort(host: host, port: port), status: status))
        }
        guard Set(members.map(\.name)).count == members.count else { throw DecodeError("a member is listed twice") }
        let names = members.map(\.name)
        func member(_ r: inout ByteReader, _ what: String) throws(DecodeError) -> NodeName {
            let i = try r.readCount(what, limit: Int.max)
            guard i < names.count else { throw DecodeError("\(what) \(i) is not a member") }
            return names[i]
        }
        let claimant = try member(&r, "claimant")
        let ring = try Self.readRing(&r, q: q, names: names)
        let target: Ring? = switch try r.readU8("target flag") {
        case 0: nil
        case 1: try Self.readRing(&r, q: q, names: names)
        default: throw DecodeError("bad target flag")
        }
        let transferCount = try r.readCount("transfers", limit: q * 16)
        var transfers: [PartitionTransfer] = []
        var completed = Set<PartitionTransfer>()
        for _ in 0..<transferCount {
            let p = try r.readCount("transfer partition", limit: q - 1)
            let t = PartitionTransfer(partition: PartitionID(UInt32(p)), from: try member(&r, "transfer source"), to: try member(&r, "transfer target"))
            transfers.append(t)
            switch try r.readU8("transfer done") {
            case 0: break
            case 1: completed.insert(t)
            default: throw DecodeError("bad transfer flag")
            }
        }
        guard target != nil || transfers.isEmpty else { throw DecodeError("transfers without a plan") }
        let stagedCount = try r.readCount("staged changes", limit: Self.maxMembers)
        var staged: [StagedChange] = []
        for _ in 0..<stagedCount {
            let kind = try r.readU8("staged kind")
            let n = try member(&r, "staged member")
            switch kind {
            case 1: staged.append(.join(n))
            case 2: staged.append(.leave(n))
            case 3: staged.append(.remove(n))
            default: throw DecodeError("unknown staged change \(kind)")
            }
        }
        let removedCount = try r.readCount("removals", limit: Self.maxMembers)
        var removals = Set<NodeName>()
        for _ in 0..<removedCount { removals.insert(try member(&r, "removed member")) }
        var departed: [NodeName] = []
        if format >= 2 {
            let departedCount = try r.readCount("departed", limit: Self.maxDeparted)
            for _ in 0..<departedCount { departed.append(try Self.name(try r.readString("departed member", limit: NodeName.maxBytes))) }
            guard Set(departed).count == departed.count else { throw DecodeError("a departed member is listed twice") }
        }
        try r.expectEnd("cluster state")
        guard !cluster.isEmpty, nVal >= 1 else { throw DecodeError("empty cluster name or n_val 0") }
        self.init(cluster: cluster, partitionCount: q, nVal: nVal, version: version, claimant: claimant, members: members,
                  ring: ring, target: target, transfers: transfers.sorted(), completed: completed, staged: staged, removals: removals,
                  departed: departed)
    }

    private static func name(_ s: String) throws(DecodeError) -> NodeName {
        do { return try NodeName(s) } catch { throw DecodeError(error.reason) }
    }

    private static func readRing(_ r: inout ByteReader, q: Int, names: [NodeName]) throws(DecodeError) -> Ring {
        let count = try r.readCount("ring members", limit: names.count)
        var ringMembers: [NodeName] = []
        for _ in 0..<count {
            let i = try r.readCount("ring member", limit: Int.max)
            guard i < names.count else { throw DecodeError("ring member \(i) is not a member") }
            ringMembers.append(names[i])
        }
        var owners: [Int] = []
        if count > 0 {
            owners.reserveCapacity(q)
            for _ in 0..<q { owners.append(try r.readCount("owner", limit: Int.max)) }
        }
        do { return try Ring(partitionCount: q, members: ringMembers, owners: owners) } catch { throw DecodeError(error.reason) }
    }
}
