import Foundation
import CairnCore
public import Histogram

/// Percentiles of one operation type, in microseconds.
public struct OperationSummary: Sendable, Hashable {
    public var count: UInt64
    public var p50: UInt64, p90: UInt64, p99: UInt64, p999: UInt64, max: UInt64
    public var mean: Double

    public init(count: UInt64, p50: UInt64, p90: UInt64, p99: UInt64, p999: UInt64, max: UInt64, mean: Double) {
        self.count = count
        self.p50 = p50
        self.p90 = p90
        self.p99 = p99
        self.p999 = p999
        self.max = max
        self.mean = mean
    }

    public init(_ h: Histogram<UInt64>) {
        self.init(count: h.totalCount, p50: h.valueAtPercentile(50), p90: h.valueAtPercentile(90), p99: h.valueAtPercentile(99),
                  p999: h.valueAtPercentile(99.9), max: h.max, mean: h.totalCount == 0 ? 0 : h.mean)
    }
}

/// The end-of-run report, as text for people and JSON for scripts.
public struct RunReport: Sendable {
    public var config: RunConfig
    public var elapsed: Duration
    public var operations: [String: OperationSummary]
    public var errors: [String: Int]
    /// The first distinct messages of each error kind (at most `WorkerStats.maxSamples`).
    public var errorSamples: [String: [String]] = [:]
    public var verification: Verifier.Summary?
    public var firstFailures: [String]
    public var siblingReads: Int
    /// Requests that completed in the warm-up (`RunConfig.warmup`): sent, not counted; and those
    /// of them that failed (not in `errors`).
    public var warmupOperations: UInt64 = 0
    public var warmupErrors: UInt64 = 0

    public var seconds: Double {
        let (s, a) = elapsed.components
        return Double(s) + Double(a) / 1e18
    }

    public var totalOperations: UInt64 { operations.values.reduce(0) { $0 + $1.count } }
    public var totalErrors: Int { errors.values.reduce(0, +) }
    /// Successful operations per second.
    public var throughput: Double { seconds > 0 ? Double(totalOperations) / seconds : 0 }
    /// Non-zero when verification found a problem.
    public var failed: Bool { (verification?.errors ?? 0) > 0 }

    public var text: String {
        var lines = ["\(config.phase.rawValue) against \(config.target): \(totalOperations) operations in \(String(format: "%.1f", seconds)) s, "
            + "\(String(format: "%.0f", throughput)) ops/s, \(totalErrors) errors"]
        if warmupOperations + warmupErrors > 0 {
            lines.append("  and \(warmupOperations) operations of the warm-up, not counted (\(warmupErrors) of its requests failed)")
        }
        lines.append("  op        count       p50 µs    p90 µs    p99 µs  p99.9 µs    max µs")
        for (op, s) in operations.sorted(by: { $0.key < $1.key }) {
            lines.append(String(format: "  %-7@ %9llu %11llu %9llu %9llu %9llu %9llu", op as NSString, s.count, s.p50, s.p90, s.p99, s.p999, s.max))
        }
        if !errors.isEmpty { lines.append("  errors: " + errors.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")) }
        for (kind, messages) in errorSamples.sorted(by: { $0.key < $1.key }) {
            for m in messages { lines.append("  \(kind) error: \(m)") }
        }
        if siblingReads > 0 { lines.append("  reads that met siblings: \(siblingReads)") }
        if let v = verification {
            lines.append("  verify: \(v.readsChecked) reads checked, lost=\(v.lost) corrupt=\(v.corrupt) wrong_key=\(v.wrongKey)")
            for f in firstFailures { lines.append("    \(f)") }
        }
        return lines.joined(separator: "\n")
    }

    public var json: String {
        var ops: [String: Any] = [:]
        for (op, s) in operations {
            ops[op] = ["count": s.count, "p50_us": s.p50, "p90_us": s.p90, "p99_us": s.p99, "p999_us": s.p999, "max_us": s.max,
                       "mean_us": (s.mean * 10).rounded() / 10]
        }
        var config: [String: Any] = [
            "phase": self.config.phase.rawValue, "target": self.config.target, "records": self.config.records,
            "concurrency": self.config.concurrency, "workload": self.config.workload.name,
            "distribution": self.config.distribution.rawValue, "value_size": "\(self.config.valueSize.lowerBound)-\(self.config.valueSize.upperBound)",
            "verify": self.config.verify, "seed": self.config.seed, "mode": self.config.rate == nil ? "closed" : "open",
        ]
        if let r = self.config.rate { config["rate"] = r }
        if let o = self.config.operations { config["operations"] = o }
        if self.config.warmup > .zero { config["warmup_seconds"] = Double(self.config.warmup.wholeNanoseconds) / 1e9 }
        var root: [String: Any] = [
            "config": config,
            "totals": ["operations": totalOperations, "errors": totalErrors, "seconds": (seconds * 1000).rounded() / 1000,
                       "sibling_reads": siblingReads, "warmup_operations": warmupOperations, "warmup_errors": warmupErrors],
            "throughput_ops_per_s": (throughput * 10).rounded() / 10,
            "errors": errors,
            "error_samples": errorSamples,
            "operations": ops,
        ]
        if let v = verification {
            root["verification"] = ["reads_checked": v.readsChecked, "lost": v.lost, "corrupt": v.corrupt, "wrong_key": v.wrongKey,
                                    "first_failures": firstFailures]
        }
        guard let data = try? JSONSerialization.data(withJSONObject: root, options: [.prettyPrinted, .sortedKeys]) else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }
}
