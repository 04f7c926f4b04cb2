import CairnCore

/// One nemesis fault. Nodes are numbered from 0.
public enum Fault: Sendable, Hashable, CustomStringConvertible {
    /// The node can reach no peer and no peer can reach it.
    case isolate(Int)
    /// Two sides that cannot reach each other; `minority` is the smaller.
    case split(minority: [Int])
    /// A split as `split`, with every client confined to the side of its home node (client i's
    /// home is the i-th member, round robin): clients on the minority side reach only the
    /// minority — the case sloppy quorum and hints exist for.
    case clientSplit(minority: [Int])
    /// The nodes other than `center` are split in two halves; `center` sees both.
    case bridge(center: Int)
    /// Messages from `from` to `to` are lost; the other direction works.
    case oneWay(from: Int, to: Int)
    /// `kill -9`, restarted when healed.
    case kill(Int)
    /// `SIGSTOP`, `SIGCONT` when healed.
    case pause(Int)
    /// `kill -9` and the node's data directory deleted (a lost disk); restarted under its name
    /// when healed, then `cairn repair` on it, as an operator would after replacing the disk.
    case wipeDisk(Int)
    /// The node is stopped (SIGTERM) and bytes of its largest table flipped (bit rot);
    /// restarted when healed, with nothing more done: it must find the damage, keep serving and
    /// refill the keys from replicas by itself (the heal waits until it has).
    case corruptTable(Int)
    /// The node's outgoing internode messages wait this long (the fault-injecting transport).
    case delay(node: Int, millis: Int)
    /// This share of the node's outgoing internode messages (or their replies) is lost.
    case drop(node: Int, percent: Int)
    /// Membership: a new node starts with `cluster.seeds` only, `cairn cluster join`, plan,
    /// commit; done when it is valid and no transfer is pending.
    case join(Int)
    /// Membership: `cairn cluster leave`, plan, commit; done when its data is handed off, it is
    /// no longer listed and its `cairnd` has exited (with 0).
    case leave(Int)
    /// Membership: `kill -9`, then `cairn cluster remove`, plan, commit; done when its
    /// partitions are rebuilt from the other replicas and it is no longer listed.
    case remove(Int)

    /// A membership change (one of the `membership` kind): it lasts until it completes.
    public var isMembershipChange: Bool {
        switch self {
        case .join, .leave, .remove: true
        default: false
        }
    }

    /// The node a membership change joins, removes or sees leave.
    var membershipNode: Int? {
        switch self {
        case .join(let n), .leave(let n), .remove(let n): n
        default: nil
        }
    }

    /// The `cairn cluster` verb that stages a membership change ("" for other faults).
    var membershipVerb: String {
        switch self {
        case .join: "join"
        case .leave: "leave"
        case .remove: "remove"
        default: ""
        }
    }

    public var description: String {
        switch self {
        case .isolate(let n): "isolate n\(n + 1)"
        case .split(let m): "split: {" + m.map { "n\($0 + 1)" }.joined(separator: ",") + "} | rest"
        case .clientSplit(let m): "split with clients: {" + m.map { "n\($0 + 1)" }.joined(separator: ",") + "} and their clients | rest"
        case .bridge(let c): "bridge through n\(c + 1)"
        case .oneWay(let f, let t): "one-way cut n\(f + 1) -> n\(t + 1)"
        case .kill(let n): "kill -9 n\(n + 1)"
        case .pause(let n): "SIGSTOP n\(n + 1)"
        case .wipeDisk(let n): "wipe n\(n + 1)'s disk (kill -9, data directory deleted)"
        case .corruptTable(let n): "corrupt a table of n\(n + 1) (stopped, bytes flipped)"
        case .delay(let n, let ms): "delay n\(n + 1) outgoing by \(ms) ms"
        case .drop(let n, let p): "drop \(p)% of n\(n + 1)'s messages"
        case .join(let n): "join n\(n + 1)"
        case .leave(let n): "leave n\(n + 1)"
        case .remove(let n): "remove n\(n + 1) (kill -9, then cluster remove)"
        }
    }

    /// Which peers each node must not send to, for a partition fault (empty for the others),
    /// in a cluster of nodes 0..<nodes.
    public func blocked(nodes: Int) -> [Int: Set<Int>] { blocked(members: Array(0..<nodes)) }

