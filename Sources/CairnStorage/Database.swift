import CStorageSupport
import Dispatch
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Operations applied atomically: one log record, consecutive sequence numbers.
///
/// ```
/// batch = first-sequence:u64be count:u32be op*
/// op    = kind:u8 key:blob [value:blob]      ; 1 = put (value follows), 0 = delete,
///                                            ; 2 = delete-range (key = lower, value = upper)
/// blob  = length:varint bytes
/// ```
public struct WriteBatch: Sendable, Hashable {
    public enum Op: Sendable, Hashable {
        case put([UInt8], [UInt8])
        case delete([UInt8])
        /// Every key in `[lower, upper)`.
        case deleteRange([UInt8], [UInt8])
    }

    public private(set) var ops: [Op] = []
    public init() {}
    public mutating func put(_ key: [UInt8], _ value: [UInt8]) { ops.append(.put(key, value)) }
    public mutating func delete(_ key: [UInt8]) { ops.append(.delete(key)) }
    public mutating func deleteRange(from lower: [UInt8], to upper: [UInt8]) { ops.append(.deleteRange(lower, upper)) }

    static let rangeDeletion: UInt8 = 2

    /// Bytes of keys and values: what a batch adds to the memtable, roughly.
    var payloadBytes: Int {
        ops.reduce(0) { n, op in
            switch op {
            case .put(let k, let v): n + k.count + v.count
            case .delete(let k): n + k.count
            case .deleteRange(let l, let u): n + l.count + u.count
            }
        }
    }

    /// At least the bytes `encode` appends: header, payload, and per op a kind byte and two
    /// varint lengths (at most 10 bytes each).
    var encodedBytesEstimate: Int { 12 + payloadBytes + 21 * ops.count }

    func encoded(firstSequence: UInt64) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(encodedBytesEstimate)
        encode(firstSequence: firstSequence, into: &out)
        return out
    }

    /// Appends the batch's log record payload (`encoded`) to `out`.
    func encode(firstSequence: UInt64, into out: inout [UInt8]) {
        for shift in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: firstSequence >> UInt64(shift))) }
        Coding.putU32(&out, UInt32(ops.count))
        for op in ops {
            switch op {
            case .put(let k, let v):
                out.append(EntryKind.value.rawValue)
                Coding.putVarint(&out, UInt64(k.count)); out += k
                Coding.putVarint(&out, UInt64(v.count)); out += v
            case .delete(let k):
                out.append(EntryKind.deletion.rawValue)
                Coding.putVarint(&out, UInt64(k.count)); out += k
            case .deleteRange(let lower, let upper):
                out.append(WriteBatch.rangeDeletion)
                Coding.putVarint(&out, UInt64(lower.count)); out += lower
                Coding.putVarint(&out, UInt64(upper.count)); out += upper
            }
        }
    }

    static func decode(_ b: [UInt8]) -> (UInt64, WriteBatch)? {
        guard b.count >= 12 else { return nil }
        let seq = b[0..<8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        let count = Int(Coding.getU32(b, 8))
        var p = 12
        var batch = WriteBatch()
        func blob() -> [UInt8]? {
            guard let n = Coding.getVarint(b, &p, limit: b.count), n <= UInt64(b.count - p) else { return nil }
            defer { p += Int(n) }
            return Array(b[p..<p + Int(n)])
        }
        for _ in 0..<count {
            guard p < b.count else { return nil }
            let kind = b[p]
            p += 1
            guard let key = blob() else { return nil }
            switch kind {
            case EntryKind.value.rawValue:
                guard let value = blob() else { return nil }
                batch.put(key, value)
            case EntryKind.deletion.rawValue:
                batch.delete(key)
            case WriteBatch.rangeDeletion:
                guard let upper = blob() else { return nil }
                batch.deleteRange(from: key, to: upper)
            default:
                return nil
            }
        }
        return p == b.count ? (seq, batch) : nil
    }
}


/// How a database is opened. Every bound here has a config key in the node's `cairn.conf`
/// (Docs/configuration.md) and a statistic.
public struct DatabaseOptions: Sendable {
    public var syncMode: SyncMode = .always
    /// Open even if a log is corrupt before its tail (`storage.salvage`, `cairnd --salvage`):
    /// skip each corrupt stretch, and each record that checks out but is not a valid batch, keep
    /// everything else, and count what was dropped (`Statistics.salvagedBytes`,
    /// `salvagedRegions`). Off: such a log makes `open` fail with `.corruption` naming the file
    /// and offset. A torn tail is dropped either way; the manifest is never salvaged.
    public var salvage = false
    /// Memory for memtables, the active one and the one being flushed together
    /// (`write_buffer_bytes`): the active memtable is frozen and flushed at half of it.
    public var writeBufferBytes = 64 << 20
    /// The block cache's capacity (`block_cache_bytes`).
    public var blockCacheBytes = 64 << 20
    /// A flush puts every data block it writes into the block cache: the newest writes are the
    /// likeliest reads. Without it, every read of a key that was in the flushed memtable misses
    /// the cache until its block is read back (for about a second after each flush under load,
    /// each such read leaves the event loop for a store thread and a file read).
    public var cacheFlushedBlocks = true
    /// A compaction puts into the block cache each output block whose last key's block was
    /// cached in an input table (readers were using that range); the rest would only push out
    /// what readers use. Without it, the same cold second follows every compaction.
    public var cacheCompactedBlocks = true
    /// The write-ahead log is extended ahead of its appends by zeroed chunks of this size
    /// (`log_preallocate_bytes`; 0: never), so a sync need not record a new file size: on ext4
    /// and XFS one device write per `fdatasync` instead of two. Costs at most this much disk per
    /// log, and the zeros are written once.
    public var logPreallocateBytes = 1 << 20
    /// Under `always`, log records wait in memory for the next sync and reach the file in one
    /// write with it (`log_buffer_bytes`): one `write` per group commit instead of one per
    /// record; a buffer this full is written out at once. Nothing is acknowledged before the
    /// sync, so a crash loses nothing acknowledged. Other sync modes write each record at once
    /// (their writers are acknowledged before any sync). 0: never buffered.
    public var logBufferBytes = 64 << 10
    /// The log writer's buffer under these options (`logBufferBytes` under `always`, else 0).
    var logBufferLimit: Int { syncMode == .always ? logBufferBytes : 0 }
    /// A table being written (flush, compaction) is written out to the device every this many
    /// bytes, and the writer waits for it (`bytes_per_sync`; 0: only the final sync). Bounds how
    /// much of a table the device queue holds ahead of a log sync: without it a flush's whole
    /// table reaches the device at its final sync, and every write's log sync waits behind it.
    public var bytesPerSync = 1 << 20
    /// Background write budget for compaction (`compaction_bytes_per_second`; 0: unlimited).
    public var compactionBytesPerSecond: UInt64 = 128 << 20
    public var compaction = CompactionPolicy()
    public var blockSize = 4096
    public var bloomBitsPerKey = 10
    /// Under `always`, a writer that finds no log sync running performs it on its own thread
    /// (see `GroupCommitter.waitDurable`). Off by default: the node must not block Swift's
    /// cooperative pool on `fdatasync`; a standalone program with dedicated writer threads may
    /// turn it on for lower synced-write latency.
    public var syncOnWriterThread = false
    /// Consecutive failures of a background job before it gives up and writes are refused.
    public var backgroundRetryLimit = 5
    public init() {}
}

