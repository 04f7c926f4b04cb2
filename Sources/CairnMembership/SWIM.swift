public import CairnCore
#if canImport(Glibc)
import Glibc
#endif

/// What a member is believed to be. Ordered by precedence at equal incarnation: a suspicion
/// overrides "alive", "dead" overrides both.
public enum MemberStatus: Int, Hashable, Sendable, Comparable, CustomStringConvertible {
    case alive, suspect, dead

    public static func < (a: MemberStatus, b: MemberStatus) -> Bool { a.rawValue < b.rawValue }

    public var description: String {
        switch self {
        case .alive: "alive"
        case .suspect: "suspect"
        case .dead: "dead"
        }
    }
}

/// One piece of gossip: `name` is `status` at `incarnation`. A suspicion names who suspects
/// (`by`), so independent confirmations can be counted (Lifeguard).
public struct MemberUpdate: Hashable, Sendable {
    public var name: NodeName
    public var status: MemberStatus
    public var incarnation: UInt64
    public var by: NodeName?

    public init(name: NodeName, status: MemberStatus, incarnation: UInt64, by: NodeName? = nil) {
        self.name = name
        self.status = status
        self.incarnation = incarnation
        self.by = by
    }
}

/// The failure detector's messages. Every one but `nack` carries gossip.
public enum SWIMMessage: Hashable, Sendable {
    /// "Are you alive?" — answered with `ack` carrying the same sequence.
    case ping(sequence: UInt64, updates: [MemberUpdate])
    /// "Ping `target` for me" — answered with `ack` if the target answered, else `nack`.
    case pingRequest(sequence: UInt64, target: NodeName, updates: [MemberUpdate])
    /// `target` answered the probe numbered `sequence`.
    case ack(sequence: UInt64, target: NodeName, updates: [MemberUpdate])
    /// An indirect prober heard nothing from `target` (Lifeguard: tells the asker that the
    /// helper itself is working, so a silent helper counts against the asker's own health).
    case nack(sequence: UInt64, target: NodeName)
}

/// What the shell must do.
public enum SWIMDirective: Hashable, Sendable {
    case send(to: NodeName, SWIMMessage)
    /// A member's status changed (`from` nil: newly known). Liveness consumers (request routing,
    /// the ring's gossip) follow these.
    case statusChanged(NodeName, from: MemberStatus?, to: MemberStatus, incarnation: UInt64)
}

/// How the failure detector is tuned (memberlist's LAN defaults, scaled to a store's cluster).
public struct SWIMSettings: Hashable, Sendable {
    /// Time between probes of successive members (times the local-health multiplier).
    ///
    /// The defaults (500 ms, 200 ms, α = 5, β = 2) are tuned with `cairn-sim --detection` to the
    /// goals at 5, 16 and 64 members: a crash held dead by every member within 5 s (p50) and
    /// 10 s (p99), no `dead` for a member paused 3 s, < 1 false `dead` per member-day at 5%
    /// message loss. memberlist's LAN values (1 s, 500 ms, 4, 6) detect a crash in ~15 s.
    public var probeInterval: Duration = .milliseconds(500)
    /// How long a direct probe waits for its ack (times the local-health multiplier).
    public var probeTimeout: Duration = .milliseconds(200)
    /// Members asked to probe indirectly (k).
    public var indirectProbes = 3
    /// The suspicion timeout is `suspicionMultiplier × probeInterval` (Lifeguard's α) with k
    /// independent confirmations; with none it is `suspicionMaxMultiplier` times that (β), and
    /// it shrinks towards α as confirmations arrive. It does not grow with the cluster: `dead`
    /// verdicts and refutations are told to every member at once, not gossiped.
    public var suspicionMultiplier = 5
    public var suspicionMaxMultiplier = 2
    /// Lifeguard's local-health multiplier bound: at most this many steps of slowing down.
    public var maxLocalHealth = 8
    /// Gossip updates piggybacked on one message, and how many times each is sent per
    /// `log2(n + 1)`.
    public var maxPiggyback = 8
    public var retransmitMultiplier = 3
    /// Indirect probes this member runs for others at once; requests past it are ignored (the
    /// asker counts a missing nack against its own health, as for a slow helper).
    public var maxRelays = 64
    /// How often one member held dead is pinged anyway, telling it so. Members stay in the ring
    /// while dead, and after a partition heals both sides may hold each other dead and probe no
    /// one across it: this ping is how they find each other again (the dead one refutes).
    public var deadProbeInterval: Duration = .seconds(2)
    public init() {}
}

