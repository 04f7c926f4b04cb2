public import CairnCore

/// One node's anti-entropy timetable: when each partition it holds is next exchanged and with
/// which peer, which exchanges run now within the concurrency bound, and when each partition's
/// tombstones are next swept. Pure: the shell (`AntiEntropyManager`) passes the time and what it
/// knows of each partition; the schedule decides, drawing its jitter from its own seeded
/// generator, so the same calls give the same timetable.
///
/// - A partition seen for the first time is due at a point drawn over one interval (so a node's
///   partitions spread out), a refilling one at once.
/// - Each exchange makes the next due an interval later, ±25 %; the peers are taken in turn.
/// - A truncated exchange is due again a second later; a failed exchange of a refilling
///   partition after 0.25 s, doubling per failure in a row, at most 30 s.
/// - At most `maxConcurrentExchanges` run at once, timer and operator (`take`) together, and a
///   partition never has two.
/// - One tombstone sweep at a time; each partition's is due an interval (±25 %) after its last,
///   the first spread over one interval.
public struct AntiEntropySchedule: Sendable {
    public struct Settings: Sendable, Hashable {
        /// `aae.exchange_interval`.
        public var exchangeInterval: Duration
        /// `aae.max_concurrent_exchanges`.
        public var maxConcurrentExchanges: Int
        /// `tombstones.sweep_interval`; zero: never.
        public var sweepInterval: Duration

        public init(exchangeInterval: Duration, maxConcurrentExchanges: Int, sweepInterval: Duration) {
            self.exchangeInterval = exchangeInterval
            self.maxConcurrentExchanges = maxConcurrentExchanges
            self.sweepInterval = sweepInterval
        }
    }

    /// What the shell knows of one partition it holds, now.
    public struct Partition: Sendable, Hashable {
        public var id: PartitionID
        public var refilling: Bool
        /// Its tree is ready (not missing, not being built): an exchange needs one.
        public var treeReady: Bool
        /// This node is one of its replicas (a copy still handed in is filled by its transfer).
        public var replica: Bool
        /// Its other replicas reachable now, in a stable order.
        public var peers: [NodeName]

        public init(id: PartitionID, refilling: Bool = false, treeReady: Bool = true, replica: Bool = true, peers: [NodeName]) {
            self.id = id
            self.refilling = refilling
            self.treeReady = treeReady
            self.replica = replica
            self.peers = peers
        }
    }

    /// How an exchange ended.
    public enum Outcome: Sendable, Hashable {
        /// In sync, or every difference repaired.
        case completed
        /// Stopped at its bound with more to repair.
        case truncated
        case failed
    }

    public var settings: Settings
    private var nextDue: [PartitionID: ContinuousClock.Instant] = [:]
    private var peerCursor: [PartitionID: Int] = [:]
    private var refillFailures: [PartitionID: Int] = [:]
    private var nextSweep: [PartitionID: ContinuousClock.Instant] = [:]
    /// Partitions with an exchange running.
    public private(set) var exchanging: Set<PartitionID> = []
    /// Whether a sweep runs.
    public private(set) var sweeping = false
    private var rng: SplitMix64

    public init(settings: Settings, seed: UInt64) {
        self.settings = settings
        rng = SplitMix64(seed: seed)
    }

    /// The timer's exchanges due at `now`, each with its peer, as many as free slots allow; each
    /// is marked running (end it with `ended`).
    public mutating func exchangesDue(now: ContinuousClock.Instant, _ partitions: [Partition]) -> [(PartitionID, NodeName)] {
        var out: [(PartitionID, NodeName)] = []
        for p in partitions {
            guard exchanging.count < settings.maxConcurrentExchanges else { break }
            if nextDue[p.id] == nil { nextDue[p.id] = p.refilling ? now : now + spread(settings.exchangeInterval) }
            guard let due = nextDue[p.id], due <= now, !exchanging.contains(p.id),
                  p.treeReady, p.replica, !p.peers.isEmpty else { continue }
            let cursor = peerCursor[p.id, default: 0]
            peerCursor[p.id] = cursor &+ 1
            exchanging.insert(p.id)
            nextDue[p.id] = now + jitter(settings.exchangeInterval)
            out.append((p.id, p.peers[cursor % p.peers.count]))
        }
        return out
    }

    /// Takes a slot for an exchange of `p` the operator asked for; false when none is free or
    /// `p` already has one.
    public mutating func take(_ p: PartitionID) -> Bool {
        guard !exchanging.contains(p), exchanging.count < settings.maxConcurrentExchanges else { return false }
        exchanging.insert(p)
        return true
    }

    /// Frees `p`'s slot.
    public mutating func release(_ p: PartitionID) { exchanging.remove(p) }

    /// Records how an exchange of `p` ended (`refilling`: its copy was refilling when it ended).
    public mutating func ended(_ p: PartitionID, _ outcome: Outcome, refilling: Bool, now: ContinuousClock.Instant) {
        switch outcome {
        case .failed:
            guard refilling else { return }
            let failures = refillFailures[p, default: 0] + 1
            refillFailures[p] = failures
            nextDue[p] = now + .milliseconds(min(30_000, 250 << min(failures, 7)))
        case .truncated:
            refillFailures[p] = nil
            nextDue[p] = now + .seconds(1)
        case .completed:
            refillFailures[p] = nil
        }
    }

    /// Makes `p` due at `now` (damage found in its copy).
    public mutating func dueNow(_ p: PartitionID, now: ContinuousClock.Instant) { nextDue[p] = now }

    /// The partition whose sweep is due at `now`, if none runs; it is marked running (end it
    /// with `sweepEnded`) and its next is set an interval later.
    public mutating func sweepDue(now: ContinuousClock.Instant, _ partitions: [PartitionID]) -> PartitionID? {
        guard settings.sweepInterval > .zero, !sweeping else { return nil }
        var due: PartitionID?
        for p in partitions {
            guard let at = nextSweep[p] else {
                nextSweep[p] = now + spread(settings.sweepInterval)
                continue
            }
            if at <= now, due == nil { due = p }
        }
        guard let p = due else { return nil }
        nextSweep[p] = now + jitter(settings.sweepInterval)
        sweeping = true
        return p
    }

    public mutating func sweepEnded() { sweeping = false }

    /// A point drawn in [0, d).
    private mutating func spread(_ d: Duration) -> Duration {
        .milliseconds(Int64(rng.next(below: UInt64(max(1, d / .milliseconds(1))))))
    }

    /// `d` ± 25 %.
    private mutating func jitter(_ d: Duration) -> Duration {
        let ms = max(4, d / .milliseconds(1))
        let quarter = ms / 4
        return .milliseconds(Int64(ms - quarter) + Int64(rng.next(below: UInt64(2 * quarter + 1))))
    }
}
