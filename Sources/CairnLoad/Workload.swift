/// The operations a workload mixes.
public enum OperationType: String, Sendable, CaseIterable, Hashable {
    case read, update, insert
    /// Read, then write back with the context the read returned (YCSB workload F).
    case readModifyWrite = "rmw"
    /// Delete (Cairn: a tombstone with the last context seen; Redis `DEL`; etcd `deleterange`).
    case delete
}

/// What a run does: the operation mix and its default key distribution.
public struct Workload: Sendable, Hashable {
    public var name: String
    /// Proportions, summing to 1.
    public let mix: [OperationType: Double]
    public var distribution: KeyDistribution
    /// `mix` as cumulative bounds in a fixed order, for `pick`.
    private let ops: [OperationType]
    private let bounds: [Double]

    public init(name: String, mix: [OperationType: Double], distribution: KeyDistribution) {
        self.name = name
        self.mix = mix
        self.distribution = distribution
        var acc = 0.0
        var ops: [OperationType] = []
        var bounds: [Double] = []
        for op in OperationType.allCases {
            guard let p = mix[op], p > 0 else { continue }
            acc += p
            ops.append(op)
            bounds.append(acc)
        }
        self.ops = ops
        self.bounds = bounds
    }

    /// The YCSB core workloads that fit a key-value API, plus write-only.
    public static func named(_ name: String) -> Workload? {
        switch name.lowercased() {
        case "a": Workload(name: "a", mix: [.read: 0.5, .update: 0.5], distribution: .zipfian)
        case "b": Workload(name: "b", mix: [.read: 0.95, .update: 0.05], distribution: .zipfian)
        case "c": Workload(name: "c", mix: [.read: 1.0], distribution: .zipfian)
        case "d": Workload(name: "d", mix: [.read: 0.95, .insert: 0.05], distribution: .latest)
        case "f": Workload(name: "f", mix: [.read: 0.5, .readModifyWrite: 0.5], distribution: .zipfian)
        case "write-only": Workload(name: "write-only", mix: [.update: 1.0], distribution: .uniform)
        default: nil
        }
    }

    /// A custom mix: `read=0.7,update=0.2,insert=0.05,rmw=0.03,delete=0.02` (one per line or comma-separated;
    /// `#` comments; proportions are normalized).
    public static func custom(_ text: String, distribution: KeyDistribution = .zipfian) throws(LoadError) -> Workload {
        var mix: [OperationType: Double] = [:]
        for raw in text.split(whereSeparator: { $0 == "," || $0.isNewline }) {
            let item = raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first?
                .trimmingCharacters(in: .whitespaces) ?? ""
            if item.isEmpty { continue }
            let parts = item.split(separator: "=", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
            guard parts.count == 2, let op = OperationType(rawValue: parts[0]), let w = Double(parts[1]), w >= 0, w.isFinite else {
                throw LoadError.invalidArgument("mix entry '\(item)' is not op=proportion with op one of read, update, insert, rmw, delete")
            }
            mix[op, default: 0] += w
        }
        let total = mix.values.reduce(0, +)
        guard total > 0 else { throw LoadError.invalidArgument("the mix has no operations") }
        return Workload(name: "custom", mix: mix.mapValues { $0 / total }, distribution: distribution)
    }

    /// Picks an operation with the mix's proportions.
    public func pick(_ rng: inout SplitMix64) -> OperationType {
        let u = rng.nextDouble()
        for i in bounds.indices where u < bounds[i] { return ops[i] }
        return ops.last ?? .read
    }
}

public enum LoadError: Error, Sendable, CustomStringConvertible {
    case invalidArgument(String)
    case target(String)

    public var description: String {
        switch self {
        case .invalidArgument(let s): s
        case .target(let s): s
        }
    }
}

import Foundation
public import CairnCore
