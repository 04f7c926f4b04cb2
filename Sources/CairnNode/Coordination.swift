public import CairnCore

/// One replica a coordinator may talk to: a primary of the key, or a fallback (the next nodes
/// on the ring) that stands in for a primary that is down.
public struct ReplicaTarget: Hashable, Sendable {
    public var node: NodeName
    public var address: String
    public var isPrimary: Bool
    public var isLocal: Bool
    /// For a fallback chosen by sloppy quorum: the primary whose share it takes.
    public var standsInFor: NodeName?

    public init(node: NodeName, address: String, isPrimary: Bool, isLocal: Bool, standsInFor: NodeName? = nil) {
        self.node = node
        self.address = address
        self.isPrimary = isPrimary
        self.isLocal = isLocal
        self.standsInFor = standsInFor
    }

    public var role: ReplicaRole { isPrimary ? .primary : .fallback(for: standsInFor?.value ?? "") }
    /// The primary that misses the request if this replica does: itself, or the one it stands in for.
    var home: NodeName? { isPrimary ? node : standsInFor }
}

/// Who takes part in a request (pure): every primary of the key (those down are reported, not
/// sent to), and under sloppy quorum, for each primary that is down, the next fallback that is
/// not down, in ring order. A write coordinator that is itself a fallback (`coordinatorIsFallback`:
/// a forwarding node reached no primary) always takes part, standing in for the first primary
/// that is down (or, seeing none down, for the first one: its copy is handed to the primaries
/// like any fallback copy).
///
/// `unplaced`: primaries that are down and got no fallback (fewer live nodes than N + down
/// primaries): a write keeps a hint for each.
public enum ReplicaSelection {
    public static func choose(_ candidates: [ReplicaTarget], down: [NodeName: String], sloppy: Bool, coordinatorIsFallback: Bool = false)
        -> (replicas: [ReplicaTarget], unplaced: [NodeName]) {
        let primaries = candidates.primaries
        // The common case, nothing known down: the primaries, and no fallback to choose.
        if down.isEmpty, !coordinatorIsFallback { return (primaries, []) }
        let downPrimaries = primaries.filter { !$0.isLocal && down[$0.node] != nil }.map(\.node)
        guard sloppy else { return (primaries, downPrimaries) }
        let forced = coordinatorIsFallback ? candidates.first { !$0.isPrimary && $0.isLocal } : nil
        var free = candidates.filter { !$0.isPrimary && $0 != forced && ($0.isLocal || down[$0.node] == nil) }
        var chosen: [ReplicaTarget] = []
        var uncovered = downPrimaries
        if var me = forced {
            me.standsInFor = uncovered.isEmpty ? primaries.first?.node : uncovered.removeFirst()
            chosen.append(me)
        }
        var unplaced: [NodeName] = []
        for p in uncovered {
            if free.isEmpty {
                unplaced.append(p)
            } else {
                var f = free.removeFirst()
                f.standsInFor = p
                chosen.append(f)
            }
        }
        return (primaries + chosen, unplaced)
    }
}

extension Array where Element == ReplicaTarget {
    /// The primaries among these targets, in order: the array itself when every one is (the
    /// common case, which then costs no copy).
    var primaries: [ReplicaTarget] { allSatisfy(\.isPrimary) ? self : filter(\.isPrimary) }
}

extension Array {
    /// Appends, reserving room for a few elements at the first append (one allocation where
    /// appending one by one to an empty array would grow it twice).
    @inline(__always)
    mutating func appendReserving(_ element: Element) {
        if capacity == 0 { reserveCapacity(4) }
        append(element)
    }
}

/// `a + b`, without building a new array when either is empty (most directive lists are).
@inline(__always)
func joined<T>(_ a: [T], _ b: [T]) -> [T] { a.isEmpty ? b : (b.isEmpty ? a : a + b) }

