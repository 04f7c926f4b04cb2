public import CairnAntiEntropy
import CairnCore
import CairnRing
import CairnStorage
import CairnWire
import Logging

/// How anti-entropy is paced and bounded (`aae.*`, Docs/configuration.md).
public struct AntiEntropySettings: Sendable {
    /// Whether vnodes keep trees and replicas exchange them (`aae.enabled`).
    public var enabled = true
    /// The trees' shape, the same on every node (`aae.tree_depth`: 16^depth segments).
    public var shape = TreeShape.standard
    /// Each partition is exchanged about this often, with jitter of ±25% (`aae.exchange_interval`).
    public var exchangeInterval: Duration = .seconds(480)
    /// Exchanges this node runs at once, timer and `cairn repair` together (`aae.max_concurrent_exchanges`).
    public var maxConcurrentExchanges = 2
    /// Bounds of one exchange (`aae.max_segments_per_exchange`, `aae.keys_per_page`, `aae.max_parents_per_query`).
    public var exchange = ExchangeSettings()
    /// Objects in one fetch or push of a repair (`aae.repair_batch_keys`).
    public var repairBatchKeys = 256
    /// A key page or object batch stops growing past this many bytes (`aae.max_reply_bytes`).
    public var maxReplyBytes = 1 << 20
    /// A ready tree is rebuilt from storage this often (`aae.rebuild_interval`, 7 days): a rebuild
    /// catches a tree that drifted from the data (a bug, damaged bytes).
    public var rebuildInterval: Duration = .seconds(7 * 86_400)
    /// Tree builds running at once (`aae.max_concurrent_builds`).
    public var maxConcurrentBuilds = 1
    /// Bytes per second all builds together read (`aae.build_bytes_per_second`); tombstone
    /// sweeps share the budget.
    public var buildBytesPerSecond = 32 << 20
    /// Bytes per second the exchanges this node begins send and receive together, trees, key
    /// pages and objects (`aae.exchange_bytes_per_second`): a refill takes longer, the requests
    /// it runs beside keep their latency.
    public var exchangeBytesPerSecond = 2 << 20
    /// A tombstone is collected no sooner than this after its deletion (`tombstones.grace`),
    /// and only when `TombstoneRule` allows.
    public var tombstoneGrace: Duration = .seconds(3600)
    /// Each partition's tombstones are looked at this often (`tombstones.sweep_interval`;
    /// zero: tombstones are kept forever).
    public var tombstoneSweepInterval: Duration = .seconds(3600)
    /// Clocks of collected tombstones each primary vnode remembers, newest kept
    /// (`tombstones.remembered_per_vnode`): a copy of history one covers is not stored again.
    public var rememberedPerVnode = 65_536
    public init() {}
}

/// Anti-entropy state that outlives vnodes: whether each partition's copy is refilling, and the
/// trees saved at the last clean shutdown (each taken once, by the vnode that starts with it).
///
/// Refilling (Docs/anti-entropy.md, "Refilling"): a store created by this run (`createdFresh`:
/// a new node, or a known name whose disk was lost) marks itself refilling; from then on each
/// partition's copy is refilling until an exchange of it with another replica completes (not
/// truncated). The mark and the partitions settled are kept in the store's metadata, so a
/// restart in the middle of a refill goes on refilling. Thread-safe.
final class AntiEntropyState: Sendable {
    private struct Refill {
        var pending = false
        var settled: Set<PartitionID> = []
        /// Partitions whose copy lost keys to damaged storage (`markDamaged`): refilling until an
        /// exchange completes, whatever `pending` says.
        var damaged: Set<PartitionID> = []
        /// Damaged tables already handled (their partitions marked).
        var handledTables: Set<UInt64> = []
        /// Settled partitions not yet written to the store.
        var unsaved = false
    }
    private let refill = Locked(Refill())
    private let saved = Locked<[PartitionID: SegmentTree]>([:])

    static let refillKey = "refill"
    static let settledKey = "refill-settled"
    static let damagedKey = "refill-damaged"
    /// The wall time (ms) this node last recorded itself alive (`heartbeat`).
    static let aliveKey = "alive-at"
    /// Set when the node came back from longer than the hint window away: its refilling
    /// partitions may hold stale values, not only lack keys.
    static let staleKey = "refill-stale"
    static let handledTablesKey = "damage-handled"
    /// The side file holding the trees saved at a clean shutdown.
    static let treeFile = "aae-trees"

    /// Reads the refill mark (setting it first for a store this run created) and, after a clean
    /// shutdown, the saved trees. A tree that does not decode is logged and built anew.
    ///
    /// A node whose last recorded heartbeat is more than `awayLimitMillis` (`hints.max_age`)
    /// before `nowMillis` was away longer than the hint window: hints for it may have expired,
    /// so deletes and writes it missed may reach it only through exchanges, and every partition
    /// counts as refilling until an exchange of it completes (its old data is not authoritative).
    func load(from store: any PartitionStore, logger: Logger, nowMillis: UInt64 = 0, awayLimitMillis: UInt64 = 0) async throws {
        emptyStart.withLock { $0 = store.openedEmpty }
        heartbeatEvery.withLock { $0 = Self.heartbeatInterval(awayLimitMillis: awayLimitMillis) }
        if store.createdFresh { try await store.setMetadata([(Self.refillKey, [1])]) }
        // A mark in a damaged table block is unknown: assume the worst (refilling) for the
        // refill mark, and nothing settled; exchanges settle the partitions again.
        func read(_ name: String) throws -> (value: [UInt8]?, known: Bool) {
            do { return (try store.metadata(name), true) } catch let e as StorageError {
                guard case .corruption = e else { throw e }
                logger.error("anti-entropy metadata unreadable; assuming this node's copies need refilling", metadata: [
                    "name": "\(name)", "error": "\(e)"])
                return (nil, false)
            }
        }
        let mark = try read(Self.refillKey)
        var pending = mark.value != nil || !mark.known
        var settled = Set(Self.decodePartitions(try read(Self.settledKey).value ?? []))
        if let bytes = try read(Self.aliveKey).value, let aliveAt = BigEndianWords.decode(bytes, count: 1)?.first, awayLimitMillis > 0 {
            if nowMillis > aliveAt, nowMillis - aliveAt > awayLimitMillis {
                try await store.setMetadata([(Self.refillKey, [1]), (Self.settledKey, []), (Self.staleKey, [1])])
                logger.warning("this node was away longer than hints.max_age; its partitions count as refilling until an exchange of each completes",
                               metadata: ["away_seconds": "\((nowMillis - aliveAt) / 1000)"])
                pending = true
                settled = []
            }
        }
        let staleMark = try read(Self.staleKey).value != nil
        stale.withLock { $0 = staleMark }
        let damaged = Set(Self.decodePartitions(try read(Self.damagedKey).value ?? []))
        let handled = Set(Self.decodeTables(try read(Self.handledTablesKey).value ?? []))
        refill.withLock { $0 = Refill(pending: pending, settled: settled, damaged: damaged, handledTables: handled) }
        if !damaged.isEmpty {
            logger.warning("partitions that lost keys to damaged storage are still refilling", metadata: [
                "partitions": "\(damaged.sorted().map(\.index))"])
        }
        if pending {
            logger.warning("this node's store is new: its partitions count as refilling until an anti-entropy exchange of each completes",
                           metadata: ["settled": "\(settled.count)"])
        }
        // Taken (removed) whatever happens: a file found at a later start is that run's own.
        guard let file = try await store.takeSideFile(Self.treeFile), store.openedAfterCleanShutdown else { return }
        do {
            saved.withLock { $0 = [:] }
            let trees = try Self.decodeTrees(file)
            saved.withLock { $0 = trees }
        } catch {
            logger.warning("saved anti-entropy trees unreadable; they will be built from storage", metadata: ["error": "\(error)"])
        }
    }