/// SWIM failure detection with Lifeguard's refinements, as a pure state machine (no I/O, no
/// clock, no randomness of its own: time comes with every event, the probe order from a seed).
///
/// Protocol: every `probeInterval` the instance pings the next member of a shuffled round robin;
/// with no ack within `probeTimeout` it asks `indirectProbes` others to ping it (`pingRequest`);
/// with no ack through them either, it suspects the member and gossips the suspicion. A suspicion
/// becomes `dead` after the suspicion timeout, which shrinks with independent confirmations; the
/// member itself refutes it by gossiping `alive` with a higher incarnation. Lifeguard: the local
/// health multiplier (LHM) grows when this instance's own probes fail, when helpers fail to nack
/// and when it has to refute a suspicion of itself, and slows its probing and timeouts down, so a
/// slow or overloaded member does not accuse healthy ones.
///
/// Invariants: an incarnation only grows; a status change at equal incarnation only moves towards
/// `dead`; `dead` is left only for `alive` at a higher incarnation (the member came back).
/// Isolation: a value type; the shell owns it and feeds it events in order.
public struct SWIMInstance: Sendable {
    public let me: NodeName
    public let settings: SWIMSettings
    public private(set) var incarnation: UInt64 = 0
    /// 0 (healthy) ... `settings.maxLocalHealth`.
    public private(set) var localHealth = 0
    /// Set by `leave()`.
    public private(set) var left = false

    struct Member: Hashable, Sendable {
        var status: MemberStatus
        var incarnation: UInt64
        /// While suspect: when the suspicion began here and who confirmed it.
        var suspectedAt: ContinuousClock.Instant?
        var confirmations: Set<NodeName> = []
    }

    enum Phase: Hashable, Sendable {
        case direct
        case indirect(helpers: Int, nacks: Int)
    }

    struct Probe: Hashable, Sendable {
        let target: NodeName
        let sequence: UInt64
        var phase: Phase
        var deadline: ContinuousClock.Instant
    }

    /// A ping sent on another member's behalf: answer `origin` with ack or nack.
    struct Relay: Hashable, Sendable {
        let origin: NodeName
        let originSequence: UInt64
        let target: NodeName
        let deadline: ContinuousClock.Instant
    }

    private(set) var members: [NodeName: Member] = [:]
    private var probe: Probe?
    private var relays: [UInt64: Relay] = [:]
    private var nextProbeAt: ContinuousClock.Instant
    private var nextDeadProbeAt: ContinuousClock.Instant
    /// Round robin over the members held dead (by name), for `deadProbeInterval`.
    private var lastDeadProbed: NodeName?
    private var order: [NodeName] = []
    private var sequence: UInt64 = 0
    private var rng: SplitMix64
    /// Gossip waiting to be piggybacked, with how often each was sent.
    private var gossip: [NodeName: (update: MemberUpdate, sent: Int)] = [:]

    public init(me: NodeName, settings: SWIMSettings = SWIMSettings(), seed: UInt64, now: ContinuousClock.Instant) {
        self.me = me
        self.settings = settings
        rng = SplitMix64(seed: seed)
        nextProbeAt = now
        nextDeadProbeAt = now + settings.deadProbeInterval
        enqueue(MemberUpdate(name: me, status: .alive, incarnation: 0))
    }

    // MARK: Queries

    public func status(of node: NodeName) -> MemberStatus? { members[node]?.status }

    public func incarnation(of node: NodeName) -> UInt64? { members[node]?.incarnation }

    /// Members other than this one, by name.
    public var memberNames: [NodeName] { members.keys.sorted() }

    /// The earliest instant at which `tick` has something to do.
    public var nextDeadline: ContinuousClock.Instant {
        // The next probe starts only once the one in flight has ended (at its deadline at the
        // latest), so while one is in flight its deadline is what matters.
        var d = probe?.deadline ?? nextProbeAt
        if members.values.contains(where: { $0.status == .dead }) { d = min(d, nextDeadProbeAt) }
        for r in relays.values { d = min(d, r.deadline) }
        for (_, m) in members { if let at = m.suspectedAt { d = min(d, at + suspicionTimeout(confirmations: m.confirmations.count)) } }
        return d
    }