/// Bookkeeping shared by the read and write machines: who was asked, who answered, and what
/// the requirement needs. Pure.
struct QuorumTally: Sendable {
    let operation: OperationKind
    let requirement: QuorumRequirement
    let replicas: [ReplicaTarget]
    /// One per replica, in `replicas`' order (one array for what the tally learns).
    private var slots: [Slot]
    /// Acknowledgements so far.
    private var ackCount = 0

    private struct Slot: Sendable {
        var outcome: ReplicaOutcome?
        /// The place of its acknowledgement in arrival order, from 1 (0: none), for the receipt.
        var ackOrder = 0
        /// Whether its acknowledgement said its copy was durable.
        var durable = false
    }

    init(operation: OperationKind, requirement: QuorumRequirement, replicas: [ReplicaTarget]) {
        self.operation = operation
        self.requirement = requirement
        self.replicas = replicas
        slots = Array(repeating: Slot(), count: replicas.count)
    }

    /// Each replica's outcome so far (nil: none yet), in `replicas`' order.
    var outcomes: [ReplicaOutcome?] { slots.map(\.outcome) }

    func outcome(at i: Int) -> ReplicaOutcome? { slots[i].outcome }

    /// Whether replica `i` acknowledged with a durable copy.
    private func durable(_ i: Int) -> Bool { slots[i].durable }

    func index(of node: NodeName) -> Int? { replicas.firstIndex { $0.node == node } }

    /// Records the first outcome for `node`; later ones (duplicates, late replies) are ignored.
    mutating func record(_ node: NodeName, _ outcome: ReplicaOutcome, durable isDurable: Bool = false) -> Bool {
        guard let i = index(of: node), slots[i].outcome == nil else { return false }
        slots[i].outcome = outcome
        if outcome == .acknowledged {
            ackCount += 1
            slots[i].ackOrder = ackCount
            slots[i].durable = isDurable
        }
        return true
    }

    /// Every acknowledgement so far, in arrival order: the durability receipt.
    var receipt: [ReplicaAck] {
        var out: [ReplicaAck] = []
        out.reserveCapacity(ackCount)
        // A few replicas at most (n_val ≤ 16, plus fallbacks): a scan per place.
        for place in stride(from: 1, through: ackCount, by: 1) {
            guard let i = slots.firstIndex(where: { $0.ackOrder == place }) else { continue }
            out.append(ReplicaAck(node: replicas[i].node.value, role: replicas[i].role, durable: slots[i].durable))
        }
        return out
    }

    var acks: Int { slots.count { $0.outcome == .acknowledged } }
    var primaryAcks: Int { replicas.indices.count { replicas[$0].isPrimary && slots[$0].outcome == .acknowledged } }
    var pending: Int { slots.count { $0.outcome == nil } }
    var pendingPrimaries: Int { replicas.indices.count { replicas[$0].isPrimary && slots[$0].outcome == nil } }
    var primaries: Int { replicas.count { $0.isPrimary } }
    var pendingNodes: [NodeName] { pendingNodes(includingLocal: true) }

    /// The replicas yet to report (the local one left out unless `includingLocal`), in order.
    func pendingNodes(includingLocal: Bool) -> [NodeName] {
        var out: [NodeName] = []
        for (i, r) in replicas.enumerated() where slots[i].outcome == nil && (includingLocal || !r.isLocal) { out.append(r.node) }
        return out
    }

    var satisfied: Bool { acks >= requirement.required && primaryAcks >= requirement.primaryRequired }

    /// The failure to report if the requirement can no longer be met, else nil.
    func impossible() -> QuorumFailure? {
        if acks + pending < requirement.required {
            return failure(.notReached, name: requirement.name, required: requirement.required, achieved: acks, candidates: replicas.count)
        }
        if primaryAcks + pendingPrimaries < requirement.primaryRequired {
            return failure(.notReached, name: "P" + requirement.name, required: requirement.primaryRequired,
                           achieved: primaryAcks, candidates: primaries)
        }
        return nil
    }