    /// The tree saved for `p` at the last clean shutdown, once; while `emptyStart` holds (the
    /// store opened empty and the node has not started serving), an empty one.
    func takeSavedTree(_ p: PartitionID, shape: TreeShape) -> SegmentTree? {
        if emptyStart.value { return SegmentTree(shape: shape) }
        return saved.withLock { $0.removeValue(forKey: p) }
    }

    /// Set while the store is as it opened, empty: the vnodes started then need no tree build.
    /// Ended (`endEmptyStart`) once the first view's vnodes are started, before any write.
    private let emptyStart = Locked(false)

    func endEmptyStart() { emptyStart.withLock { $0 = false } }

    private let stale = Locked(false)
    /// Partitions of this node a set-aside damaged table covers (`setDamageHandled`).
    private let setAside = Locked<Set<PartitionID>>([])

    /// Records the partitions that set-aside damaged tables cover now: a vnode of one may drop
    /// a key the damage hides when it is read (`Vnode.get`).
    func setDamageHandled(_ partitions: Set<PartitionID>) { setAside.withLock { $0 = partitions } }

    /// Whether damage covering `p` was handled: its table set aside, its partitions marked.
    func mayForgetDamaged(_ p: PartitionID) -> Bool { setAside.withLock { $0.contains(p) } }

    /// Whether `p`'s copy may hold stale values: refilling after the node was away longer than
    /// the hint window.
    func isStale(_ p: PartitionID) -> Bool { stale.value && refill.withLock { $0.pending && !$0.settled.contains(p) } }

    func isRefilling(_ p: PartitionID) -> Bool { refill.withLock { ($0.pending && !$0.settled.contains(p)) || $0.damaged.contains(p) } }

    var refillPending: Bool { refill.withLock { $0.pending || !$0.damaged.isEmpty } }

    /// Partitions refilling because damaged storage cost them keys, in order.
    var damagedPartitions: [PartitionID] { refill.withLock { $0.damaged.sorted() } }

    /// Whether damaged table `table` was handled (`markDamaged`).
    func damageHandled(_ table: UInt64) -> Bool { refill.withLock { $0.handledTables.contains(table) } }

    /// Records that damaged table `table` cost `partitions` keys: each refills until an exchange
    /// of it completes. Synced before returning, so a restart goes on refilling them.
    func markDamaged(table: UInt64, partitions: [PartitionID], liveTables: Set<UInt64>, store: any PartitionStore) async throws {
        let (damaged, handled) = refill.withLock { r in
            r.damaged.formUnion(partitions)
            r.handledTables.insert(table)
            // Tables gone from the store need no memory.
            r.handledTables.formIntersection(liveTables.union([table]))
            return (r.damaged.sorted(), r.handledTables.sorted())
        }
        try await store.setMetadata([(Self.damagedKey, Self.encodePartitions(damaged)), (Self.handledTablesKey, Self.encodeTables(handled))])
    }

    /// Records that `p`'s copy completed an exchange, so it no longer counts as refilling. True
    /// if it was refilling. Kept durably by the next `persistSettled` (a crash before that only
    /// makes the partition refill once more).
    @discardableResult
    func settle(_ p: PartitionID) -> Bool {
        refill.withLock { r in
            let wasDamaged = r.damaged.remove(p) != nil
            let wasRefilling = r.pending && r.settled.insert(p).inserted
            guard wasDamaged || wasRefilling else { return false }
            r.unsaved = true
            return true
        }
    }

    private let lastHeartbeat = Locked<UInt64?>(nil)
    private let heartbeatEvery = Locked<UInt64>(60_000)

    /// How often the heartbeat is recorded: a quarter of the away limit, between 1 s and 1 min,
    /// so a start measures its absence to within that (a shorter absence is never taken for a
    /// longer one by more than it).
    static func heartbeatInterval(awayLimitMillis: UInt64) -> UInt64 { min(60_000, max(1_000, awayLimitMillis / 4)) }

    /// Records that this node is alive now (`aliveKey`), at most every `heartbeatInterval`: how a
    /// later start knows how long it was away.
    func heartbeat(store: any PartitionStore, nowMillis: UInt64) async throws {
        let every = heartbeatEvery.value
        let due = lastHeartbeat.withLock { last in
            guard last.map({ nowMillis < $0 || nowMillis - $0 >= every }) ?? true else { return false }
            last = nowMillis
            return true
        }
        guard due else { return }
        try await store.setMetadata([(Self.aliveKey, BigEndianWords.encode(nowMillis))])
    }

    /// Writes the partitions settled since the last call (one synced write), if any.
    func persistSettled(store: any PartitionStore) async throws {
        guard let (settled, damaged) = refill.withLock({ r -> ([PartitionID], [PartitionID])? in
            guard r.unsaved else { return nil }
            r.unsaved = false
            return (r.settled.sorted(), r.damaged.sorted())
        }) else { return }
        do {
            try await store.setMetadata([(Self.settledKey, Self.encodePartitions(settled)), (Self.damagedKey, Self.encodePartitions(damaged))])
        } catch {
            refill.withLock { $0.unsaved = true }
            throw error
        }
    }

    /// Saves `trees` (replacing what was saved before) for the next start after a clean shutdown.
    static func save(_ trees: [PartitionID: SegmentTree], to store: any PartitionStore) async throws {
        try await store.saveSideFile(treeFile, encodeTrees(trees))
    }

    /// `trees-file = %x01 count:u32be (partition:u32be tree:blob)* check:u64be` (check: XXH64 of
    /// what precedes; each tree as `SegmentTree.encoded`).
    static func encodeTrees(_ trees: [PartitionID: SegmentTree]) -> [UInt8] {
        var w = ByteWriter(capacity: trees.count * (trees.first?.value.shape.segments ?? 0) * 8 + 16)
        w.writeU8(1)
        w.writeU32(UInt32(truncatingIfNeeded: trees.count))
        for p in trees.keys.sorted() {
            w.writeU32(p.index)
            w.writeBlob(trees[p]?.encoded() ?? [])
        }
        w.writeU64(KeyHash.hash(w.bytes))
        return w.bytes
    }

    static func decodeTrees(_ bytes: [UInt8]) throws(DecodeError) -> [PartitionID: SegmentTree] {
        guard bytes.count >= 13, KeyHash.hash(Array(bytes[..<(bytes.count - 8)])) == bytes.suffix(8).reduce(UInt64(0), { $0 << 8 | UInt64($1) })
        else { throw DecodeError("trees file fails its check") }
        var r = ByteReader(Array(bytes[..<(bytes.count - 8)]))
        guard try r.readU8("trees format") == 1 else { throw DecodeError("unknown trees file format") }
        let n = Int(try r.readU32("tree count"))
        guard n <= r.remaining / 5 else { throw DecodeError("tree count \(n) exceeds what the file holds") }
        var out: [PartitionID: SegmentTree] = [:]
        for _ in 0..<n {
            let p = PartitionID(try r.readU32("partition"))
            out[p] = try SegmentTree.decode(try r.readBlob("tree", limit: r.remaining))
        }
        try r.expectEnd("trees file")
        return out
    }

    static func encodePartitions(_ ps: [PartitionID]) -> [UInt8] {
        var w = ByteWriter(capacity: ps.count * 4)
        for p in ps { w.writeU32(p.index) }
        return w.bytes
    }

    static func encodeTables(_ ts: [UInt64]) -> [UInt8] {
        var w = ByteWriter(capacity: ts.count * 8)
        for t in ts { w.writeU64(t) }
        return w.bytes
    }

