public import CairnCore

/// One replica a coordinator may talk to.
public struct ReplicaTarget: Hashable, Sendable {
    public var node: NodeName
    public var address: String
    public var isPrimary: Bool
    public var isLocal: Bool

    public init(node: NodeName, address: String, isPrimary: Bool, isLocal: Bool) {
        self.node = node
        self.address = address
        self.isPrimary = isPrimary
        self.isLocal = isLocal
    }
}

/// Bookkeeping shared by the read and write machines: who was asked, who answered, and what
/// the requirement needs. Pure.
struct QuorumTally: Sendable {
    let operation: OperationKind
    let requirement: QuorumRequirement
    let replicas: [ReplicaTarget]
    private(set) var outcomes: [ReplicaOutcome?]

    init(operation: OperationKind, requirement: QuorumRequirement, replicas: [ReplicaTarget]) {
        self.operation = operation
        self.requirement = requirement
        self.replicas = replicas
        self.outcomes = Array(repeating: nil, count: replicas.count)
    }

    func index(of node: NodeName) -> Int? { replicas.firstIndex { $0.node == node } }

    /// Records the first outcome for `node`; later ones (duplicates, late replies) are ignored.
    mutating func record(_ node: NodeName, _ outcome: ReplicaOutcome) -> Bool {
        guard let i = index(of: node), outcomes[i] == nil else { return false }
        outcomes[i] = outcome
        return true
    }

    var acks: Int { outcomes.count { $0 == .acknowledged } }
    var primaryAcks: Int { replicas.indices.count { replicas[$0].isPrimary && outcomes[$0] == .acknowledged } }
    var pending: Int { outcomes.count { $0 == nil } }
    var pendingPrimaries: Int { replicas.indices.count { replicas[$0].isPrimary && outcomes[$0] == nil } }
    var primaries: Int { replicas.count { $0.isPrimary } }
    var pendingNodes: [NodeName] { replicas.indices.filter { outcomes[$0] == nil }.map { replicas[$0].node } }

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
            if let why = down[r.node] { outcomes[i] = .notSent(why) }
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

    mutating func expire(afterMillis ms: UInt32) {
        for i in outcomes.indices where outcomes[i] == nil { outcomes[i] = .timedOut(afterMillis: ms) }
    }

    func failure(_ kind: QuorumFailure.Kind, name: String, required: Int, achieved: Int, candidates: Int) -> QuorumFailure {
        let reports = replicas.indices.map { i in
            ReplicaReport(node: replicas[i].node.value, address: replicas[i].address, isPrimary: replicas[i].isPrimary,
                          outcome: outcomes[i] ?? (kind == .unavailable ? .acknowledged : .noAnswerYet))
        }
        // For `unavailable`, reachable replicas were never contacted; list only the down ones.
        let shown = kind == .unavailable ? reports.filter { if case .notSent = $0.outcome { true } else { false } } : reports
        return QuorumFailure(kind: kind, operation: operation, requirement: name, required: required, achieved: achieved,
                             candidates: candidates, replicas: shown)
    }
}

/// The write coordinator's protocol, as a pure state machine.
///
/// The coordinator is always a primary replica (other nodes forward to one). It applies the write
/// to its own vnode first (stamping the new version), then replicates the resulting object to the
/// other reachable replicas and answers once W acknowledgements (PW from primaries) are in.
/// It keeps listening until every replica answered or the deadline passed.
///
/// Truthfulness: `unavailable` is only ever reported before anything is applied; once the local
/// vnode applied the write, every failure is `notReached` (the outcome is unknown).
public struct WriteCoordination: Sendable {
    public enum Directive: Hashable, Sendable {
        /// Stamp and store the write on the local vnode; report with `localApplied` / `localFailed`.
        case applyLocally
        /// Send the stamped object to these replicas; report each with `replicaAcked` / `replicaFailed`.
        case replicate(to: [NodeName])
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

    private var tally: QuorumTally
    private let timeoutMillis: UInt32
    private var responded = false
    private var finished = false
    private var applied = false

    public init(operation: OperationKind, requirement: QuorumRequirement, replicas: [ReplicaTarget], timeoutMillis: UInt32) {
        tally = QuorumTally(operation: operation, requirement: requirement, replicas: replicas)
        self.timeoutMillis = timeoutMillis
    }

    public var isFinished: Bool { finished }
    public var outcomes: [ReplicaOutcome?] { tally.outcomes }

    /// `down`: replicas the shell believes unreachable, with the reason.
    public mutating func start(down: [NodeName: String]) -> [Directive] {
        if let failure = tally.excludeDown(down) {
            return conclude(.quorumFailed(failure))
        }
        return [.applyLocally]
    }

