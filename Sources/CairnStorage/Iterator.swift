import Synchronization

/// How an entry is stored as a table value (Docs/storage-format.md, "Entries"):
///
/// ```
/// table-value = kind:u8 sequence:varint value     ; kind 1 = value, 0 = deletion (value empty)
/// ```
enum InternalValue {
    static func encode(_ e: Memtable.Entry) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(e.value.count + 10)
        out.append(e.kind.rawValue)
        Coding.putVarint(&out, e.sequence)
        out += e.value
        return out
    }

    static func decode(key: [UInt8], _ b: [UInt8], path: String, offset: UInt64) throws(StorageError) -> Memtable.Entry {
        try decode(key: key, b, from: 0, to: b.count, path: path, offset: offset)
    }

    /// Decodes the table value in `b[start..<end]`; `path` and `offset` (the block's) name it in errors.
    static func decode(key: [UInt8], _ b: [UInt8], from start: Int, to end: Int, path: String, offset: UInt64) throws(StorageError) -> Memtable.Entry {
        var p = start + 1
        guard start < end, end <= b.count, let kind = EntryKind(rawValue: b[start]), let seq = Coding.getVarint(b, &p, limit: end),
              kind == .value || p == end
        else { throw .corruption(path: path, offset: offset, reason: "malformed table entry at \(start) for a key of \(key.count) bytes") }
        return Memtable.Entry(key: key, sequence: seq, kind: kind, value: Array(b[p..<end]))
    }
}

/// A forward cursor over internal entries in key order, one entry per key.
protocol EntrySource: AnyObject {
    /// The entry under the cursor; nil when exhausted.
    var current: Memtable.Entry? { get }
    func advance() throws(StorageError)
}

/// The newest entry per key at or below a snapshot, from a memtable.
final class MemtableSource: EntrySource {
    private let cursor: Memtable.Cursor
    private(set) var current: Memtable.Entry?

    init(_ memtable: Memtable, from lower: [UInt8], snapshot: UInt64) {
        cursor = memtable.cursor(from: lower, snapshot: snapshot)
        current = cursor.next()
    }

    func advance() throws(StorageError) { current = cursor.next() }
}

/// Key ranges an iteration passed over because they could not be read: a damaged block (from
/// the block before it, exclusive, through its last key) or a damaged table (its stated range).
/// Shared by the sources of one iteration; single consumer.
final class DamageHoles {
    struct Hole {
        var low: [UInt8]
        var lowInclusive: Bool
        var high: [UInt8]

        func contains(_ key: [UInt8]) -> Bool {
            !high.isBefore(key) && (lowInclusive ? !key.isBefore(low) : low.isBefore(key))
        }
    }
    private(set) var holes: [Hole] = []
    let corruption: CorruptionLog?

    init(corruption: CorruptionLog?) { self.corruption = corruption }

    func add(_ hole: Hole, because error: StorageError) {
        holes.append(hole)
        corruption?.note(error)
    }

    func contains(_ key: [UInt8]) -> Bool { holes.contains { $0.contains(key) } }
}

/// The entries of a run of tables with disjoint, increasing key spans (one table, or one level ≥ 1).
/// Decodes one entry at a time straight from the cached block: a key buffer reused for prefix
/// decompression, and one allocation each for the key and the value it hands out.
///
/// A damaged table (no index) or block cannot be iterated: reaching it throws its error, unless
/// the iteration ends (`upper`) before the table's range begins, or `holes` is given: then the
/// damaged stretch is recorded there and passed over.
final class TableRunSource: EntrySource {
    private let tables: [TableReader]
    /// Each table's smallest key (from the manifest; bounds a hole in its first block).
    private let smallest: [[UInt8]]
    private let holes: DamageHoles?
    private var table: Int
    private var blockIndex = 0
    /// Over `Block.empty` when no block is loaded (so it is advanced in place, never copied).
    private var cursor = BlockCursor(Block.empty)
    private let fillCache: Bool
    private let upper: [UInt8]?
    private(set) var current: Memtable.Entry?

    init(_ tables: [TableReader], smallest: [[UInt8]] = [], from lower: [UInt8], upper: [UInt8]? = nil, fillCache: Bool = true,
         holes: DamageHoles? = nil) throws(StorageError) {
        self.tables = tables
        self.smallest = smallest
        self.holes = holes
        self.fillCache = fillCache
        self.upper = upper
        // The first table whose last key is ≥ lower.
        table = tables.firstIndex { t in t.largestKey.map { !$0.isBefore(lower) } ?? false } ?? tables.count
        if table < tables.count {
            blockIndex = tables[table].blockIndex(atOrAfter: lower)
            try load()
        }
        try advance()
        while let e = current, e.key.isBefore(lower) { try advance() }
    }

