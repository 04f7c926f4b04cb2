public import CairnCore
import Synchronization

/// Faults injected into this node's outgoing internode messages, for the torture harness
/// (`cairn-torture`). It exists only when `cairnd` runs with `--test-fault-injection`; otherwise
/// the node has none and nothing (no config key, no request) can create one.
///
/// Rules, set as a whole: messages to `blocked` peers are not sent (a partition as this node
/// sees it: one direction); every other message waits `delayMillis`, and `dropPercent` of them
/// are lost — half before delivery, half after (the reply is lost), so the sender sees a timeout
/// either way and cannot tell which. Thread-safe.
public final class TransportFaults: Sendable {
    public struct Rules: Sendable, Hashable {
        public var blocked: Set<NodeName> = []
        public var delayMillis = 0
        public var dropPercent = 0
        public init() {}

        /// Parses `block=n2,n3&delay=50&drop=10` (any subset; empty clears everything).
        public init(query: String) throws(ValidationError) {
            for pair in query.split(separator: "&") where !pair.isEmpty {
                let kv = pair.split(separator: "=", maxSplits: 1).map(String.init)
                guard kv.count == 2 else { throw ValidationError("expected key=value, got \(pair)") }
                switch kv[0] {
                case "block":
                    blocked = Set(try kv[1].split(separator: ",").map { n throws(ValidationError) in try NodeName(String(n)) })
                case "delay":
                    guard let ms = Int(kv[1]), (0...60_000).contains(ms) else { throw ValidationError("delay must be 0...60000 ms") }
                    delayMillis = ms
                case "drop":
                    guard let p = Int(kv[1]), (0...100).contains(p) else { throw ValidationError("drop must be 0...100 percent") }
                    dropPercent = p
                default: throw ValidationError("unknown fault \(kv[0])")
                }
            }
        }

        public var description: String {
            "block=\(blocked.map(\.value).sorted().joined(separator: ",")) delay=\(delayMillis)ms drop=\(dropPercent)%"
        }
    }

    enum Decision: Equatable { case pass(delayMillis: Int), block, dropRequest(delayMillis: Int), dropReply(delayMillis: Int) }

    private let state = Mutex<(rules: Rules, rng: UInt64)>((Rules(), 0x9E37_79B9_7F4A_7C15))

    public init() {}

    public var rules: Rules { state.withLock { $0.rules } }

    public func set(_ rules: Rules) { state.withLock { $0.rules = rules } }

    func decide(to peer: NodeName) -> Decision {
        state.withLock { s in
            if s.rules.blocked.contains(peer) { return .block }
            let delay = s.rules.delayMillis
            guard s.rules.dropPercent > 0 else { return .pass(delayMillis: delay) }
            s.rng ^= s.rng << 13
            s.rng ^= s.rng >> 7
            s.rng ^= s.rng << 17
            // Out of 200: `dropPercent` lose the request, as many again lose the reply.
            let roll = Int(s.rng % 200)
            if roll < s.rules.dropPercent { return .dropRequest(delayMillis: delay) }
            if roll >= 100 && roll < 100 + s.rules.dropPercent { return .dropReply(delayMillis: delay) }
            return .pass(delayMillis: delay)
        }
    }
}
