public import Histogram
import Synchronization

/// Latencies (µs) of one operation type: the whole run, and the current progress interval.
public struct LatencyStats: Sendable {
    /// Up to 10 minutes, 3 significant digits.
    public static let highestMicros: UInt64 = 600_000_000
    public var total = Histogram<UInt64>(highestTrackableValue: LatencyStats.highestMicros, numberOfSignificantValueDigits: .three)
    public var interval = Histogram<UInt64>(highestTrackableValue: LatencyStats.highestMicros, numberOfSignificantValueDigits: .three)

    public init() {}

    /// Records into the interval only; `rollInterval` folds it into the total once a second.
    mutating func record(_ micros: UInt64) {
        _ = interval.record(min(max(micros, 1), Self.highestMicros))
    }

    mutating func rollInterval() {
        total.add(interval)
        interval.reset()
    }

    /// Everything recorded so far, including the current interval.
    var all: Histogram<UInt64> {
        var h = total
        h.add(interval)
        return h
    }
}

/// One worker's counters. Uncontended: only its worker writes; the progress reporter takes the
/// lock once a second.
public final class WorkerStats: Sendable {
    /// The names operations are reported under; `record` takes an index into this list.
    static let names = ["read", "update", "insert", "rmw", "delete"]

    struct State {
        var ops: [LatencyStats?] = Array(repeating: nil, count: WorkerStats.names.count)
        var errors: [String: Int] = [:]
        /// The first distinct messages of each error kind, at most `maxSamples` each.
        var samples: [String: [String]] = [:]
    }

    /// Error messages kept per kind (per worker, and in the report).
    static let maxSamples = 3

    private let state = Mutex(State())

    public init() {}

    func record(_ op: Int, micros: UInt64) {
        state.withLock { s in
            if s.ops[op] == nil { s.ops[op] = LatencyStats() }
            s.ops[op]?.record(micros)
        }
    }

    func error(_ kind: String, _ message: String) {
        state.withLock { s in
            s.errors[kind, default: 0] += 1
            Self.keep(message, as: kind, in: &s.samples)
        }
    }

    static func keep(_ message: String, as kind: String, in samples: inout [String: [String]]) {
        let kept = samples[kind, default: []]
        guard kept.count < maxSamples, !kept.contains(message) else { return }
        samples[kind, default: []].append(String(message.prefix(300)))
    }

    /// Adds this worker's interval histograms into `into` and resets them.
    func drainInterval(into: inout [String: Histogram<UInt64>], errors: inout Int) {
        state.withLock { s in
            for i in s.ops.indices {
                guard s.ops[i] != nil, let interval = s.ops[i]?.interval else { continue }
                into[Self.names[i], default: Histogram<UInt64>(highestTrackableValue: LatencyStats.highestMicros, numberOfSignificantValueDigits: .three)]
                    .add(interval)
                s.ops[i]?.rollInterval()
            }
            errors += s.errors.values.reduce(0, +)
        }
    }

    func totals(into: inout [String: Histogram<UInt64>], errors: inout [String: Int], samples: inout [String: [String]]) {
        state.withLock { s in
            for (i, stats) in s.ops.enumerated() {
                guard let stats else { continue }
                into[Self.names[i], default: Histogram<UInt64>(highestTrackableValue: LatencyStats.highestMicros, numberOfSignificantValueDigits: .three)]
                    .add(stats.all)
            }
            for (k, v) in s.errors { errors[k, default: 0] += v }
            for (k, messages) in s.samples.sorted(by: { $0.key < $1.key }) {
                for m in messages { Self.keep(m, as: k, in: &samples) }
            }
        }
    }
}

/// Open-loop pacing, pure: operation `i` is intended to start at `start + i / rate`. Its latency is
/// measured from that intended start, not from when a free connection let it go: a stall makes
/// every operation scheduled during it count the wait (coordinated omission corrected).
public struct OpenLoopSchedule: Sendable {
    public let rate: Double
    public init(rate: Double) { self.rate = rate }

    /// Nanoseconds after the run's start at which operation `i` should start.
    public func intendedStartNanos(_ i: UInt64) -> UInt64 {
        let ns = (Double(i) * 1e9 / rate).rounded()
        return ns.isFinite && ns < 1.8e19 ? UInt64(max(ns, 0)) : .max
    }

    /// Latency (µs) of operation `i` that completed `completedNanos` after the run's start.
    public func correctedLatencyMicros(_ i: UInt64, completedNanos: UInt64) -> UInt64 {
        let intended = intendedStartNanos(i)
        return completedNanos > intended ? (completedNanos - intended) / 1000 : 0
    }
}