    /// Loads block `blockIndex` of table `table`, or the first readable one after it when
    /// passing over damage; on return the cursor is over it, or the run is exhausted.
    private func load() throws(StorageError) {
        while table < tables.count {
            let t = tables[table]
            if let damage = t.damage {
                // Tables of a run are in key order: if this one starts at or past `upper`, so do the rest.
                if let upper, let smallest = t.damagedSmallest, !smallest.isBefore(upper) { break }
                guard let holes else { throw damage }
                holes.add(.init(low: t.damagedSmallest ?? [], lowInclusive: true, high: t.largestKey ?? []), because: damage)
            } else if blockIndex < t.blockCount {
                do {
                    cursor = BlockCursor(try t.readBlock(t.index[blockIndex].handle, fillCache: fillCache))
                    return
                } catch {
                    try passOver(error)
                    blockIndex += 1
                    continue
                }
            }
            table += 1
            blockIndex = 0
        }
        table = tables.count
        cursor = BlockCursor(Block.empty)
    }

    /// Records block `blockIndex` of table `table` as a hole (rethrows unless passing over damage).
    private func passOver(_ error: StorageError) throws(StorageError) {
        guard let holes, case .corruption = error else { throw error }
        let t = tables[table]
        let first = blockIndex == 0
        let low = first ? (table < smallest.count ? smallest[table] : []) : t.index[blockIndex - 1].lastKey
        holes.add(.init(low: low, lowInclusive: first, high: t.index[blockIndex].lastKey), because: error)
    }

    func advance() throws(StorageError) {
        while table < tables.count {
            let t = tables[table]
            let blockOffset = blockIndex < t.blockCount ? t.index[blockIndex].handle.offset : 0
            do {
                if let value = try cursor.next(path: t.path, offset: blockOffset) {
                    current = try InternalValue.decode(key: cursor.key, cursor.block.data, from: value.lowerBound, to: value.upperBound,
                                                       path: t.path, offset: blockOffset)
                    return
                }
            } catch {
                // A malformed entry in a block that passed its checksum: the rest of it is a hole.
                try passOver(error)
            }
            blockIndex += 1
            if blockIndex >= t.blockCount {
                table += 1
                blockIndex = 0
            }
            try load()
        }
        current = nil
    }
}

/// Merges sources into one stream in key order; for a key found in several sources, the entry with
/// the highest sequence wins. Yields internal entries (deletions included).
struct MergingCursor {
    let sources: [any EntrySource]

    /// The next key's winning entry, advancing every source past that key.
    mutating func next() throws(StorageError) -> Memtable.Entry? {
        var best: Memtable.Entry?
        for s in sources {
            guard let e = s.current else { continue }
            if let b = best {
                if e.key.isBefore(b.key) || (e.key == b.key && e.sequence > b.sequence) { best = e }
            } else {
                best = e
            }
        }
        guard let best else { return nil }
        for s in sources {
            while let e = s.current, e.key == best.key { try s.advance() }
        }
        return best
    }
}

/// What an iteration does when it meets a damaged block or table.
public enum DamagePolicy: Sendable {
    /// Throw the damage's `.corruption` error (the iteration stops there).
    case fail
    /// Pass over the damaged stretch and leave out every key it may hide: each key in it is
    /// yielded only as a point read (`Snapshot.get`) answers it, so the iteration holds exactly
    /// the keys a reader can read, and never an older version the damage may hide. The damage is
    /// recorded (`Database.Statistics.corruptTables`).
    case passOver
}

/// An ordered iteration over `[lower, upper)` as of a snapshot: live values only (deletions and
/// range-deleted entries are skipped). Single consumer; not thread-safe. Holds the snapshot's
/// memtables and tables open while alive.
public final class DatabaseIterator: Sequence, IteratorProtocol {
    private var merged: MergingCursor
    private let upper: [UInt8]?
    private let view: ReadView
    /// Damage passed over so far (`DamagePolicy.passOver` only).
    private let holes: DamageHoles?
    /// The first error met (the iteration stops there).
    public private(set) var error: StorageError?

    init(view: ReadView, lower: [UInt8], upper: [UInt8]?, damage: DamagePolicy = .fail) throws(StorageError) {
        let holes = damage == .passOver ? DamageHoles(corruption: view.corruption) : nil
        do {
            var sources: [any EntrySource] = view.memtables.map { MemtableSource($0, from: lower, snapshot: view.sequence) }
            for (i, t) in view.level0.enumerated() {
                let smallest = i < view.level0Smallest.count ? [view.level0Smallest[i]] : []
                sources.append(try TableRunSource([t], smallest: smallest, from: lower, upper: upper, holes: holes))
            }
            for level in view.levels where !level.isEmpty {
                let from = level.firstIndex { !$0.meta.largest.isBefore(lower) } ?? level.count
                let run = level[from...].prefix { t in upper.map { t.meta.smallest.isBefore($0) } ?? true }
                sources.append(try TableRunSource(run.map(\.reader), smallest: run.map(\.meta.smallest), from: lower, upper: upper, holes: holes))
            }
            // Set-aside tables join the merge like any source: it keeps the highest sequence per key.
            for q in view.quarantined where q.meta.overlaps(lower, upper) {
                sources.append(try TableRunSource([q.reader], smallest: [q.meta.smallest], from: lower, upper: upper, holes: holes))
            }
            merged = MergingCursor(sources: sources)
        } catch {
            view.corruption?.note(error)
            throw error
        }
        self.upper = upper
        self.view = view
        self.holes = holes
    }