/// The engine's front door (LevelDB-style): `open`, `put` / `delete` / `deleteRange` / `write`
/// (atomic batches), `get`, snapshots with ordered iteration, `flush`, `compact`, `close`.
///
/// Contract: a write acknowledged under `always` survives a crash; a batch is all or nothing;
/// `deleteRange` is durable when it returns (it is recorded in the manifest); after a failed sync,
/// a failed log or manifest write (a short write, ENOSPC, EIO: nothing is ever appended after the
/// fragment it may leave, which recovery drops as a torn tail), or a background job failing
/// `backgroundRetryLimit` times, every write is refused (`writesRefused`) until the database is
/// reopened. Writes are delayed, never failed, while level 0 is past its slowdown
/// bound, and wait while the memtables are full or level 0 is past its stop bound. A corrupt
/// table never keeps the database closed or unwritable: a read whose answer the damage may hide
/// throws `.corruption` (never an older version or nil), a compaction that meets it sets the
/// table aside (`Version.quarantined`), and `statistics` names it (Docs/storage-format.md,
/// "Corrupt tables").
///
/// Isolation: thread-safe. One lock guards the write path's state (sequence, memtables, version,
/// open tables); reads copy a `ReadView` under it and then read without it. A flush worker and a
/// compaction worker (actors on their own threads) do the background writing; `close()` stops them.
public final class Database: Sendable {
    public struct Statistics: Sendable, Hashable {
        public var recoveredRecords = 0
        /// Bytes of torn last records dropped at open: the logs' (truncated) and the manifest's.
        public var tornTailBytes: UInt64 = 0
        /// Log bytes `salvage` dropped at open (corrupt stretches and records that were not batches).
        public var salvagedBytes: UInt64 = 0
        /// Corrupt stretches and undecodable records `salvage` dropped at open.
        public var salvagedRegions = 0
        public var removedOrphanFiles = 0
        /// Log syncs since open, every log's (`cairn_storage_log_syncs`).
        public var logSyncs = 0
        /// Writes to the log files since open, every log's (`cairn_storage_log_writes`).
        public var logWrites = 0
        public var writes = 0
        public var writtenBytes: UInt64 = 0
        public var flushes = 0
        public var flushedBytes: UInt64 = 0
        /// Times a flush or compaction wrote its table out mid-way (`DatabaseOptions.bytesPerSync`).
        public var tableWriteOuts = 0
        public var compactions = 0
        public var trivialMoves = 0
        public var compactionReadBytes: UInt64 = 0
        public var compactionWrittenBytes: UInt64 = 0
        public var compactionThrottledMicros: UInt64 = 0
        public var droppedEntries = 0
        public var delayedWrites = 0
        public var stalledWrites = 0
        public var backgroundFailures = 0
        /// What the last failed flush or compaction reported (nil if none failed).
        public var lastBackgroundError: String?
        public var memtableBytes = 0
        public var immutableMemtableBytes = 0
        public var tablesPerLevel: [Int] = []
        public var bytesPerLevel: [UInt64] = []
        public var rangeTombstones = 0
        public var blockCache = BlockCache.Counters()
        /// Live tables known to be corrupt (file numbers, sorted): a read or a compaction met a
        /// bad block in them, they could not be opened, or they were set aside in an earlier run.
        public var corruptTables: [UInt64] = []
        /// Live tables set aside from compaction because they are corrupt (file numbers, sorted);
        /// not counted in `tablesPerLevel` / `bytesPerLevel`. See `Version.quarantined`.
        public var quarantinedTables: [UInt64] = []
        /// Corruption errors met since open (reads, compactions, tables that could not be opened).
        public var corruptionEvents = 0
        /// The last corruption error met (nil if none).
        public var lastCorruption: String?
    }

    struct State {
        var sequence: UInt64
        var memtable: Memtable
        /// The frozen memtable being flushed, the log number that starts after it, and its last sequence.
        var immutable: (table: Memtable, nextLog: UInt64, lastSequence: UInt64)?
        var version: Version
        var readers: [UInt64: TableReader]
        var level0: [TableReader] = []
        var level0Smallest: [[UInt8]] = []
        var levels: [[LiveTable]] = []
        var quarantined: [LiveTable] = []
        /// The memtables a reader consults, newest first (kept so a read allocates nothing here).
        var memtables: [Memtable] = []
        var manifest: WALWriter
        var writer: WALWriter
        var committer: GroupCommitter
        var compacting: Set<UInt64> = []
        var pointers: [Int: [UInt8]] = [:]
        /// A log or manifest append failed: every write is refused until reopened.
        var writeFailure: StorageError?
        var backgroundError: StorageError?
        var closed = false
        var stats = Statistics()
        let corruption: CorruptionLog

        /// Rebuilds the read path's table lists from the version.
        mutating func relink() {
            memtables = [memtable] + (immutable.map { [$0.table] } ?? [])
            let l0 = (version.tables[0] ?? []).compactMap { m in readers[m.number].map { (m.smallest, $0) } }
            level0 = l0.map(\.1)
            level0Smallest = l0.map(\.0)
            levels = (1..<CompactionPolicy.levels).map { level in
                (version.tables[level] ?? []).compactMap { m in readers[m.number].map { LiveTable(meta: m, reader: $0) } }
            }
            quarantined = version.quarantined.compactMap { m in readers[m.number].map { LiveTable(meta: m, reader: $0) } }
        }

        var view: ReadView { view(at: sequence) }

        /// The read view as of `sequence` (≤ the current one).
        func view(at sequence: UInt64) -> ReadView {
            ReadView(memtables: memtables, level0: level0, level0Smallest: level0Smallest, levels: levels, quarantined: quarantined,
                     tombstones: version.tombstones, sequence: sequence, corruption: corruption)
        }
    }

    let fs: any FileSystem
    public let directory: String
    let options: DatabaseOptions
    /// Whether a write is on stable storage when `waitDurable` returns for it (`syncMode` is
    /// `always`).
    public var syncsEveryWrite: Bool { options.syncMode == .always }
    let cache: BlockCache
    /// The corruption met since open (also referenced by every read view).
    let corruption: CorruptionLog
    private let state: Mutex<State>
    /// Serializes flushes (one at a time; writes continue into the fresh memtable meanwhile).
    private let flushLock = Mutex(())
    /// Serializes compactions (the worker's and `compactUntilSettled`'s): one merge at a time.
    private let compactionLock = Mutex(())
    /// Serializes the log's writers: appends, log switches and the final close. Held around the
    /// `write(2)` and the switch's syncs instead of the state lock, so readers (who take only the
    /// state lock) do not wait for a put's disk I/O. (A flush's or compaction's manifest edit is
    /// appended under the state lock and synced after it is released; a range deletion's, rare,
    /// still syncs under it.) Order: `logLock`, then `state`.
    private let logLock = Mutex(())
    private let flushSignal = WakeSignal()
    private let compactionSignal = WakeSignal()
    /// Wakes writers waiting for room (a flush or compaction finished, or the database closed).
    private let room = Broadcast()
    private let workers = Mutex<[Task<Void, Never>]>([])
    /// The `interval` sync mode's timer loop.
    private let timer = Mutex<Task<Void, Never>?>(nil)
    /// Where background work runs and how the engine waits.
    let environment: any StorageEnvironment
    /// Runs group-commit syncs (and the interval timer's) off the writers' threads.
    let syncQueue: any BlockingQueue

    private init(fs: any FileSystem, directory: String, options: DatabaseOptions, cache: BlockCache, state: State,
                 environment: any StorageEnvironment, syncQueue: any BlockingQueue) {
        self.fs = fs
        self.environment = environment
        self.syncQueue = syncQueue
        self.directory = directory
        self.options = options
        self.cache = cache
        corruption = state.corruption
        self.state = Mutex(state)
    }

    /// Bounds that keep every counter far from overflow whatever a file says: a manifest or log
    /// stating a sequence or file number at or past them is corruption (`Version.validate`, log
    /// replay); files named with a larger number are ignored.
    static let maxSequence: UInt64 = 1 << 62
    static let maxFileNumber: UInt64 = 1 << 40

    static func numbered(_ n: UInt64, _ suffix: String) -> String {
        let digits = String(n)
        return String(repeating: "0", count: max(0, 6 - digits.count)) + digits + suffix
    }
    static func logName(_ n: UInt64) -> String { numbered(n, ".log") }
    /// The file name of table `n` in the database directory.
    public static func tableName(_ n: UInt64) -> String { numbered(n, ".sst") }

    func path(_ name: String) -> String { directory + "/" + name }

    static func makeCommitter(_ writer: WALWriter, durable: UInt64, queue: any BlockingQueue) -> GroupCommitter {
        GroupCommitter(durable: durable, queue: queue) { () throws(StorageError) in try writer.sync() }
    }

