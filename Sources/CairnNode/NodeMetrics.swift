import CoreMetrics
public import Prometheus



import CairnCore
import CairnAntiEntropy
import CairnStorage
import Synchronization

/// The node's metrics, created once against the node's own Prometheus registry (so several
/// in-process nodes never share counters). Names and meanings: Docs/metrics.md.
public final class NodeMetrics: Sendable {
    public let registry: PrometheusCollectorRegistry
    let factory: PrometheusMetricsFactory

    /// Request latency buckets: 100 µs ... 10 s.
    public static let latencyBuckets: [Duration] = [
        .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .microseconds(2500),
        .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
        .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2500), .seconds(5), .seconds(10),
    ]

    public enum Outcome: String, CaseIterable, Sendable {
        case ok, notFound = "not_found", unavailable, notReached = "not_reached", timeout, invalid, overloaded, error
    }

    /// Indexed by `OperationKind.rawValue - 1`, then by the outcome's position in `allCases`
    /// (no string building on the request path).
    private let requests: [[CoreMetrics.Counter]]
    private let latency: [CoreMetrics.Timer]
    private static let outcomeIndex = Dictionary(uniqueKeysWithValues: Outcome.allCases.enumerated().map { ($1, $0) })
    let inflight: CoreMetrics.Gauge
    let inflightLimit: CoreMetrics.Gauge
    let protocolErrors: CoreMetrics.Counter
    let siblingsPruned: CoreMetrics.Counter
    let supervisorRestarts: CoreMetrics.Counter
    let forwarded: CoreMetrics.Counter
    /// Replica requests for a partition this node handed away, relayed to its successors.
    let relayedReplicaRequests: CoreMetrics.Counter
    /// Replica gets and puts served from the event loop on the store's thread, without a task.
    let directReplicaRequests: CoreMetrics.Counter
    /// Client gets, puts and deletes coordinated from callbacks, without a task (`NodeCore.coordinateDirectly`).
    let directCoordinations: CoreMetrics.Counter
    /// Local reads answered from memory on the thread that asked, without the store's thread:
    /// by a coordinator for its own copy, and for another node's replica get.
    let memoryReadsCoordinator: CoreMetrics.Counter
    let memoryReadsReplica: CoreMetrics.Counter
    let peersUp: CoreMetrics.Gauge
    let replicaRequests: CoreMetrics.Counter
    let replicaFailures: CoreMetrics.Counter
    let storageErrors: CoreMetrics.Counter
    let corruptObjects: CoreMetrics.Counter
    /// Times a client or peer connection stopped being read because its replies were not read
    /// (`limits.max_unflushed_reply_bytes`) or too many of its requests were unanswered.
    let readPauses: CoreMetrics.Counter
    /// Reads that met a corrupt storage block (checksum mismatch): the key was not served here.
    let corruptReads: CoreMetrics.Counter
    /// Keys whose damaged stored copy a write (a replica's object, a client's value) replaced.
    let damagedKeysReplaced: CoreMetrics.Counter
    /// Streams open now, to peers (`out`) and from peers (`in`).
    let streamsOut: StreamGauge
    let streamsIn: StreamGauge
    /// Stream sends that found the window full and waited (`transport.stream_window_bytes`).
    let streamWindowWaits: CoreMetrics.Counter
    /// Stream opens refused by `transport.max_streams_per_peer`, on either side.
    let streamsRefused: CoreMetrics.Counter
    /// Gossip packets sent and received (SWIM messages with a ring summary).
    let gossipSent: CoreMetrics.Counter
    let gossipReceived: CoreMetrics.Counter
    /// Liveness changes this node's failure detector made (alive, suspect, dead).
    let livenessChanges: CoreMetrics.Counter
    /// The version of the ring state this node holds.
    let ringVersion: CoreMetrics.Gauge
    /// Handoff: bytes and keys sent, keys received and merged, transfers running and waiting here.
    let handoffBytes: CoreMetrics.Counter
    let handoffKeys: CoreMetrics.Counter
    let handoffReceivedKeys: CoreMetrics.Counter
    let handoffActive: CoreMetrics.Gauge
    let handoffPending: CoreMetrics.Gauge
    let handoffOldestSeconds: CoreMetrics.Gauge
    let handoffTimeouts: CoreMetrics.Counter
    let handoffLeftovers: CoreMetrics.Counter
    /// Read repairs by outcome: sent, acknowledged, failed, skipped_overload.
    let readRepairs: LabelledCounter
    let readRepairsInflight: CoreMetrics.Gauge
    /// Hints (`cairn_hints_*`): kept, replayed, dropped by reason; held now (count, bytes, oldest age).
    let hintsStored: CoreMetrics.Counter
    let hintsReplayed: CoreMetrics.Counter
    let hintsDropped: LabelledCounter
    let hintsHeld: CoreMetrics.Gauge
    let hintsBytes: CoreMetrics.Gauge
    let hintsOldestSeconds: CoreMetrics.Gauge
    /// Anti-entropy (`cairn_aae_*`): exchanges by outcome, keys repaired by direction, bytes by
    /// direction, tree builds by kind, trees found drifted by a rebuild, the oldest exchange's
    /// age, partitions refilling and builds waiting.
    let aaeExchanges: LabelledCounter
    let aaeKeysRepaired: LabelledCounter
    /// Bytes of the keys and objects those repairs moved (what `aaeBytes` was spent on).
    let aaeDataRepaired: LabelledCounter
    let aaeBytes: LabelledCounter
    let aaeTreeBuilds: LabelledCounter
    let aaeTreeDrift: CoreMetrics.Counter
    let aaeOldestExchangeSeconds: CoreMetrics.Gauge
    let aaeRefilling: CoreMetrics.Gauge
    /// Tombstones found by the last sweep of each partition (not yet collected); collected;
    /// kept by each reason (`TombstoneRule.Block`).
    let tombstonesHeld: CoreMetrics.Gauge
    let tombstonesCollected: CoreMetrics.Counter
    /// Copies of collected history (a collected tombstone, or older) that arrived again and
    /// were not stored.
    let tombstonesReturned: CoreMetrics.Counter
    /// Collected tombstones' clocks the vnodes remember (`tombstones.remembered_per_vnode` each).
    let tombstonesRemembered: StreamGauge
    let tombstonesBlocked: [TombstoneRule.Block: CoreMetrics.Gauge]
    /// Damaged tables set aside and their partitions marked for refilling.
    let aaeDamagedTables: CoreMetrics.Counter
    /// Bytes of tables the scrub read and checked; passes it completed; damaged blocks it found.
    let scrubBytes: CoreMetrics.Counter
    let scrubPasses: CoreMetrics.Counter
    let scrubDamage: CoreMetrics.Counter
    let aaeBuildsPending: CoreMetrics.Gauge
    /// Writes this node took as a fallback (sloppy quorum), and fallback vnodes it runs now.
    let fallbackWrites: CoreMetrics.Counter
    let fallbackVnodes: CoreMetrics.Gauge
    /// Handshakes this node refused, by side (`in`: as the acceptor, `out`: as the dialer) and reason.
    private let handshakeRejections: [String: CoreMetrics.Counter]

    public init(maxInflight: Int) {
        registry = PrometheusCollectorRegistry()
        var f = PrometheusMetricsFactory(registry: registry)
        f.defaultDurationHistogramBuckets = Self.latencyBuckets
        factory = f
        let ops: [OperationKind] = [.get, .put, .delete]
        let requests = ops.map { op in
            Outcome.allCases.map { outcome in
                CoreMetrics.Counter(label: "cairn_requests_total", dimensions: [("op", "\(op)"), ("outcome", outcome.rawValue)], factory: f)
            }
        }
        let latency = ops.map { CoreMetrics.Timer(label: "cairn_request_duration_seconds", dimensions: [("op", "\($0)")], factory: f) }
        self.requests = requests
        self.latency = latency
        inflight = CoreMetrics.Gauge(label: "cairn_inflight_requests", factory: f)
        inflightLimit = CoreMetrics.Gauge(label: "cairn_inflight_requests_limit", factory: f)
        inflightLimit.record(maxInflight)
        protocolErrors = CoreMetrics.Counter(label: "cairn_protocol_errors_total", factory: f)
        gossipSent = CoreMetrics.Counter(label: "cairn_gossip_packets_total", dimensions: [("direction", "out")], factory: f)
        gossipReceived = CoreMetrics.Counter(label: "cairn_gossip_packets_total", dimensions: [("direction", "in")], factory: f)
        livenessChanges = CoreMetrics.Counter(label: "cairn_liveness_changes_total", factory: f)
        ringVersion = CoreMetrics.Gauge(label: "cairn_ring_version", factory: f)
        handoffBytes = CoreMetrics.Counter(label: "cairn_handoff_bytes_total", factory: f)
        handoffKeys = CoreMetrics.Counter(label: "cairn_handoff_keys_total", dimensions: [("direction", "out")], factory: f)
        handoffReceivedKeys = CoreMetrics.Counter(label: "cairn_handoff_keys_total", dimensions: [("direction", "in")], factory: f)
        handoffActive = CoreMetrics.Gauge(label: "cairn_handoff_active_transfers", factory: f)
        handoffPending = CoreMetrics.Gauge(label: "cairn_handoff_pending_transfers", factory: f)
        handoffOldestSeconds = CoreMetrics.Gauge(label: "cairn_handoff_oldest_transfer_seconds", factory: f)
        handoffTimeouts = CoreMetrics.Counter(label: "cairn_handoff_timeouts_total", factory: f)
        handoffLeftovers = CoreMetrics.Counter(label: "cairn_handoff_leftover_copies_total", factory: f)
        siblingsPruned = CoreMetrics.Counter(label: "cairn_siblings_pruned_total", factory: f)
        supervisorRestarts = CoreMetrics.Counter(label: "cairn_supervisor_restarts_total", factory: f)
        forwarded = CoreMetrics.Counter(label: "cairn_forwarded_requests_total", factory: f)
        relayedReplicaRequests = CoreMetrics.Counter(label: "cairn_relayed_replica_requests_total", factory: f)
        directReplicaRequests = CoreMetrics.Counter(label: "cairn_replica_requests_served_direct_total", factory: f)
        directCoordinations = CoreMetrics.Counter(label: "cairn_requests_coordinated_direct_total", factory: f)
        memoryReadsCoordinator = CoreMetrics.Counter(label: "cairn_reads_from_memory_total", dimensions: [("role", "coordinator")], factory: f)
        memoryReadsReplica = CoreMetrics.Counter(label: "cairn_reads_from_memory_total", dimensions: [("role", "replica")], factory: f)
        peersUp = CoreMetrics.Gauge(label: "cairn_peers_up", factory: f)
        replicaRequests = CoreMetrics.Counter(label: "cairn_replica_requests_total", factory: f)
        replicaFailures = CoreMetrics.Counter(label: "cairn_replica_request_failures_total", factory: f)
        storageErrors = CoreMetrics.Counter(label: "cairn_storage_errors_total", factory: f)
        corruptObjects = CoreMetrics.Counter(label: "cairn_corrupt_objects_total", factory: f)
        readPauses = CoreMetrics.Counter(label: "cairn_connection_read_pauses_total", factory: f)
        corruptReads = CoreMetrics.Counter(label: "cairn_storage_corrupt_reads_total", factory: f)
        damagedKeysReplaced = CoreMetrics.Counter(label: "cairn_damaged_keys_replaced_total", factory: f)
        streamsOut = StreamGauge(CoreMetrics.Gauge(label: "cairn_streams_open", dimensions: [("direction", "out")], factory: f))
        streamsIn = StreamGauge(CoreMetrics.Gauge(label: "cairn_streams_open", dimensions: [("direction", "in")], factory: f))
        streamWindowWaits = CoreMetrics.Counter(label: "cairn_stream_window_waits_total", factory: f)
        streamsRefused = CoreMetrics.Counter(label: "cairn_streams_refused_total", factory: f)
        readRepairs = LabelledCounter(label: "cairn_read_repairs_total", dimension: "outcome",
                                      values: ["sent", "acknowledged", "failed", "skipped_overload"], factory: f)
        readRepairsInflight = CoreMetrics.Gauge(label: "cairn_read_repairs_inflight", factory: f)
        hintsStored = CoreMetrics.Counter(label: "cairn_hints_stored_total", factory: f)
        hintsReplayed = CoreMetrics.Counter(label: "cairn_hints_replayed_total", factory: f)
        hintsDropped = LabelledCounter(label: "cairn_hints_dropped_total", dimension: "reason",
                                       values: ["expired", "target_full", "store_full", "not_ready", "unreadable"], factory: f)
        hintsHeld = CoreMetrics.Gauge(label: "cairn_hints", factory: f)
        hintsBytes = CoreMetrics.Gauge(label: "cairn_hints_bytes", factory: f)
        hintsOldestSeconds = CoreMetrics.Gauge(label: "cairn_hints_oldest_seconds", factory: f)
        aaeExchanges = LabelledCounter(label: "cairn_aae_exchanges_total", dimension: "outcome",
                                       values: ["in_sync", "repaired", "truncated", "failed"], factory: f)
        aaeKeysRepaired = LabelledCounter(label: "cairn_aae_keys_repaired_total", dimension: "direction",
                                          values: ["local", "remote"], factory: f)
        aaeDataRepaired = LabelledCounter(label: "cairn_aae_repaired_bytes_total", dimension: "direction",
                                          values: ["local", "remote"], factory: f)
        aaeBytes = LabelledCounter(label: "cairn_aae_bytes_total", dimension: "direction", values: ["sent", "received"], factory: f)
        aaeTreeBuilds = LabelledCounter(label: "cairn_aae_tree_builds_total", dimension: "kind",
                                        values: ["build", "rebuild", "failed"], factory: f)
        aaeTreeDrift = CoreMetrics.Counter(label: "cairn_aae_tree_drift_total", factory: f)
        aaeOldestExchangeSeconds = CoreMetrics.Gauge(label: "cairn_aae_oldest_exchange_seconds", factory: f)
        aaeRefilling = CoreMetrics.Gauge(label: "cairn_aae_refilling_partitions", factory: f)
        aaeDamagedTables = CoreMetrics.Counter(label: "cairn_aae_damaged_tables_total", factory: f)
        tombstonesHeld = CoreMetrics.Gauge(label: "cairn_tombstones_held", factory: f)
        tombstonesCollected = CoreMetrics.Counter(label: "cairn_tombstones_collected_total", factory: f)
        tombstonesReturned = CoreMetrics.Counter(label: "cairn_tombstones_returned_total", factory: f)
        tombstonesRemembered = StreamGauge(CoreMetrics.Gauge(label: "cairn_tombstones_remembered", factory: f))
        tombstonesBlocked = Dictionary(uniqueKeysWithValues: TombstoneRule.Block.allCases.map {
            ($0, CoreMetrics.Gauge(label: "cairn_tombstones_blocked", dimensions: [("reason", $0.rawValue)], factory: f))
        })
        scrubBytes = CoreMetrics.Counter(label: "cairn_storage_scrub_bytes_total", factory: f)
        scrubPasses = CoreMetrics.Counter(label: "cairn_storage_scrub_passes_total", factory: f)
        scrubDamage = CoreMetrics.Counter(label: "cairn_storage_scrub_damage_total", factory: f)
        aaeBuildsPending = CoreMetrics.Gauge(label: "cairn_aae_tree_builds_pending", factory: f)
        fallbackWrites = CoreMetrics.Counter(label: "cairn_fallback_writes_total", factory: f)
        fallbackVnodes = CoreMetrics.Gauge(label: "cairn_fallback_vnodes", factory: f)
        var rejections: [String: CoreMetrics.Counter] = [:]
        for side in ["in", "out"] {
            for reason in HandshakeRefusal.Reason.allCases {
                rejections[side + reason.rawValue] = CoreMetrics.Counter(label: "cairn_handshake_rejections_total",
                                                                         dimensions: [("side", side), ("reason", reason.rawValue)], factory: f)
            }
        }
        handshakeRejections = rejections
    }

    /// Counts a handshake refused as the acceptor (`inbound`) or the dialer.
    func countHandshakeRejection(_ reason: HandshakeRefusal.Reason, inbound: Bool) {
        handshakeRejections[(inbound ? "in" : "out") + reason.rawValue]?.increment()
    }

    /// Counts a request that was refused before any work (no latency sample).
    func count(_ op: OperationKind, _ outcome: Outcome) {
        let i = Int(op.rawValue) - 1
        guard requests.indices.contains(i), let o = Self.outcomeIndex[outcome] else { return }
        requests[i][o].increment()
    }

    func record(_ op: OperationKind, _ outcome: Outcome, since start: ContinuousClock.Instant) {
        count(op, outcome)
        let i = Int(op.rawValue) - 1
        if latency.indices.contains(i) { latency[i].recordInterval(since: start) }
    }

    /// Mirrors the storage engine's counters (read at scrape time). Monotonic engine counters are
    /// exposed as gauges holding their current value.
    func recordStorage(_ s: Database.Statistics) {
        let values: [(String, [(String, String)], Double)] = [
            ("cairn_storage_memtable_bytes", [], Double(s.memtableBytes)),
            ("cairn_storage_immutable_memtable_bytes", [], Double(s.immutableMemtableBytes)),
            ("cairn_storage_block_cache_bytes", [], Double(s.blockCache.bytes)),
            ("cairn_storage_block_cache_hits", [], Double(s.blockCache.hits)),
            ("cairn_storage_block_cache_misses", [], Double(s.blockCache.misses)),
            ("cairn_storage_log_syncs", [], Double(s.logSyncs)),
            ("cairn_storage_log_writes", [], Double(s.logWrites)),
            ("cairn_storage_flushes", [], Double(s.flushes)),
            ("cairn_storage_compactions", [], Double(s.compactions)),
            ("cairn_storage_compaction_written_bytes", [], Double(s.compactionWrittenBytes)),
            ("cairn_storage_compaction_throttled_seconds", [], Double(s.compactionThrottledMicros) / 1e6),
            ("cairn_storage_table_write_outs", [], Double(s.tableWriteOuts)),
            ("cairn_storage_delayed_writes", [], Double(s.delayedWrites)),
            ("cairn_storage_stalled_writes", [], Double(s.stalledWrites)),
            ("cairn_storage_background_failures", [], Double(s.backgroundFailures)),
            ("cairn_storage_range_tombstones", [], Double(s.rangeTombstones)),
            ("cairn_storage_corrupt_tables", [], Double(s.corruptTables.count)),
            ("cairn_storage_quarantined_tables", [], Double(s.quarantinedTables.count)),
            ("cairn_storage_corruption_events", [], Double(s.corruptionEvents)),
        ] + s.tablesPerLevel.enumerated().map { ("cairn_storage_tables", [("level", "\($0.offset)")], Double($0.element)) }
          + s.bytesPerLevel.enumerated().map { ("cairn_storage_level_bytes", [("level", "\($0.offset)")], Double($0.element)) }
        for (label, dimensions, value) in values {
            CoreMetrics.Gauge(label: label, dimensions: dimensions, factory: factory).record(value)
        }
    }

    /// The Prometheus text exposition of every metric.
    public func exposition() -> String { registry.emitToString() }
}

