/// A set-valued key's value: the elements as ascending decimal numbers joined by commas
/// (`"3,17,42"`; empty set: empty value). Readable with `cairn get`.
public enum SetValue {
    public static func encode(_ s: Set<UInt64>) -> [UInt8] { Array(s.sorted().map(String.init).joined(separator: ",").utf8) }

    /// nil if the bytes are not such a list (a value no client of the harness wrote).
    /// Parses the bytes in place (no strings): the simulator decodes every read's siblings.
    public static func decode(_ b: [UInt8]) -> Set<UInt64>? {
        if b.isEmpty { return [] }
        var out = Set<UInt64>()
        var n: UInt64 = 0
        var digits = 0
        for byte in b {
            if byte == UInt8(ascii: ",") {
                guard digits > 0 else { return nil }
                out.insert(n)
                (n, digits) = (0, 0)
                continue
            }
            guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else { return nil }
            let (times10, o1) = n.multipliedReportingOverflow(by: 10)
            let (sum, o2) = times10.addingReportingOverflow(UInt64(byte - UInt8(ascii: "0")))
            guard !o1, !o2 else { return nil }
            n = sum
            digits += 1
        }
        guard digits > 0 else { return nil }
        out.insert(n)
        return out
    }
}

/// How one add attempt ended, as the client was told.
public enum AttemptOutcome: Sendable, Hashable {
    /// Acknowledged (W replicas).
    case ok
    /// Certainly not applied (unavailable, invalid, overloaded, no node reachable).
    case failed(String)
    /// Indeterminate (not reached, timeout, a server error mid-write): never counted as failed.
    case unknown(String)
}

/// One read-modify-write that tried to add `element` to `key`.
public struct Attempt: Sendable, Hashable {
    public var client: Int
    public var key: String
    public var element: UInt64
    /// Milliseconds since the run started.
    public var startMillis: Int
    public var endMillis: Int
    public var outcome: AttemptOutcome

    public init(client: Int, key: String, element: UInt64, startMillis: Int, endMillis: Int, outcome: AttemptOutcome) {
        self.client = client
        self.key = key
        self.element = element
        self.startMillis = startMillis
        self.endMillis = endMillis
        self.outcome = outcome
    }
}

/// What the final read found for one key.
public enum FinalRead: Sendable, Hashable {
    case elements(Set<UInt64>)
    /// The key could not be read at R = all after the quiet period (nothing can be concluded).
    case unreadable(String)
    /// A sibling was not a set the harness writes.
    case garbage(String)
}

/// The verdict: every attempted element classified against the final read.
public struct CheckResult: Sendable {
    public var acknowledged = 0
    public var acknowledgedPresent = 0
    public var lost: [Attempt] = []
    public var unknownPresent = 0
    public var unknownAbsent = 0
    public var failedButPresent: [Attempt] = []
    public var failedAbsent = 0
    /// Elements present that no attempt on that key ever tried to add.
    public var phantom: [(key: String, element: UInt64)] = []
    public var unreadable: [String: String] = [:]

    /// A lost acknowledged write, an element nobody wrote, a write reported failed that landed,
    /// or a key that could not be read at all.
    public var passed: Bool { lost.isEmpty && phantom.isEmpty && failedButPresent.isEmpty && unreadable.isEmpty }

    /// Always the last line of a run's output.
    public var summary: String {
        "acknowledged=\(acknowledged) lost=\(lost.count) unknown_present=\(unknownPresent) unknown_absent=\(unknownAbsent) "
            + "failed_but_present=\(failedButPresent.count) phantom=\(phantom.count)"
    }

    /// Classifies every attempt: acknowledged and present / lost; unknown and present / absent;
    /// failed and present (a defect in what clients were told) / absent; and elements present that
    /// were never attempted. Pure.
    public static func check(attempts: [Attempt], finals: [String: FinalRead]) -> CheckResult {
        var r = CheckResult()
        var attempted: [String: Set<UInt64>] = [:]
        for a in attempts { attempted[a.key, default: []].insert(a.element) }
        for (key, read) in finals {
            switch read {
            case .unreadable(let why): r.unreadable[key] = why
            case .garbage(let why): r.unreadable[key] = "unexpected value: \(why)"
            case .elements(let present):
                for e in present.subtracting(attempted[key] ?? []).sorted() { r.phantom.append((key, e)) }
            }
        }
        for a in attempts {
            guard case .elements(let present)? = finals[a.key] else { continue }
            let isPresent = present.contains(a.element)
            switch a.outcome {
            case .ok:
                r.acknowledged += 1
                if isPresent { r.acknowledgedPresent += 1 } else { r.lost.append(a) }
            case .unknown:
                if isPresent { r.unknownPresent += 1 } else { r.unknownAbsent += 1 }
            case .failed:
                if isPresent { r.failedButPresent.append(a) } else { r.failedAbsent += 1 }
            }
        }
        // Acknowledged attempts on unreadable keys still count as acknowledged.
        r.acknowledged += attempts.filter { a in a.outcome == .ok && r.unreadable[a.key] != nil }.count
        r.lost.sort { ($0.key, $0.element) < ($1.key, $1.element) }
        return r
    }
}

/// One key's primary that does not hold, on its own, every acknowledged add of the key.
public struct PrimaryGap: Sendable, Hashable, CustomStringConvertible {
    public var key: String
    public var node: String
    /// Acknowledged elements absent from the node's copy (empty when the copy was unreadable).
    public var missing: [UInt64]
    /// Why the copy could not be read, if it could not.
    public var unreadable: String?

    public var description: String {
        if let unreadable { return "\(key): primary \(node)'s own copy could not be read: \(unreadable)" }
        let shown = missing.prefix(5).map(String.init).joined(separator: ", ")
        return "\(key): primary \(node) alone lacks \(missing.count) acknowledged add\(missing.count == 1 ? "" : "s") (\(shown)\(missing.count > 5 ? ", …" : ""))"
    }
}

extension CheckResult {
    /// Replicas converge without anti-entropy (hints, fallback handoff, read repair): after the
    /// quiet period each primary's own copy of a key (`copies[key][node]`: its elements, or why it
    /// could not be read) holds every acknowledged add of that key. Pure.
    public static func primaryGaps(attempts: [Attempt], copies: [String: [String: Result<Set<UInt64>, ReadFailure>]]) -> [PrimaryGap] {
        var acknowledged: [String: Set<UInt64>] = [:]
        for a in attempts where a.outcome == .ok { acknowledged[a.key, default: []].insert(a.element) }
        var gaps: [PrimaryGap] = []
        for (key, nodes) in copies.sorted(by: { $0.key < $1.key }) {
            for (node, copy) in nodes.sorted(by: { $0.key < $1.key }) {
                switch copy {
                case .failure(let f): gaps.append(PrimaryGap(key: key, node: node, missing: [], unreadable: f.reason))
                case .success(let held):
                    let missing = (acknowledged[key] ?? []).subtracting(held).sorted()
                    if !missing.isEmpty { gaps.append(PrimaryGap(key: key, node: node, missing: missing)) }
                }
            }
        }
        return gaps
    }
}

/// Why a replica's own copy could not be read.
public struct ReadFailure: Error, Sendable, Hashable {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
}