    /// The next live pair; nil at the end of the range. Throws on corruption (unless passing
    /// over damage).
    public func nextEntry() throws(StorageError) -> (key: [UInt8], value: [UInt8])? {
        try nextVersion().map { ($0.key, $0.value) }
    }

    /// `nextEntry`, with the sequence the pair was written at.
    public func nextVersion() throws(StorageError) -> (key: [UInt8], value: [UInt8], sequence: UInt64)? {
        do {
            while var e = try merged.next() {
                if let upper, !e.key.isBefore(upper) { return nil }
                // A hole is recorded before the merge reaches its keys (a source reads a block once
                // every key before it is consumed), so checking here catches every key in one.
                if let holes, !holes.holes.isEmpty, holes.contains(e.key) {
                    // Exactly what a point read answers: a damaged block it must consult hides the key.
                    guard let found = try? view.entry(e.key) else { continue }
                    e = found
                }
                if e.kind == .deletion || view.tombstones.contains(where: { $0.hides(e.key, e.sequence, snapshot: view.sequence) }) { continue }
                return (e.key, e.value, e.sequence)
            }
            return nil
        } catch {
            view.corruption?.note(error)
            throw error
        }
    }

    /// `Sequence` conformance: stops at the end or at the first error (then `error` is set).
    public func next() -> (key: [UInt8], value: [UInt8])? {
        guard error == nil else { return nil }
        do { return try nextEntry() } catch let e {
            error = e
            return nil
        }
    }

    /// The smallest key greater than every key starting with `prefix` (nil: no such key).
    public static func upperBound(ofPrefix prefix: [UInt8]) -> [UInt8]? {
        var p = prefix
        while let last = p.last {
            if last < 0xFF {
                p[p.count - 1] = last + 1
                return p
            }
            p.removeLast()
        }
        return nil
    }
}

/// A table the read path can use: its manifest entry and its open reader.
struct LiveTable: Sendable {
    let meta: TableMeta
    let reader: TableReader
}

/// Everything a reader needs at one instant: the memtables (newest first), level 0 (newest
/// first), the deeper levels (each sorted by key, disjoint), the set-aside (quarantined) tables,
/// live range tombstones, and the sequence number that bounds what is visible. Immutable;
/// capturing it costs reference counts. Corruption a read meets is noted in `corruption`.
struct ReadView: Sendable {
    var memtables: [Memtable]
    var level0: [TableReader]
    /// The smallest key of each level-0 table (as `level0`).
    var level0Smallest: [[UInt8]] = []
    var levels: [[LiveTable]]
    var quarantined: [LiveTable] = []
    var tombstones: [RangeTombstone]
    var sequence: UInt64
    /// The sequence at which range tombstones apply, when it differs from `sequence` (a durable
    /// read: tombstones are durable through the manifest as soon as they exist, and flushes and
    /// compactions have already dropped what they hide, so they must hide it here too).
    var tombstoneSequence: UInt64?
    var corruption: CorruptionLog?

    /// The newest entry for `key` at the view's sequence: memtables, then level 0 newest first,
    /// then one table per deeper level (a key's newer versions are always in shallower places);
    /// then every set-aside table whose range holds the key and which may hold something newer
    /// than what was found (they have no place in that order, so their entries are weighed by
    /// sequence). A damaged table or block in that path throws: never an older version or nil.
    func entry(_ key: [UInt8]) throws(StorageError) -> Memtable.Entry? {
        for m in memtables {
            if let e = m.get(key, snapshot: sequence) { return e }
        }
        var found: Memtable.Entry?
        if case .entry(let e) = try tableEntry(key, inMemoryOnly: false) { found = e }
        for q in quarantined where !key.isBefore(q.meta.smallest) && !q.meta.largest.isBefore(key) {
            if let f = found, q.meta.largestSequence <= f.sequence { continue }
            if let e = try q.reader.entry(key), found.map({ e.sequence > $0.sequence }) ?? true { found = e }
        }
        return found
    }

