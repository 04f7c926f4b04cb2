public import CairnCore
public import CairnStorage

/// The node's persistent store: one CairnStorage database under `<data_dir>/storage`.
///
/// Key layout (Docs/storage-format.md, "The node's keys"):
/// ```
/// data-key     = %x01 partition:u32be key     ; a partition's keys are one contiguous range
/// metadata-key = %x00 name                    ; "actor-epoch" (u64be), "clean-shutdown" (empty),
///                                             ; "run-sync-mode" (u8: 0 always, 1 interval, 2 none)
/// ```
///
/// Where engine calls run: point calls on the partition's request executor (the environment's
/// `makeRequestExecutors`: threads of their own on the machine; partition p gets executor
/// `p mod count`), where its vnode runs; open, close, folds, counts and drops on a bulk executor
/// (`makeWorkerExecutor`), so a scan never queues ahead of a vnode's requests. Log syncs run on
/// the engine's group-commit queue. No engine call blocks the cooperative pool.
///
/// The actor epoch lives with the data. It is kept across restarts only when no dot this node
/// issued and showed can have been lost: after a clean shutdown. After any crash the node takes a
/// fresh epoch, so it never reissues a dot a peer or client may already hold: whatever the sync
/// mode, a coordinator sends its stamped write to the other replicas while its own log syncs
/// (`WriteCoordination`), so a dot may be out before it is durable here. If the epoch or the
/// clean mark cannot be read because its table block is corrupt, or salvage dropped log records
/// at open, the node assumes the worst (a fresh epoch). Stamp actors recorded under an older
/// epoch retire with it (`Vnode.savedStampActor`).
/// Thread-safe.
public final class DiskBackend: PartitionStore {
    public let database: Database
    private let epoch: UInt64
    /// The request executors; partition p's is `executors[p.index % executors.count]`.
    private let executors: [any SerialExecutor]
    /// Open, close, folds, counts and drops.
    private let bulk: ExecutorLane

    static let epochKey: [UInt8] = [0] + Array("actor-epoch".utf8)
    static let cleanKey: [UInt8] = [0] + Array("clean-shutdown".utf8)
    static let runSyncModeKey: [UInt8] = [0] + Array("run-sync-mode".utf8)

    /// The `run-sync-mode` metadata value: 0 always, 1 interval, 2 none.
    static func syncModeCode(_ mode: SyncMode) -> UInt8 {
        switch mode {
        case .always: 0
        case .interval: 1
        case .none: 2
        }
    }

    public let createdFresh: Bool
    public let openedAfterCleanShutdown: Bool
    public var openedEmpty: Bool { createdFresh }

    private let fs: any FileSystem
    private let directory: String

    private init(database: Database, epoch: UInt64, executors: [any SerialExecutor], bulk: ExecutorLane, opened: OpenedAs,
                 fs: any FileSystem, directory: String) {
        self.fs = fs
        self.directory = directory
        self.database = database
        self.epoch = epoch
        self.executors = executors
        self.bulk = bulk
        createdFresh = opened.fresh
        openedAfterCleanShutdown = opened.clean
    }

    /// What `open` found: a directory with no earlier run's data, and whether that run shut
    /// down cleanly.
    struct OpenedAs {
        var fresh: Bool
        var clean: Bool
    }

    /// Opens (recovering) the database in `directory` and settles the actor epoch, on the bulk
    /// executor. `progress(done, total)`: log bytes replayed. `fs` is the file seam (tests inject
    /// faults), `environment` runs the engine's work (request executors included), `epochs` draws
    /// a fresh epoch.
    public static func open(directory: String, options: DatabaseOptions, fs: any FileSystem = PosixFileSystem(),
                            environment: any StorageEnvironment = ThreadEnvironment(), epochs: EpochSource = EpochSource(),
                            progress: (@Sendable (UInt64, UInt64) -> Void)? = nil) async throws -> DiskBackend {
        var executors = environment.makeRequestExecutors(label: "cairn.store")
        if executors.isEmpty { executors = [environment.makeWorkerExecutor(label: "cairn.store")] }
        let bulk = ExecutorLane(environment.makeWorkerExecutor(label: "cairn.store.bulk"))
        let db = try await bulk.run {
            try Database.open(fs: fs, directory: directory, options: options, environment: environment, progress: progress)
        }
        do {
            let (epoch, batch, opened) = try await bulk.run { try settleEpoch(db, options: options, epochs: epochs) }
            try await write(batch, to: db, on: bulk)
            return DiskBackend(database: db, epoch: epoch, executors: executors, bulk: bulk, opened: opened, fs: fs, directory: directory)
        } catch {
            await db.abandon()
            throw error
        }
    }