    static func decodeTables(_ bytes: [UInt8]) -> [UInt64] {
        var r = ByteReader(bytes)
        var out: [UInt64] = []
        while r.remaining >= 8, let t = try? r.readU64() { out.append(t) }
        return out
    }

    static func decodePartitions(_ bytes: [UInt8]) -> [PartitionID] {
        var r = ByteReader(bytes)
        var out: [PartitionID] = []
        while r.remaining >= 4, let i = try? r.readU32() { out.append(PartitionID(i)) }
        return out
    }
}

/// What one exchange did, for `cairn repair` and `--status`.
struct ExchangeRecord: Sendable {
    var partition: PartitionID
    var peer: NodeName
    /// `in_sync`, `repaired`, `truncated` or `failed`.
    var outcome: String
    var summary: ExchangeSummary
    var bytesSent = 0
    var bytesReceived = 0
    var error: String?
    /// The failure may pass by itself soon (a tree not built yet).
    var retryable = false
    var finishedAt: ContinuousClock.Instant
    var wallMillis: UInt64
    var tookMillis: Int
}

/// Runs this node's side of anti-entropy: builds the trees vnodes lack (and rebuilds ready ones
/// on `aae.rebuild_interval`), exchanges each partition it holds with its other primaries on a
/// jittered timer and on demand (`cairn repair`), and answers other replicas' exchanges.
///
/// Isolation: thread-safe (its books behind locks); `run()` is a child of the node's supervisor
/// and owns every background build and exchange as child tasks. Bounds: at most
/// `maxConcurrentExchanges` exchanges (timer and on demand together) and `maxConcurrentBuilds`
/// builds at once; builds read at most `buildBytesPerSecond`.
final class AntiEntropyManager: SupervisedChild {
    /// The node's services (`env.me`, `env.transport`, … read through), the bounds, the vnodes
    /// and the refill state.
    @dynamicMemberLookup
    struct Environment: Sendable {
        let services: NodeServices
        let settings: AntiEntropySettings
        let vnodes: VnodeTable
        let state: AntiEntropyState
        /// Seeds the timers' jitter (deterministic in simulations).
        let seed: UInt64
        /// The node's own actor (what a primary vnode stamps with unless it has its own).
        let nodeActor: ActorID
        /// What this node holds for others: nodes it keeps hints for, partitions it keeps
        /// fallback copies of (indexes).
        let pendingHandoff: @Sendable () async -> (targets: [String], fallbacks: [Int])
        subscript<T>(dynamicMember path: KeyPath<NodeServices, T>) -> T { services[keyPath: path] }
    }

    let childName = "anti-entropy"
    let env: Environment
    private struct Book {
        /// When exchanges and sweeps are due, and which run.
        var schedule: AntiEntropySchedule
        var last: [PartitionID: ExchangeRecord] = [:]
        var builtAt: [PartitionID: ContinuousClock.Instant] = [:]
        /// What each partition's last sweep found.
        var tombstones: [PartitionID: TombstoneTally] = [:]
        /// Per partition and peer: the store's last applied sequence when the newest exchange
        /// with that peer that completed untruncated began (`TombstoneRule.Partition.exchangedAt`),
        /// and the ring version it ran under (start to end). Only exchanges under the current
        /// ring count: a ring change moves copies (a departing owner's old data reaches the new
        /// one by handoff), so what an earlier exchange proved no longer holds.
        var exchangedAt: [PartitionID: [NodeName: (sequence: UInt64, ring: UInt64)]] = [:]
        var building: Set<PartitionID> = []
        /// Builds that failed, in a row, with the last failure's time and reason (their backoff).
        var buildFailures: [PartitionID: (count: Int, at: ContinuousClock.Instant, reason: String)] = [:]
        /// Partitions refilling at the last look (nil: none yet).
        var refillingSeen: Int?
    }
    private let book: Locked<Book>
    /// Notified when a build or an exchange ends.
    private let slotsFree = Condition()
    private let woken = Locked(false)
    private let pacer: Pacer
    /// Paces the traffic of the exchanges this node begins (`exchangeBytesPerSecond`).
    let exchangePacer: Pacer

    init(env: Environment) {
        self.env = env
        let settings = AntiEntropySchedule.Settings(exchangeInterval: env.settings.exchangeInterval,
                                                    maxConcurrentExchanges: env.settings.maxConcurrentExchanges,
                                                    sweepInterval: env.settings.enabled ? env.settings.tombstoneSweepInterval : .zero)
        book = Locked(Book(schedule: AntiEntropySchedule(settings: settings, seed: env.seed)))
        pacer = Pacer(bytesPerSecond: env.settings.buildBytesPerSecond, clock: env.clock)
        exchangePacer = Pacer(bytesPerSecond: env.settings.exchangeBytesPerSecond, clock: env.clock)
    }

    func run() async throws {
        guard env.settings.enabled else { return }
        await withDiscardingTaskGroup { group in
            while !Task.isCancelled {
                let mine = env.vnodes.partitions
                await handleDamage(mine)
                for p in await buildsDue(mine) {
                    group.addTask {
                        await self.build(p)
                        self.wake()
                    }
                }
                if let p = sweepDue(mine) {
                    group.addTask {
                        await self.sweep(p)
                        self.wake()   // the next due partition at once, not a tick later
                    }
                }
                for (p, peer) in exchangesDue(mine) {
                    group.addTask {
                        _ = await self.exchange(p, with: peer)
                        self.release(p)
                    }
                }
                publish(mine)
                if let store = env.storage() {
                    do { try await env.state.persistSettled(store: store) } catch {
                        env.logger.error("could not record refilled partitions; retrying", metadata: ["error": "\(error)"])
                    }
                    do { try await env.state.heartbeat(store: store, nowMillis: env.clock.wallMillis()) } catch {
                        env.logger.warning("could not record this node's heartbeat", metadata: ["error": "\(error)"])
                    }
                }
                // Once a second, or at once when a build or exchange ends (its slot is free).
                _ = await slotsFree.wait(until: { woken.withLock { w in defer { w = false }; return w } },
                                         deadline: env.clock.now() + .seconds(1), clock: env.clock)
            }
            group.cancelAll()
        }
    }

    // MARK: Damage

    /// Handles each damaged table the store reports for the first time: sets it aside, marks
    /// the partitions of this node its key range covers as refilling (durably), and drops their
    /// trees. The rebuilds leave out what the damage hides, and the refilling partitions are
    /// exchanged as soon as their trees are ready, so replicas send the lost keys back.
    private func handleDamage(_ mine: [PartitionID]) async {
        guard let store = env.storage() else { return }
        let damaged = store.damagedTables()
        defer {
            // Tables handled (this run or an earlier one) and set aside.
            let handled = damaged.filter { $0.quarantined && env.state.damageHandled($0.table) }
            env.state.setDamageHandled(Set(mine.filter { p in handled.contains { $0.partitions?.contains(p.index) ?? false } }))
        }
        let found = damaged.filter { !env.state.damageHandled($0.table) }
        guard !found.isEmpty else { return }
        let live = Set(store.tables().map(\.table))
        for d in found {
            var setAside = false
            if !d.quarantined {
                do { setAside = try await store.quarantine(table: d.table) } catch {
                    env.logger.error("could not set a damaged table aside; retrying", metadata: ["table": "\(d.table)", "error": "\(error)"])
                    continue
                }
            }
            let hit = mine.filter { p in d.partitions?.contains(p.index) ?? false }
            do {
                try await env.state.markDamaged(table: d.table, partitions: hit, liveTables: live, store: store)
            } catch {
                env.logger.error("could not record damaged partitions; retrying", metadata: ["table": "\(d.table)", "error": "\(error)"])
                continue
            }
            for p in hit {
                await env.vnodes.vnode(for: p)?.invalidateTree()
                book.withLock { $0.schedule.dueNow(p, now: env.clock.now()) }
            }
            env.metrics.aaeDamagedTables.increment()
            env.logger.error("damaged table quarantined; the keys it held are being refilled from replicas", metadata: [
                "table": "\(d.table)", "bytes": "\(d.bytes)", "set_aside_now": "\(setAside)",
                "partitions": "\(hit.map(\.index))",
            ])
        }
        wake()
    }