    public mutating func localApplied() -> [Directive] {
        guard !finished, !applied, let me = tally.replicas.first(where: \.isLocal) else { return [] }
        applied = true
        _ = tally.record(me.node, .acknowledged)
        let others = tally.pendingNodes
        return (others.isEmpty ? [] : [.replicate(to: others)]) + evaluate()
    }

    public mutating func localFailed(_ reason: String) -> [Directive] {
        guard !finished, !applied else { return [] }
        return conclude(.coordinatorFailed(reason))
    }

    public mutating func localRejected(_ reason: String) -> [Directive] {
        guard !finished, !applied else { return [] }
        return conclude(.rejected(reason))
    }

    public mutating func replicaAcked(_ node: NodeName) -> [Directive] {
        guard !finished, applied, tally.record(node, .acknowledged) else { return [] }
        return evaluate()
    }

    public mutating func replicaFailed(_ node: NodeName, _ outcome: ReplicaOutcome) -> [Directive] {
        guard !finished, applied, tally.record(node, outcome) else { return [] }
        return evaluate()
    }

    public mutating func deadlinePassed() -> [Directive] {
        guard !finished else { return [] }
        tally.expire(afterMillis: timeoutMillis)
        if !applied { return conclude(.coordinatorTimedOut(afterMillis: timeoutMillis)) }
        return evaluate()
    }

    private mutating func evaluate() -> [Directive] {
        var out: [Directive] = []
        if !responded {
            if tally.satisfied {
                responded = true
                out.append(.respond(.acknowledged))
            } else if let failure = tally.impossible() {
                responded = true
                out.append(.respond(.quorumFailed(failure)))
            }
        }
        if tally.pending == 0 {
            finished = true
            out.append(.finish)
        }
        return out
    }

    private mutating func conclude(_ outcome: WriteOutcome) -> [Directive] {
        finished = true
        if responded { return [.finish] }
        responded = true
        return [.respond(outcome), .finish]
    }
}

/// The read coordinator's protocol, as a pure state machine.
///
/// Asks every reachable replica, answers with the merge (DVVSet sync) of the first R answers
/// (PR of them from primaries), then keeps collecting until all answered or the deadline passed.
/// A replica that has no object counts as an answer ("not found" is a valid answer).
public struct ReadCoordination: Sendable {
    public enum Directive: Hashable, Sendable {
        /// Ask these replicas (the local one included, if listed).
        case fetch(from: [NodeName])
        case respond(ReadOutcome)
        /// All answers are in (or the deadline passed). `divergent` lists replicas whose answer
        /// differed from the merge of all answers: the input read repair will use.
        case finish(divergent: [NodeName])
    }

    public enum ReadOutcome: Hashable, Sendable {
        /// The merge of the answers; nil when no replica held the key.
        case answered(VersionedObject?)
        case quorumFailed(QuorumFailure)
    }

    private var tally: QuorumTally
    private let timeoutMillis: UInt32
    private var answers: [NodeName: VersionedObject?] = [:]
    private var responded = false
    private var finished = false

    public init(requirement: QuorumRequirement, replicas: [ReplicaTarget], timeoutMillis: UInt32) {
        tally = QuorumTally(operation: .get, requirement: requirement, replicas: replicas)
        self.timeoutMillis = timeoutMillis
    }

    public var isFinished: Bool { finished }

    public mutating func start(down: [NodeName: String]) -> [Directive] {
        if let failure = tally.excludeDown(down) {
            finished = true
            responded = true
            return [.respond(.quorumFailed(failure)), .finish(divergent: [])]
        }
        return [.fetch(from: tally.pendingNodes)]
    }

    public mutating func replied(_ node: NodeName, _ object: VersionedObject?) -> [Directive] {
        guard !finished, tally.record(node, .acknowledged) else { return [] }
        answers[node] = .some(object)
        return evaluate()
    }

    public mutating func replicaFailed(_ node: NodeName, _ outcome: ReplicaOutcome) -> [Directive] {
        guard !finished, tally.record(node, outcome) else { return [] }
        return evaluate()
    }

    public mutating func deadlinePassed() -> [Directive] {
        guard !finished else { return [] }
        tally.expire(afterMillis: timeoutMillis)
        return evaluate()
    }

    private var merged: VersionedObject? {
        let objects = answers.values.compactMap { $0 }
        return objects.isEmpty ? nil : VersionedObject.sync(objects)
    }

    private mutating func evaluate() -> [Directive] {
        var out: [Directive] = []
        if !responded {
            if tally.satisfied {
                responded = true
                out.append(.respond(.answered(merged)))
            } else if let failure = tally.impossible() {
                responded = true
                out.append(.respond(.quorumFailed(failure)))
            }
        }
        if tally.pending == 0 {
            finished = true
            let all = merged
            let divergent = answers.filter { $0.value != all }.map(\.key).sorted()
            out.append(.finish(divergent: divergent))
        }
        return out
    }
}