    /// The newest entry for `key` in the leveled tables; with `inMemoryOnly`, `.needsDisk` as
    /// soon as a table on the path would have to read a block the cache does not hold.
    private func tableEntry(_ key: [UInt8], inMemoryOnly: Bool) throws(StorageError) -> TableReader.Probe {
        for t in level0 {
            let p = try t.probe(key, inMemoryOnly: inMemoryOnly)
            if case .absent = p { continue }
            return p
        }
        for level in levels where !level.isEmpty {
            var lo = 0
            var hi = level.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if level[mid].meta.largest.isBefore(key) { lo = mid + 1 } else { hi = mid }
            }
            guard lo < level.count, !key.isBefore(level[lo].meta.smallest) else { continue }
            let p = try level[lo].reader.probe(key, inMemoryOnly: inMemoryOnly)
            if case .absent = p { continue }
            return p
        }
        return .absent
    }

    func get(_ key: [UInt8]) throws(StorageError) -> [UInt8]? {
        do {
            return visible(try entry(key), key)
        } catch {
            corruption?.note(error)
            throw error
        }
    }

    /// `get` without touching a file: memtables, filters, indexes and cached blocks. `.needsDisk`
    /// when the answer needs a block read, a set-aside table, or meets an error (a read that
    /// may block, or must report damage, belongs on a store thread).
    func getInMemory(_ key: [UInt8]) -> InMemoryRead {
        for m in memtables {
            if let e = m.get(key, snapshot: sequence) { return .answered(visible(e, key)) }
        }
        guard quarantined.isEmpty else { return .needsDisk }
        do {
            switch try tableEntry(key, inMemoryOnly: true) {
            case .entry(let e): return .answered(visible(e, key))
            case .absent: return .answered(nil)
            case .needsDisk: return .needsDisk
            }
        } catch {
            return .needsDisk
        }
    }

    /// The value `e` gives `key`: none for a deletion, or a value a range tombstone hides.
    private func visible(_ e: Memtable.Entry?, _ key: [UInt8]) -> [UInt8]? {
        guard let e, e.kind == .value else { return nil }
        let tombstonesAt = tombstoneSequence ?? sequence
        if !tombstones.isEmpty, tombstones.contains(where: { $0.hides(key, e.sequence, snapshot: tombstonesAt) }) { return nil }
        return e.value
    }
}

/// A point read answered from memory, or the word that it needs the disk (`Database.getDurableInMemory`).
public enum InMemoryRead: Sendable, Equatable {
    /// The value, or nil: absent or deleted.
    case answered([UInt8]?)
    case needsDisk
}

/// A consistent, read-only view of the database at one sequence number: later writes, flushes and
/// compactions do not change what it returns. Keeps the memtables and table files it references
/// alive (open) until released. Thread-safe.
public final class Snapshot: Sendable {
    let view: ReadView
    public var sequence: UInt64 { view.sequence }

    init(view: ReadView) { self.view = view }

    public func get(_ key: [UInt8]) throws(StorageError) -> [UInt8]? { try view.get(key) }

    /// Live pairs with `lower ≤ key < upper` (nil upper: to the end), in key order; `damage`
    /// says what meeting a damaged block does.
    public func iterator(from lower: [UInt8] = [], to upper: [UInt8]? = nil, damage: DamagePolicy = .fail) throws(StorageError) -> DatabaseIterator {
        try DatabaseIterator(view: view, lower: lower, upper: upper, damage: damage)
    }

    /// Live pairs whose key starts with `prefix`, in key order.
    public func iterator(prefix: [UInt8]) throws(StorageError) -> DatabaseIterator {
        try DatabaseIterator(view: view, lower: prefix, upper: DatabaseIterator.upperBound(ofPrefix: prefix))
    }
}

/// The corruption a database has met since it opened: the tables found corrupt (by reads,
/// compactions or at open), how many corruption errors were met, and the last one. Its own lock,
/// so a reader that meets corruption never takes the engine's. Thread-safe.
final class CorruptionLog: Sendable {
    struct Counts: Sendable {
        var tables: Set<UInt64> = []
        var events = 0
        var last: String?
    }
    private let state = Mutex(Counts())

    init() {}

    /// Notes `error` if it is corruption; a table is named by its file (`NNNNNN.sst`).
    func note(_ error: StorageError) {
        guard case .corruption(let path, _, _) = error else { return }
        let name = path.split(separator: "/").last ?? ""
        let table = name.hasSuffix(".sst") ? UInt64(name.dropLast(4)) : nil
        state.withLock { s in
            s.events += 1
            s.last = error.description
            if let table { s.tables.insert(table) }
        }
    }

    /// Marks tables known to be corrupt without counting an event (set aside in an earlier run).
    func mark(_ tables: [UInt64]) { state.withLock { $0.tables.formUnion(tables) } }

    var counts: Counts { state.withLock { s in Counts(tables: s.tables, events: s.events, last: s.last) } }

}