    /// Marks every replica in `down` as not sent and reports `unavailable` if too few remain.
    mutating func excludeDown(_ down: [NodeName: String]) -> QuorumFailure? {
        for (i, r) in replicas.enumerated() where !r.isLocal {
            if let why = down[r.node] { slots[i].outcome = .notSent(why) }
        }
        let reachable = pending
        let reachablePrimaries = pendingPrimaries
        if reachable < requirement.required {
            return failure(.unavailable, name: requirement.name, required: requirement.required, achieved: reachable, candidates: replicas.count)
        }
        if reachablePrimaries < requirement.primaryRequired {
            return failure(.unavailable, name: "P" + requirement.name, required: requirement.primaryRequired,
                           achieved: reachablePrimaries, candidates: primaries)
        }
        return nil
    }

    /// Replaces the recorded outcome of these replicas (a blocking read's stale answers).
    mutating func override(_ outcomes: [NodeName: ReplicaOutcome]) {
        for (n, o) in outcomes { if let i = index(of: n) { slots[i].outcome = o } }
    }

    mutating func expire(afterMillis ms: UInt32) {
        for i in slots.indices where slots[i].outcome == nil { slots[i].outcome = .timedOut(afterMillis: ms) }
    }

    func failure(_ kind: QuorumFailure.Kind, name: String, required: Int, achieved: Int, candidates: Int) -> QuorumFailure {
        let reports = replicas.indices.map { i in
            ReplicaReport(node: replicas[i].node.value, address: replicas[i].address, role: replicas[i].role,
                          outcome: slots[i].outcome ?? (kind == .unavailable ? .acknowledged : .noAnswerYet), durable: durable(i))
        }
        // For `unavailable`, reachable replicas were never contacted; list only the down ones.
        let shown = kind == .unavailable ? reports.filter { if case .notSent = $0.outcome { true } else { false } } : reports
        return QuorumFailure(kind: kind, operation: operation, requirement: name, required: required, achieved: achieved,
                             candidates: candidates, replicas: shown)
    }
}

/// The write coordinator's protocol, as a pure state machine.
///
/// The coordinator is always one of the write's replicas: a primary (other nodes forward to
/// one), or, when no primary could be reached, a fallback. It stamps the write on its own vnode
/// first (the new version), then replicates the resulting object to the other reachable replicas
/// while its own copy becomes durable (`localStamped`, then `localApplied` or `localFailed`), and
/// answers once W acknowledgements (PW from primaries) are in. Replicating before the local sync
/// shows a dot before it is durable here; a node therefore takes a fresh actor epoch after every
/// unclean shutdown (`DiskBackend`), so a dot lost with an unsynced write is never reissued.
/// Under sloppy quorum a primary that is down is replaced by a fallback (`ReplicaSelection`). It
/// keeps listening until every replica answered or the deadline passed.
///
/// Hints: every primary that will miss the write — down with no fallback, or sent to and failed
/// or silent, or whose fallback failed — is named once in a `keepHint` directive, after the local
/// apply (there is an object to keep). A primary whose fallback acknowledged gets no hint: the
/// fallback's copy reaches it by handoff. The shell reports each kept with `hintKept`. An
/// acknowledgement waits for the hints asked for before it (a coordinator that crashes right after
/// answering still replays them: a primary that missed an acknowledged write always has a hint
/// or a fallback copy coming), unless the deadline passed (the W copies are what was promised);
/// the machine finishes only once every hint is kept.
///
/// Truthfulness: `unavailable` is only ever reported before anything is applied; once the local
/// vnode stamped the write, every failure is `notReached` (the outcome is unknown), the local
/// copy's failure included (it counts as that replica's).
public struct WriteCoordination: Sendable {
    public enum Directive: Hashable, Sendable {
        /// Stamp and store the write on the local vnode; report `localStamped` once stored (not
        /// yet durable), then `localApplied` once durable, or `localFailed` / `localRejected`.
        case applyLocally
        /// Send the stamped object to these replicas; report each with `replicaAcked` / `replicaFailed`.
        case replicate(to: [NodeName])
        /// Keep a durable hint of the stamped object for each of these primaries; report
        /// `hintKept` once done.
        case keepHint(for: [NodeName])
        case respond(WriteOutcome)
        /// Nothing more will happen; the shell may release the request.
        case finish
    }