    // MARK: Tombstones


    /// What one sweep of a partition found: tombstones held after it, and why each was kept.
    struct TombstoneTally: Sendable {
        var held = 0
        var blocked: [TombstoneRule.Block: Int] = [:]
    }

    /// The partition whose tombstone sweep is due, if no sweep runs (one at a time); its next
    /// sweep is set an interval (±25 %) later. The first sweep of each is spread over the first
    /// interval.
    private func sweepDue(_ mine: [PartitionID]) -> PartitionID? {
        let now = env.clock.now()
        return book.withLock { $0.schedule.sweepDue(now: now, mine) }
    }

    /// Sweeps `p`'s tombstones: decides each by `TombstoneRule` and has the vnode collect those
    /// it allows, reading the partition paced with the tree builds' budget.
    func sweep(_ p: PartitionID) async {
        defer { book.withLock { $0.schedule.sweepEnded() } }
        guard let store = env.storage(), let v = env.vnodes.vnode(for: p), let ring = env.ring() else { return }
        let primaries = ring.replicas(of: p)
        guard primaries.contains(env.me) else { return }
        let here = await env.pendingHandoff()
        let exchanged = (book.withLock { $0.exchangedAt[p] ?? [:] }).compactMapValues { $0.ring == ring.version ? $0.sequence : nil }
        var state = TombstoneRule.Partition(
            otherPrimaries: primaries.filter { $0 != env.me }.map(\.description),
            exchangedAt: Dictionary(uniqueKeysWithValues: exchanged.map { ($0.key.description, $0.value) }),
            // Any hint at all blocks: a hint's target may no longer be a primary of the partition
            // (the ring changed), and its replay still reaches the partition's owners.
            pendingHere: here.fallbacks.contains(Int(p.index)) || !here.targets.isEmpty,
            refilling: env.state.isRefilling(p),
            transferring: ring.pendingTransfers.contains { $0.partition == p })
        let rule = TombstoneRule(graceMillis: env.settings.tombstoneGrace.wholeMilliseconds)
        // The other members are asked only when nothing known here blocks already.
        if case .success = rule.horizon(state) {
            let elsewhere = await askPending(ring)
            state.pendingElsewhere = elsewhere.fallbacks.contains(Int(p.index)) || !elsewhere.targets.isEmpty
            state.memberUnknown = elsewhere.unknown
        }
        let horizon = rule.horizon(state)
        let now = env.clock.wallMillis()
        let limits = env.limits
        struct Page: Sendable {
            var scanned = 0
            var bytes = 0
            var tally = TombstoneTally()
            var doomed: [(key: [UInt8], hash: UInt64)] = []
        }
        var tally = TombstoneTally()
        var collected = 0
        var after: [UInt8]?
        do {
            repeat {
                let fold = try await store.foldVersions(partition: p, after: after, into: Page()) { page, key, value, sequence in
                    page.scanned += 1
                    page.bytes += key.count + value.count
                    if let o = try? VersionedObject.decode(value, limits: limits), o.isDeleted {
                        let newest = o.values.map(\.timestampMillis).max() ?? 0
                        if let why = rule.decide(sequence: sequence, newestMillis: newest, nowMillis: now, horizon: horizon) {
                            page.tally.held += 1
                            page.tally.blocked[why, default: 0] += 1
                        } else {
                            page.doomed.append((key, KeyVersionHash.hash(key: key, object: o)))
                        }
                    }
                    return page.scanned >= 1024 ? .stop : .continue
                }
                await pacer.pace(fold.accumulator.bytes)
                let page = fold.accumulator
                tally.held += page.tally.held
                for (why, n) in page.tally.blocked { tally.blocked[why, default: 0] += n }
                var rest = page.doomed[...]
                while !rest.isEmpty {
                    let batch = Array(rest.prefix(env.settings.repairBatchKeys))
                    rest = rest.dropFirst(batch.count)
                    let n = try await v.collect(batch, nodeActor: env.nodeActor)
                    collected += n
                    tally.held += batch.count - n   // a write came since: no longer a candidate, or kept
                }
                after = fold.resumeAfter
            } while after != nil
        } catch {
            env.logger.warning("tombstone sweep failed; the next one tries again", metadata: ["partition": "\(p.index)", "error": "\(error)"])
            return
        }
        env.metrics.tombstonesCollected.increment(by: collected)
        let totals = book.withLock { b in
            b.tombstones[p] = tally
            return b.tombstones.values.reduce(into: TombstoneTally()) { sum, t in
                sum.held += t.held
                for (why, n) in t.blocked { sum.blocked[why, default: 0] += n }
            }
        }
        env.metrics.tombstonesHeld.record(totals.held)
        for why in TombstoneRule.Block.allCases { env.metrics.tombstonesBlocked[why]?.record(totals.blocked[why] ?? 0) }
        if collected > 0 {
            env.logger.info("tombstones collected", metadata: ["partition": "\(p.index)", "collected": "\(collected)", "held": "\(tally.held)"])
        } else if tally.held > 0 {
            env.logger.debug("tombstones held", metadata: [
                "partition": "\(p.index)", "held": "\(tally.held)",
                "blocked": "\(tally.blocked.sorted { $0.key.rawValue < $1.key.rawValue }.map { "\($0.key.rawValue)=\($0.value)" }.joined(separator: ","))"])
        }
    }

    /// Asks every other member what hints and fallback copies it holds. `unknown` when one
    /// could not say (down, unreachable, or refusing): it may hold some.
    private func askPending(_ ring: RingState) async -> (targets: Set<String>, fallbacks: Set<Int>, unknown: Bool) {
        let others = ring.members.map(\.name).filter { $0 != env.me }
        let request = AntiEntropyCodec.encode(AntiEntropyRequest(partition: PartitionID(0), shape: env.settings.shape, body: .pending))
        return await withTaskGroup(of: AntiEntropyReply?.self) { group in
            for m in others {
                group.addTask { [env] in
                    guard let answer = try? await env.transport.send(to: m, .antiEntropy(request), timeoutMillis: env.requestTimeoutMillis),
                          case .antiEntropyReply(let bytes) = answer else { return nil }
                    return try? AntiEntropyCodec.decodeReply(bytes, limits: env.limits)
                }
            }
            var out: (targets: Set<String>, fallbacks: Set<Int>, unknown: Bool) = ([], [], false)
            for await reply in group {
                guard case .pending(let targets, let fallbacks) = reply else {
                    out.unknown = true
                    continue
                }
                out.targets.formUnion(targets)
                out.fallbacks.formUnion(fallbacks)
            }
            return out
        }
    }

    // MARK: Trees