    /// The same among `members` (the nodes in the cluster when the fault starts).
    public func blocked(members: [Int]) -> [Int: Set<Int>] {
        var cut: [Int: Set<Int>] = [:]
        func sever(_ a: Set<Int>, _ b: Set<Int>) {
            for x in a { cut[x, default: []].formUnion(b) }
            for y in b { cut[y, default: []].formUnion(a) }
        }
        let all = Set(members)
        switch self {
        case .isolate(let n): sever([n], all.subtracting([n]))
        case .split(let minority), .clientSplit(let minority): sever(Set(minority), all.subtracting(minority))
        case .bridge(let c):
            let others = members.sorted().filter { $0 != c }
            let half = others.count / 2
            sever(Set(others.prefix(half)), Set(others.dropFirst(half)))
        case .oneWay(let f, let t): cut[f, default: []].insert(t)
        default: break
        }
        return cut
    }
}

/// The kinds of fault `--faults` selects from.
public enum FaultKind: String, CaseIterable, Sendable, Hashable {
    case isolate, split, bridge, oneWay = "one-way", kill, pause, delay, drop
    /// `Fault.clientSplit`.
    case clientSplit = "client-split"
    /// Joins, leaves and removes (`--joins`, `--leaves`, `--removes` of them).
    case membership
    /// `Fault.wipeDisk`, `Fault.corruptTable`: opted into (`--faults default,wipe-disk,corrupt-table`),
    /// so the default schedules stay as they were.
    case wipeDisk = "wipe-disk"
    case corruptTable = "corrupt-table"

    /// The first eight kinds, in the order the schedule numbers them: a seed's schedule with
    /// these is the same as before the kinds were selectable.
    public static let classic: [FaultKind] = [.isolate, .split, .bridge, .oneWay, .kill, .pause, .delay, .drop]
    /// The default selection: every kind except `membership` (`classic`, then `client-split`).
    public static let standard: [FaultKind] = classic + [.clientSplit]
}

/// How many membership changes of each sort a run makes.
public struct MembershipPlan: Sendable, Hashable {
    public var joins = 0
    public var leaves = 0
    public var removes = 0
    public init(joins: Int = 0, leaves: Int = 0, removes: Int = 0) {
        self.joins = joins
        self.leaves = leaves
        self.removes = removes
    }
    public var total: Int { joins + leaves + removes }

    enum Change: Hashable { case join, leave, remove }

    /// The order of the changes, starting from `nodes` members: joins and departures alternate,
    /// and a departure is made only while at least `minimum` members stay (a join comes first
    /// when one is needed). Changes that cannot keep `minimum` members are left out.
    func order(nodes: Int, minimum: Int) -> [Change] {
        var (j, l, r, count) = (joins, leaves, removes, nodes)
        var out: [Change] = []
        while j + l + r > 0 {
            let canShrink = count - 1 >= minimum
            if j > 0 && (!canShrink || out.last != .join || l + r == 0) {
                out.append(.join)
                (j, count) = (j - 1, count + 1)
            } else if canShrink && l > 0 && l >= r {
                out.append(.leave)
                (l, count) = (l - 1, count - 1)
            } else if canShrink && r > 0 {
                out.append(.remove)
                (r, count) = (r - 1, count - 1)
            } else if canShrink && l > 0 {
                out.append(.leave)
                (l, count) = (l - 1, count - 1)
            } else {
                break
            }
        }
        return out
    }
}

/// A fault, when it starts and how long it lasts (offsets from the start of the run).
public struct ScheduledFault: Sendable, Hashable {
    public var atMillis: Int
    /// For a membership change: 0 (it lasts until it completes).
    public var durationMillis: Int
    public var fault: Fault
    /// The nodes in the cluster when the fault starts (partitions cut links among these).
    public var members: [Int]
}

/// The nemesis schedule: one fault at a time, each healed (a membership change: completed)
/// before the next, drawn from a seeded generator so a run is reproducible from its seed. Pure.
///
/// Membership changes are spread over the first 80 % of the run; nodes that join are numbered
/// after the first `nodes` (n6, n7, ... in a 5-node run) and names are never reused. n1 (the
/// first claimant) never leaves and is never removed.
public struct NemesisSchedule: Sendable, Hashable {
    public var faults: [ScheduledFault]
    /// Nodes that exist at some point: the first ones and every joiner.
    public var slots: Int
    /// The members at the end of the run.
    public var finalMembers: [Int]

    /// At least this many members at all times (N = 3 replicas).
    public static let minimumMembers = 3