    public enum WriteOutcome: Hashable, Sendable {
        case acknowledged
        case quorumFailed(QuorumFailure)
        /// The coordinator's own vnode failed while applying the write (a storage error); nothing
        /// was replicated. Whether the local copy changed is unknown.
        case coordinatorFailed(String)
        /// The local apply did not finish before the deadline; nothing was replicated, the local
        /// write may still complete: outcome unknown.
        case coordinatorTimedOut(afterMillis: UInt32)
        /// The write is invalid for this key (e.g. its clock would exceed the actor limit): certainly
        /// not applied.
        case rejected(String)
    }

    private let candidates: [ReplicaTarget]
    private let sloppy: Bool
    private let coordinatorIsFallback: Bool
    private var tally: QuorumTally
    private let timeoutMillis: UInt32
    private var responded = false
    private var finished = false
    /// The local vnode stamped the write: there is an object, and it went to the replicas.
    private var stamped = false
    /// The local copy is durable (acknowledged), or failed after stamping.
    private var localDone = false
    private var unplaced: [NodeName] = []
    private var hinted: Set<NodeName> = []
    /// `keepHint` directives not yet reported kept.
    private var hintsPending = 0
    /// W is met and the acknowledgement waits for `hintsPending` to reach zero.
    private var acknowledgementHeld = false
    private var pastDeadline = false

    /// `replicas`: the key's primaries in preference order, then its fallback candidates in ring
    /// order (used only under `sloppy`, for primaries that are down). When the local one is a
    /// fallback, this node coordinates as that fallback (`ReplicaSelection`).
    public init(operation: OperationKind, requirement: QuorumRequirement, replicas: [ReplicaTarget], timeoutMillis: UInt32,
                sloppy: Bool = true) {
        candidates = replicas
        self.sloppy = sloppy
        coordinatorIsFallback = replicas.contains { $0.isLocal && !$0.isPrimary }
        tally = QuorumTally(operation: operation, requirement: requirement, replicas: replicas.primaries)
        self.timeoutMillis = timeoutMillis
    }

    public var isFinished: Bool { finished }
    /// W is met and the acknowledgement waits for hints to be kept.
    public var isHoldingAcknowledgement: Bool { acknowledgementHeld }
    public var outcomes: [ReplicaOutcome?] { tally.outcomes }
    /// The replicas taking part (chosen at `start`).
    public var replicas: [ReplicaTarget] { tally.replicas }
    /// The acknowledgements so far, in arrival order (the coordinator's own first).
    public var receipt: [ReplicaAck] { tally.receipt }

    /// `down`: replicas the shell believes unreachable, with the reason.
    public mutating func start(down: [NodeName: String]) -> [Directive] {
        let (chosen, unplaced) = ReplicaSelection.choose(candidates, down: down, sloppy: sloppy, coordinatorIsFallback: coordinatorIsFallback)
        // Kept when it is the tally made at init, untouched (the primaries: the common case).
        if chosen != tally.replicas || tally.pending != chosen.count {
            tally = QuorumTally(operation: tally.operation, requirement: tally.requirement, replicas: chosen)
        }
        self.unplaced = unplaced
        if let failure = tally.excludeDown(down) {
            return conclude(.quorumFailed(failure))
        }
        return [.applyLocally]
    }

    /// The local vnode stored the stamped write (not yet durable): it goes to the other replicas
    /// now, and hints are kept for the primaries that cannot get it.
    public mutating func localStamped() -> [Directive] {
        guard !finished, !stamped else { return [] }
        stamped = true
        let others = tally.pendingNodes(includingLocal: false)
        return joined(others.isEmpty ? [] : [.replicate(to: others)], hints(for: unplaced))
    }