    /// Reads the metadata and decides the epoch; returns it with the metadata batch to write
    /// (synced) before the store is used.
    private static func settleEpoch(_ db: Database, options: DatabaseOptions, epochs: EpochSource) throws -> (UInt64, WriteBatch, OpenedAs) {
        // The metadata keys sort first, so they live in the first block of the tables holding
        // them: if that block is corrupt, a value is unknown and the worst is assumed (a fresh
        // epoch never reissues a dot). The corruption is in the database's statistics; the
        // keys rewritten below shadow the bad block from now on.
        let stored = try readMetadata(db, epochKey).value.flatMap { BigEndianWords.decode($0, count: 1)?.first }
        let cleanMark = try readMetadata(db, cleanKey)
        let clean: Bool? = cleanMark.known ? cleanMark.value != nil : nil
        let runSyncMode = try readMetadata(db, runSyncModeKey)
        // Every run writes its sync mode at open: none recorded (and readable) is a first run.
        let fresh = runSyncMode.known && runSyncMode.value == nil && stored == nil
        // Salvage may have dropped synced, acknowledged records: dots this node showed.
        let stats = db.statistics
        let salvaged = stats.salvagedBytes > 0 || stats.salvagedRegions > 0
        var epoch = stored ?? 0
        var batch = WriteBatch()
        if epoch == 0 || salvaged || clean != true {
            epoch = epochs.next()
            batch.put(epochKey, BigEndianWords.encode(epoch))
        }
        batch.put(runSyncModeKey, [Self.syncModeCode(options.syncMode)])
        // From here on a crash is an unclean shutdown.
        if clean != false { batch.delete(cleanKey) }
        return (epoch, batch, OpenedAs(fresh: fresh, clean: clean == true && !salvaged))
    }

    /// A metadata key's value, and whether it could be read at all (false: its block is corrupt).
    private static func readMetadata(_ db: Database, _ key: [UInt8]) throws -> (value: [UInt8]?, known: Bool) {
        do {
            return (try db.get(key), true)
        } catch {
            guard case .corruption = error else { throw error }
            return (nil, false)
        }
    }

    public var isPersistent: Bool { true }
    public var persistentEpoch: UInt64? { epoch }
    public var acknowledgesDurably: Bool { database.syncsEveryWrite }

    /// `%x00 "meta/" name`: the node's metadata values (`metadata`, `setMetadata`).
    static func metadataKey(_ name: String) -> [UInt8] { [0] + Array("meta/".utf8) + Array(name.utf8) }

    public func metadata(_ name: String) throws -> [UInt8]? { try database.get(Self.metadataKey(name)) }

    /// One synced batch per 16 MiB of values (a log record holds at most 64 MiB).
    public func setMetadata(_ values: [(name: String, value: [UInt8]?)]) async throws {
        var batch = WriteBatch()
        var bytes = 0
        for (name, value) in values {
            if let value { batch.put(Self.metadataKey(name), value) } else { batch.delete(Self.metadataKey(name)) }
            bytes += value?.count ?? 0
            if bytes >= 16 << 20 {
                try await write(batch)
                batch = WriteBatch()
                bytes = 0
            }
        }
        if !batch.ops.isEmpty { try await write(batch) }
    }

    public func applyMetadata(_ name: String, _ value: [UInt8]) throws -> DurabilityToken {
        var b = WriteBatch()
        b.put(Self.metadataKey(name), value)
        return DurabilityToken(sequence: try database.apply(b))
    }

    /// `<storage dir>/<name>`, through the store's file system, on the bulk executor.
    public func saveSideFile(_ name: String, _ bytes: [UInt8]) async throws {
        let (fs, directory) = (fs, directory)
        try await bulk.run { try fs.replaceAtomically(name, in: directory, with: bytes) }
    }

    public func takeSideFile(_ name: String) async throws -> [UInt8]? {
        let (fs, directory) = (fs, directory)
        return try await bulk.run {
            let path = directory + "/" + name
            guard let bytes = try fs.readWhole(path) else { return nil }
            try fs.remove(path)
            try fs.syncDirectory(directory)
            return bytes
        }
    }

    /// Takes the engine snapshot at once; pages read it on the bulk executor, passing over
    /// damage (`foldReadable`): it feeds anti-entropy trees, which must hold what reads can serve.
    public func snapshot(partition: PartitionID) throws -> PartitionSnapshot {
        let (snapshot, bulk) = (database.snapshot(), bulk)
        let end = Self.partitionEnd(partition)
        return PartitionSnapshot { after, limit in
            try await bulk.run {
                let lower = after.map { Self.dataKey(partition, $0) + [0] } ?? Self.dataKey(partition, [])
                let entries = try snapshot.iterator(from: lower, to: end, damage: .passOver)
                var out: [(key: [UInt8], value: [UInt8])] = []
                while out.count < max(limit, 1), let (k, value) = try entries.nextEntry() {
                    out.append((Array(k[Self.dataKeyPrefixBytes...]), value))
                }
                return out
            }
        }
    }

