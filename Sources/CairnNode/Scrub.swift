import CairnCore
import Logging

/// How the storage scrub runs (`storage.scrub_*`, Docs/configuration.md).
public struct ScrubSettings: Sendable {
    /// Time between the starts of two passes over every table (`storage.scrub_interval`, 7 days;
    /// zero: no scrub). The first pass starts when the node starts.
    public var interval: Duration = .seconds(7 * 86_400)
    /// Bytes per second a pass reads (`storage.scrub_bytes_per_second`, 16 MiB/s).
    public var bytesPerSecond = 16 << 20
    public init() {}
}

/// Reads every table of the store through and checks each block, so damage (bit rot, a torn
/// sector) is found before a read needs the keys it holds: at start, then every
/// `ScrubSettings.interval`, paced. It only finds: damage it meets is recorded by the store
/// (`PartitionStore.damagedTables`), and `AntiEntropyManager` sets the table aside and has the
/// keys it held refilled from replicas.
///
/// Isolation: an actor; one pass at a time. Supervised by the node's supervisor.
actor Scrubber: SupervisedChild {
    nonisolated let childName = "scrub"
    private let settings: ScrubSettings
    private let storage: @Sendable () -> (any PartitionStore)?
    private let clock: any NodeClock
    private let metrics: NodeMetrics
    private let logger: Logger
    private let pacer: Pacer

    init(settings: ScrubSettings, storage: @escaping @Sendable () -> (any PartitionStore)?, clock: any NodeClock,
         metrics: NodeMetrics, logger: Logger) {
        self.settings = settings
        self.storage = storage
        self.clock = clock
        self.metrics = metrics
        self.logger = logger
        pacer = Pacer(bytesPerSecond: settings.bytesPerSecond, clock: clock)
    }

    func run() async throws {
        guard settings.interval > .zero else { return }
        while !Task.isCancelled {
            let started = clock.now()
            try await pass()
            try await clock.sleep(until: started + settings.interval)
        }
    }

    /// One pass over the tables live when it starts (a table written since is checked by the
    /// next). Returns the damaged blocks found.
    @discardableResult
    func pass() async throws -> Int {
        guard let store = storage() else { return 0 }
        let tables = store.tables()
        guard !tables.isEmpty else { return 0 }
        let started = clock.now()
        var bytes = 0
        var damaged = 0
        for t in tables {
            try Task.checkCancellation()
            await pacer.pace(Int(clamping: t.bytes))
            do {
                let r = try await store.verify(table: t.table)
                bytes += r.bytes
                damaged += r.damaged
                metrics.scrubBytes.increment(by: r.bytes)
                if r.damaged > 0 {
                    metrics.scrubDamage.increment(by: r.damaged)
                    logger.error("scrub found a damaged table", metadata: ["table": "\(t.table)", "damaged_blocks": "\(r.damaged)"])
                }
            } catch {
                // A table compacted away meanwhile is gone, not damaged; anything else is logged
                // and the pass goes on.
                logger.warning("scrub could not read a table", metadata: ["table": "\(t.table)", "error": "\(error)"])
            }
        }
        metrics.scrubPasses.increment()
        logger.info("scrub pass complete", metadata: [
            "tables": "\(tables.count)", "bytes": "\(bytes)", "damaged_blocks": "\(damaged)",
            "took": "\(started.duration(to: clock.now()))",
        ])
        return damaged
    }
}