    /// The local copy is durable: it counts. Reported without `localStamped` first, it stands for
    /// both (stored and durable at once).
    public mutating func localApplied(durable: Bool = false) -> [Directive] {
        guard !finished, !localDone, let me = tally.replicas.first(where: \.isLocal) else { return [] }
        let sent = localStamped()
        localDone = true
        _ = tally.record(me.node, .acknowledged, durable: durable)
        return joined(sent, evaluate())
    }

    /// The local vnode failed. Before stamping nothing went anywhere: the coordinator failed.
    /// After, the write is out with the replicas: the local copy counts as a failed replica.
    public mutating func localFailed(_ reason: String) -> [Directive] {
        guard !finished, !localDone else { return [] }
        guard stamped, let me = tally.replicas.first(where: \.isLocal) else { return conclude(.coordinatorFailed(reason)) }
        localDone = true
        guard tally.record(me.node, .failed(reason)) else { return [] }
        return evaluate()
    }

    public mutating func localRejected(_ reason: String) -> [Directive] {
        guard !finished, !stamped else { return [] }
        return conclude(.rejected(reason))
    }

    public mutating func replicaAcked(_ node: NodeName, durable: Bool = false) -> [Directive] {
        guard !finished, stamped, tally.record(node, .acknowledged, durable: durable) else { return [] }
        return evaluate()
    }

    public mutating func replicaFailed(_ node: NodeName, _ outcome: ReplicaOutcome) -> [Directive] {
        guard !finished, stamped, tally.record(node, outcome) else { return [] }
        let home = tally.replicas.first { $0.node == node }?.home
        return joined(hints(for: home.map { [$0] } ?? []), evaluate())
    }

    /// A `keepHint` directive was performed (the hints are durable, or keeping them failed and was
    /// reported elsewhere).
    public mutating func hintKept() -> [Directive] {
        guard hintsPending > 0 else { return [] }
        hintsPending -= 1
        return evaluate()
    }

    public mutating func deadlinePassed() -> [Directive] {
        guard !finished else { return [] }
        pastDeadline = true
        let silent = tally.replicas.indices.filter { tally.outcome(at: $0) == nil }.compactMap { tally.replicas[$0].home }
        tally.expire(afterMillis: timeoutMillis)
        if !stamped { return conclude(.coordinatorTimedOut(afterMillis: timeoutMillis)) }
        return joined(hints(for: silent), evaluate())
    }

    /// A `keepHint` for those of `nodes` not hinted yet (never the coordinator itself).
    private mutating func hints(for nodes: [NodeName]) -> [Directive] {
        guard !nodes.isEmpty else { return [] }
        let me = tally.replicas.first(where: \.isLocal)?.node
        let new = nodes.filter { $0 != me && hinted.insert($0).inserted }
        guard !new.isEmpty else { return [] }
        hintsPending += 1
        return [.keepHint(for: new)]
    }

    private mutating func evaluate() -> [Directive] {
        var out: [Directive] = []
        if !responded {
            if tally.satisfied {
                responded = true
                acknowledgementHeld = true
            } else if let failure = tally.impossible() {
                responded = true
                out.appendReserving(.respond(.quorumFailed(failure)))
            }
        }
        if acknowledgementHeld, hintsPending == 0 || pastDeadline {
            acknowledgementHeld = false
            out.appendReserving(.respond(.acknowledged))
        }
        if tally.pending == 0, hintsPending == 0, !finished {
            finished = true
            out.appendReserving(.finish)
        }
        return out
    }

    /// An outcome decided before anything was stamped (so no hint is pending).
    private mutating func conclude(_ outcome: WriteOutcome) -> [Directive] {
        finished = true
        if responded { return [.finish] }
        responded = true
        return [.respond(outcome), .finish]
    }
}