    // MARK: Events

    /// A member this instance learns of outside gossip (configuration, a join): alive at
    /// incarnation 0 unless already known.
    public mutating func add(_ node: NodeName) -> [SWIMDirective] {
        guard node != me, members[node] == nil else { return [] }
        return apply(MemberUpdate(name: node, status: .alive, incarnation: 0), now: nil)
    }

    /// This member leaves for good (its data is handed off): tells every member it is dead at a
    /// new incarnation, so they stop probing it at once instead of suspecting it first. From
    /// then on it refutes nothing.
    public mutating func leave() -> [SWIMDirective] {
        left = true
        incarnation += 1
        let gone = MemberUpdate(name: me, status: .dead, incarnation: incarnation, by: me)
        return members.keys.sorted().map { n in
            sequence += 1
            return .send(to: n, .ping(sequence: sequence, updates: [gone]))
        }
    }

    /// Pings every member once (a process that has just started: a member holding it dead from
    /// before answers so, and it refutes at once).
    public mutating func announce() -> [SWIMDirective] {
        let updates = piggyback()
        return members.keys.sorted().map { n in
            sequence += 1
            return .send(to: n, .ping(sequence: sequence, updates: updates))
        }
    }

    /// Forgets `node` (it left the cluster): no more probes of it, no gossip about it, and a
    /// probe of it in flight is dropped. Gossip heard later about it adds it back.
    public mutating func remove(_ node: NodeName) {
        guard node != me else { return }
        members[node] = nil
        gossip[node] = nil
        order.removeAll { $0 == node }
        if probe?.target == node { probe = nil }
        relays = relays.filter { $0.value.target != node && $0.value.origin != node }
    }

    /// Drives probes, indirect probes, relays and suspicion timeouts up to `now`.
    public mutating func tick(now: ContinuousClock.Instant) -> [SWIMDirective] {
        var out: [SWIMDirective] = []
        // Suspicions that ran out.
        for name in members.keys.sorted() {
            guard let m = members[name], m.status == .suspect, let at = m.suspectedAt,
                  now >= at + suspicionTimeout(confirmations: m.confirmations.count) else { continue }
            let verdict = MemberUpdate(name: name, status: .dead, incarnation: m.incarnation)
            // Told to every member at once (the dead one included, in case it lives): each
            // stops routing to it now rather than when gossip reaches it, so detection does not
            // wait on O(log n) rounds of dissemination.
            out += apply(verdict, now: now) + broadcast(verdict)
        }
        // Relays that heard nothing: nack the asker.
        for seq in relays.keys.sorted() {
            guard let r = relays[seq], now >= r.deadline else { continue }
            relays[seq] = nil
            out.append(.send(to: r.origin, .nack(sequence: r.originSequence, target: r.target)))
        }
        // The probe in flight.
        if var p = probe, now >= p.deadline {
            switch p.phase {
            case .direct:
                let helpers = pickHelpers(excluding: p.target)
                if helpers.isEmpty {
                    out += probeFailed(p, now: now)
                } else {
                    p.phase = .indirect(helpers: helpers.count, nacks: 0)
                    p.deadline = now + scaled(settings.probeTimeout)
                    probe = p
                    for h in helpers {
                        out.append(.send(to: h, .pingRequest(sequence: p.sequence, target: p.target, updates: piggyback())))
                    }
                }
            case .indirect(let helpers, let nacks):
                // Lifeguard: every helper that did not even nack counts against our own health.
                if nacks < helpers { adjustHealth(+1) }
                out += probeFailed(p, now: now)
            }
        }
        // The next probe.
        if probe == nil, now >= nextProbeAt, let target = nextTarget() {
            sequence += 1
            probe = Probe(target: target, sequence: sequence, phase: .direct, deadline: now + scaled(settings.probeTimeout))
            nextProbeAt = now + scaled(settings.probeInterval)
            out.append(.send(to: target, .ping(sequence: sequence, updates: piggyback())))
        } else if probe == nil, now >= nextProbeAt {
            nextProbeAt = now + scaled(settings.probeInterval)
        }
        // One member held dead, told so.
        if now >= nextDeadProbeAt {
            nextDeadProbeAt = now + settings.deadProbeInterval
            let dead = members.filter { $0.value.status == .dead }.keys.sorted()
            let last = lastDeadProbed
            if let target = dead.first(where: { name in last.map { name > $0 } ?? true }) ?? dead.first, let m = members[target] {
                lastDeadProbed = target
                sequence += 1
                let told = MemberUpdate(name: target, status: .dead, incarnation: m.incarnation, by: me)
                out.append(.send(to: target, .ping(sequence: sequence, updates: piggyback() + [told])))
            }
        }
        return out
    }