    /// Opens (creating if needed) the database in `directory`: reads the manifest (the live
    /// tables and range tombstones), replays the logs it does not cover into a fresh memtable
    /// (truncating a torn tail), removes files no version references, then starts a new log and a
    /// new manifest and the background workers. `progress(done, total)` reports log replay in bytes.
    /// `environment` runs the background work (default: threads of its own, real time).
    public static func open(fs: any FileSystem, directory: String, options: DatabaseOptions = .init(),
                            environment: any StorageEnvironment = ThreadEnvironment(),
                            progress: (@Sendable (UInt64, UInt64) -> Void)? = nil) throws(StorageError) -> Database {
        try fs.createDirectory(directory)
        let recovered = try Manifest.recoverReporting(fs: fs, directory: directory)
        var version = recovered?.version ?? Version()
        if let recovered { try version.validate(path: directory + "/" + recovered.manifest) }
        let names = try fs.list(directory)
        // Logs by number. A name whose number the engine never issues (at or past
        // `maxFileNumber`, e.g. a stray `18446744073709551615.log`) is not ours: never replayed,
        // counted or removed.
        let logs = names.filter { $0.hasSuffix(".log") }.compactMap { name -> (UInt64, String)? in
            guard let n = UInt64(name.dropLast(4)), n < Self.maxFileNumber else { return nil }
            return (n, name)
        }.sorted { $0.0 < $1.0 }
        let memtable = Memtable()
        var sequence = version.lastSequence
        var stats = Statistics()
        stats.tornTailBytes = recovered?.tornTailBytes ?? 0
        let replay = logs.filter { $0.0 >= version.logNumber }
        // Opened once: the sizes give the progress total, the same handles are replayed.
        var files: [any ReadableFile] = []
        for (_, name) in replay { files.append(try fs.openReadable(directory + "/" + name)) }
        defer { for f in files { f.close() } }
        let sizes = files.map(\.size)
        let total = sizes.reduce(0, +)
        var done: UInt64 = 0
        progress?(0, total)
        for ((_, name), file) in zip(replay, files) {
            let size = file.size
            let path = directory + "/" + name
            let r = try WAL.replay(file, path: path, salvage: options.salvage) { (record: [UInt8], offset: UInt64) throws(StorageError) in
                // A record whose checksum holds but whose content is unusable: refused, or dropped
                // (and counted) under salvage.
                func unusable(_ reason: String) throws(StorageError) {
                    guard options.salvage else { throw .corruption(path: path, offset: offset, reason: reason) }
                    stats.salvagedBytes += UInt64(WAL.headerBytes + record.count)
                    stats.salvagedRegions += 1
                }
                guard let (first, batch) = WriteBatch.decode(record) else {
                    return try unusable("a log record with a valid checksum is not a write batch")
                }
                let (end, overflow) = first.addingReportingOverflow(UInt64(batch.ops.count))
                guard !overflow, end < Self.maxSequence else {
                    return try unusable("batch sequence \(first) out of range")
                }
                for (i, op) in batch.ops.enumerated() {
                    let seq = first + UInt64(i)
                    switch op {
                    case .put(let k, let v): memtable.add(key: k, sequence: seq, kind: .value, value: v)
                    case .delete(let k): memtable.add(key: k, sequence: seq, kind: .deletion, value: [])
                    case .deleteRange(let lower, let upper):
                        var e = VersionEdit()
                        e.addedTombstones = [RangeTombstone(lower: lower, upper: upper, sequence: seq)]
                        version.apply(e)
                    }
                }
                sequence = max(sequence, end - (batch.ops.isEmpty ? 0 : 1))
                stats.recoveredRecords += 1
            }
            if r.tornTailBytes > 0 {
                try fs.truncate(path, to: r.validEnd)
                stats.tornTailBytes += r.tornTailBytes
            }
            stats.salvagedBytes += r.salvagedBytes
            stats.salvagedRegions += r.salvagedRegions
            done += size
            progress?(done, total)
        }
        // Files no version references: outputs of a flush or compaction cut short by a crash.
        let live = Set(version.allTables.map { tableName($0.number) })
        for name in names where name.hasSuffix(".sst") && !live.contains(name) {
            try fs.remove(directory + "/" + name)
            stats.removedOrphanFiles += 1
        }
        let cache = BlockCache(capacityBytes: options.blockCacheBytes)
        let corruption = CorruptionLog()
        corruption.mark(version.quarantined.map(\.number))
        var readers: [UInt64: TableReader] = [:]
        for meta in version.allTables {
            let path = directory + "/" + tableName(meta.number)
            do {
                readers[meta.number] = try TableReader(fs: fs, path: path, number: meta.number, cache: cache)
            } catch {
                // A corrupt footer, filter or index: the table is opened damaged and set aside (the
                // new manifest records it), so one table does not keep the database closed.
                guard case .corruption = error else { throw error }
                readers[meta.number] = TableReader(damaged: error, meta: meta, path: path)
                corruption.note(error)
                var e = VersionEdit()
                e.quarantined = [(meta.level, meta.number)]
                version.apply(e)
            }
        }
        let highestLog = logs.last?.0 ?? 0
        let logNumber = max(version.nextFile, highestLog + 1)
        guard logNumber < Self.maxFileNumber else {
            throw .corruption(path: directory + "/" + Manifest.currentName, offset: 0, reason: "file number \(logNumber) out of range")
        }
        let manifestNumber = logNumber + 1
        let logPath = directory + "/" + logName(logNumber)
        let file = try fs.createLog(logPath, preallocateBytes: options.logPreallocateBytes)
        try file.sync()
        try fs.syncDirectory(directory)
        // The replayed logs stay until a flush covers them: the new manifest keeps the old log number.
        version.nextFile = manifestNumber + 1
        version.lastSequence = sequence
        let manifest = try Manifest.create(fs: fs, directory: directory, number: manifestNumber, version: version)
        let current = Manifest.fileName(manifestNumber)
        for name in try fs.list(directory) where name.hasPrefix("MANIFEST-") && name != current {
            try fs.remove(directory + "/" + name)
        }
        try fs.syncDirectory(directory)
        let writer = WALWriter(file: file, path: logPath, bufferLimit: options.logBufferLimit)
        let syncQueue = environment.makeQueue(label: "cairn.storage.group-commit")
        var state = State(sequence: sequence, memtable: memtable, version: version, readers: readers, manifest: manifest,
                          writer: writer, committer: makeCommitter(writer, durable: sequence, queue: syncQueue), stats: stats, corruption: corruption)
        state.relink()
        let db = Database(fs: fs, directory: directory, options: options, cache: cache, state: state,
                          environment: environment, syncQueue: syncQueue)
        db.startBackground()
        // A replayed memtable is written as a table before open returns (as LevelDB and RocksDB
        // do): reads then find the data in one table rather than a large memtable, and the
        // replayed logs go.
        if memtable.count > 0 {
            do { try db.flush() } catch {
                // The instance is never handed out: stop its workers (they exit on `closed`).
                db.state.withLock { $0.closed = true }
                db.flushSignal.notify()
                db.compactionSignal.notify()
                throw error
            }
        }
        environment.releaseFreeMemory()
        db.compactionSignal.notify()
        return db
    }

    // MARK: Background work

    private func startBackground() {
        let flusher = BackgroundWorker(name: "cairn.storage.flush", environment: environment)
        let compactor = BackgroundWorker(name: "cairn.storage.compaction", environment: environment)
        let (flushSignal, compactionSignal) = (flushSignal, compactionSignal)
        let tasks = [
            environment.spawn { await flusher.run(self, signal: flushSignal) { db throws(StorageError) in try db.flushImmutable() } },
            environment.spawn { await compactor.run(self, signal: compactionSignal) { db throws(StorageError) in try db.compactOnce() } },
        ]
        workers.withLock { $0 = tasks }
        if case .interval(let ms) = options.syncMode {
            let (environment, queue) = (environment, syncQueue)
            let loop = environment.spawn { [weak self] in
                while true {
                    do { try await environment.sleep(for: .milliseconds(max(ms, 1))) } catch { return }
                    guard let writer = self?.state.withLock({ $0.closed ? nil : $0.writer }) else { return }
                    // One sync at a time: a slow disk makes ticks merge, not pile up on the queue
                    // that group commits share.
                    let failure: StorageError? = await withCheckedContinuation { c in
                        queue.async {
                            do throws(StorageError) { try writer.sync(); c.resume(returning: nil) } catch { c.resume(returning: error) }
                        }
                    }
                    // A failed fsync may have lost acknowledged writes: refuse writes (fsyncgate).
                    if let failure, let db = self { _ = db.backgroundFailed(failure, failures: 1) }
                }
            }
            timer.withLock { $0 = loop }
        }
    }