    static func dataKey(_ p: PartitionID, _ key: [UInt8]) -> [UInt8] {
        // One allocation, sized for the whole key.
        var k: [UInt8] = []
        k.reserveCapacity(dataKeyPrefixBytes + key.count)
        k.append(1)
        k.append(UInt8(truncatingIfNeeded: p.index >> 24))
        k.append(UInt8(truncatingIfNeeded: p.index >> 16))
        k.append(UInt8(truncatingIfNeeded: p.index >> 8))
        k.append(UInt8(truncatingIfNeeded: p.index))
        k.append(contentsOf: key)
        return k
    }

    /// Bytes of `dataKey` before the vnode's key.
    static let dataKeyPrefixBytes = 5

    /// The first key after every data key of `p`.
    static func partitionEnd(_ p: PartitionID) -> [UInt8] {
        DatabaseIterator.upperBound(ofPrefix: dataKey(p, [])) ?? [2]
    }

    public func executor(for partition: PartitionID) -> (any SerialExecutor)? {
        executors[Int(partition.index % UInt32(executors.count))]
    }

    public func get(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? {
        try database.get(Self.dataKey(partition, key))
    }

    public func getDurable(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? {
        try database.getDurable(Self.dataKey(partition, key))
    }

    public func getDurableInMemory(partition: PartitionID, key: [UInt8]) -> InMemoryRead {
        database.getDurableInMemory(Self.dataKey(partition, key))
    }

    public var lastApplied: DurabilityToken { DurabilityToken(sequence: database.lastSequence) }

    public func apply(partition: PartitionID, key: [UInt8], value: [UInt8]) throws -> DurabilityToken {
        try apply(partition: partition, batch: [(key, value)])
    }

    public func apply(partition: PartitionID, batch: [(key: [UInt8], value: [UInt8])]) throws -> DurabilityToken {
        var b = WriteBatch()
        for (key, value) in batch { b.put(Self.dataKey(partition, key), value) }
        return DurabilityToken(sequence: try database.apply(b))
    }

    public func delete(partition: PartitionID, keys: [[UInt8]]) throws -> DurabilityToken {
        guard !keys.isEmpty else { return lastApplied }
        var b = WriteBatch()
        for key in keys { b.delete(Self.dataKey(partition, key)) }
        return DurabilityToken(sequence: try database.apply(b))
    }

    /// Durable per the sync mode, then flow control: a vnode's acknowledgement waits while the
    /// engine is past its write bounds (the coordinator's client sees the slowdown). No engine
    /// I/O here: the sync runs on the group-commit queue.
    public func waitDurable(_ token: DurabilityToken) async throws {
        try await database.waitDurable(upTo: token.sequence)
        try await database.waitForRoom()
    }

    public func whenDurable(_ token: DurabilityToken, _ done: @escaping @Sendable ((any Error)?) -> Void) {
        database.whenDurable(upTo: token.sequence, done)
    }

    /// On the bulk executor, over one engine snapshot.
    public func fold<Accumulator: Sendable>(partition: PartitionID, after: [UInt8]?, into initial: Accumulator,
                                            _ visit: @Sendable (inout Accumulator, _ key: [UInt8], _ value: [UInt8]) throws -> FoldStep)
        async throws -> PartitionFold<Accumulator> {
        try await fold(partition: partition, after: after, into: initial, damage: .fail, visit)
    }

    public func foldReadable<Accumulator: Sendable>(partition: PartitionID, after: [UInt8]?, into initial: Accumulator,
                                                    _ visit: @Sendable (inout Accumulator, _ key: [UInt8], _ value: [UInt8]) throws -> FoldStep)
        async throws -> PartitionFold<Accumulator> {
        try await fold(partition: partition, after: after, into: initial, damage: .passOver, visit)
    }

    public func foldVersions<Accumulator: Sendable>(partition: PartitionID, after: [UInt8]?, into initial: Accumulator,
                                                    _ visit: @Sendable (inout Accumulator, _ key: [UInt8], _ value: [UInt8], _ sequence: UInt64) throws -> FoldStep)
        async throws -> PartitionFold<Accumulator> {
        let database = database
        return try await bulk.run {
            let lower = after.map { Self.dataKey(partition, $0) + [0] } ?? Self.dataKey(partition, [])
            let entries = try database.snapshot().iterator(from: lower, to: Self.partitionEnd(partition), damage: .passOver)
            var accumulator = initial
            while let (k, value, sequence) = try entries.nextVersion() {
                let key = Array(k[Self.dataKeyPrefixBytes...])
                if try visit(&accumulator, key, value, sequence) == .stop { return PartitionFold(accumulator: accumulator, resumeAfter: key) }
            }
            return PartitionFold(accumulator: accumulator, resumeAfter: nil)
        }
    }

    private func fold<Accumulator: Sendable>(partition: PartitionID, after: [UInt8]?, into initial: Accumulator, damage: DamagePolicy,
                                             _ visit: @Sendable (inout Accumulator, _ key: [UInt8], _ value: [UInt8]) throws -> FoldStep)
        async throws -> PartitionFold<Accumulator> {
        let database = database
        return try await bulk.run {
            // The smallest key after `after` is `after` + %x00.
            let lower = after.map { Self.dataKey(partition, $0) + [0] } ?? Self.dataKey(partition, [])
            let entries = try database.snapshot().iterator(from: lower, to: Self.partitionEnd(partition), damage: damage)
            var accumulator = initial
            while let (k, value) = try entries.nextEntry() {
                let key = Array(k[Self.dataKeyPrefixBytes...])
                if try visit(&accumulator, key, value) == .stop { return PartitionFold(accumulator: accumulator, resumeAfter: key) }
            }
            return PartitionFold(accumulator: accumulator, resumeAfter: nil)
        }
    }

    public func damagedTables() -> [StoreDamage] {
        database.damagedTables.map { d in
            StoreDamage(table: d.meta.number, partitions: Self.primaryPartitions(from: d.meta.smallest, through: d.meta.largest),
                        quarantined: d.quarantined, bytes: d.meta.size)
        }
    }

    /// The primary partitions whose data keys (`dataKey`) can lie in `[smallest, largest]`.
    static func primaryPartitions(from smallest: [UInt8], through largest: [UInt8]) -> ClosedRange<UInt32>? {
        // A data key is %x01 index:u32be key; metadata keys sort before, nothing after.
        func index(_ k: [UInt8], fill: UInt8) -> UInt32 {
            (1...4).reduce(UInt32(0)) { acc, i in acc << 8 | UInt32(i < k.count ? k[i] : fill) }
        }
        let last = UInt32.max >> 1   // fallback copies have bit 31 set
        let low: UInt32 = smallest.first.map { $0 < 1 ? 0 : ($0 > 1 ? UInt32.max : index(smallest, fill: 0)) } ?? 0
        let high: UInt32 = largest.first.map { $0 < 1 ? 0 : ($0 > 1 ? UInt32.max : index(largest, fill: 0xFF)) } ?? 0
        guard largest.first ?? 0 >= 1, low <= last, low <= high else { return nil }
        return low...min(high, last)
    }

    public func quarantine(table: UInt64) async throws -> Bool {
        let database = database
        return try await bulk.run { try database.quarantine(table: table) }
    }

    public func tables() -> [(table: UInt64, bytes: UInt64)] { database.liveTables.map { ($0.number, $0.size) } }

    public func verify(table: UInt64) async throws -> (bytes: Int, damaged: Int) {
        let database = database
        return try await bulk.run {
            let (bytes, damage) = try database.verify(table: table)
            return (bytes, damage.count)
        }
    }

    public func count(partition: PartitionID) async throws -> Int {
        try await fold(partition: partition, after: nil, into: 0) { n, _, _ in
            n += 1
            return .continue
        }.accumulator
    }

    /// Drops every key of `partition` (a vnode handed off): one range deletion, recorded in the
    /// manifest on the bulk executor.
    public func drop(partition: PartitionID) async throws {
        var b = WriteBatch()
        b.deleteRange(from: Self.dataKey(partition, []), to: Self.partitionEnd(partition))
        try await write(b)
    }

    /// Writes `batch` synced, whatever the sync mode: flow control, the append on the bulk
    /// executor, then the group commit.
    private func write(_ batch: WriteBatch) async throws {
        try await Self.write(batch, to: database, on: bulk)
    }

    private static func write(_ batch: WriteBatch, to database: Database, on bulk: ExecutorLane) async throws {
        try await database.waitForRoom()
        let last = try await bulk.run { try database.apply(batch) }
        try await database.waitDurable(upTo: last, sync: .always)
    }

    public var storageStatistics: Database.Statistics? { database.statistics }

    /// Stops the engine without syncing or marking the shutdown clean: a crash.
    public func abandon() async { await database.abandon() }

    /// Marks the shutdown clean (durably), writes the memtable as a table on the bulk executor,
    /// then closes the engine (its last log sync and file closes are the only calls left on the
    /// caller's thread).
    public func close() async throws {
        var mark = WriteBatch()
        mark.put(Self.cleanKey, [])
        let database = database
        do {
            try await write(mark)
            try await bulk.run { try database.flush() }
        } catch {
            // Not a clean shutdown (writes are refused, say): still stop the engine's workers
            // and close its files, then report why.
            try? await database.close()
            throw error
        }
        try await database.close()
    }
}
