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
        let memtable: Memtable
    }

    let fs: any FileSystem
    public let directory: String
    let options: DatabaseOptions
    private let state: Mutex<State>
    private let writer: WALWriter
    private let committer: GroupCommitter
    private let recovered: Statistics
    /// Dispatch sources are thread-safe; the box only lets the class stay `Sendable`.
    struct TimerBox: @unchecked Sendable { let source: any DispatchSourceTimer }
    private let timer: TimerBox?

    private init(fs: any FileSystem, directory: String, options: DatabaseOptions, sequence: UInt64, memtable: Memtable,
                 writer: WALWriter, recovered: Statistics) {
        self.fs = fs
        self.directory = directory
        self.options = options
        self.state = Mutex(State(sequence: sequence, memtable: memtable))
        self.writer = writer
        self.committer = GroupCommitter(durable: sequence) { () throws(StorageError) in try writer.sync() }
        self.recovered = recovered
        if case .interval(let ms) = options.syncMode {
            let t = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "cairn.storage.interval-sync"))
            t.schedule(deadline: .now() + .milliseconds(ms), repeating: .milliseconds(max(ms, 1)))
            t.setEventHandler { try? writer.sync() }
            t.resume()
            timer = TimerBox(source: t)
        } else {
            timer = nil
        }
    }

    static func logName(_ n: Int) -> String {
        let digits = String(n)
        return String(repeating: "0", count: max(0, 6 - digits.count)) + digits + ".log"
    }

    /// Opens (creating if needed) the database in `directory`: replays every log into a fresh
    /// memtable, truncating a torn tail, then starts a new log.
    public static func open(fs: any FileSystem, directory: String, options: DatabaseOptions = .init()) throws(StorageError) -> Database {
        try fs.createDirectory(directory)
        let logs = try fs.list(directory).filter { $0.hasSuffix(".log") }.compactMap { name -> (Int, String)? in
            guard let n = Int(name.dropLast(4)) else { return nil }
            return (n, name)
        }.sorted { $0.0 < $1.0 }
        let memtable = Memtable()
        var sequence: UInt64 = 0
        var stats = Statistics()
        for (_, name) in logs {
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
                sequence = max(sequence, first + UInt64(batch.ops.count) - (batch.ops.isEmpty ? 0 : 1))
                stats.recoveredRecords += 1
            }
            if r.tornTailBytes > 0 {
                try fs.truncate(path, to: r.validEnd)
                stats.tornTailBytes += r.tornTailBytes
            }
            stats.salvagedBytes += r.salvagedBytes
        }
        let next = (logs.last?.0 ?? 0) + 1
        let path = directory + "/" + logName(next)
        let file = try fs.openAppendable(path, create: true)
        try file.sync()
        try fs.syncDirectory(directory)
        return Database(fs: fs, directory: directory, options: options, sequence: sequence, memtable: memtable,
                        writer: WALWriter(file: file, path: path), recovered: stats)
    }

    /// Applies `batch` atomically. Under `always` (or `sync: .always` for this write) it returns only
    /// once the batch is durable.
    public func write(_ batch: WriteBatch, sync: SyncMode? = nil) async throws {
        guard !batch.ops.isEmpty else { return }
        let last: UInt64 = try state.withLock { s throws(StorageError) in
            let first = s.sequence + 1
            try writer.append([batch.encoded(firstSequence: first)], sync: false)
            for (i, op) in batch.ops.enumerated() {
                switch op {
                case .put(let k, let v): s.memtable.add(key: k, sequence: first + UInt64(i), kind: .value, value: v)
                case .delete(let k): s.memtable.add(key: k, sequence: first + UInt64(i), kind: .deletion, value: [])
                }
            }
            s.sequence = first + UInt64(batch.ops.count) - 1
            committer.noteAppended(upTo: s.sequence)
            return s.sequence
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

    /// The value of `key` (nil if absent or deleted).
    public func get(_ key: [UInt8]) -> [UInt8]? {
        guard let e = state.withLock({ $0.memtable }).get(key), e.kind == .value else { return nil }
        return e.value
    }

    public var statistics: Statistics {
        var s = recovered
        s.logSyncs = committer.syncCount
        return s
    }

    public func close() throws(StorageError) {
        timer?.source.cancel()
        try writer.close()
    }
}