    var isClosed: Bool { state.withLock { $0.closed || $0.backgroundError != nil } }

    /// A background job failed `failures` times in a row: past the limit (or at once for a failed
    /// sync) the database refuses writes until reopened.
    func backgroundFailed(_ error: StorageError, failures: Int) -> Bool {
        let fatal: Bool = state.withLock { s in
            s.stats.backgroundFailures += 1
            s.stats.lastBackgroundError = error.description
            // Past the limit; at once after a failed sync, or once writes are refused for good
            // (the manifest cannot take another edit).
            var fatal = failures >= options.backgroundRetryLimit || s.backgroundError != nil
            if case .syncFailed = error { fatal = true }
            if fatal, s.backgroundError == nil { s.backgroundError = error }
            return fatal
        }
        if fatal { room.notifyAll() }
        return fatal
    }

    /// Freezes the memtable and starts a new log. The caller holds `logLock` (no append runs),
    /// not the state lock: the new log's creation and syncs and the old log's final sync happen
    /// outside it, so readers do not wait for them. Everything logged so far is synced before the
    /// switch, so the frozen memtable's writers are durable. Returns false (nothing done) while a
    /// flush is pending.
    private func switchLog() throws(StorageError) -> Bool {
        guard let (number, old) = state.withLock({ s -> (UInt64, WALWriter)? in
            guard s.immutable == nil, !s.closed else { return nil }
            // Reserved now: flushes and compactions take numbers concurrently.
            defer { s.version.nextFile += 1 }
            return (s.version.nextFile, s.writer)
        }) else { return false }
        let logPath = path(Self.logName(number))
        let file = try fs.createLog(logPath, preallocateBytes: options.logPreallocateBytes)
        do throws(StorageError) {
            try file.sync()
            try fs.syncDirectory(directory)
        } catch {
            // Nothing switched: the empty new log goes, the next write past the bound retries.
            try? file.close()
            try? fs.remove(logPath)
            throw error
        }
        do throws(StorageError) {
            try old.sync()
        } catch {
            // Writes already acknowledged under `interval`/`none` may be gone: refuse writes
            // until reopen, and say why.
            try? file.close()
            try? fs.remove(logPath)
            state.withLock { s in if s.writeFailure == nil { s.writeFailure = error } }
            throw error
        }
        // Sized like the one it replaces (no append runs meanwhile: the caller holds `logLock`),
        // but never reserving room for more keys than a full one could hold at 64 bytes each (a
        // replayed log is not bounded by the write buffer), and made before the state lock is taken.
        let expected = min(state.withLock { $0.memtable }.keyCount, options.writeBufferBytes / 2 / 64)
        let fresh = Memtable(expectedKeys: expected)
        state.withLock { s in
            s.committer.markDurable(upTo: s.sequence)
            s.memtable.freeze()
            s.immutable = (s.memtable, number, s.sequence)
            s.memtable = fresh
            s.writer = WALWriter(file: file, path: logPath, bufferLimit: options.logBufferLimit)
            // The statistic counts every log's syncs: the retiring committer's so far are kept
            // (a sync it still runs after this is not counted).
            s.stats.logSyncs += s.committer.syncCount
            s.stats.logWrites += old.fileWrites
            s.committer = Self.makeCommitter(s.writer, durable: s.sequence, queue: syncQueue)
            s.relink()
        }
        return true
    }

    /// Writes the frozen memtable as a level-0 table (newest version per key; entries a range
    /// tombstone hides are dropped, deletions kept), records it, and drops the logs it covered.
    /// Returns false when nothing was frozen.
    func flushImmutable() throws(StorageError) -> Bool {
        try flushLock.withLock { _ throws(StorageError) -> Bool in
            let job: (Memtable, UInt64, UInt64, UInt64, [RangeTombstone], UInt64)? = state.withLock { s in
                guard let imm = s.immutable else { return nil }
                let number = s.version.nextFile
                s.version.nextFile += 1
                return (imm.table, imm.nextLog, imm.lastSequence, number, s.version.tombstones, s.sequence)
            }
            guard let (frozen, nextLog, lastSequence, number) = job.map({ ($0.0, $0.1, $0.2, $0.3) }),
                  let (tombstones, filteredThrough) = job.map({ ($0.4, $0.5) }) else { return false }
            var edit = VersionEdit()
            edit.logNumber = nextLog
            edit.lastSequence = lastSequence
            var reader: TableReader?
            var written: UInt64 = 0
            var writeOuts = 0
            let tablePath = path(Self.tableName(number))
            // Walked without the memtable's lock (the log switch froze it: no add follows), so
            // reads of it, the event loops' in-memory reads among them, never wait for the flush.
            var entries = frozen.frozenEntries()
            do throws(StorageError) {
                var table: (builder: TableBuilder, smallest: [UInt8], largest: [UInt8], low: UInt64, high: UInt64)?
                while let e = entries.next() {
                    if tombstones.contains(where: { $0.hides(e.key, e.sequence) }) { continue }
                    if table == nil {
                        let builder = try TableBuilder(fs: fs, path: tablePath, blockSize: options.blockSize,
                                                       bitsPerKey: options.bloomBitsPerKey, bytesPerSync: options.bytesPerSync,
                                                       caching: options.cacheFlushedBlocks ? .init(cache: cache, number: number) : nil)
                        table = (builder, e.key, e.key, e.sequence, e.sequence)
                    }
                    try table?.builder.add(key: e.key, value: InternalValue.encode(e))
                    table?.largest = e.key
                    if let t = table {
                        table?.low = min(t.low, e.sequence)
                        table?.high = max(t.high, e.sequence)
                    }
                }
                if let t = table {
                    written = try t.builder.finish()
                    writeOuts = t.builder.writeOuts
                    try fs.syncDirectory(directory)
                    edit.added = [TableMeta(number: number, level: 0, size: written, smallest: t.smallest, largest: t.largest,
                                            smallestSequence: t.low, largestSequence: t.high, filteredThrough: filteredThrough)]
                    reader = try TableReader(fs: fs, path: tablePath, number: number, cache: cache)
                }
            } catch {
                // A partial table (a full disk, say) would hold its space until the next open.
                if fs.exists(tablePath) { try? fs.remove(tablePath) }
                cache.evict(file: number)
                throw error
            }
            var recorded = false
            var appended = false
            do throws(StorageError) {
                let manifest = try state.withLock { s throws(StorageError) -> WALWriter in
                    edit.nextFile = s.version.nextFile
                    let manifest = try appendEdit(edit, &s, appended: &appended)
                    recorded = true
                    s.version.apply(edit)
                    if let reader { s.readers[number] = reader }
                    s.immutable = nil
                    s.stats.flushes += 1
                    s.stats.flushedBytes += written
                    s.stats.tableWriteOuts += writeOuts
                    try retireTombstones(&s)
                    s.relink()
                    return manifest
                }
                // Reads and writes go on meanwhile; the logs the edit retires stay until it is durable.
                try syncManifest(manifest)
            } catch {
                // The table's edit never made it to the manifest: the table is an orphan. (An edit
                // appended whole whose sync failed may be replayed by a reopen: keep its table.)
                if !recorded, let reader {
                    reader.close()
                    if !appended { try? fs.remove(tablePath) }
                }
                throw error
            }
            // The frozen memtable is freed here, on this thread, once the lock is released (its
            // arena is about a hundred blocks; still not work to do under the state lock).
            withExtendedLifetime(frozen) {}
            for name in try fs.list(directory) where name.hasSuffix(".log") {
                if let n = UInt64(name.dropLast(4)), n < nextLog { try fs.remove(path(name)) }
            }
            try fs.syncDirectory(directory)
            compactionSignal.notify()
            room.notifyAll()
            return true
        }
    }

    /// Appends `edit` to the manifest durably; the caller applies it after. If that fails, the
    /// manifest writer refuses every later edit (nothing goes on top of the fragment the failed
    /// append may have left; recovery drops it as a torn tail), so the database stops: writes are
    /// refused and the background workers end until it is reopened. Caller holds the lock.
    private func record(_ edit: VersionEdit, _ s: inout State) throws(StorageError) {
        var appended = false
        try record(edit, &s, appended: &appended)
    }

