import CairnCore

/// One nemesis fault. Nodes are numbered from 0.
public enum Fault: Sendable, Hashable, CustomStringConvertible {
    /// The node can reach no peer and no peer can reach it.
    case isolate(Int)
    /// Two sides that cannot reach each other; `minority` is the smaller.
    case split(minority: [Int])
    /// The nodes other than `center` are split in two halves; `center` sees both.
    case bridge(center: Int)
    /// Messages from `from` to `to` are lost; the other direction works.
    case oneWay(from: Int, to: Int)
    /// `kill -9`, restarted when healed.
    case kill(Int)
    /// `SIGSTOP`, `SIGCONT` when healed.
    case pause(Int)
    /// The node's outgoing internode messages wait this long (the fault-injecting transport).
    case delay(node: Int, millis: Int)
    /// This share of the node's outgoing internode messages (or their replies) is lost.
    case drop(node: Int, percent: Int)

    public var description: String {
        switch self {
        case .isolate(let n): "isolate n\(n + 1)"
        case .split(let m): "split: {" + m.map { "n\($0 + 1)" }.joined(separator: ",") + "} | rest"
        case .bridge(let c): "bridge through n\(c + 1)"
        case .oneWay(let f, let t): "one-way cut n\(f + 1) -> n\(t + 1)"
        case .kill(let n): "kill -9 n\(n + 1)"
        case .pause(let n): "SIGSTOP n\(n + 1)"
        case .delay(let n, let ms): "delay n\(n + 1) outgoing by \(ms) ms"
        case .drop(let n, let p): "drop \(p)% of n\(n + 1)'s messages"
        }
    }

    /// Which peers each node must not send to, for a partition fault (empty for the others).
    public func blocked(nodes: Int) -> [Int: Set<Int>] {
        var cut: [Int: Set<Int>] = [:]
        func sever(_ a: Set<Int>, _ b: Set<Int>) {
            for x in a { cut[x, default: []].formUnion(b) }
            for y in b { cut[y, default: []].formUnion(a) }
        }
        let all = Set(0..<nodes)
        switch self {
        case .isolate(let n): sever([n], all.subtracting([n]))
        case .split(let minority): sever(Set(minority), all.subtracting(minority))
        case .bridge(let c):
            let others = (0..<nodes).filter { $0 != c }
            let half = others.count / 2
            sever(Set(others.prefix(half)), Set(others.dropFirst(half)))
        case .oneWay(let f, let t): cut[f, default: []].insert(t)
        default: break
        }
        return cut
    }
}

/// A fault, when it starts and how long it lasts (offsets from the start of the run).
public struct ScheduledFault: Sendable, Hashable {
    public var atMillis: Int
    public var durationMillis: Int
    public var fault: Fault
}

/// The nemesis schedule: one fault at a time, each healed before the next, drawn from a seeded
/// generator so a run is reproducible from its seed. Pure.
public struct NemesisSchedule: Sendable, Hashable {
    public var faults: [ScheduledFault]

    public init(seed: UInt64, nodes: Int, durationMillis: Int, transportFaults: Bool = true) {
        var rng = SplitMix64(seed: seed)
        var faults: [ScheduledFault] = []
        var t = 2000 + Int(rng.next(below: 2000))   // let the workload start first
        // Leave the last stretch quiet: the run ends with everything healed.
        while t < durationMillis - 4000 {
            let length = 2000 + Int(rng.next(below: 4000))
            let fault = Self.draw(&rng, nodes: nodes, transportFaults: transportFaults)
            faults.append(ScheduledFault(atMillis: t, durationMillis: min(length, durationMillis - 3000 - t), fault: fault))
            t += length + 1000 + Int(rng.next(below: 2000))
        }
        self.faults = faults
    }

    static func draw(_ rng: inout SplitMix64, nodes: Int, transportFaults: Bool) -> Fault {
        let node = Int(rng.next(below: UInt64(nodes)))
        let other = (node + 1 + Int(rng.next(below: UInt64(max(nodes - 1, 1))))) % nodes
        let kinds = transportFaults ? 8 : 6
        switch rng.next(below: UInt64(kinds)) {
        case 0: return .isolate(node)
        case 1:
            let size = max(1, (nodes - 1) / 2)
            var members = Set<Int>()
            while members.count < size { members.insert(Int(rng.next(below: UInt64(nodes)))) }
            return .split(minority: members.sorted())
        case 2: return .bridge(center: node)
        case 3: return .oneWay(from: node, to: other)
        case 4: return .kill(node)
        case 5: return .pause(node)
        case 6: return .delay(node: node, millis: 20 + Int(rng.next(below: 200)))
        default: return .drop(node: node, percent: 10 + Int(rng.next(below: 40)))
        }
    }

    public var text: String {
        faults.map { f in
            String(format: "  %7.1fs  +%4.1fs  ", Double(f.atMillis) / 1000, Double(f.durationMillis) / 1000) + f.fault.description
        }.joined(separator: "\n")
    }
}