    /// Partitions whose vnode needs a tree built (none yet) or rebuilt (older than the rebuild
    /// interval), as many as free build slots allow; each is marked building.
    private func buildsDue(_ mine: [PartitionID]) async -> [PartitionID] {
        let now = env.clock.now()
        var candidates: [PartitionID] = []
        var pending = 0
        for p in mine {
            guard let v = env.vnodes.vnode(for: p), v.keepsTree else { continue }
            if v.needsTreeBuild {
                pending += 1
                // A build that failed waits 2^n seconds (at most 5 minutes) before the next try.
                if let f = book.withLock({ $0.buildFailures[p] }),
                   f.at.duration(to: now) < .seconds(min(300, 1 << min(f.count, 9))) { continue }
                if await v.isServing { candidates.append(p) }
            } else if let at = book.withLock({ $0.builtAt[p] }), at.duration(to: now) >= env.settings.rebuildInterval {
                candidates.append(p)
            } else if book.withLock({ $0.builtAt[p] == nil }) {
                // A tree loaded from the last clean shutdown: its rebuild is due an interval from now.
                book.withLock { $0.builtAt[p] = now }
            }
        }
        env.metrics.aaeBuildsPending.record(pending)
        return book.withLock { b in
            var out: [PartitionID] = []
            for p in candidates where !b.building.contains(p) && b.building.count < env.settings.maxConcurrentBuilds {
                b.building.insert(p)
                out.append(p)
            }
            return out
        }
    }

    /// Builds `p`'s tree from a snapshot of its storage, paced, while writes go on (the vnode
    /// records them in a delta); a rebuild of a ready tree reports drift.
    func build(_ p: PartitionID) async {
        defer { book.withLock { b in _ = b.building.remove(p) } }
        guard let v = env.vnodes.vnode(for: p) else { return }
        let shape = env.settings.shape
        let begun: (snapshot: PartitionSnapshot, generation: UInt64)?
        do { begun = try await v.beginTreeBuild(shape: shape) } catch {
            buildFailed(p, "\(error)")
            return
        }
        guard let (snapshot, generation) = begun else { return }
        let rebuild = await v.treeRoot() != nil
        let started = env.clock.now()
        var tree = SegmentTree(shape: shape)
        var after: [UInt8]?
        var keys = 0
        do {
            while !Task.isCancelled {
                let page = try await snapshot.page(after, 1024)
                var bytes = 0
                for (key, value) in page {
                    bytes += key.count + value.count
                    // An object that does not decode is not served either: it has no version.
                    guard let o = try? VersionedObject.decode(value, limits: env.limits) else { continue }
                    tree.update(key: key, old: 0, new: KeyVersionHash.hash(key: key, object: o))
                }
                keys += page.count
                await pacer.pace(bytes)
                guard page.count == 1024, let last = page.last else { break }
                after = last.key
            }
        } catch {
            await v.abandonTreeBuild(generation: generation)
            buildFailed(p, "\(error)")
            return
        }
        if Task.isCancelled {
            await v.abandonTreeBuild(generation: generation)
            return
        }
        guard let drifted = await v.finishTreeBuild(tree, generation: generation) else { return }
        book.withLock { b in
            b.builtAt[p] = env.clock.now()
            b.buildFailures[p] = nil
        }
        env.metrics.aaeTreeBuilds.increment(outcome: rebuild ? "rebuild" : "build")
        if drifted {
            env.metrics.aaeTreeDrift.increment()
            env.logger.warning("anti-entropy tree rebuilt from storage differed from the tree kept by writes; the rebuilt one is used",
                               metadata: ["partition": "\(p.index)"])
        }
        env.logger.debug("anti-entropy tree built", metadata: [
            "partition": "\(p.index)", "keys": "\(keys)", "took": "\(started.duration(to: env.clock.now()))", "rebuild": "\(rebuild)"])
    }

    /// Why the last build of `p`'s tree failed (nil: none failed since its last success).
    func buildFailure(_ p: PartitionID) -> String? { book.withLock { $0.buildFailures[p]?.reason } }

    /// Counts and logs a failed build, and backs its partition off.
    private func buildFailed(_ p: PartitionID, _ reason: String) {
        env.metrics.aaeTreeBuilds.increment(outcome: "failed")
        let now = env.clock.now()
        let count = book.withLock { b in
            let n = (b.buildFailures[p]?.count ?? 0) + 1
            b.buildFailures[p] = (n, now, reason)
            if b.builtAt[p] != nil { b.builtAt[p] = now }
            return n
        }
        // Once, then every tenth time: a store that cannot build keeps failing.
        if count == 1 || count % 10 == 0 {
            env.logger.error("anti-entropy tree build failed; retrying with backoff", metadata: [
                "partition": "\(p.index)", "failures": "\(count)", "error": "\(reason)"])
        }
    }

    /// The trees of every primary vnode that has one ready, to save at a clean shutdown.
    func readyTrees() async -> [PartitionID: SegmentTree] {
        var out: [PartitionID: SegmentTree] = [:]
        for p in env.vnodes.partitions {
            if let t = await env.vnodes.vnode(for: p)?.readyTree { out[p] = t }
        }
        return out
    }

    // MARK: Scheduling

    /// The other primaries of `p` this node may exchange with now (reachable).
    private func peers(of p: PartitionID) -> [NodeName] {
        (env.ring()?.replicas(of: p) ?? []).filter { $0 != env.me && env.reachable($0) }
    }

    /// Partitions due for a timer exchange, with the peer each goes to (peers taken in turn), as
    /// many as free slots allow; each is marked exchanging. A refilling partition is due at once.
    private func exchangesDue(_ mine: [PartitionID]) -> [(PartitionID, NodeName)] {
        let now = env.clock.now()
        let ring = env.ring()
        // No free slot: nothing to start, so nothing to look at.
        let (building, full) = book.withLock { ($0.building, $0.schedule.exchanging.count >= env.settings.maxConcurrentExchanges) }
        guard !full else { return [] }
        let facts = mine.map { p in
            let replicas = ring?.replicas(of: p) ?? []
            return AntiEntropySchedule.Partition(
                id: p, refilling: env.state.isRefilling(p),
                treeReady: !(env.vnodes.vnode(for: p)?.needsTreeBuild ?? true) && !building.contains(p),
                replica: replicas.contains(env.me), peers: replicas.filter { $0 != env.me && env.reachable($0) })
        }
        return book.withLock { $0.schedule.exchangesDue(now: now, facts) }
    }

    private func release(_ p: PartitionID) {
        book.withLock { $0.schedule.release(p) }
        wake()
    }

    /// Wakes the scheduling loop (and waiters for an exchange slot).
    private func wake() {
        woken.withLock { $0 = true }
        slotsFree.notifyAll()
    }

    /// Takes an exchange slot for `p` (waiting for one), false if `p` is already exchanging and
    /// did not finish within `wait`.
    private func acquire(_ p: PartitionID, wait: Duration) async -> Bool {
        let deadline = env.clock.now() + wait
        while !Task.isCancelled {
            let now = env.clock.now()
            guard now < deadline else { return false }
            // A second at a time: the slot is looked at again at least that often.
            let took = await slotsFree.wait(until: {
                book.withLock { $0.schedule.take(p) }
            }, deadline: min(deadline, now + .seconds(1)), clock: env.clock)
            if took { return true }
        }
        return false
    }

    private func publish(_ mine: [PartitionID]) {
        let now = env.clock.now()
        let oldest = book.withLock { b in
            mine.map { p in b.last[p].map { $0.finishedAt.duration(to: now) } ?? .zero }.max() ?? .zero
        }
        env.metrics.aaeOldestExchangeSeconds.record(Int(oldest / .seconds(1)))
        let refilling = env.state.refillPending ? mine.count { env.state.isRefilling($0) } : 0
        env.metrics.aaeRefilling.record(refilling)
        let was = book.withLock { b in
            defer { b.refillingSeen = refilling }
            return b.refillingSeen
        }
        if let was, was > 0, refilling == 0, !mine.isEmpty {
            env.logger.info("every partition of this node refilled by anti-entropy", metadata: ["partitions": "\(mine.count)"])
        }
    }