/// The read coordinator's protocol, as a pure state machine.
///
/// Asks every replica taking part (the reachable primaries, and under sloppy quorum a fallback
/// for each primary that is down), answers with the merge (DVVSet sync) of the first R answers
/// (PR of them from primaries), then keeps collecting until all answered or the deadline passed.
/// A replica that has no object counts as an answer ("not found" is a valid answer).
///
/// Read repair: once every answer is in (or the deadline passed), each primary that answered
/// with a copy other than the merge of all answers — stale, or missing — is sent that merge
/// (`repair`): a DVV merge there, never a new version. Fallbacks are not repaired (their copy is
/// handed off). With `ReadRepairMode.blocking` the answer waits for that moment too and counts,
/// towards R and PR, only replicas that hold the merge: those that answered with it and those
/// whose repair was acknowledged. The machine finishes once every repair reported.
public struct ReadCoordination: Sendable {
    public enum Directive: Hashable, Sendable {
        /// Ask these replicas (the local one included, if listed).
        case fetch(from: [NodeName])
        case respond(ReadOutcome)
        /// Merge `object` into these primaries' copies; report each with `repairAcked` / `repairFailed`.
        case repair(targets: [NodeName], object: VersionedObject)
        /// All answers (and repairs) are in, or the deadline passed. `divergent` lists replicas
        /// whose answer differed from the merge of all answers.
        case finish(divergent: [NodeName])
    }

    public enum ReadOutcome: Hashable, Sendable {
        /// The merge of the answers; nil when no replica held the key.
        case answered(VersionedObject?)
        case quorumFailed(QuorumFailure)
    }

    private let candidates: [ReplicaTarget]
    private let sloppy: Bool
    private let mode: ReadRepairMode
    private var tally: QuorumTally
    private let timeoutMillis: UInt32
    /// Each replica's answer, in arrival order: a few at most (n_val ≤ 16 plus fallbacks), so a
    /// scan finds one (`answer(of:)`) without hashing node names.
    private var answers: [(node: NodeName, object: VersionedObject?)] = []
    /// Primaries that answered while refilling (Docs/anti-entropy.md, "Refilling").
    private var refilling: Set<NodeName> = []
    /// Of those, the ones that may hold stale values (away past the hint window).
    private var stale: Set<NodeName> = []
    private var responded = false
    private var finished = false
    /// Repairs sent and not yet reported; nil before the repair decision.
    private var repairing: Set<NodeName>?
    private var repaired: Set<NodeName> = []
    private var repairFailures: [NodeName: String] = [:]
    private var divergent: [NodeName] = []
    private var final: VersionedObject?

    public init(requirement: QuorumRequirement, replicas: [ReplicaTarget], timeoutMillis: UInt32, sloppy: Bool = true,
                repair: ReadRepairMode = .async) {
        candidates = replicas
        self.sloppy = sloppy
        mode = repair
        tally = QuorumTally(operation: .get, requirement: requirement, replicas: replicas.primaries)
        self.timeoutMillis = timeoutMillis
    }

    public var isFinished: Bool { finished }
    /// The replicas taking part (chosen at `start`).
    public var replicas: [ReplicaTarget] { tally.replicas }

    public mutating func start(down: [NodeName: String]) -> [Directive] {
        let chosen = ReplicaSelection.choose(candidates, down: down, sloppy: sloppy).replicas
        if chosen != tally.replicas || tally.pending != chosen.count {
            tally = QuorumTally(operation: .get, requirement: tally.requirement, replicas: chosen)
        }
        if let failure = tally.excludeDown(down) {
            finished = true
            responded = true
            return [.respond(.quorumFailed(failure)), .finish(divergent: [])]
        }
        return [.fetch(from: tally.pendingNodes)]
    }

    /// `refilling`: the replica lost its data and has not completed an exchange for the
    /// partition since (its "not found" is weighed like a fallback's, below).
    /// `stale`: the replica was away past the hint window and has not completed an exchange
    /// since: none of its answers is evidence until every primary is in.
    public mutating func replied(_ node: NodeName, _ object: VersionedObject?, refilling isRefilling: Bool = false, stale isStale: Bool = false) -> [Directive] {
        guard !finished, repairing == nil, tally.record(node, .acknowledged) else { return [] }
        answers.append((node, object))
        if isRefilling || isStale { refilling.insert(node) }
        if isStale { stale.insert(node) }
        return evaluate()
    }