    /// A message from `from`.
    public mutating func received(_ message: SWIMMessage, from: NodeName, now: ContinuousClock.Instant) -> [SWIMDirective] {
        var out: [SWIMDirective] = []
        switch message {
        case .ping(let seq, let updates):
            out += merge(updates, now: now)
            out += add(from)
            var reply = piggyback()
            // A member pinging us that we hold suspect or dead may never have heard so (the
            // gossip about it went to others): tell it, so it refutes with a higher incarnation.
            if let m = members[from], m.status != .alive, !reply.contains(where: { $0.name == from }) {
                reply.append(MemberUpdate(name: from, status: m.status, incarnation: m.incarnation, by: me))
            }
            out.append(.send(to: from, .ack(sequence: seq, target: me, updates: reply)))
        case .pingRequest(let seq, let target, let updates):
            out += merge(updates, now: now)
            guard relays.count < settings.maxRelays else { break }
            sequence += 1
            relays[sequence] = Relay(origin: from, originSequence: seq, target: target, deadline: now + scaled(settings.probeTimeout))
            out.append(.send(to: target, .ping(sequence: sequence, updates: piggyback())))
        case .ack(let seq, let target, let updates):
            out += merge(updates, now: now)
            if let r = relays.removeValue(forKey: seq) {
                out.append(.send(to: r.origin, .ack(sequence: r.originSequence, target: r.target, updates: piggyback())))
            } else if let p = probe, p.sequence == seq, p.target == target {
                probe = nil
                adjustHealth(-1)
            }
        case .nack(let seq, _):
            if var p = probe, p.sequence == seq, case .indirect(let helpers, let nacks) = p.phase {
                p.phase = .indirect(helpers: helpers, nacks: nacks + 1)
                probe = p
            }
        }
        return out
    }

    // MARK: Internals

    /// The Lifeguard suspicion timeout for `c` independent confirmations:
    /// max(min, max − (max − min) · log(c + 1) / log(k + 1)).
    func suspicionTimeout(confirmations c: Int) -> Duration {
        // Not scaled by log(n), as SWIM's gossip-only dissemination needs: verdicts of `dead`
        // and refutations reach every member at once (`broadcast`), so how long a refutation
        // takes does not grow with the cluster.
        let base = settings.probeInterval * Double(settings.suspicionMultiplier)
        let longest = base * Double(settings.suspicionMaxMultiplier)
        let k = Double(max(settings.indirectProbes, 1))
        let fraction = log(Double(c) + 1) / log(k + 1)
        return max(base, longest - (longest - base) * fraction)
    }

    private func scaled(_ d: Duration) -> Duration { d * (localHealth + 1) }

    private mutating func adjustHealth(_ delta: Int) {
        localHealth = min(max(localHealth + delta, 0), settings.maxLocalHealth)
    }

    private mutating func probeFailed(_ p: Probe, now: ContinuousClock.Instant) -> [SWIMDirective] {
        probe = nil
        adjustHealth(+1)
        guard let m = members[p.target], m.status == .alive else { return [] }
        let verdict = MemberUpdate(name: p.target, status: .suspect, incarnation: m.incarnation, by: me)
        return apply(verdict, now: now) + tell(verdict)
    }

    /// Sends a verdict about a member to that member at once (Lifeguard's buddy system): if it
    /// can hear us it refutes now, instead of when gossip happens to reach it.
    /// Sends `update` to every member at once, each in a ping of its own.
    private mutating func broadcast(_ update: MemberUpdate) -> [SWIMDirective] {
        members.keys.sorted().map { n in
            sequence += 1
            return .send(to: n, .ping(sequence: sequence, updates: [update]))
        }
    }

    private mutating func tell(_ verdict: MemberUpdate) -> [SWIMDirective] {
        sequence += 1
        return [.send(to: verdict.name, .ping(sequence: sequence, updates: [verdict]))]
    }

