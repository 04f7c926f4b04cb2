public import CairnCore
public import CairnStorage

/// The node's persistent backend: one CairnStorage database under `<data_dir>/storage`.
///
/// Key layout (Docs/storage-format.md, "The node's keys"):
/// ```
/// data-key     = %x01 partition:u32be key     ; a partition's keys are one contiguous range
/// metadata-key = %x00 name                    ; "actor-epoch" (u64be), "clean-shutdown" (empty)
/// ```
///
/// The actor epoch lives with the data. It is kept across restarts when no dot this node issued
/// can have been lost: after a clean shutdown, or under the `always` sync mode (a coordinator's
/// write is durable locally before any replica sees it). Otherwise (a crash under `interval` or
/// `none`) the node takes a fresh epoch, so it never reissues a dot a peer may already hold. If
/// the epoch cannot be read because its table block is corrupt, the node also takes a fresh one.
/// Thread-safe.
public final class DiskBackend: StorageBackend {
    public let database: Database
    private let epoch: UInt64

    static let epochKey: [UInt8] = [0] + Array("actor-epoch".utf8)
    static let cleanKey: [UInt8] = [0] + Array("clean-shutdown".utf8)

    private init(database: Database, epoch: UInt64) {
        self.database = database
        self.epoch = epoch
    }

    /// Opens (recovering) the database in `directory` and settles the actor epoch.
    /// `progress(done, total)`: log bytes replayed.
    public static func open(directory: String, options: DatabaseOptions,
                            progress: (@Sendable (UInt64, UInt64) -> Void)? = nil) async throws -> DiskBackend {
        let db = try Database.open(fs: PosixFileSystem(), directory: directory, options: options, progress: progress)
        do {
            // The metadata keys sort first, so they live in the first block of the tables holding
            // them: if that block is corrupt, the epoch is unknown (take a fresh one: a new epoch
            // never reissues a dot) and the shutdown is taken as unclean. The corruption is in
            // the database's statistics; the rewritten keys shadow the bad block from now on.
            var stored: UInt64?
            var clean: Bool?
            do throws(StorageError) {
                stored = try db.get(epochKey).flatMap { $0.count == 8 ? $0.reduce(UInt64(0)) { $0 << 8 | UInt64($1) } : nil }
            } catch {
                guard case .corruption = error else { throw error }
            }
            do throws(StorageError) {
                clean = try db.get(cleanKey) != nil
            } catch {
                guard case .corruption = error else { throw error }
            }
            var epoch = stored ?? 0
            if epoch == 0 || (clean != true && options.syncMode != .always) {
                epoch = UInt64.random(in: 1...UInt64.max)
                try await db.put(epochKey, (0..<8).map { UInt8(truncatingIfNeeded: epoch >> UInt64(56 - 8 * $0)) }, sync: .always)
            }
            // From here on a crash is an unclean shutdown.
            if clean != false { try await db.delete(cleanKey, sync: .always) }
            return DiskBackend(database: db, epoch: epoch)
        } catch {
            await db.abandon()
            throw error
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

    /// Marks the shutdown clean (durably), then closes the engine.
    public func close() async throws {
        try await database.put(Self.cleanKey, [], sync: .always)
        try await database.close()
    }
}