    // MARK: On demand (`cairn repair`)

    /// Exchanges every partition in `partitions` (nil: every one this node holds as a primary)
    /// with each of its other reachable primaries, at most `maxConcurrentExchanges` at once
    /// (shared with the timer), and returns every exchange's record. A partition with no tree
    /// ready yet has it built first.
    func repair(_ partitions: [PartitionID]?) async -> (records: [ExchangeRecord], skipped: [(PartitionID, String)]) {
        let mine = Set(env.vnodes.partitions)
        let wanted = partitions ?? mine.sorted()
        var skipped: [(PartitionID, String)] = []
        var jobs: [(PartitionID, NodeName)] = []
        for p in wanted {
            guard mine.contains(p) else {
                skipped.append((p, "node \(env.me) holds no primary copy of partition \(p.index)"))
                continue
            }
            let replicas = env.ring()?.replicas(of: p) ?? []
            guard replicas.contains(env.me) else {
                skipped.append((p, "node \(env.me) is not yet a replica of partition \(p.index): its copy is being handed in"))
                continue
            }
            let others = replicas.filter { $0 != env.me }
            let reachable = others.filter(env.reachable)
            if reachable.isEmpty { skipped.append((p, others.isEmpty ? "no other replica" : "no other replica reachable")) }
            for peer in reachable { jobs.append((p, peer)) }
        }
        let records = await withTaskGroup(of: ExchangeRecord?.self) { group in
            var records: [ExchangeRecord] = []
            var next = jobs.makeIterator()
            func launch(_ group: inout TaskGroup<ExchangeRecord?>) {
                guard let (p, peer) = next.next() else { return }
                group.addTask {
                    guard await self.acquire(p, wait: .seconds(3600)) else { return nil }
                    defer { self.release(p) }
                    if let v = self.env.vnodes.vnode(for: p), v.needsTreeBuild {
                        await self.buildNow(p)
                    }
                    // A peer still building its tree (it just started) is asked again, for a while.
                    var record = await self.exchange(p, with: peer)
                    var waits = 0
                    while record.retryable, waits < Self.maxNotReadyWaits, !Task.isCancelled {
                        try? await self.env.clock.sleep(for: .milliseconds(250))
                        record = await self.exchange(p, with: peer)
                        waits += 1
                    }
                    // A truncated exchange left segments for the next: go on until none is left.
                    var rounds = 1
                    while record.outcome == "truncated", rounds < Self.maxRepairRounds, !Task.isCancelled {
                        let next = await self.exchange(p, with: peer)
                        record = Self.combined(record, next)
                        rounds += 1
                    }
                    return record
                }
            }
            for _ in 0..<max(1, env.settings.maxConcurrentExchanges) { launch(&group) }
            while let r = await group.next() {
                if let r { records.append(r) }
                launch(&group)
            }
            return records
        }
        // What `cairn repair` refilled is on disk when it answers.
        if let store = env.storage() {
            do { try await env.state.persistSettled(store: store) } catch {
                env.logger.error("could not record refilled partitions; retrying", metadata: ["error": "\(error)"])
            }
        }
        return (records, skipped)
    }

    /// Objects one fetch may ask for (the largest `aae.repair_batch_keys`): a reply stays bounded.
    static let maxKeysPerQuestion = 1 << 16

    /// Exchanges `cairn repair` runs for one partition and peer at most, one after another while
    /// each ends truncated.
    static let maxRepairRounds = 4096
    /// Times `cairn repair` asks a peer again whose tree is not ready yet (every 250 ms: a minute).
    static let maxNotReadyWaits = 240

    /// Two exchanges of one partition and peer, one after the other, as one record.
    static func combined(_ a: ExchangeRecord, _ b: ExchangeRecord) -> ExchangeRecord {
        var r = b
        r.summary.segmentsDiffering += a.summary.segmentsDiffering
        r.summary.keysCompared += a.summary.keysCompared
        r.summary.keysToLocal += a.summary.keysToLocal
        r.summary.keysToRemote += a.summary.keysToRemote
        r.summary.treeHashes += a.summary.treeHashes
        r.summary.inSync = a.summary.inSync && b.summary.inSync
        r.bytesSent += a.bytesSent
        r.bytesReceived += a.bytesReceived
        r.tookMillis += a.tookMillis
        if r.outcome == "in_sync", a.outcome != "in_sync" { r.outcome = "repaired" }
        return r
    }

    /// Builds `p`'s tree now unless a build of it is running; waits for a running one.
    private func buildNow(_ p: PartitionID) async {
        let mine = book.withLock { b in b.building.insert(p).inserted }
        if mine { return await build(p) }
        while book.withLock({ $0.building.contains(p) }) { try? await env.clock.sleep(for: .milliseconds(50)) }
    }

    /// The last exchange of every partition this node holds (nil: none yet).
    func status() -> [(PartitionID, ExchangeRecord?, refilling: Bool)] {
        let mine = env.vnodes.partitions
        return book.withLock { b in mine.map { ($0, b.last[$0], env.state.isRefilling($0)) } }
    }

    // MARK: One exchange

    /// Runs one exchange of `p` with `peer` to its end and records it. The caller holds `p`'s slot.
    func exchange(_ p: PartitionID, with peer: NodeName) async -> ExchangeRecord {
        let started = env.clock.now()
        // What this copy held when the exchange began: a completed exchange proves the peer
        // holds it too (the tombstone rule's horizon).
        let startSequence = env.storage()?.lastApplied.sequence
        let startRing = env.ring()?.version
        var run = ExchangeRun(manager: self, partition: p, peer: peer)
        let result = await run.perform()
        let summary: ExchangeSummary
        let outcome: String
        var error: String?
        var retryable = false
        switch result {
        case .success(let s):
            summary = s
            outcome = s.inSync ? "in_sync" : s.truncated ? "truncated" : "repaired"
        case .failure(let e):
            summary = run.summary
            outcome = "failed"
            error = e.reason
            retryable = e.retryable
        }
        let now = env.clock.now()
        var record = ExchangeRecord(partition: p, peer: peer, outcome: outcome, summary: summary, bytesSent: run.bytesSent,
                                    bytesReceived: run.bytesReceived, error: error, finishedAt: now, wallMillis: env.clock.wallMillis(),
                                    tookMillis: Int(started.duration(to: now) / .milliseconds(1)))
        record.retryable = retryable
        book.withLock { $0.last[p] = record }
        let m = env.metrics
        m.aaeExchanges.increment(outcome: outcome)
        m.aaeKeysRepaired.increment(outcome: "local", by: run.keysToLocal)
        m.aaeKeysRepaired.increment(outcome: "remote", by: run.keysToRemote)
        m.aaeDataRepaired.increment(outcome: "local", by: run.dataToLocal)
        m.aaeDataRepaired.increment(outcome: "remote", by: run.dataToRemote)
        m.aaeBytes.increment(outcome: "sent", by: run.bytesSent)
        m.aaeBytes.increment(outcome: "received", by: run.bytesReceived)
        if let error {
            env.logger.info("anti-entropy exchange failed", metadata: ["partition": "\(p.index)", "peer": "\(peer)", "error": "\(error)"])
            // A refilling partition tries again soon (with another peer), not an interval later.
            let refilling = env.state.isRefilling(p)
            book.withLock { $0.schedule.ended(p, .failed, refilling: refilling, now: now) }
        } else {
            book.withLock { b in
                // A truncated one goes on soon: more to repair.
                b.schedule.ended(p, outcome == "truncated" ? .truncated : .completed, refilling: false, now: now)
                if outcome != "truncated", let startSequence, let startRing, startRing == env.ring()?.version {
                    b.exchangedAt[p, default: [:]][peer] = (startSequence, startRing)
                }
            }
            if outcome != "truncated", env.state.settle(p) {
                env.logger.debug("partition refilled by anti-entropy", metadata: ["partition": "\(p.index)", "peer": "\(peer)"])
            }
            if run.keysToLocal + run.keysToRemote > 0 {
                env.logger.info("anti-entropy repaired keys", metadata: [
                    "partition": "\(p.index)", "peer": "\(peer)", "to_local": "\(run.keysToLocal)", "to_remote": "\(run.keysToRemote)",
                    "bytes_sent": "\(run.bytesSent)", "bytes_received": "\(run.bytesReceived)"])
            }
        }
        return record
    }