    /// The next member to probe: round robin over a shuffled list of the members not known dead,
    /// reshuffled after each pass (SWIM's bounded detection time).
    private mutating func nextTarget() -> NodeName? {
        while true {
            if order.isEmpty {
                order = members.keys.filter { members[$0]?.status != .dead }.sorted()
                guard !order.isEmpty else { return nil }
                for i in stride(from: order.count - 1, to: 0, by: -1) { order.swapAt(i, Int(rng.next(below: UInt64(i + 1)))) }
            }
            let next = order.removeFirst()
            if let m = members[next], m.status != .dead { return next }
        }
    }

    private mutating func pickHelpers(excluding target: NodeName) -> [NodeName] {
        var candidates = members.keys.filter { $0 != target && members[$0]?.status == .alive }.sorted()
        for i in stride(from: candidates.count - 1, to: 0, by: -1) { candidates.swapAt(i, Int(rng.next(below: UInt64(i + 1)))) }
        return Array(candidates.prefix(settings.indirectProbes))
    }

    private mutating func merge(_ updates: [MemberUpdate], now: ContinuousClock.Instant) -> [SWIMDirective] {
        updates.flatMap { apply($0, now: now) }
    }

    /// Applies one update by SWIM's precedence rules; refutes suspicions and deaths of itself.
    private mutating func apply(_ u: MemberUpdate, now: ContinuousClock.Instant?) -> [SWIMDirective] {
        if u.name == me {
            guard u.status != .alive, !left else { return [] }
            // A verdict at an older incarnation than ours is stale, but whoever spreads it has
            // not heard our refutation: repeat it (without raising the incarnation again).
            let fresh = u.incarnation >= incarnation
            if fresh {
                incarnation = u.incarnation + 1
                adjustHealth(+1)
            }
            let alive = MemberUpdate(name: me, status: .alive, incarnation: incarnation)
            enqueue(alive)
            // Held dead, this member routes no requests here; held suspect, it is about to be
            // (every member's suspicion timer runs, and a `dead` verdict is told to all at once):
            // tell everyone at once rather than by piggyback over O(log n) probe rounds. A
            // suspicion is refuted so once per incarnation; stale copies only re-gossip it.
            guard u.status == .dead || fresh else { return [] }
            return broadcast(alive)
        }
        let current = members[u.name]
        if let c = current {
            let newer = u.incarnation > c.incarnation
            let same = u.incarnation == c.incarnation
            switch (c.status, u.status) {
            case (.suspect, .suspect) where same:
                // An independent confirmation shortens the suspicion (Lifeguard).
                if let by = u.by, by != me, !members[u.name, default: c].confirmations.contains(by) {
                    members[u.name]?.confirmations.insert(by)
                    enqueue(u)
                }
                return []
            case (.dead, .alive) where newer: break
            case (.dead, _): return []
            case (_, .alive) where newer: break
            case (_, .alive): return []
            case (_, _) where newer || (same && u.status > c.status): break
            default: return []
            }
        } else if u.status == .dead {
            // A member first heard of as dead is remembered so it is not re-added as alive.
            members[u.name] = Member(status: .dead, incarnation: u.incarnation)
            return []
        }
        var m = Member(status: u.status, incarnation: u.incarnation)
        if u.status == .suspect {
            m.suspectedAt = now ?? current?.suspectedAt
            if let by = u.by, by != me { m.confirmations = [by] }
        }
        members[u.name] = m
        enqueue(u)
        return [.statusChanged(u.name, from: current?.status, to: u.status, incarnation: u.incarnation)]
    }

    private mutating func enqueue(_ u: MemberUpdate) {
        gossip[u.name] = (u, 0)
    }

    /// Up to `maxPiggyback` updates, least sent first (ties: by name); each is dropped after
    /// `retransmitMultiplier × ⌈log2(n + 1)⌉` sends.
    private mutating func piggyback() -> [MemberUpdate] {
        let limit = settings.retransmitMultiplier * max(1, Int(log2(Double(members.count + 2)).rounded(.up)))
        let picked = gossip.values.sorted { ($0.sent, $0.update.name) < ($1.sent, $1.update.name) }.prefix(settings.maxPiggyback)
        var out: [MemberUpdate] = []
        for entry in picked {
            out.append(entry.update)
            let sent = entry.sent + 1
            gossip[entry.update.name] = sent >= limit ? nil : (entry.update, sent)
        }
        return out
    }
}