    public mutating func replicaFailed(_ node: NodeName, _ outcome: ReplicaOutcome) -> [Directive] {
        guard !finished, repairing == nil, tally.record(node, outcome) else { return [] }
        return evaluate()
    }

    public mutating func deadlinePassed() -> [Directive] {
        guard !finished, repairing == nil else { return [] }
        tally.expire(afterMillis: timeoutMillis)
        return evaluate()
    }

    public mutating func repairAcked(_ node: NodeName) -> [Directive] {
        guard !finished, repairing?.remove(node) != nil else { return [] }
        repaired.insert(node)
        return concludeRepairs()
    }

    public mutating func repairFailed(_ node: NodeName, _ reason: String) -> [Directive] {
        guard !finished, repairing?.remove(node) != nil else { return [] }
        repairFailures[node] = reason
        return concludeRepairs()
    }

    /// `node`'s answer: nil when it has not answered, `.some(nil)` when it holds nothing.
    private func answer(of node: NodeName) -> VersionedObject?? {
        for a in answers where a.node == node { return .some(a.object) }
        return nil
    }

    private var merged: VersionedObject? {
        var objects = answers.lazy.compactMap(\.object).makeIterator()
        guard let first = objects.next() else { return nil }
        return VersionedObject.sync(first, IteratorSequence(objects))
    }

    /// Fallbacks that answered "not found". A fallback holds only what it took while standing
    /// in, so its miss is no evidence against a value the primaries hold: it counts towards R
    /// only once no primary asked is still to answer (a live primary's copy is never outvoted by
    /// fallbacks that never saw the key).
    private var fallbackMisses: Int {
        tally.replicas.count { r in !r.isPrimary && answer(of: r.node).map { $0 == nil } ?? false }
    }

    /// Refilling primaries that answered "not found", and stale ones that answered at all
    /// (`valuesToo`): a replica refilled by anti-entropy after losing its disk or data may not
    /// have the key yet; one away past the hint window may hold an old version whose deletion it
    /// missed. Such an answer counts towards R and PR only once every primary asked has answered
    /// (not failed, not timed out): with all of them in, the merge is right (a key none holds is
    /// truly absent, as in a new cluster whose nodes all start refilling); with one missing, it
    /// may be the one holding the key. A blocking read repairs stale values, so there only
    /// misses are held back.
    private func refillingAnswers(valuesToo: Bool) -> Int {
        refilling.count { n in answer(of: n).map { $0 == nil || (valuesToo && stale.contains(n)) } ?? false }
    }

    /// R (and PR) met, counting fallback misses only once the primaries are all in, and
    /// refilling replicas' answers only once every primary answered.
    private var satisfied: Bool {
        guard tally.satisfied else { return false }
        let refillMisses = tally.primaryAcks < tally.primaries ? refillingAnswers(valuesToo: true) : 0
        let fallback = tally.pendingPrimaries > 0 ? fallbackMisses : 0
        guard refillMisses + fallback > 0 else { return true }
        return tally.acks - fallback - refillMisses >= tally.requirement.required
            && tally.primaryAcks - refillMisses >= tally.requirement.primaryRequired
    }

