public import CairnCore
public import CairnStorage

/// The node's persistent backend: one CairnStorage database under `<data_dir>/storage`.
///
/// Key layout (Docs/storage-format.md, "The node's keys"):
/// ```
/// data-key     = %x01 partition:u32be key     ; a partition's keys are one contiguous range
/// metadata-key = %x00 name                    ; "actor-epoch" (u64be), "clean-shutdown" (empty),
///                                             ; "run-sync-mode" (u8: 0 always, 1 interval, 2 none)
/// ```
///
/// The actor epoch lives with the data. It is kept across restarts when no dot this node issued
/// and showed can have been lost: after a clean shutdown, or after a crash of a run that used the
/// `always` sync mode (a dot is shown to nobody — reads see only synced writes, replicas get it
/// after the local sync — before it is durable). Otherwise (a crash of a run under `interval` or
/// `none`, whatever this run uses) the node takes a fresh epoch, so it never reissues a dot a
/// peer or client may already hold. If the epoch, the clean mark or the recorded sync mode
/// cannot be read because its table block is corrupt, or salvage dropped log records at open,
/// the node assumes the worst (a fresh epoch).
/// Thread-safe.
public final class DiskBackend: StorageBackend {
    public let database: Database
    private let epoch: UInt64

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

    private init(database: Database, epoch: UInt64) {
        self.database = database
        self.epoch = epoch
    }

    /// Opens (recovering) the database in `directory` and settles the actor epoch.
    /// `progress(done, total)`: log bytes replayed. `fs` is the file seam (tests inject faults),
    /// `environment` runs the engine's background work, `epochs` draws a fresh epoch.
    public static func open(directory: String, options: DatabaseOptions, fs: any FileSystem = PosixFileSystem(),
                            environment: any StorageEnvironment = ThreadEnvironment(), epochs: EpochSource = EpochSource(),
                            progress: (@Sendable (UInt64, UInt64) -> Void)? = nil) async throws -> DiskBackend {
        let db = try Database.open(fs: fs, directory: directory, options: options, environment: environment, progress: progress)
        do {
            // The metadata keys sort first, so they live in the first block of the tables holding
            // them: if that block is corrupt, a value is unknown and the worst is assumed (a fresh
            // epoch never reissues a dot). The corruption is in the database's statistics; the
            // keys rewritten below shadow the bad block from now on.
            let stored = try readMetadata(db, epochKey).value.flatMap { $0.count == 8 ? $0.reduce(UInt64(0)) { $0 << 8 | UInt64($1) } : nil }
            let cleanMark = try readMetadata(db, cleanKey)
            let clean: Bool? = cleanMark.known ? cleanMark.value != nil : nil
            // What the previous run promised decides, not this run's setting: a crash under
            // `interval` or `none` may have lost dots this node had already shown.
            let previousRunSyncedAlways = try readMetadata(db, runSyncModeKey).value == [Self.syncModeCode(.always)]
            // Salvage may have dropped synced, acknowledged records: dots this node showed.
            let stats = db.statistics
            let salvaged = stats.salvagedBytes > 0 || stats.salvagedRegions > 0
            var epoch = stored ?? 0
            var batch = WriteBatch()
            if epoch == 0 || salvaged || (clean != true && !previousRunSyncedAlways) {
                epoch = epochs.next()
                batch.put(epochKey, (0..<8).map { UInt8(truncatingIfNeeded: epoch >> UInt64(56 - 8 * $0)) })
            }
            batch.put(runSyncModeKey, [Self.syncModeCode(options.syncMode)])
            // From here on a crash is an unclean shutdown.
            if clean != false { batch.delete(cleanKey) }
            try await db.write(batch, sync: .always)
            return DiskBackend(database: db, epoch: epoch)
        } catch {
            await db.abandon()
            throw error
        }
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

    static func dataKey(_ p: PartitionID, _ key: [UInt8]) -> [UInt8] {
        var k: [UInt8] = [1, UInt8(truncatingIfNeeded: p.index >> 24), UInt8(truncatingIfNeeded: p.index >> 16),
                          UInt8(truncatingIfNeeded: p.index >> 8), UInt8(truncatingIfNeeded: p.index)]
        k.append(contentsOf: key)
        return k
    }

    public func get(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? {
        try database.get(Self.dataKey(partition, key))
    }

    public func getDurable(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? {
        try database.getDurable(Self.dataKey(partition, key))
    }

    public var lastApplied: DurabilityToken { DurabilityToken(sequence: database.lastSequence) }

    public func apply(partition: PartitionID, key: [UInt8], value: [UInt8]) throws -> DurabilityToken {
        var b = WriteBatch()
        b.put(Self.dataKey(partition, key), value)
        return DurabilityToken(sequence: try database.apply(b))
    }

    /// Durable per the sync mode, then flow control: a vnode's acknowledgement waits while the
    /// engine is past its write bounds (the coordinator's client sees the slowdown).
    public func waitDurable(_ token: DurabilityToken) async throws {
        try await database.waitDurable(upTo: token.sequence)
        try await database.waitForRoom()
    }

    public func count(partition: PartitionID) throws -> Int {
        var n = 0
        let it = try database.iterator(prefix: Self.dataKey(partition, []))
        while try it.nextEntry() != nil { n += 1 }
        return n
    }

    /// Drops every key of `partition` (a vnode handed off): one range deletion.
    public func drop(partition: PartitionID) async throws {
        let lower = Self.dataKey(partition, [])
        try await database.deleteRange(from: lower, to: DatabaseIterator.upperBound(ofPrefix: lower) ?? [2], sync: .always)
    }

    public var storageStatistics: Database.Statistics? { database.statistics }

    /// Stops the engine without syncing or marking the shutdown clean: a crash.
    public func abandon() async { await database.abandon() }

    /// Marks the shutdown clean (durably), then closes the engine.
    public func close() async throws {
        do {
            try await database.put(Self.cleanKey, [], sync: .always)
        } catch {
            // Not a clean shutdown (writes are refused, say): still stop the engine's workers
            // and close its files, then report why.
            try? await database.close()
            throw error
        }
        try await database.close()
    }
}