    /// Asks `peer` one anti-entropy question.
    fileprivate func ask(_ peer: NodeName, _ request: AntiEntropyRequest, bytesSent: inout Int, bytesReceived: inout Int)
        async throws(ExchangeFailure) -> AntiEntropyReply {
        let payload = AntiEntropyCodec.encode(request)
        bytesSent += payload.count
        let answer: Message
        do {
            answer = try await env.transport.send(to: peer, .antiEntropy(payload), timeoutMillis: env.requestTimeoutMillis)
        } catch {
            throw ExchangeFailure("\(peer) did not answer: \(error)")
        }
        switch answer {
        case .antiEntropyReply(let bytes):
            bytesReceived += bytes.count
            do { return try AntiEntropyCodec.decodeReply(bytes, limits: env.limits) } catch {
                throw ExchangeFailure("\(peer) answered with a malformed reply: \(error)")
            }
        case .error(let e): throw ExchangeFailure("\(peer) refused: \(e.message)", retryable: e.code == .notReady)
        default: throw ExchangeFailure("\(peer) answered with \(answer.type)")
        }
    }

    // MARK: Serving other replicas

    /// Answers another replica's exchange question about this node's primary copy of a partition.
    func serve(_ request: AntiEntropyRequest) async -> Result<AntiEntropyReply, ErrorReply> {
        let p = request.partition
        if case .pending = request.body {
            // Any member answers this one, replica or not, anti-entropy on or off.
            let held = await env.pendingHandoff()
            return .success(.pending(hintTargets: held.targets, fallbacks: held.fallbacks))
        }
        guard env.settings.enabled else { return .failure(ErrorReply(code: .notReady, message: "anti-entropy is off on node \(env.me) (aae.enabled)")) }
        guard request.shape == env.settings.shape else {
            return .failure(ErrorReply(code: .invalidArgument, message:
                "node \(env.me) keeps trees of \(env.settings.shape), not \(request.shape): set aae.tree_depth alike on every node"))
        }
        guard let v = env.vnodes.vnode(for: p) else {
            return .failure(ErrorReply(code: .notAReplica, message: "node \(env.me) holds no primary copy of partition \(p.index)"))
        }
        // A tree whose build keeps failing is no reason to wait: say so (not retryable).
        let notReady = book.withLock { $0.buildFailures[p] }.map {
            ErrorReply(code: .storage, message: "node \(env.me) could not build its tree of partition \(p.index): \($0.reason)")
        } ?? ErrorReply(code: .notReady, message: "node \(env.me) has no tree of partition \(p.index) ready yet")
        switch request.body {
        case .pending:
            return .failure(ErrorReply(code: .invalidArgument, message: "unreachable"))
        case .root:
            guard let root = await v.treeRoot() else { return .failure(notReady) }
            return .success(.root(root, refilling: env.state.isRefilling(p)))
        case .children(let level, let parents):
            guard parents.count <= AntiEntropyCodec.maxEntries / TreeShape.fanout else {
                return .failure(ErrorReply(code: .invalidArgument, message: "too many parents in one tree query"))
            }
            guard let hashes = await v.treeChildren(level: level, of: parents) else { return .failure(notReady) }
            return .success(.hashes(hashes))
        case .keys(var query):
            guard let store = env.storage() else { return .failure(notReady) }
            // The asker's page size is a wish: this node scans and answers at most its own.
            query.limit = min(query.limit, env.settings.exchange.keysPerPage)
            do {
                return .success(.keys(try await Self.listKeys(store, partition: p, query: query, shape: request.shape, withObjects: true,
                                                              maxBytes: env.settings.maxReplyBytes, limits: env.limits)))
            } catch {
                return .failure(ErrorReply(code: .storage, message: "node \(env.me) could not list partition \(p.index): \(error)"))
            }
        case .fetch(let keys):
            guard keys.count <= Self.maxKeysPerQuestion else {
                return .failure(ErrorReply(code: .invalidArgument, message: "a fetch of \(keys.count) keys exceeds \(Self.maxKeysPerQuestion)"))
            }
            do throws(VnodeError) {
                return .success(.objects(try await v.getAll(keys)))
            } catch {
                return .failure(ErrorReply(code: .storage, message: error.description))
            }
        case .push(let entries):
            do throws(VnodeError) {
                try await v.mergeAll(entries)
                return .success(.pushed(entries.count))
            } catch {
                return .failure(ErrorReply(code: .storage, message: error.description))
            }
        }
    }

    /// A page of `query` over this node's copy of `p`: keys of the asked segments after
    /// `query.after`, in key order, with their version hashes (and objects, for `objectsFor`
    /// segments when `withObjects`). Stops at `query.limit` keys, `maxBytes` bytes, or after
    /// scanning `64 × limit` keys (a page of a large partition with few keys asked for), and then
    /// says where (`through`). Objects that do not decode are left out (not served either).
    static func listKeys(_ store: any PartitionStore, partition p: PartitionID, query: KeyQuery, shape: TreeShape, withObjects: Bool,
                         maxBytes: Int, limits: Limits) async throws -> KeyPage {
        struct Page: Sendable {
            var entries: [KeyEntry] = []
            var bytes = 0
            var scanned = 0
        }
        let segments = Set(query.segments), objectSegments = withObjects ? Set(query.objectsFor) : []
        let limit = max(1, query.limit), scanLimit = max(1, query.limit) * 64
        let fold = try await store.foldReadable(partition: p, after: query.after, into: Page()) { page, key, value in
            page.scanned += 1
            let segment = KeyVersionHash.segment(of: key, shape: shape)
            if segments.contains(segment), let o = try? VersionedObject.decode(value, limits: limits) {
                let withObject = objectSegments.contains(segment)
                page.entries.append(KeyEntry(key: key, hash: KeyVersionHash.hash(key: key, object: o), object: withObject ? o : nil))
                page.bytes += key.count + 12 + (withObject ? value.count : 0)
            }
            return page.entries.count >= limit || page.bytes >= maxBytes || page.scanned >= scanLimit ? .stop : .continue
        }
        return KeyPage(entries: fold.accumulator.entries, through: fold.resumeAfter)
    }
}

struct ExchangeFailure: Error, Sendable {
    var reason: String
    /// The peer was not ready (its tree is being built): asking again soon may succeed.
    var retryable: Bool
    init(_ reason: String, retryable: Bool = false) {
        self.reason = reason
        self.retryable = retryable
    }
}

/// The shell of one exchange: performs `ExchangeMachine`'s steps against this node's vnode and
/// store (local) and the peer's answers (remote), and the repairs it names, in batches.
private struct ExchangeRun {
    let manager: AntiEntropyManager
    let partition: PartitionID
    let peer: NodeName
    var bytesSent = 0
    var bytesReceived = 0
    var keysToLocal = 0
    var keysToRemote = 0
    /// Bytes of the keys and objects repaired each way (what the traffic was for).
    var dataToLocal = 0
    var dataToRemote = 0
    var summary = ExchangeSummary()