    private mutating func evaluate() -> [Directive] {
        var out: [Directive] = []
        // The merge, once computed here (answers do not change during one evaluation).
        var mergedNow: VersionedObject?? = nil
        if !responded, mode == .async {
            if satisfied {
                responded = true
                let m = merged
                mergedNow = .some(m)
                out.appendReserving(.respond(.answered(m)))
            } else if let failure = tally.impossible() ?? (tally.pending == 0 ? refillingFailure(valuesToo: true) : nil) {
                responded = true
                out.appendReserving(.respond(.quorumFailed(failure)))
            }
        }
        if !responded, mode == .blocking, let failure = tally.impossible() {
            responded = true
            out.appendReserving(.respond(.quorumFailed(failure)))
        }
        guard tally.pending == 0 else { return out }
        // Every answer is in: decide the repair.
        let all = mergedNow ?? merged
        final = all
        var differing: [NodeName] = []
        for a in answers where a.object != all { differing.append(a.node) }
        differing.sort()
        divergent = differing
        let stale = divergent.filter { n in tally.replicas.contains { $0.node == n && $0.isPrimary } }
        if let all, !stale.isEmpty {
            repairing = Set(stale)
            out.appendReserving(.repair(targets: stale, object: all))
            return out
        }
        repairing = []
        concludeRepairs(into: &out)
        return out
    }

    /// Once no repair is outstanding: a blocking read answers, and the machine finishes.
    private mutating func concludeRepairs() -> [Directive] {
        var out: [Directive] = []
        concludeRepairs(into: &out)
        return out
    }

    private mutating func concludeRepairs(into out: inout [Directive]) {
        guard let repairing, repairing.isEmpty else { return }
        if !responded {
            responded = true
            out.appendReserving(.respond(blockingOutcome()))
        }
        finished = true
        out.appendReserving(.finish(divergent: divergent))
    }

    /// Every answer is in and R (PR) is met only by counting refilling replicas' answers while
    /// some primary did not answer: not reached, naming the refilling replicas.
    private func refillingFailure(valuesToo: Bool) -> QuorumFailure? {
        let misses = tally.primaryAcks < tally.primaries ? refillingAnswers(valuesToo: valuesToo) : 0
        let req = tally.requirement
        guard misses > 0, tally.acks - misses < req.required || tally.primaryAcks - misses < req.primaryRequired else { return nil }
        var holding = tally
        holding.override(Dictionary(uniqueKeysWithValues: refilling.filter { n in answer(of: n).map { $0 == nil || (valuesToo && stale.contains(n)) } ?? false }.map {
            ($0, ReplicaOutcome.failed("refilling: has not completed an anti-entropy exchange since it lost data or was away; its answer is no evidence yet"))
        }))
        if tally.acks - misses < req.required {
            return holding.failure(.notReached, name: req.name, required: req.required, achieved: tally.acks - misses,
                                   candidates: tally.replicas.count)
        }
        return holding.failure(.notReached, name: "P" + req.name, required: req.primaryRequired, achieved: tally.primaryAcks - misses,
                               candidates: tally.primaries)
    }

    /// A blocking read's answer: R (PR) replicas must hold the merge — those that answered with
    /// it, and those whose repair was acknowledged.
    private func blockingOutcome() -> ReadOutcome {
        // A refilling replica repaired with the merge holds it; with nothing found, no repair
        // went out and its miss is still no evidence.
        if final == nil, let failure = refillingFailure(valuesToo: false) { return .quorumFailed(failure) }
        var holding = tally
        var reasons: [NodeName: ReplicaOutcome] = [:]
        for n in divergent where !repaired.contains(n) {
            reasons[n] = .failed("stale and not repaired" + (repairFailures[n].map { ": " + $0 } ?? " (a fallback's copy)"))
        }
        let req = tally.requirement
        var acks = 0
        var primaryAcks = 0
        for r in tally.replicas where answer(of: r.node) != nil && reasons[r.node] == nil {
            acks += 1
            if r.isPrimary { primaryAcks += 1 }
        }
        if acks >= req.required && primaryAcks >= req.primaryRequired { return .answered(final) }
        holding.override(reasons)
        if acks < req.required {
            return .quorumFailed(holding.failure(.notReached, name: req.name, required: req.required, achieved: acks,
                                                 candidates: tally.replicas.count))
        }
        return .quorumFailed(holding.failure(.notReached, name: "P" + req.name, required: req.primaryRequired, achieved: primaryAcks,
                                             candidates: tally.primaries))
    }
}
