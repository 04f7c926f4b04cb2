import Dispatch
import Synchronization

/// Operations applied atomically: one log record, consecutive sequence numbers.
///
/// ```
/// batch = first-sequence:u64be count:u32be op*
/// op    = kind:u8 key:blob [value:blob]      ; kind 1 = put (value follows), 0 = delete
/// blob  = length:varint bytes
/// ```
public struct WriteBatch: Sendable, Hashable {
    public enum Op: Sendable, Hashable {
        case put([UInt8], [UInt8])
        case delete([UInt8])
    }

    public private(set) var ops: [Op] = []
    public init() {}
    public mutating func put(_ key: [UInt8], _ value: [UInt8]) { ops.append(.put(key, value)) }
    public mutating func delete(_ key: [UInt8]) { ops.append(.delete(key)) }

    func encoded(firstSequence: UInt64) -> [UInt8] {
        var out: [UInt8] = []
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
            }
        }
        return out
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
            default:
                return nil
            }
        }
        return p == b.count ? (seq, batch) : nil
    }
}

public struct DatabaseOptions: Sendable {
    public var syncMode: SyncMode = .always
    /// Skip corrupt log records (counted in `Statistics.salvagedBytes`) instead of refusing to open.
    public var salvage = false
    public init() {}
}

/// The engine's front door. This step: the write-ahead log, group commit and the memtable, with
/// recovery on open. (Flushing to tables, the manifest and compaction come next.)
///
/// Contract: a write acknowledged under `always` survives a crash (every test crash drops all
/// unsynced bytes); a batch is all or nothing; after a failed sync every write is refused until
/// the database is reopened. Thread-safe.
public final class Database: Sendable {
    public struct Statistics: Sendable {
        public var recoveredRecords = 0
        public var tornTailBytes: UInt64 = 0
        public var salvagedBytes: UInt64 = 0
        public var logSyncs = 0
    }

    struct State {
        var sequence: UInt64
        var memtable: Memtable
        /// The memtable being flushed: still read until its table is visible.
        var immutable: Memtable?
        /// Newest first: tables of level 0 (each a flushed memtable).
        var tables: [(meta: TableMeta, reader: TableReader)] = []
        var version: Version
        var manifest: WALWriter
        var writer: WALWriter
        var logNumber: UInt64
    }

    let fs: any FileSystem
    public let directory: String
    let options: DatabaseOptions
    private let state: Mutex<State>
    /// Serializes flushes (one at a time; writes continue into the fresh memtable meanwhile).
    private let flushLock = Mutex(())
    private let committer: Mutex<GroupCommitter>
    private let recovered: Statistics
    /// Dispatch sources are thread-safe; the box only lets the class stay `Sendable`.
    struct TimerBox: @unchecked Sendable { let source: any DispatchSourceTimer }
    private let timer = Mutex<TimerBox?>(nil)

