/// Which of several candidate nodes to send one request to, and when to stop: the one rule that
/// clients and forwarding nodes share. A request moves on to the next candidate only when the
/// previous one certainly did not apply it — it refused (`ErrorCode.isRefusal`) or the request
/// was certainly not delivered (`ConnectionError.certainlyNotDelivered`) — or, for an idempotent
/// request, when it may have been delivered but no answer came.
///
/// A pure state machine: no I/O, no clock, no async. The caller performs each `Directive` and
/// reports what happened with `received(_:)` or `failed(_:)`, which return the next directive.
/// A value type with no shared state: each request owns its own `Failover`, confined to the
/// task that drives it.
///
/// Invariants:
/// - Candidates are tried in order `0, 1, …, candidates - 1`, each at most once.
/// - Until a final directive, `directive` is `.tryCandidate`, and an event is about that
///   candidate: report exactly one event per `.tryCandidate`.
/// - `.deliver`, `.giveUp` and `.exhausted` are final: every later event is ignored and
///   returns the same directive.
/// - A non-idempotent request never moves on after a candidate may have received it.
public struct Failover: Sendable, Hashable {
    /// What the caller does next.
    public enum Directive: Sendable, Hashable {
        /// Send the request to candidate `index` (in `0..<candidates`), then report the reply
        /// with `received(_:)` or the failure with `failed(_:)`.
        case tryCandidate(Int)
        /// A candidate answered (success or a non-refusal error): relay this reply. Final.
        case deliver(Message)
        /// Stop without trying another candidate: the request may have been applied. Final.
        case giveUp(GiveUp)
        /// Every candidate was tried and none answered. Final.
        case exhausted(Summary)
    }

    /// Why the request stops with its outcome unknown.
    public enum GiveUp: Sendable, Hashable {
        /// The non-idempotent request may have reached `candidate` (lost connection, timeout,
        /// abandoned), so it is not retried elsewhere.
        case maybeApplied(candidate: Int, ConnectionError)
        /// `candidate` answered with bytes that cannot be decoded (`.protocolViolation`). Not
        /// retried, idempotent or not: the peer received the request and is misbehaving.
        case undecodableReply(candidate: Int, why: String)

        /// The candidate that may have applied the request.
        public var candidate: Int {
            switch self {
            case .maybeApplied(let c, _), .undecodableReply(let c, _): c
            }
        }

        /// The failure that ended the request.
        public var error: ConnectionError {
            switch self {
            case .maybeApplied(_, let e): e
            case .undecodableReply(_, let why): .protocolViolation(why)
            }
        }
    }

    /// What one candidate did, for the caller's report.
    public struct Attempt: Sendable, Hashable {
        public enum Outcome: Sendable, Hashable {
            /// Refused before doing anything: certainly not applied.
            case refused(ErrorReply)
            /// Certainly not delivered.
            case notDelivered(ConnectionError)
            /// May have been delivered; recorded only for idempotent requests.
            case maybeDelivered(ConnectionError)
        }

        public var candidate: Int
        public var outcome: Outcome

        public init(candidate: Int, outcome: Outcome) {
            self.candidate = candidate
            self.outcome = outcome
        }
    }

    /// How a request ended after every candidate was tried.
    public struct Summary: Sendable, Hashable {
        public enum Kind: Sendable, Hashable {
            /// At least one candidate may have received the (idempotent) request.
            case timedOut
            /// Every candidate refused (at least one candidate existed).
            case overloaded
            /// Otherwise: some or all candidates could not be reached, or there were none.
            case unreachable
        }

        public var kind: Kind
        /// One entry per candidate, in the order tried.
        public var attempts: [Attempt]

        /// True unless some candidate may have received the request (`kind != .timedOut`).
        public var certainlyNotApplied: Bool { kind != .timedOut }

        public init(kind: Kind, attempts: [Attempt]) {
            self.kind = kind
            self.attempts = attempts
        }
    }

    /// The number of candidates (never negative).
    public let candidates: Int
    /// Whether the request may be delivered more than once (reads). Decides only what happens
    /// after a candidate may have received it: move on (idempotent) or give up.
    public let idempotent: Bool
    /// The directive in force: before any event, `.tryCandidate(0)` or, with no candidates,
    /// `.exhausted` of kind `.unreachable`.
    public private(set) var directive: Directive
    /// What each candidate tried so far did, in order (the candidate that answered or caused
    /// `.giveUp` is not included).
    public private(set) var attempts: [Attempt] = []

    /// A machine for `candidates` nodes (a negative count counts as none).
    public init(candidates: Int, idempotent: Bool) {
        self.candidates = max(candidates, 0)
        self.idempotent = idempotent
        self.directive = Self.advance(to: 0, of: self.candidates, after: [])
    }

    /// The candidate being tried answered with `reply`. A refusal moves on; anything else is
    /// delivered.
    public mutating func received(_ reply: Message) -> Directive {
        guard case .tryCandidate(let k) = directive else { return directive }
        if case .error(let e) = reply, e.code.isRefusal {
            attempts.append(Attempt(candidate: k, outcome: .refused(e)))
            directive = Self.advance(to: k + 1, of: candidates, after: attempts)
        } else {
            directive = .deliver(reply)
        }
        return directive
    }

    /// The candidate being tried gave no usable reply. Moves on if the request certainly was not
    /// delivered, or may have been but is idempotent; gives up otherwise.
    public mutating func failed(_ error: ConnectionError) -> Directive {
        guard case .tryCandidate(let k) = directive else { return directive }
        if case .protocolViolation(let why) = error {
            directive = .giveUp(.undecodableReply(candidate: k, why: why))
        } else if error.certainlyNotDelivered {
            attempts.append(Attempt(candidate: k, outcome: .notDelivered(error)))
            directive = Self.advance(to: k + 1, of: candidates, after: attempts)
        } else if idempotent {
            attempts.append(Attempt(candidate: k, outcome: .maybeDelivered(error)))
            directive = Self.advance(to: k + 1, of: candidates, after: attempts)
        } else {
            directive = .giveUp(.maybeApplied(candidate: k, error))
        }
        return directive
    }

    /// Candidate `next`, or the summary when none is left.
    private static func advance(to next: Int, of candidates: Int, after attempts: [Attempt]) -> Directive {
        guard next >= candidates else { return .tryCandidate(next) }
        let kind: Summary.Kind
        if attempts.contains(where: { if case .maybeDelivered = $0.outcome { true } else { false } }) {
            kind = .timedOut
        } else if !attempts.isEmpty, attempts.allSatisfy({ if case .refused = $0.outcome { true } else { false } }) {
            kind = .overloaded
        } else {
            kind = .unreachable
        }
        return .exhausted(Summary(kind: kind, attempts: attempts))
    }
}
