/// How many replicas must answer: a number, a majority of N, or all N.
public enum Quorum: Hashable, Sendable, CustomStringConvertible {
    case count(Int)
    case quorum
    case all

    /// Parses `quorum`, `all`, `one` or a non-negative number.
    public init(parsing text: String) throws(ValidationError) {
        switch text.lowercased() {
        case "quorum": self = .quorum
        case "all": self = .all
        case "one": self = .count(1)
        default:
            guard let n = Int(text), n >= 0, n <= 255 else {
                throw ValidationError("'\(text)' is not a quorum: use a number 0...255, 'one', 'quorum' or 'all'")
            }
            self = .count(n)
        }
    }

    /// The number of replicas this means for replication factor `n`.
    public func resolve(n: Int) -> Int {
        switch self {
        case .count(let c): c
        case .quorum: n / 2 + 1
        case .all: n
        }
    }

    public var description: String {
        switch self {
        case .count(let c): "\(c)"
        case .quorum: "quorum"
        case .all: "all"
        }
    }
}

/// Per-request consistency and timeout. `nil` fields take the node's configured default.
public struct RequestOptions: Hashable, Sendable {
    public var r: Quorum?
    public var w: Quorum?
    /// How many of the R answers must come from primary owners.
    public var pr: Quorum?
    /// How many of the W acknowledgements must come from primary owners.
    public var pw: Quorum?
    public var timeoutMillis: UInt32?
    /// Whether a down primary's share goes to a fallback (sloppy quorum); nil: the node's
    /// `quorum.sloppy`. PR/PW count primaries either way.
    public var sloppy: Bool?
    /// How a read repairs stale replicas it found; nil: `.async`.
    public var readRepair: ReadRepairMode?

    public init(r: Quorum? = nil, w: Quorum? = nil, pr: Quorum? = nil, pw: Quorum? = nil, timeoutMillis: UInt32? = nil,
                sloppy: Bool? = nil, readRepair: ReadRepairMode? = nil) {
        self.r = r
        self.w = w
        self.pr = pr
        self.pw = pw
        self.timeoutMillis = timeoutMillis
        self.sloppy = sloppy
        self.readRepair = readRepair
    }
}

/// When a read's repair of stale replicas happens relative to its answer.
public enum ReadRepairMode: UInt8, Hashable, Sendable {
    /// The client gets its answer at R; the repair follows (default).
    case async = 0
    /// The answer waits until every stale replica that answered acknowledged the merged object,
    /// so a later quorum read sees at least what this one returned (monotonic quorum reads).
    case blocking = 1
}

/// R/PR or W/PW resolved against N and validated: `1 <= required <= n`, `0 <= primary <= required`.
public struct QuorumRequirement: Hashable, Sendable {
    public let name: String          // "R" or "W"
    public let required: Int
    public let primaryRequired: Int
    public let n: Int

    public init(name: String, quorum: Quorum, primary: Quorum, n: Int) throws(ValidationError) {
        let req = quorum.resolve(n: n)
        let prim = primary.resolve(n: n)
        guard req >= 1, req <= n else { throw ValidationError("\(name)=\(quorum) resolves to \(req); it must be between 1 and N=\(n)") }
        guard prim >= 0, prim <= req else {
            throw ValidationError("P\(name)=\(primary) resolves to \(prim); it must be between 0 and \(name)=\(req)")
        }
        self.name = name
        self.required = req
        self.primaryRequired = prim
        self.n = n
    }
}