/// A counter with one label whose values are known up front (no string building per increment;
/// an unknown value is counted nowhere). Thread-safe.
final class LabelledCounter: Sendable {
    private let counters: [String: CoreMetrics.Counter]

    init(label: String, dimension: String, values: [String], factory: PrometheusMetricsFactory) {
        counters = Dictionary(uniqueKeysWithValues: values.map {
            ($0, CoreMetrics.Counter(label: label, dimensions: [(dimension, $0)], factory: factory))
        })
    }

    func increment(outcome value: String, by n: Int = 1) {
        guard n > 0 else { return }
        counters[value]?.increment(by: n)
    }
}

/// A gauge of open streams, kept as a count here (opened / closed). Thread-safe.
final class StreamGauge: Sendable {
    private let gauge: CoreMetrics.Gauge
    private let count = Atomic<Int>(0)
    init(_ gauge: CoreMetrics.Gauge) {
        self.gauge = gauge
        gauge.record(0)
    }
    var value: Int { count.load(ordering: .relaxed) }
    func opened() { gauge.record(count.wrappingAdd(1, ordering: .relaxed).newValue) }
    func closed() { gauge.record(count.wrappingSubtract(1, ordering: .relaxed).newValue) }
    /// Adds `n` (negative: takes away) at once.
    func adjust(by n: Int) {
        guard n != 0 else { return }
        gauge.record(count.wrappingAdd(n, ordering: .relaxed).newValue)
    }
}

extension CoreMetrics.Timer {
    func recordInterval(since start: ContinuousClock.Instant) {
        let d = ContinuousClock.now - start
        let (s, atto) = d.components
        recordNanoseconds(s.multipliedReportingOverflow(by: 1_000_000_000).partialValue &+ atto / 1_000_000_000)
    }
}
