/// What happened to one replica during a request, as the coordinator saw it.
public enum ReplicaOutcome: Hashable, Sendable {
    case acknowledged
    /// Nothing was sent: the replica was believed down (the reason says why).
    case notSent(String)
    /// Sent, no answer before the deadline.
    case timedOut(afterMillis: UInt32)
    /// The connection failed; the request may or may not have been delivered.
    case connectionLost(String)
    /// The replica answered with an error.
    case failed(String)
    /// Still waiting when the request failed for want of the others (outcome unknown).
    case noAnswerYet
}

/// Why a replica took part in a request: it is one of the key's N primaries, or a fallback
/// standing in (sloppy quorum) for the named primary that was down.
public enum ReplicaRole: Hashable, Sendable, CustomStringConvertible {
    case primary
    case fallback(for: String)

    public var isPrimary: Bool { self == .primary }

    public var description: String {
        switch self {
        case .primary: "primary"
        case .fallback(let p): "fallback for \(p)"
        }
    }
}

/// One replica's acknowledgement of a write, as the durability receipt lists it.
public struct ReplicaAck: Hashable, Sendable {
    public var node: String
    public var role: ReplicaRole
    /// The replica's copy was on stable storage (its log synced) when it acknowledged; false
    /// under `storage.sync` = `interval:…` / `none` or an in-memory store: the copy survives a
    /// process crash of that replica only if the OS wrote it back.
    public var durable: Bool

    public init(node: String, role: ReplicaRole, durable: Bool) {
        self.node = node
        self.role = role
        self.durable = durable
    }
}

public struct ReplicaReport: Hashable, Sendable {
    public var node: String
    public var address: String
    public var role: ReplicaRole
    public var outcome: ReplicaOutcome
    /// For an acknowledged replica: whether its copy was durable when it acknowledged.
    public var durable: Bool

    public var isPrimary: Bool { role.isPrimary }

    public init(node: String, address: String, role: ReplicaRole, outcome: ReplicaOutcome, durable: Bool = false) {
        self.node = node
        self.address = address
        self.role = role
        self.outcome = outcome
        self.durable = durable
    }

    public init(node: String, address: String, isPrimary: Bool, outcome: ReplicaOutcome, durable: Bool = false) {
        self.init(node: node, address: address, role: isPrimary ? .primary : .fallback(for: ""), outcome: outcome, durable: durable)
    }
}

public enum OperationKind: UInt8, Hashable, Sendable, CustomStringConvertible {
    case get = 1, put = 2, delete = 3

    public var description: String {
        switch self {
        case .get: "get"
        case .put: "put"
        case .delete: "delete"
        }
    }

    public var isWrite: Bool { self != .get }
}

/// A request that could not gather its quorum.
///
/// - `unavailable`: too few replicas were reachable, so nothing was sent: the operation certainly
///   did not take effect.
/// - `notReached`: the operation was sent but too few replicas acknowledged in time. For a write
///   the outcome is unknown: it may have been applied and may surface later.
public struct QuorumFailure: Error, Hashable, Sendable, CustomStringConvertible {
    public enum Kind: UInt8, Hashable, Sendable { case unavailable = 1, notReached = 2 }

    public var kind: Kind
    public var operation: OperationKind
    /// "R" / "W" / "PR" / "PW": the requirement that failed.
    public var requirement: String
    public var required: Int
    /// Replicas that answered (reads) or acknowledged (writes) — or, for `unavailable`, that were reachable.
    public var achieved: Int
    /// The replicas counted against the requirement (N, or the primaries for PR/PW).
    public var candidates: Int
    public var replicas: [ReplicaReport]

    public init(kind: Kind, operation: OperationKind, requirement: String, required: Int, achieved: Int,
                candidates: Int, replicas: [ReplicaReport]) {
        self.kind = kind
        self.operation = operation
        self.requirement = requirement
        self.required = required
        self.achieved = achieved
        self.candidates = candidates
        self.replicas = replicas
    }

    /// One line that says what failed, who was missing, and what it means for the data.
    public var description: String {
        let primary = requirement.hasPrefix("P")
        let what = primary ? "primary replicas" : "replicas"
        var parts: [String] = []
        switch kind {
        case .unavailable:
            parts.append("\(requirement)=\(required) unavailable: \(achieved) of \(candidates) \(what) reachable")
        case .notReached:
            let verb = operation.isWrite ? "acknowledged" : "answered"
            parts.append("\(requirement)=\(required) not reached: \(achieved) of \(candidates) \(what) \(verb)")
        }
        for r in replicas {
            switch r.outcome {
            case .acknowledged: continue
            case .notSent(let why): parts.append("\(r.address) is down (\(why))")
            case .timedOut(let ms): parts.append("\(r.address) timed out after \(ms) ms")
            case .connectionLost(let why): parts.append("\(r.address) connection lost (\(why))")
            case .failed(let why): parts.append("\(r.address) failed: \(why)")
            case .noAnswerYet: parts.append("\(r.address) had not answered yet")
            }
        }
        switch (kind, operation.isWrite) {
        case (.unavailable, true): parts.append("nothing was written")
        case (.notReached, true): parts.append("the write may have been applied on the replicas that acknowledged")
        case (_, false): break
        }
        return parts.joined(separator: "; ")
    }
}