    private init(fs: any FileSystem, directory: String, options: DatabaseOptions, state: State, recovered: Statistics) {
        self.fs = fs
        self.directory = directory
        self.options = options
        let writer = state.writer
        let sequence = state.sequence
        self.state = Mutex(state)
        self.committer = Mutex(GroupCommitter(durable: sequence) { () throws(StorageError) in try writer.sync() })
        self.recovered = recovered
        if case .interval(let ms) = options.syncMode {
            let t = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "cairn.storage.interval-sync"))
            t.schedule(deadline: .now() + .milliseconds(ms), repeating: .milliseconds(max(ms, 1)))
            t.setEventHandler { [weak self] in _ = try? self?.state.withLock({ $0.writer }).sync() }
            t.resume()
            timer.withLock { $0 = TimerBox(source: t) }
        }
    }

    /// Bounds that keep every counter far from overflow whatever a file says.
    static let maxSequence: UInt64 = 1 << 62
    static let maxFileNumber: UInt64 = 1 << 40

    static func logName(_ n: UInt64) -> String {
        let digits = String(n)
        return String(repeating: "0", count: max(0, 6 - digits.count)) + digits + ".log"
    }

    static func tableName(_ n: UInt64) -> String {
        let d = String(n)
        return String(repeating: "0", count: max(0, 6 - d.count)) + d + ".sst"
    }

    /// Opens (creating if needed) the database in `directory`: reads the manifest (the live
    /// tables), replays the logs it does not cover into a fresh memtable (truncating a torn tail),
    /// then starts a new log and a new manifest.
    public static func open(fs: any FileSystem, directory: String, options: DatabaseOptions = .init()) throws(StorageError) -> Database {
        try fs.createDirectory(directory)
        var version = try Manifest.recover(fs: fs, directory: directory)?.0 ?? Version()
        let logs = try fs.list(directory).filter { $0.hasSuffix(".log") }.compactMap { name -> (UInt64, String)? in
            guard let n = UInt64(name.dropLast(4)) else { return nil }
            return (n, name)
        }.sorted { $0.0 < $1.0 }
        let memtable = Memtable()
        var sequence = version.lastSequence
        var stats = Statistics()
        for (number, name) in logs where number >= version.logNumber {
            let path = directory + "/" + name
            let r = try WAL.recover(try fs.openReadable(path), path: path, salvage: options.salvage)
            for record in r.records {
                guard let (first, batch) = WriteBatch.decode(record) else {
                    throw .corruption(path: path, offset: 0, reason: "a log record with a valid checksum is not a write batch")
                }
                for (i, op) in batch.ops.enumerated() {
                    let seq = first + UInt64(i)
                    switch op {
                    case .put(let k, let v): memtable.add(key: k, sequence: seq, kind: .value, value: v)
                    case .delete(let k): memtable.add(key: k, sequence: seq, kind: .deletion, value: [])
                    }
                }
                let (end, overflow) = first.addingReportingOverflow(UInt64(batch.ops.count))
                guard !overflow, end < Self.maxSequence else {
                    throw .corruption(path: path, offset: 0, reason: "batch sequence \(first) out of range")
                }
                sequence = max(sequence, end - (batch.ops.isEmpty ? 0 : 1))
                stats.recoveredRecords += 1
            }
            if r.tornTailBytes > 0 {
                try fs.truncate(path, to: r.validEnd)
                stats.tornTailBytes += r.tornTailBytes
            }
            stats.salvagedBytes += r.salvagedBytes
        }
        var tables: [(meta: TableMeta, reader: TableReader)] = []
        for meta in (version.tables[0] ?? []).sorted(by: { $0.number > $1.number }) {
            tables.append((meta, try TableReader(fs: fs, path: directory + "/" + tableName(meta.number))))
        }
        let highestLog = logs.last?.0 ?? 0
        let logNumber = max(version.nextFile, highestLog + 1)
        guard logNumber < Self.maxFileNumber else {
            throw .corruption(path: directory + "/" + Manifest.currentName, offset: 0, reason: "file number \(logNumber) out of range")
        }
        let manifestNumber = logNumber + 1
        let path = directory + "/" + logName(logNumber)
        let file = try fs.openAppendable(path, create: true)
        try file.sync()
        try fs.syncDirectory(directory)
        // The replayed logs stay until a flush covers them: the new manifest keeps the old log number.
        version.nextFile = manifestNumber + 1
        version.lastSequence = sequence
        let manifest = try Manifest.create(fs: fs, directory: directory, number: manifestNumber, version: version)
        // Older manifests are obsolete once CURRENT names the new one.
        let current = Manifest.fileName(manifestNumber)
        for name in try fs.list(directory) where name.hasPrefix("MANIFEST-") && name != current {
            try fs.remove(directory + "/" + name)
        }
        try fs.syncDirectory(directory)
        let state = State(sequence: sequence, memtable: memtable, tables: tables, version: version, manifest: manifest,
                          writer: WALWriter(file: file, path: path), logNumber: logNumber)
        return Database(fs: fs, directory: directory, options: options, state: state, recovered: stats)
    }

    /// Writes the memtable as a level-0 table, records it in the manifest, and drops the logs it
    /// covered. Writes continue meanwhile into a fresh memtable and a new log.
    public func flush() throws(StorageError) {
        try flushLock.withLock { _ throws(StorageError) in
            // 1. Swap in a fresh memtable and log; everything before is in `frozen` and older logs.
            let (frozen, newLog, sequence, nextFile): (Memtable, UInt64, UInt64, UInt64) = try state.withLock { s throws(StorageError) in
                let number = s.version.nextFile
                let path = directory + "/" + Self.logName(number)
                let file = try fs.openAppendable(path, create: true)
                try file.sync()
                try fs.syncDirectory(directory)
                try s.writer.sync()
                let frozen = s.memtable
                s.immutable = frozen
                s.memtable = Memtable()
                s.writer = WALWriter(file: file, path: path)
                s.logNumber = number
                s.version.nextFile = number + 1
                let writer = s.writer
                committer.withLock { $0 = GroupCommitter(durable: s.sequence) { () throws(StorageError) in try writer.sync() } }
                return (frozen, number, s.sequence, number + 1)
            }
            let entries = frozen.scan()
            var edit = VersionEdit()
            edit.logNumber = newLog
            edit.lastSequence = sequence
            edit.nextFile = nextFile + 1
            var reader: TableReader?
            if let first = entries.first, let last = entries.last {
                // 2. The table: newest version per key, deletions kept (they shadow older tables).
                let tablePath = directory + "/" + Self.tableName(nextFile)
                let builder = try TableBuilder(fs: fs, path: tablePath)
                for e in entries { try builder.add(key: e.key, value: [e.kind.rawValue] + e.value) }
                let size = try builder.finish()
                try fs.syncDirectory(directory)
                edit.added = [TableMeta(number: nextFile, level: 0, size: size, smallest: first.key, largest: last.key)]
                reader = try TableReader(fs: fs, path: tablePath)
            }
            // 3. Durably record it, then make it visible, then drop the covered logs.
            try state.withLock { s throws(StorageError) in
                try Manifest.record(edit, to: s.manifest)
                s.version.apply(edit)
                if let reader, let meta = edit.added.first { s.tables.insert((meta, reader), at: 0) }
                s.immutable = nil   // its entries are in the table now
            }
            for name in try fs.list(directory) where name.hasSuffix(".log") {
                if let n = UInt64(name.dropLast(4)), n < newLog { try fs.remove(directory + "/" + name) }
            }
            try fs.syncDirectory(directory)
        }
    }

    /// Applies `batch` atomically. Under `always` (or `sync: .always` for this write) it returns only
    /// once the batch is durable.
    public func write(_ batch: WriteBatch, sync: SyncMode? = nil) async throws {
        guard !batch.ops.isEmpty else { return }
        let (last, committer): (UInt64, GroupCommitter) = try state.withLock { s throws(StorageError) in
            let first = s.sequence + 1
            try s.writer.append([batch.encoded(firstSequence: first)], sync: false)
            for (i, op) in batch.ops.enumerated() {
                switch op {
                case .put(let k, let v): s.memtable.add(key: k, sequence: first + UInt64(i), kind: .value, value: v)
                case .delete(let k): s.memtable.add(key: k, sequence: first + UInt64(i), kind: .deletion, value: [])
                }
            }
            s.sequence = first + UInt64(batch.ops.count) - 1
            let c = self.committer.withLock { $0 }
            c.noteAppended(upTo: s.sequence)
            return (s.sequence, c)
        }
        if (sync ?? options.syncMode) == .always {
            try await committer.waitDurable(upTo: last)
        }
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

    /// The value of `key` (nil if absent or deleted): the memtable, the memtable being flushed,
    /// then tables newest first.
    public func get(_ key: [UInt8]) throws(StorageError) -> [UInt8]? {
        let (memtable, immutable, tables) = state.withLock { ($0.memtable, $0.immutable, $0.tables.map(\.reader)) }
        if let e = memtable.get(key) { return e.kind == .value ? e.value : nil }
        if let e = immutable?.get(key) { return e.kind == .value ? e.value : nil }
        for t in tables {
            if let v = try t.get(key), let kind = v.first {
                return kind == EntryKind.value.rawValue ? Array(v.dropFirst()) : nil
            }
        }
        return nil
    }

    public var statistics: Statistics {
        var s = recovered
        s.logSyncs = committer.withLock { $0 }.syncCount
        return s
    }

    public func close() throws(StorageError) {
        timer.withLock { $0?.source.cancel() }
        try state.withLock { s throws(StorageError) in try s.writer.close() }
    }
}