    /// `record`, telling the caller whether the edit was appended whole before anything failed:
    /// then only its sync failed, the edit may still be (or become) durable, and a reopen may
    /// replay it — so files it adds must not be removed (an open removes them if it is not).
    private func record(_ edit: VersionEdit, _ s: inout State, appended: inout Bool) throws(StorageError) {
        let manifest = try appendEdit(edit, &s, appended: &appended)
        do {
            try manifest.sync()
        } catch {
            stopAfterManifestFailure(error, &s)
            throw error
        }
    }

    /// Appends `edit` to the manifest without syncing it, for a caller that applies it under the
    /// same hold of the lock and, once the lock is released, calls `syncManifest` with the writer
    /// returned before anything that needs the edit durable (removing the files it retires,
    /// returning). Reads and writes do not wait for that sync. Until it completes, a crash loses
    /// the edit whole and nothing it retired has been removed, so the reopened database is the one
    /// before it. A failed append stops the database as `record` does. Caller holds the lock.
    private func appendEdit(_ edit: VersionEdit, _ s: inout State, appended: inout Bool) throws(StorageError) -> WALWriter {
        do {
            try s.manifest.append([edit.encoded()], sync: false)
            appended = true
            return s.manifest
        } catch {
            stopAfterManifestFailure(error, &s)
            throw error
        }
    }

    /// Makes the edits `appendEdit` wrote durable. Caller does not hold the lock. A failure stops
    /// the database (the edit is applied in memory, and may or may not be on disk).
    private func syncManifest(_ manifest: WALWriter) throws(StorageError) {
        do {
            try manifest.sync()
        } catch {
            state.withLock { s in stopAfterManifestFailure(error, &s) }
            throw error
        }
    }

    /// After a failed manifest append or sync: writes are refused and background work ends until
    /// the database is reopened. Caller holds the lock.
    private func stopAfterManifestFailure(_ error: StorageError, _ s: inout State) {
        if s.writeFailure == nil { s.writeFailure = error }
        if s.backgroundError == nil { s.backgroundError = error }
        room.notifyAll()
    }

    /// The error every write meets after a log or manifest append failed.
    static func refusal(_ failure: StorageError) -> StorageError {
        .writesRefused("a write to the log or manifest failed (\(failure)); writes are refused until the database is reopened")
    }

    /// Drops range tombstones that hide nothing any more: every memtable is newer than the
    /// tombstone, and no table overlapping its range holds an older entry. Caller holds the lock
    /// and, after releasing it, syncs the manifest (`syncManifest`): the edit is only appended.
    private func retireTombstones(_ s: inout State) throws(StorageError) {
        let memtableOldest = [s.memtable.smallestSequence, s.immutable?.table.smallestSequence].compactMap { $0 }.min() ?? .max
        let retired = s.version.tombstones.filter { t in
            memtableOldest > t.sequence
                && !s.version.allTables.contains { $0.mayHoldEntriesHidden(by: t) }
        }
        guard !retired.isEmpty else { return }
        var edit = VersionEdit()
        edit.removedTombstones = retired.map(\.sequence)
        var appended = false
        _ = try appendEdit(edit, &s, appended: &appended)
        s.version.apply(edit)
    }

    /// Performs the most urgent compaction, if any (see `CompactionPolicy.pick`). Merges the input
    /// tables into new tables of the output level, keeping the newest entry per key, dropping
    /// entries a range tombstone hides and deletions with nothing older below, within the write
    /// budget. Readers are never blocked: the new tables replace the old in one version edit.
    /// Returns false when there was nothing to do.
    func compactOnce() throws(StorageError) -> Bool {
        try compactionLock.withLock { _ throws(StorageError) -> Bool in try compactLocked() }
    }

    private func compactLocked() throws(StorageError) -> Bool {
        var moved: WALWriter?
        let picked: (CompactionPlan, [TableReader], Version, UInt64)? = try state.withLock { s throws(StorageError) in
            guard s.backgroundError == nil, !s.closed, let plan = options.compaction.pick(s.version, pointers: s.pointers) else { return nil }
            if plan.isTrivialMove, let t = plan.inputs.first {
                var edit = VersionEdit()
                edit.removed = [(plan.level, t.number)]
                var relocated = t
                relocated.level = plan.outputLevel
                edit.added = [relocated]
                var appended = false
                moved = try appendEdit(edit, &s, appended: &appended)
                s.version.apply(edit)
                s.pointers[plan.level] = t.largest
                s.stats.trivialMoves += 1
                s.relink()
                return (plan, [], s.version, s.sequence)
            }
            s.compacting = Set(plan.all.map(\.number))
            return (plan, plan.all.compactMap { s.readers[$0.number] }, s.version, s.sequence)
        }
        guard let (plan, readers, version, filteredThrough) = picked else { return false }
        if plan.isTrivialMove {
            if let moved { try syncManifest(moved) }
            room.notifyAll()
            return true
        }
        var outputs: [TableMeta] = []
        do {
            outputs = try merge(plan, readers: readers, version: version, filteredThrough: filteredThrough)
        } catch {
            state.withLock { $0.compacting = [] }
            // A bad block in an input: set that table aside and carry on without it (the next
            // pick no longer sees it). Retrying would meet the same block forever.
            if case .corruption(let p, _, _) = error, let bad = plan.all.first(where: { path(Self.tableName($0.number)) == p }) {
                try setAside(bad, because: error)
                return true
            }
            throw error
        }
        let inputBytes = plan.all.totalSize
        var recorded = false
        var appended = false
        do {
            // The outputs are opened before the edit, so a live table always has a reader.
            var opened: [UInt64: TableReader] = [:]
            for o in outputs {
                opened[o.number] = try TableReader(fs: fs, path: path(Self.tableName(o.number)), number: o.number, cache: cache)
            }
            let manifest = try state.withLock { s throws(StorageError) -> WALWriter in
                defer { s.compacting = [] }
                var edit = VersionEdit()
                // A range deletion may have dropped an input meanwhile: remove only what is still live.
                let live = Set(s.version.allTables.map(\.number))
                edit.removed = plan.all.filter { live.contains($0.number) }.map { ($0.level, $0.number) }
                edit.added = outputs
                edit.nextFile = s.version.nextFile
                let manifest = try appendEdit(edit, &s, appended: &appended)
                recorded = true
                s.version.apply(edit)
                s.readers.merge(opened) { _, new in new }
                for t in plan.all { s.readers[t.number] = nil }
                s.pointers[plan.level] = plan.inputs.map(\.largest).max { $0.isBefore($1) }
                s.stats.compactions += 1
                s.stats.compactionReadBytes = s.stats.compactionReadBytes.addingSaturating(inputBytes)
                s.stats.compactionWrittenBytes += outputs.totalSize
                try retireTombstones(&s)
                s.relink()
                return manifest
            }
            // Reads and writes go on meanwhile; the inputs stay until the edit is durable.
            try syncManifest(manifest)
        } catch {
            state.withLock { $0.compacting = [] }
            // Outputs no edit references (a reopen would remove them too). An edit appended whole
            // whose sync failed may be replayed by a reopen: its outputs stay.
            if !recorded && !appended { for o in outputs { try? fs.remove(path(Self.tableName(o.number))) } }
            throw error
        }
        // Open snapshots keep their descriptors; the names go now.
        for t in plan.all {
            cache.evict(file: t.number)
            if fs.exists(path(Self.tableName(t.number))) { try fs.remove(path(Self.tableName(t.number))) }
        }
        try fs.syncDirectory(directory)
        room.notifyAll()
        return true
    }

    /// Quarantines table `t` (a compaction met `error` in it): one manifest edit moves it out of
    /// its level into `Version.quarantined`, where it stays readable, weighed by sequence, and no
    /// compaction touches it. Writes go on. No-op if the table is no longer in its level.
    private func setAside(_ t: TableMeta, because error: StorageError?) throws(StorageError) {
        if let error { corruption.note(error) }
        try state.withLock { s throws(StorageError) in
            guard s.version.tables[t.level]?.contains(where: { $0.number == t.number }) == true else { return }
            var e = VersionEdit()
            e.quarantined = [(t.level, t.number)]
            try record(e, &s)
            s.version.apply(e)
            s.relink()
        }
        room.notifyAll()   // level 0 may have shrunk
    }