    public init(seed: UInt64, nodes: Int, durationMillis: Int, kinds: [FaultKind] = FaultKind.standard,
                membership: MembershipPlan = MembershipPlan()) {
        var rng = SplitMix64(seed: seed)
        // A generator of its own for membership choices: the other faults' draws stay as they
        // would be without them.
        var memberRNG = SplitMix64(seed: seed ^ 0x6D65_6D62_6572_7368)
        let regular = (FaultKind.standard + [.wipeDisk, .corruptTable]).filter { kinds.contains($0) }
        let changes = kinds.contains(.membership) ? membership.order(nodes: nodes, minimum: Self.minimumMembers) : []
        let changeTimes = changes.indices.map { k in durationMillis * 8 / 10 * (k + 1) / (changes.count + 1) }
        var members = Array(0..<nodes)
        var nextSlot = nodes
        var faults: [ScheduledFault] = []
        var nextChange = 0
        var t = 2000 + Int(rng.next(below: 2000))   // let the workload start first
        // Leave the last stretch quiet: the run ends with everything healed.
        func placeChange() {
            t = max(t, changeTimes[nextChange])
            let before = members
            let fault: Fault
            switch changes[nextChange] {
            case .join:
                fault = .join(nextSlot)
                members.append(nextSlot)
                nextSlot += 1
            case .leave, .remove:
                let candidates = members.filter { $0 != 0 }
                let node = candidates[Int(memberRNG.next(below: UInt64(candidates.count)))]
                fault = changes[nextChange] == .leave ? .leave(node) : .remove(node)
                members.removeAll { $0 == node }
            }
            faults.append(ScheduledFault(atMillis: t, durationMillis: 0, fault: fault, members: before))
            nextChange += 1
            t += 1000   // the next faults run while its transfers do
        }
        while t < durationMillis - 4000 {
            if nextChange < changes.count && (changeTimes[nextChange] <= t || regular.isEmpty) {
                placeChange()
                continue
            }
            if regular.isEmpty { break }
            let length = 2000 + Int(rng.next(below: 4000))
            let fault = Self.draw(&rng, members: members, kinds: regular)
            faults.append(ScheduledFault(atMillis: t, durationMillis: min(length, durationMillis - 3000 - t), fault: fault, members: members))
            t += length + 1000 + Int(rng.next(below: 2000))
        }
        // A long fault can step over the last change's time: it still happens, at the end.
        while nextChange < changes.count { placeChange() }
        self.faults = faults
        slots = nextSlot
        finalMembers = members
    }

    /// One fault of the `kinds` (a non-empty selection, in `FaultKind.standard` order) on
    /// `members`.
    static func draw(_ rng: inout SplitMix64, members: [Int], kinds: [FaultKind]) -> Fault {
        let count = members.count
        let index = Int(rng.next(below: UInt64(count)))
        let node = members[index]
        let other = members[(index + 1 + Int(rng.next(below: UInt64(max(count - 1, 1))))) % count]
        switch kinds[Int(rng.next(below: UInt64(kinds.count)))] {
        case .isolate: return .isolate(node)
        case .split:
            let size = max(1, (count - 1) / 2)
            var minority = Set<Int>()
            while minority.count < size { minority.insert(members[Int(rng.next(below: UInt64(count)))]) }
            return .split(minority: minority.sorted())
        case .bridge: return .bridge(center: node)
        case .oneWay: return .oneWay(from: node, to: other)
        case .kill: return .kill(node)
        case .pause: return .pause(node)
        case .delay: return .delay(node: node, millis: 20 + Int(rng.next(below: 200)))
        case .clientSplit:
            let size = max(1, (count - 1) / 2)
            var minority = Set<Int>()
            while minority.count < size { minority.insert(members[Int(rng.next(below: UInt64(count)))]) }
            return .clientSplit(minority: minority.sorted())
        case .wipeDisk: return .wipeDisk(node)
        case .corruptTable: return .corruptTable(node)
        case .drop, .membership: return .drop(node: node, percent: 10 + Int(rng.next(below: 40)))
        }
    }

    /// Membership changes of each sort in the schedule.
    public var joins: Int { faults.count { if case .join = $0.fault { true } else { false } } }
    public var leaves: Int { faults.count { if case .leave = $0.fault { true } else { false } } }
    public var removes: Int { faults.count { if case .remove = $0.fault { true } else { false } } }

    public var text: String {
        faults.map { f in
            String(format: "  %7.1fs  ", Double(f.atMillis) / 1000)
                + (f.fault.isMembershipChange ? "(until done)  " : String(format: "+%4.1fs  ", Double(f.durationMillis) / 1000))
                + f.fault.description
        }.joined(separator: "\n")
    }
}