    init(manager: AntiEntropyManager, partition: PartitionID, peer: NodeName) {
        self.manager = manager
        self.partition = partition
        self.peer = peer
    }

    private var env: AntiEntropyManager.Environment { manager.env }

    mutating func perform() async -> Result<ExchangeSummary, ExchangeFailure> {
        do throws(ExchangeFailure) {
            return .success(try await steps())
        } catch {
            return .failure(error)
        }
    }

    private mutating func steps() async throws(ExchangeFailure) -> ExchangeSummary {
        guard let vnode = env.vnodes.vnode(for: partition) else { throw ExchangeFailure("no primary copy of partition \(partition.index) here") }
        guard let store = env.storage() else { throw ExchangeFailure("storage is not open") }
        let shape = env.settings.shape
        var machine = ExchangeMachine(shape: shape, settings: env.settings.exchange)
        var step = machine.start()
        while true {
            summary = machine.summary
            switch step {
            case .compareRoots:
                guard let local = await vnode.treeRoot() else {
                    // Worth waiting for only while a build can still succeed.
                    if let failure = manager.buildFailure(partition) {
                        throw ExchangeFailure("no tree of partition \(partition.index) here: its build failed: \(failure)")
                    }
                    throw ExchangeFailure("no tree of partition \(partition.index) ready here", retryable: true)
                }
                guard case .root(let remote, _) = try await ask(.root) else { throw ExchangeFailure("\(peer) answered a root query with another reply") }
                step = machine.roots(local: local, remote: remote)
            case .compareChildren(let level, let parents):
                guard let local = await vnode.treeChildren(level: level, of: parents) else { throw ExchangeFailure("tree of partition \(partition.index) gone") }
                guard case .hashes(let remote) = try await ask(.children(level: level, parents: parents)) else {
                    throw ExchangeFailure("\(peer) answered a tree query with another reply")
                }
                step = machine.children(local: local, remote: remote)
            case .listKeys(let query):
                let local: KeyPage
                do {
                    local = try await AntiEntropyManager.listKeys(store, partition: partition, query: query, shape: shape, withObjects: false,
                                                                  maxBytes: env.settings.maxReplyBytes, limits: env.limits)
                } catch {
                    throw ExchangeFailure("could not list partition \(partition.index) here: \(error)")
                }
                guard case .keys(let remote) = try await ask(.keys(query)) else { throw ExchangeFailure("\(peer) answered a key query with another reply") }
                step = machine.keys(local: local, remote: remote)
            case .repair(let repairs):
                try await repair(repairs, vnode: vnode)
                step = machine.repaired()
            case .finished(let s):
                summary = s
                return s
            case .failed(let reason):
                throw ExchangeFailure(reason)
            }
        }
    }

    /// Asks the peer; then waits until the bytes both ways fit in `exchangeBytesPerSecond`.
    private mutating func ask(_ body: AntiEntropyRequest.Body) async throws(ExchangeFailure) -> AntiEntropyReply {
        let before = bytesSent + bytesReceived
        let reply = try await manager.ask(peer, AntiEntropyRequest(partition: partition, shape: env.settings.shape, body: body),
                                          bytesSent: &bytesSent, bytesReceived: &bytesReceived)
        await manager.exchangePacer.pace(bytesSent + bytesReceived - before)
        return reply
    }

    /// Performs the repairs: objects the listing carried are merged here; objects this node lacks
    /// or holds older are fetched and merged here; objects the peer lacks or holds older (the
    /// merge, for a key both held) are pushed to it. Every step is a DVV merge.
    private mutating func repair(_ repairs: [KeyRepair], vnode: Vnode) async throws(ExchangeFailure) {
        var take: [(key: [UInt8], object: VersionedObject)] = []
        var fetch: [[UInt8]] = []
        var reconcile: Set<[UInt8]> = []
        var push: [[UInt8]] = []
        for r in repairs {
            switch r {
            case .take(let k, let o): take.append((k, o))
            case .pull(let k): fetch.append(k)
            case .reconcile(let k):
                fetch.append(k)
                reconcile.insert(k)
            case .push(let k): push.append(k)
            }
        }
        if env.logger.logLevel <= .trace {
            func names(_ keys: [[UInt8]]) -> String { keys.prefix(8).map { String(decoding: $0, as: UTF8.self) }.joined(separator: ",") }
            env.logger.trace("anti-entropy repairs", metadata: [
                "partition": "\(partition.index)", "peer": "\(peer)", "take": "\(names(take.map(\.key)))", "fetch": "\(names(fetch))",
                "reconcile": "\(names(Array(reconcile)))", "push": "\(names(push))"])
        }
        let batch = max(1, env.settings.repairBatchKeys)
        var outgoing: [(key: [UInt8], object: VersionedObject)] = []
        do {
            for chunk in take.chunks(of: batch) {
                try await vnode.mergeAll(Array(chunk))
                keysToLocal += chunk.count
                dataToLocal += Self.dataBytes(chunk)
            }
            for chunk in fetch.chunks(of: batch) {
                guard case .objects(let objects) = try await ask(.fetch(Array(chunk))), objects.count == chunk.count else {
                    throw ExchangeFailure("\(peer) answered a fetch with another reply")
                }
                let found = zip(chunk, objects).compactMap { k, o in o.map { (key: k, object: $0) } }
                let merged = try await vnode.mergeAll(found)
                keysToLocal += found.count
                dataToLocal += Self.dataBytes(found)
                for (entry, m) in zip(found, merged) where reconcile.contains(entry.key) && m != entry.object {
                    outgoing.append((entry.key, m))
                }
                // A key the peer listed but no longer holds (collected meanwhile): push ours.
                for (k, o) in zip(chunk, objects) where o == nil && reconcile.contains(k) { push.append(k) }
            }
            for chunk in push.chunks(of: batch) {
                let objects = try await vnode.getAll(Array(chunk))
                for (k, o) in zip(chunk, objects) { if let o { outgoing.append((k, o)) } }
            }
        } catch let e as ExchangeFailure {
            throw e
        } catch {
            throw ExchangeFailure("local copy of partition \(partition.index): \(error)")
        }
        var pending: [(key: [UInt8], object: VersionedObject)] = []
        var pendingBytes = 0
        for entry in outgoing {
            pending.append(entry)
            pendingBytes += entry.key.count + entry.object.encodedSize
            if pending.count >= batch || pendingBytes >= env.settings.maxReplyBytes {
                try await send(pending)
                pending = []
                pendingBytes = 0
            }
        }
        if !pending.isEmpty { try await send(pending) }
    }

    private mutating func send(_ entries: [(key: [UInt8], object: VersionedObject)]) async throws(ExchangeFailure) {
        guard case .pushed = try await ask(.push(entries)) else { throw ExchangeFailure("\(peer) answered a push with another reply") }
        keysToRemote += entries.count
        dataToRemote += Self.dataBytes(entries)
    }

    /// The bytes of keys and stored objects a repair batch moves (`cairn_aae_repaired_bytes_total`).
    private static func dataBytes(_ entries: some Sequence<(key: [UInt8], object: VersionedObject)>) -> Int {
        entries.reduce(0) { $0 + $1.key.count + $1.object.encodedSize }
    }
}

extension Array {
    /// Consecutive slices of at most `size` elements.
    func chunks(of size: Int) -> [ArraySlice<Element>] {
        stride(from: 0, to: count, by: Swift.max(1, size)).map { self[$0..<Swift.min($0 + Swift.max(1, size), count)] }
    }
}