    /// The merge of one compaction: writes the output tables and returns their metadata.
    private func merge(_ plan: CompactionPlan, readers: [TableReader], version: Version, filteredThrough: UInt64) throws(StorageError) -> [TableMeta] {
        let byNumber = Dictionary(readers.map { ($0.number, $0) }, uniquingKeysWith: { a, _ in a })
        var sources: [any EntrySource] = []
        if plan.level == 0 {
            for t in plan.inputs { if let r = byNumber[t.number] { sources.append(try TableRunSource([r], from: [], fillCache: false)) } }
        } else {
            sources.append(try TableRunSource(plan.inputs.compactMap { byNumber[$0.number] }, from: [], fillCache: false))
        }
        if plan.outputLevel != plan.level {
            sources.append(try TableRunSource(plan.overlaps.compactMap { byNumber[$0.number] }, from: [], fillCache: false))
        }
        var cursor = MergingCursor(sources: sources)
        // Tables below the output level, and the set-aside ones (they have no level, so they may
        // hold an older version anywhere): a deletion must stay while one of them may hold the key.
        let deeper = ((plan.outputLevel + 1)..<CompactionPolicy.levels).flatMap { version.tables[$0] ?? [] } + version.quarantined
        let tombstones = version.tombstones
        var limiter = RateLimiter(bytesPerSecond: options.compactionBytesPerSecond)
        var outputs: [TableMeta] = []
        var builder: TableBuilder?
        var current: (number: UInt64, smallest: [UInt8], largest: [UInt8], low: UInt64, high: UInt64)?
        var dropped = 0
        var writeOuts = 0
        var sinceCharge: UInt64 = 0

        func finishOutput() throws(StorageError) {
            guard let b = builder, let c = current else { return }
            let size = try b.finish()
            writeOuts += b.writeOuts
            limiter.spent(sinceCharge)
            sinceCharge = 0
            outputs.append(TableMeta(number: c.number, level: plan.outputLevel, size: size, smallest: c.smallest, largest: c.largest,
                                     smallestSequence: c.low, largestSequence: c.high, filteredThrough: filteredThrough))
            builder = nil
            current = nil
        }

        do {
            while let e = try cursor.next() {
                if tombstones.contains(where: { $0.hides(e.key, e.sequence) }) { dropped += 1; continue }
                if e.kind == .deletion, !deeper.contains(where: { !e.key.isBefore($0.smallest) && !$0.largest.isBefore(e.key) }) {
                    dropped += 1
                    continue
                }
                if builder == nil {
                    let number: UInt64 = try state.withLock { s throws(StorageError) in
                        guard !s.closed else { throw .writesRefused("database closed during compaction") }
                        defer { s.version.nextFile += 1 }
                        return s.version.nextFile
                    }
                    builder = try TableBuilder(fs: fs, path: path(Self.tableName(number)), blockSize: options.blockSize,
                                               bitsPerKey: options.bloomBitsPerKey, bytesPerSync: options.bytesPerSync,
                                               caching: options.cacheCompactedBlocks ? .init(cache: cache, number: number) { last in
                                                   readers.contains { $0.cachesBlock(covering: last) }
                                               } : nil)
                    current = (number, e.key, e.key, e.sequence, e.sequence)
                }
                let value = InternalValue.encode(e)
                try builder?.add(key: e.key, value: value)
                if var c = current {
                    c.largest = e.key
                    c.low = min(c.low, e.sequence)
                    c.high = max(c.high, e.sequence)
                    current = c
                }
                sinceCharge += UInt64(e.key.count + value.count)
                if sinceCharge >= 1 << 20 {
                    limiter.spent(sinceCharge)
                    sinceCharge = 0
                }
                if let b = builder, b.estimatedSize >= options.compaction.targetFileBytes { try finishOutput() }
            }
            try finishOutput()
            try fs.syncDirectory(directory)
        } catch {
            // Unreferenced outputs; a reopen would remove them too.
            for o in outputs {
                try? fs.remove(path(Self.tableName(o.number)))
                cache.evict(file: o.number)
            }
            if let c = current { try? fs.remove(path(Self.tableName(c.number))) }
            throw error
        }
        state.withLock {
            $0.stats.droppedEntries += dropped
            $0.stats.tableWriteOuts += writeOuts
            $0.stats.compactionThrottledMicros += limiter.sleptNanoseconds / 1000
        }
        return outputs
    }

    // MARK: Writes

    private enum Admission { case go, delay, wait }

    /// Write flow control: delays a write while level 0 is past its slowdown bound; waits while
    /// the memtables are full or level 0 is past its stop bound. Never fails a write for load.
    private func admit() async throws(StorageError) {
        var delayed = false
        while true {
            let seen = room.current
            switch try admission(delayed: delayed) {
            case .go: return
            case .delay:
                delayed = true
                // Suspends; never blocks the caller's (possibly cooperative-pool) thread.
                try? await environment.sleep(for: .milliseconds(1))
            case .wait:
                compactionSignal.notify()
                await room.wait(after: seen)
            }
        }
    }

    /// `admit`'s decision now (`delayed`: this write was delayed once already; `counting`: count
    /// a stall or delay in the statistics, as `admit` does once it acts on it).
    private func admission(delayed: Bool, counting: Bool = true) throws(StorageError) -> Admission {
        try state.withLock { s throws(StorageError) in
            if let f = s.writeFailure { throw Self.refusal(f) }
            if let e = s.backgroundError { throw .writesRefused("a background job failed (\(e))") }
            if s.closed { throw .writesRefused("the database is closed") }
            let l0 = s.version.tables[0]?.count ?? 0
            if l0 >= options.compaction.level0Stop || (s.immutable != nil && s.memtable.approximateBytes >= options.writeBufferBytes / 2) {
                if counting { s.stats.stalledWrites += 1 }
                return .wait
            }
            if l0 >= options.compaction.level0Slowdown && !delayed {
                if counting { s.stats.delayedWrites += 1 }
                return .delay
            }
            return .go
        }
    }

    /// Applies `batch` atomically. Under `always` (or `sync: .always` for this write) it returns only
    /// once the batch is durable. A batch holding a range deletion also records it in the manifest.
    public func write(_ batch: WriteBatch, sync: SyncMode? = nil) async throws {
        guard !batch.ops.isEmpty else { return }
        try await waitForRoom()
        let last = try apply(batch)
        try await waitDurable(upTo: last, sync: sync)
    }

    /// Flow control for writers: returns at once while there is room; delays while level 0 is past
    /// its slowdown bound; waits while the memtables are full or level 0 is past its stop bound.
    /// Throws only if the database is closed or failed.
    public func waitForRoom() async throws(StorageError) { try await admit() }

    /// The sequence number of the newest applied write (durable or not): `waitDurable(upTo:)`
    /// with it covers every write applied so far.
    public var lastSequence: UInt64 { state.withLock { $0.sequence } }

    /// Logs and applies `batch` without suspending (visible to readers on return; durable after
    /// `waitDurable`), bypassing flow control — for callers that must not suspend between a read
    /// and a write, which then call `waitForRoom` after. Returns the batch's last sequence number.
    public func apply(_ batch: WriteBatch) throws(StorageError) -> UInt64 {
        guard !batch.ops.isEmpty else { return state.withLock { $0.sequence } }
        return try logLock.withLock { _ throws(StorageError) -> UInt64 in try applyHoldingLogLock(batch) }
    }

