public import Histogram
import Synchronization

/// Latencies (µs) of one operation type: the whole run, and the current progress interval.
///
/// Every sample goes into both. The interval histogram is small (2 significant digits, up to
/// 60 s: about 18 KiB against the total's 170 KiB), so the once-a-second progress drain holds the
/// worker's lock for microseconds; merging full-size histograms there held it for milliseconds,
/// stalled completions behind it and starved the open loop of free sessions.
public struct LatencyStats: Sendable {
    /// Up to 10 minutes, 3 significant digits.
    public static let highestMicros: UInt64 = 600_000_000
    /// The progress interval's range: longer samples count as 60 s there (never in the total).
    public static let highestIntervalMicros: UInt64 = 60_000_000
    public var total = Histogram<UInt64>(highestTrackableValue: LatencyStats.highestMicros, numberOfSignificantValueDigits: .three)
    public var interval = LatencyStats.emptyInterval()

    public init() {}

    static func emptyInterval() -> Histogram<UInt64> {
        Histogram<UInt64>(highestTrackableValue: highestIntervalMicros, numberOfSignificantValueDigits: .two)
    }

    mutating func record(_ micros: UInt64) {
        let v = min(max(micros, 1), Self.highestMicros)
        _ = total.record(v)
        _ = interval.record(min(v, Self.highestIntervalMicros))
    }

    /// The interval so far; starts a new one.
    mutating func takeInterval() -> Histogram<UInt64> {
        defer { interval = Self.emptyInterval() }
        return interval
    }
}

/// Counters of a few sessions (`Runner.stats(for:)`). Barely contended: its sessions write, the
/// progress reporter takes the lock once a second.
public final class WorkerStats: Sendable {
    /// The names operations are reported under; `record` takes an index into this list.
    static let names = ["read", "update", "insert", "rmw", "delete"]

    struct State {
        var ops: [LatencyStats?] = Array(repeating: nil, count: WorkerStats.names.count)
        var errors: [String: Int] = [:]
        /// The first distinct messages of each error kind, at most `maxSamples` each.
        var samples: [String: [String]] = [:]
    }

    /// Error messages kept per kind (per `WorkerStats`, and in the report).
    static let maxSamples = 3

    private let state = Mutex(State())

    /// `preallocated`: every operation's histograms are made now, so recording never allocates
    /// (a run's workers); otherwise on an operation's first sample.
    public init(preallocated: Bool = false) {
        if preallocated { state.withLock { s in s.ops = s.ops.map { _ in LatencyStats() } } }
    }

    /// Operation types whose histograms exist (tests).
    var allocatedOperations: Int { state.withLock { s in s.ops.filter { $0 != nil }.count } }

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

    /// Adds this worker's interval histograms into `into` and starts new ones. The merge runs
    /// outside the lock.
    func drainInterval(into: inout [String: Histogram<UInt64>], errors: inout Int) {
        let (taken, errorCount) = state.withLock { s -> ([(Int, Histogram<UInt64>)], Int) in
            var taken: [(Int, Histogram<UInt64>)] = []
            for i in s.ops.indices where (s.ops[i]?.interval.totalCount ?? 0) > 0 {
                if let h = s.ops[i]?.takeInterval() { taken.append((i, h)) }
            }
            return (taken, s.errors.values.reduce(0, +))
        }
        for (i, h) in taken {
            into[Self.names[i], default: LatencyStats.emptyInterval()].add(h)
        }
        errors += errorCount
    }

    func totals(into: inout [String: Histogram<UInt64>], errors: inout [String: Int], samples: inout [String: [String]]) {
        state.withLock { s in
            for (i, stats) in s.ops.enumerated() {
                guard let stats, stats.total.totalCount > 0 else { continue }
                into[Self.names[i], default: Histogram<UInt64>(highestTrackableValue: LatencyStats.highestMicros, numberOfSignificantValueDigits: .three)]
                    .add(stats.total)
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

    /// `intendedStartNanos(i)` of a timetable that starts `offset` ns after the run (`.max` past
    /// the end of the clock).
    public func intendedStartNanos(_ i: UInt64, after offset: UInt64) -> UInt64 {
        let (start, overflow) = offset.addingReportingOverflow(intendedStartNanos(i))
        return overflow ? .max : start
    }

    /// Latency (µs) of operation `i` that completed `completedNanos` after the run's start.
    public func correctedLatencyMicros(_ i: UInt64, completedNanos: UInt64) -> UInt64 {
        let intended = intendedStartNanos(i)
        return completedNanos > intended ? (completedNanos - intended) / 1000 : 0
    }
}