    /// `apply` with `logLock` held: no other writer runs, so the sequence and the log writer read
    /// under the state lock stay current while the record is written outside it.
    private func applyHoldingLogLock(_ batch: WriteBatch) throws(StorageError) -> UInt64 {
        var obsolete: [UInt64] = []
        let (first, writer): (UInt64, WALWriter) = try state.withLock { s throws(StorageError) in
            if let f = s.writeFailure { throw Self.refusal(f) }
            if let e = s.backgroundError { throw .writesRefused("a background job failed (\(e))") }
            if s.closed { throw .writesRefused("the database is closed") }
            let first = s.sequence + 1
            guard first + UInt64(batch.ops.count) < Self.maxSequence else { throw .invalidArgument("sequence numbers exhausted") }
            return (first, s.writer)
        }
        do throws(StorageError) {
            // Encoded straight into the log's buffer: no record array per write.
            try writer.append(encoding: { batch.encode(firstSequence: first, into: &$0) }, estimatedBytes: batch.encodedBytesEstimate, sync: false)
        } catch {
            // The log may end in a fragment of this record now: no later record may follow it.
            switch error {
            case .invalidArgument, .writesRefused: break
            default: state.withLock { s in if s.writeFailure == nil { s.writeFailure = error } }
            }
            throw error
        }
        let (last, rotate): (UInt64, Bool) = try state.withLock { s throws(StorageError) in
            // The record is in the log: from here the batch is applied whole, even if recording a
            // range deletion in the manifest fails (then the tombstone is kept in memory, where
            // replaying the log would put it, and the error is thrown after).
            var manifestFailure: StorageError?
            for (i, op) in batch.ops.enumerated() {
                let seq = first + UInt64(i)
                switch op {
                case .put(let k, let v): s.memtable.add(key: k, sequence: seq, kind: .value, value: v)
                case .delete(let k): s.memtable.add(key: k, sequence: seq, kind: .deletion, value: [])
                case .deleteRange(let lower, let upper):
                    let t = RangeTombstone(lower: lower, upper: upper, sequence: seq)
                    if manifestFailure == nil {
                        do throws(StorageError) { obsolete += try recordRangeDeletion(&s, t) } catch { manifestFailure = error }
                    }
                    if manifestFailure != nil {
                        var e = VersionEdit()
                        e.addedTombstones = [t]
                        e.lastSequence = t.sequence
                        s.version.apply(e)
                    }
                }
            }
            s.sequence = first + UInt64(batch.ops.count) - 1
            s.committer.noteAppended(upTo: s.sequence)
            s.stats.writes += 1
            s.stats.writtenBytes += UInt64(batch.payloadBytes)
            if let manifestFailure {
                s.relink()
                throw manifestFailure
            }
            return (s.sequence, s.immutable == nil && s.memtable.approximateBytes >= options.writeBufferBytes / 2)
        }
        // Tables a range deletion dropped go first: a failed log switch must not leave them.
        for n in obsolete {
            cache.evict(file: n)
            try fs.remove(path(Self.tableName(n)))
        }
        if !obsolete.isEmpty { try fs.syncDirectory(directory) }
        if rotate, try switchLog() { flushSignal.notify() }
        return last
    }

    /// Returns once everything up to `sequence` is durable, if `sync` (default: the database's
    /// mode) is `always`; at once otherwise. Throws if a log sync failed.
    /// `waitDurable(upTo:)` then `waitForRoom()`, for callers that must not suspend: `done` gets
    /// nil once both hold, else the error, exactly once. It runs on the caller's thread when
    /// nothing needs waiting for, on the sync queue after a sync, or in a task when flow control
    /// holds the write back.
    public func whenDurable(upTo sequence: UInt64, _ done: @escaping @Sendable ((any Error)?) -> Void) {
        let admitted: @Sendable ((any Error)?) -> Void = { [self] error in
            if let error { return done(error) }
            do throws(StorageError) {
                if case .go = try admission(delayed: false, counting: false) { return done(nil) }
            } catch {
                return done(error)
            }
            _ = environment.spawn {
                do { try await self.admit() } catch { return done(error) }
                done(nil)
            }
        }
        guard options.syncMode == .always else { return admitted(nil) }
        state.withLock { $0.committer }.whenDurable(upTo: sequence, admitted)
    }

    public func waitDurable(upTo sequence: UInt64, sync: SyncMode? = nil) async throws {
        guard (sync ?? options.syncMode) == .always else {
            // Acknowledged without a sync: its record must at least leave the log's buffer.
            if options.logBufferLimit > 0 { try state.withLock { $0.writer }.writeOut() }
            return
        }
        // A log switch syncs the old log first; the current log's committer covers the rest.
        let committer = state.withLock { $0.committer }
        try await committer.waitDurable(upTo: sequence, onCallerThread: options.syncOnWriterThread)
    }

    /// Records a range tombstone in the manifest (with the sequence, so it is never reissued) and
    /// drops, in the same edit, every table entirely inside the range and older than it — the
    /// cheap part of dropping a partition. Returns the dropped tables' numbers. Caller holds the lock.
    private func recordRangeDeletion(_ s: inout State, _ t: RangeTombstone) throws(StorageError) -> [UInt64] {
        var edit = VersionEdit()
        edit.addedTombstones = [t]
        edit.lastSequence = t.sequence
        let inside = s.version.allTables.filter {
            $0.largestSequence < t.sequence && !s.compacting.contains($0.number)
                && !$0.smallest.isBefore(t.lower) && $0.largest.isBefore(t.upper)
        }
        edit.removed = inside.map { ($0.level, $0.number) }
        try record(edit, &s)
        s.version.apply(edit)
        for m in inside { s.readers[m.number] = nil }
        s.relink()
        compactionSignal.notify()
        return inside.map(\.number)
    }

    public func put(_ key: [UInt8], _ value: [UInt8], sync: SyncMode? = nil) async throws {
        var b = WriteBatch()
        b.put(key, value)
        try await write(b, sync: sync)
    }

    public func delete(_ key: [UInt8], sync: SyncMode? = nil) async throws {
        var b = WriteBatch()
        b.delete(key)
        try await write(b, sync: sync)
    }

    /// Deletes every key in `[lower, upper)`: O(1) to write whatever the range holds; tables wholly
    /// inside the range go at once, the rest is reclaimed by compaction.
    public func deleteRange(from lower: [UInt8], to upper: [UInt8], sync: SyncMode? = nil) async throws {
        guard lower.isBefore(upper) else { return }
        var b = WriteBatch()
        b.deleteRange(from: lower, to: upper)
        try await write(b, sync: sync)
    }

    // MARK: Reads

    /// The value of `key` (nil if absent or deleted) as of now.
    public func get(_ key: [UInt8]) throws(StorageError) -> [UInt8]? {
        try state.withLock { $0.view }.get(key)
    }

    /// The value of `key` (nil if absent or deleted) as of the newest sequence that is durable
    /// under the database's own sync mode. Under `always` that is
    /// `min(current sequence, the group committer's durable sequence)`: a write whose log record
    /// is not yet synced (applied, awaiting its group commit, or its sync failed) is not visible,
    /// though `get` sees it; a log switch syncs the old log, so everything before it counts as
    /// durable. Under `interval` and `none` the engine promises no durability point, and this is
    /// `get`. A caller may rely on: any value returned was written by a write whose record is on
    /// disk under `always` (a crash cannot take it back). Range deletions are the exception in the
    /// other direction: each is durable through the manifest before `apply` returns (and flushes
    /// and compactions drop what it hides at once), so range tombstones apply here at the current
    /// sequence, even while the deletion's log record is not yet synced. Thread-safe.
    public func getDurable(_ key: [UInt8]) throws(StorageError) -> [UInt8]? {
        try durableView().get(key)
    }

    /// `getDurable` answered without touching a file (memtables, Bloom filters, indexes and the
    /// block cache), or `.needsDisk`: then ask `getDurable` on a thread that may block. Never
    /// blocks on I/O, so an event loop may call it; errors (damage included) also answer
    /// `.needsDisk`, for `getDurable` to report. Thread-safe.
    public func getDurableInMemory(_ key: [UInt8]) -> InMemoryRead {
        durableView().getInMemory(key)
    }

    /// The view `getDurable` reads.
    private func durableView() -> ReadView {
        // The committer is replaced at a log switch; the view and the committer are taken together
        // (its durable sequence is then read outside the engine's lock: it only grows, and the
        // `min` keeps it within the view).
        let (view, committer) = state.withLock { s in (s.view, s.committer) }
        guard options.syncMode == .always else { return view }
        var durable = view
        durable.sequence = min(view.sequence, committer.durableSequence)
        durable.tombstoneSequence = view.sequence
        return durable
    }

    /// A consistent view as of now; see `Snapshot`.
    public func snapshot() -> Snapshot { Snapshot(view: state.withLock { $0.view }) }

    /// Live pairs with `lower ≤ key < upper` from a fresh snapshot, in key order.
    public func iterator(from lower: [UInt8] = [], to upper: [UInt8]? = nil) throws(StorageError) -> DatabaseIterator {
        try snapshot().iterator(from: lower, to: upper)
    }

    /// Live pairs whose key starts with `prefix` from a fresh snapshot, in key order.
    public func iterator(prefix: [UInt8]) throws(StorageError) -> DatabaseIterator {
        try snapshot().iterator(prefix: prefix)
    }

    // MARK: Maintenance

    /// Makes everything written so far part of a level-0 table; returns when that table is live.
    public func flush() throws(StorageError) {
        _ = try flushImmutable()
        let rotated = try logLock.withLock { _ throws(StorageError) -> Bool in
            guard state.withLock({ $0.immutable == nil && $0.memtable.count > 0 }) else { return false }
            return try switchLog()
        }
        if rotated { _ = try flushImmutable() }
    }

    /// Flushes, then compacts until no level needs it (tests, tools and the bench's settle step).
    public func compactUntilSettled() throws(StorageError) {
        try flush()
        while try compactOnce() {}
    }

    public var statistics: Statistics {
        var st = Statistics()
        var live: Set<UInt64> = []
        // Built in place: no second lock is taken inside this one.
        state.withLock { s in
            st = s.stats
            st.logSyncs += s.committer.syncCount
            st.logWrites += s.writer.fileWrites
            st.memtableBytes = s.memtable.approximateBytes
            st.immutableMemtableBytes = s.immutable?.table.approximateBytes ?? 0
            st.tablesPerLevel = (0..<CompactionPolicy.levels).map { s.version.tables[$0]?.count ?? 0 }
            st.bytesPerLevel = (0..<CompactionPolicy.levels).map { (s.version.tables[$0] ?? []).totalSize }
            st.rangeTombstones = s.version.tombstones.count
            st.quarantinedTables = s.version.quarantined.map(\.number).sorted()
            live = Set(s.version.allTables.map(\.number))
        }
        let log = corruption.counts
        st.corruptTables = log.tables.filter { live.contains($0) }.sorted()
        st.corruptionEvents = log.events
        st.lastCorruption = log.last
        st.blockCache = cache.counters
        return st
    }

    // MARK: Damage

    /// A live table known to be corrupt: its manifest entry, and whether it is set aside.
    public struct DamagedTable: Sendable, Hashable {
        public var meta: TableMeta
        public var quarantined: Bool
    }

    /// Live tables a read, a scan, a compaction, a verification or the open found corrupt, in
    /// file-number order.
    public var damagedTables: [DamagedTable] {
        let corrupt = corruption.counts.tables
        guard !corrupt.isEmpty else { return [] }
        return state.withLock { s in
            let quarantined = Set(s.version.quarantined.map(\.number))
            return s.version.allTables.filter { corrupt.contains($0.number) }.sorted { $0.number < $1.number }
                .map { DamagedTable(meta: $0, quarantined: quarantined.contains($0.number)) }
        }
    }

    /// Sets table `number` aside (`Version.quarantined`, one manifest edit) once it is known to
    /// be corrupt, without waiting for a compaction to meet the damage. Returns false when the
    /// table is not in a level (already set aside, or no longer live). Writes go on.
    @discardableResult
    public func quarantine(table number: UInt64) throws(StorageError) -> Bool {
        try compactionLock.withLock { _ throws(StorageError) -> Bool in
            guard let meta = state.withLock({ s in s.version.tables.values.joined().first { $0.number == number } }) else { return false }
            corruption.mark([number])
            try setAside(meta, because: nil)
            return true
        }
    }

    /// Live tables (levels and set-aside), in file-number order: what `verify(table:)` walks.
    public var liveTables: [TableMeta] {
        state.withLock { s in s.version.allTables.sorted { $0.number < $1.number } }
    }

    /// Reads every block of table `number` from its file (not through the cache) and checks it;
    /// a damaged one is recorded (`damagedTables`) and the walk goes on. Returns the bytes read
    /// and the damage found (empty: the table is sound or no longer live). `pace` is called
    /// with each block's size before it is read. A read that fails for another reason throws.
    public func verify(table number: UInt64, pace: (Int) -> Void = { _ in }) throws(StorageError) -> (bytes: Int, damage: [StorageError]) {
        guard let reader = state.withLock({ $0.readers[number] }) else { return (0, []) }
        if let damage = reader.damage {
            corruption.note(damage)
            return (0, [damage])
        }
        var bytes = 0
        var damage: [StorageError] = []
        for i in 0..<reader.blockCount {
            let h = reader.index[i].handle
            pace(Int(clamping: h.size))
            do {
                _ = try reader.verifyBlock(h)
            } catch {
                guard case .corruption = error else { throw error }
                corruption.note(error)
                damage.append(error)
            }
            bytes += Int(clamping: h.size)
        }
        return (bytes, damage)
    }

    /// Writes the memtable as a table (so the next open replays nothing: a fast restart with a
    /// small footprint), stops the background workers (a compaction in progress is abandoned; its
    /// partial output is removed), syncs the log and closes every file. The database is unusable
    /// afterwards.
    /// If the flush or a sync fails, the workers are still stopped and the files closed, and
    /// the first error is thrown (the database can then be reopened, which recovers from the log).
    public func close() async throws {
        var failure: (any Error)?
        if state.withLock({ !$0.closed && $0.backgroundError == nil }) {
            do { try flush() } catch { failure = error }
        }
        do { try await stop(syncing: true) } catch { failure = failure ?? error }
        if let failure { throw failure }
    }

    /// Stops the workers and releases the files without syncing anything: what a crashed process
    /// leaves (tests that then crash the fault-injecting disk).
    public func abandon() async {
        try? await stop(syncing: false)
    }

    private func stop(syncing: Bool) async throws {
        let already = state.withLock { s in
            defer { s.closed = true }
            return s.closed
        }
        timer.withLock { $0?.cancel() }
        flushSignal.notify()
        compactionSignal.notify()
        room.notifyAll()
        for t in workers.withLock({ $0 }) { await t.value }
        guard !already else { return }
        let failure: StorageError? = logLock.withLock { _ in state.withLock { s in
            var failure: StorageError?
            if syncing && s.backgroundError == nil {
                do throws(StorageError) { try s.writer.sync() } catch { failure = error }
            }
            do throws(StorageError) { try s.writer.close() } catch { failure = failure ?? error }
            do throws(StorageError) { try s.manifest.close() } catch { failure = failure ?? error }
            for r in s.readers.values { r.close() }
            return failure
        } }
        if let failure { throw failure }
    }
}


/// Runs one kind of background job (flushes, or compactions) on its own thread: waits for a
/// signal, then works until there is nothing left. A failure is retried with backoff (100 ms,
/// doubling to 5 s); past `backgroundRetryLimit` consecutive failures, or at once after a failed
/// sync, it escalates: the database refuses writes until reopened, and the worker stops.
actor BackgroundWorker {
    private let executor: any SerialExecutor
    private let environment: any StorageEnvironment
    nonisolated var unownedExecutor: UnownedSerialExecutor { executor.asUnownedSerialExecutor() }

    init(name: String, environment: any StorageEnvironment) {
        executor = environment.makeWorkerExecutor(label: name)
        self.environment = environment
    }

    func run(_ db: Database, signal: WakeSignal, job: @Sendable (Database) throws(StorageError) -> Bool) async {
        var failures = 0
        while true {
            await signal.wait()
            do {
                // No malloc_trim after a job: it holds each malloc arena's lock while it walks it,
                // the event loops' arenas included (a 60 ms stall of every request after each
                // flush), and the pages a flush frees are the next memtable's anyway: the peak
                // footprint is the same without it (Benchmarks/README.md, flush latency).
                while !db.isClosed, try job(db) { failures = 0 }
            } catch {
                failures += 1
                if db.backgroundFailed(error, failures: failures) { return }
                try? await environment.sleep(for: .milliseconds(min(100 << min(failures - 1, 6), 5000)))
                signal.notify()
            }
            if db.isClosed { return }
        }
    }
}
