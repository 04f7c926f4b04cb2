import Synchronization

/// What one entry of the memtable (and later of a table) says about its key.
public enum EntryKind: UInt8, Sendable, Hashable {
    case deletion = 0
    case value = 1
}

/// The in-memory table: every write since the last flush. Read by key (the newest entry at or
/// below a snapshot), and in table order: key ascending, sequence descending, so the first entry
/// of a key at or below a snapshot's sequence is what a reader at that snapshot sees.
///
/// A hash index from each key to its record, and each record's versions chained newest first:
/// an add is one index probe and a link at the head of the chain, whatever the table's size; a
/// point read is one probe. Order is made when asked for, not on every add: a walk (a flush,
/// a scan, a cursor) sorts the keys that arrived since the last walk, by their 16-byte prefixes
/// held beside each pointer, and merges them into the sorted view it keeps (`SortedView`: a large
/// sorted run and a small one of recent keys, so a walk after a few adds costs the small run, not
/// the table). A
/// sorted structure kept on every add (the skip list this replaced) paid a dozen cache misses per
/// new key on the writer's path, under the engine's lock; a flush sorts its table once, on the
/// flush thread (about a tenth of a microsecond per key in `cairn-db-bench --benchmarks=fillrandom`).
///
/// Memory: records, versions, keys and values are copied into an arena of large blocks (`Arena`);
/// the index is one flat array and the arrival list another, so a table of a hundred thousand
/// entries is about a hundred allocations rather than three per entry. Dropping the table frees
/// its blocks: freeing one object per entry, from the flush thread, into the allocator arenas of
/// the threads that made them, held those threads' every `malloc` for tens of milliseconds
/// after each flush.
///
/// Isolation: thread-safe; writers and readers take a short lock (the engine has one writer, the
/// commit path). A walk sorts outside the lock. Once frozen (`freeze`) the table takes no adds,
/// and a flush walks it without the lock (`frozenEntries`). Bound: `approximateBytes` (the arena's
/// bytes in use, the index's slots in use at their average load, the arrival list and the sorted
/// view a walk of every key makes, counted from the first add) grows with every insert; the
/// engine swaps in a fresh memtable when it passes `write_buffer_bytes`. Records and versions, and the bytes they point at, live until the table is
/// freed: cursors and walks keep the table alive.
public final class Memtable: Sendable {
    public struct Entry: Sendable, Hashable {
        public let key: [UInt8]
        public let sequence: UInt64
        public let kind: EntryKind
        public let value: [UInt8]
    }

    /// One key, in the arena, with its newest version inline (a point read, and a flush, touch
    /// the record alone). The key and its prefixes are fixed when the record is made, and may be
    /// read without the lock by whoever was handed the pointer under it; `newest` (and the
    /// versions' `older` links) change only under the lock, and never once the table is frozen.
    struct Record {
        var key: UnsafePointer<UInt8>
        var keyCount: Int
        /// The key's first 8 bytes and its next 8, big-endian, zero-padded: most comparisons end
        /// here without touching the key's bytes. Two words, because stored keys begin with a
        /// partition prefix of 5 bytes: the first word alone leaves 3 bytes of the user's key.
        var prefix: UInt64
        var prefix2: UInt64
        var newest: Version
    }
    typealias RecordPointer = UnsafeMutablePointer<Record>

    /// One entry of a key. A key's versions are chained by sequence, descending: the newest inline
    /// in its record, the older ones in the arena (an update moves the record's version there).
    struct Version {
        var value: UnsafePointer<UInt8>
        var valueCount: Int
        var sequence: UInt64
        var older: VersionPointer?
        var kind: EntryKind

        /// The entry of this version, whose key is `key`.
        @inline(__always) func entry(key: [UInt8]) -> Entry {
            Entry(key: key, sequence: sequence, kind: kind, value: Array(UnsafeBufferPointer(start: value, count: valueCount)))
        }
    }
    typealias VersionPointer = UnsafeMutablePointer<Version>

    /// Reached only under `state`'s lock (and, once frozen, read by walks without it).
    struct State: ~Copyable, @unchecked Sendable {
        var arena = Arena()
        var index: MemtableIndex
        /// Every record, in order of arrival: what a walk sorts the new part of.
        var records: [RecordPointer] = []
        var count = 0
        /// Set by `freeze`: no add follows, so chains are read without the lock.
        var frozen = false
        var smallestSequence: UInt64 = .max
        var largestSequence: UInt64 = 0
        /// The latest sorted view a walk made (covers `records[..<sorted.count]`).
        var sorted: SortedView?

        init(expectedKeys: Int) {
            index = MemtableIndex(expectedKeys: expectedKeys)
            records.reserveCapacity(expectedKeys)
        }

        /// The arena's bytes in use, the index's slots at their average load (two thirds), the
        /// arrival list and a sorted view of every key (counted whether or not a walk made it yet,
        /// so the count does not jump at the first walk): an empty table counts 0, however much
        /// room it reserved.
        var bytes: Int {
            arena.used + index.count * MemoryLayout<MemtableIndex.Slot>.stride * 3 / 2
                + records.count * (MemoryLayout<RecordPointer>.stride + MemoryLayout<SortKey>.stride)
        }
    }

    fileprivate let state: Mutex<State>

    /// A walk folds the sorted view's recent run into its large one once the recent run holds more
    /// than this many keys and more than a sixteenth of the large one.
    let recentKeysMinimum: Int

    /// `expectedKeys`: distinct keys the table will likely hold (the engine passes its previous
    /// memtable's), reserved in the index up front so filling it never rehashes the index.
    public convenience init(expectedKeys: Int = 0) {
        self.init(expectedKeys: expectedKeys, recentKeysMinimum: 4096)
    }

    init(expectedKeys: Int, recentKeysMinimum: Int) {
        state = Mutex(State(expectedKeys: min(max(expectedKeys, 0), 1 << 32)))
        self.recentKeysMinimum = recentKeysMinimum
    }

    static func prefix(of key: UnsafeBufferPointer<UInt8>, from start: Int) -> UInt64 {
        var p: UInt64 = 0
        for i in start..<(start + 8) { p = p << 8 | UInt64(i < key.count ? key[i] : 0) }
        return p
    }
}

/// A record pointer with its key's prefixes beside it, so a sort compares most pairs without
/// touching the records.
struct SortKey {
    var prefix: UInt64
    var prefix2: UInt64
    var record: Memtable.RecordPointer

    init(_ record: Memtable.RecordPointer) {
        prefix = record.pointee.prefix
        prefix2 = record.pointee.prefix2
        self.record = record
    }

    /// Key order. Zero padding never inverts it where the words differ: a padded byte stands for
    /// "shorter", which sorts first. Two records of one table never share a key.
    @inline(__always)
    static func precedes(_ a: SortKey, _ b: SortKey) -> Bool {
        if a.prefix != b.prefix { return a.prefix < b.prefix }
        if a.prefix2 != b.prefix2 { return a.prefix2 < b.prefix2 }
        return Coding.compare(a.record.keyBytes, b.record.keyBytes) < 0
    }
}

/// The first `count` records of a memtable's arrival list, in key order, as two sorted runs of
/// disjoint keys: `base` and `recent` (the keys sorted since `base` was last folded). Immutable
/// once made; shared by the walks that use it and kept by the table for the next walk, which
/// sorts only the records added since and merges them into `recent`, folding `recent` into
/// `base` when it grows past its bound (`merging`): a walk after a few adds costs about the
/// recent run (at most a sixteenth of the table past its first 4,096 keys), and since `base`
/// grows by at least a sixteenth at each fold, the folds of a table copy about 17 keys per key
/// in all.
final class SortedView: @unchecked Sendable {   // immutable; its pointers live as long as the memtable its holder keeps
    let base: [SortKey]
    let recent: [SortKey]
    var count: Int { base.count + recent.count }

    init(base: [SortKey], recent: [SortKey]) {
        self.base = base
        self.recent = recent
    }

    /// The walk from the first key ≥ `lower`.
    func walk(from lower: UnsafeBufferPointer<UInt8>) -> Walk {
        Walk(base: Self.firstIndex(in: base, atOrAfter: lower), recent: Self.firstIndex(in: recent, atOrAfter: lower))
    }

    private static func firstIndex(in keys: [SortKey], atOrAfter lower: UnsafeBufferPointer<UInt8>) -> Int {
        let probe = (Memtable.prefix(of: lower, from: 0), Memtable.prefix(of: lower, from: 8))
        var low = 0, high = keys.count
        while low < high {
            let mid = low + (high - low) / 2
            let k = keys[mid]
            let before = k.prefix != probe.0 ? k.prefix < probe.0
                : k.prefix2 != probe.1 ? k.prefix2 < probe.1 : Coding.compare(k.record.keyBytes, lower) < 0
            if before { low = mid + 1 } else { high = mid }
        }
        return low
    }

    /// Positions in both runs; `next` yields the smaller key of the two.
    struct Walk {
        var base: Int
        var recent: Int

        mutating func next(in view: SortedView) -> Memtable.RecordPointer? {
            if recent < view.recent.count, base >= view.base.count || SortKey.precedes(view.recent[recent], view.base[base]) {
                recent += 1
                return view.recent[recent - 1].record
            }
            guard base < view.base.count else { return nil }
            base += 1
            return view.base[base - 1].record
        }
    }

    /// This view with `fresh` (records of the same table, none of them in it) sorted and merged
    /// into the recent run; the recent run folded into the base when it holds more than
    /// `recentMinimum` keys and more than a sixteenth of the base.
    func merging(_ fresh: [Memtable.RecordPointer], recentMinimum: Int) -> SortedView {
        var added = fresh.map(SortKey.init)
        added.sort(by: SortKey.precedes)
        let recent = Self.merge(self.recent, added)
        if recent.count > max(recentMinimum, base.count / 16) { return SortedView(base: Self.merge(base, recent), recent: []) }
        return SortedView(base: base, recent: recent)
    }

    /// Two sorted runs of disjoint keys as one.
    private static func merge(_ a: [SortKey], _ b: [SortKey]) -> [SortKey] {
        if a.isEmpty { return b }
        if b.isEmpty { return a }
        var merged: [SortKey] = []
        merged.reserveCapacity(a.count + b.count)
        var i = 0, j = 0
        while i < a.count && j < b.count {
            if SortKey.precedes(b[j], a[i]) {
                merged.append(b[j])
                j += 1
            } else {
                merged.append(a[i])
                i += 1
            }
        }
        merged.append(contentsOf: a[i...])
        merged.append(contentsOf: b[j...])
        return merged
    }
}

extension UnsafeMutablePointer where Pointee == Memtable.Record {
    @inline(__always) var keyBytes: UnsafeBufferPointer<UInt8> { UnsafeBufferPointer(start: pointee.key, count: pointee.keyCount) }
    @inline(__always) func hasKey(_ key: UnsafeBufferPointer<UInt8>) -> Bool {
        pointee.keyCount == key.count && Coding.compare(keyBytes, key) == 0
    }
    /// The key's newest version at or below `snapshot`. Under the lock, or on a frozen table.
    @inline(__always) func version(atOrBelow snapshot: UInt64) -> Memtable.Version? {
        if pointee.newest.sequence <= snapshot { return pointee.newest }
        var v = pointee.newest.older
        while let x = v, x.pointee.sequence > snapshot { v = x.pointee.older }
        return v?.pointee
    }
}

/// Bump allocation from blocks of `blockBytes`, all freed together (`release`). A request larger
/// than a quarter block gets a block of its own. Not thread-safe: the memtable's lock guards it.
/// Not copyable: it owns its blocks, and frees them when it goes.
struct Arena: ~Copyable {
    static let blockBytes = 256 << 10
    private(set) var blocks: [UnsafeMutableRawPointer] = []
    private var cursor: UnsafeMutableRawPointer?
    private var remaining = 0
    /// Bytes handed out (alignment padding included) and block tails left unused: what the
    /// table's size is counted in.
    private(set) var used = 0

    /// `count` bytes at an 8-byte boundary, uninitialized.
    mutating func allocate(_ count: Int) -> UnsafeMutableRawPointer {
        let size = (count + 7) & ~7
        used += size
        if size > Self.blockBytes / 4 {
            let block = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
            blocks.append(block)
            return block
        }
        if size <= remaining, let at = cursor {
            cursor = at + size
            remaining -= size
            return at
        }
        used += remaining   // the old block's tail, left unused (0 before the first block)
        let block = UnsafeMutableRawPointer.allocate(byteCount: Self.blockBytes, alignment: 16)
        blocks.append(block)
        cursor = block + size
        remaining = Self.blockBytes - size
        return block
    }

    /// Copies `bytes` into the arena.
    mutating func copy(_ bytes: UnsafeBufferPointer<UInt8>) -> UnsafePointer<UInt8> {
        let at = allocate(bytes.count).bindMemory(to: UInt8.self, capacity: bytes.count)
        if let base = bytes.baseAddress { at.initialize(from: base, count: bytes.count) }
        return UnsafePointer(at)
    }

    deinit {
        for block in blocks { block.deallocate() }
    }
}

/// The memtable's point index: each key's record, by open addressing with linear probing
/// over one flat array of (hash, record) slots, at most three quarters full. Not thread-safe: the
/// memtable's lock guards it. Record pointers stay valid for the memtable's life. Not copyable: it
/// owns its slots.
struct MemtableIndex: ~Copyable {
    struct Slot {
        var hash: Int
        var node: Memtable.RecordPointer?
    }
    private(set) var slots: UnsafeMutableBufferPointer<Slot>
    private(set) var count = 0

    init(expectedKeys: Int) {
        let wanted = min(max(expectedKeys, 0), 1 << 40)   // far past any memtable; keeps the arithmetic in range
        var capacity = 16
        while capacity * 3 < wanted * 4 { capacity <<= 1 }
        slots = .allocate(capacity: capacity)
        slots.initialize(repeating: Slot(hash: 0, node: nil))
    }

    static func hash(_ key: UnsafeBufferPointer<UInt8>) -> Int {
        var h = Hasher()
        h.combine(bytes: UnsafeRawBufferPointer(key))
        return h.finalize()
    }

    /// The slot holding `key`, or the empty slot where it would go.
    @inline(__always)
    private func position(_ key: UnsafeBufferPointer<UInt8>, _ hash: Int) -> Int {
        let mask = slots.count - 1
        var i = hash & mask
        while let n = slots[i].node {
            if slots[i].hash == hash && n.hasKey(key) { return i }
            i = (i + 1) & mask
        }
        return i
    }

    func find(_ key: UnsafeBufferPointer<UInt8>, hash: Int) -> Memtable.RecordPointer? { slots[position(key, hash)].node }

    /// Makes `node` the record for `key` (inserting the key when new).
    mutating func set(_ key: UnsafeBufferPointer<UInt8>, hash: Int, _ node: Memtable.RecordPointer) {
        var i = position(key, hash)
        if slots[i].node == nil {
            if (count + 1) * 4 > slots.count * 3 {
                grow()
                i = position(key, hash)
            }
            count += 1
        }
        slots[i] = Slot(hash: hash, node: node)
    }

    private mutating func grow() {
        let old = slots
        slots = .allocate(capacity: old.count * 2)
        slots.initialize(repeating: Slot(hash: 0, node: nil))
        let mask = slots.count - 1
        for slot in old where slot.node != nil {
            var i = slot.hash & mask
            while slots[i].node != nil { i = (i + 1) & mask }
            slots[i] = slot
        }
        old.deallocate()
    }

    deinit { slots.deallocate() }
}

extension Memtable {
    /// Distinct keys in the table.
    public var keyCount: Int { state.withLock { $0.index.count } }

    public var count: Int { state.withLock { $0.count } }
    /// The arena's bytes in use (records, versions, keys, values), the index's slots, the arrival
    /// list and the sorted view: close to the memory the table holds (0 when empty).
    public var approximateBytes: Int { state.withLock { $0.bytes } }

    /// Adds an entry. (key, sequence) pairs are unique: the engine issues each sequence once, in
    /// order, so a new version normally heads its key's chain; one that arrives out of order is
    /// linked where its sequence belongs. The key's bytes are copied once per table.
    public func add(key: [UInt8], sequence: UInt64, kind: EntryKind, value: [UInt8]) {
        key.withUnsafeBufferPointer { key in
            value.withUnsafeBufferPointer { value in
                state.withLock { s in Self.add(&s, key: key, sequence: sequence, kind: kind, value: value) }
            }
        }
    }

    private static func add(_ s: inout State, key: UnsafeBufferPointer<UInt8>, sequence: UInt64, kind: EntryKind,
                            value: UnsafeBufferPointer<UInt8>) {
        precondition(!s.frozen, "an add to a frozen memtable")
        let hash = MemtableIndex.hash(key)
        let version = Version(value: s.arena.copy(value), valueCount: value.count, sequence: sequence, older: nil, kind: kind)
        s.smallestSequence = min(s.smallestSequence, sequence)
        s.largestSequence = max(s.largestSequence, sequence)
        s.count += 1
        guard let record = s.index.find(key, hash: hash) else {
            let record = s.arena.allocate(MemoryLayout<Record>.stride).bindMemory(to: Record.self, capacity: 1)
            record.initialize(to: Record(key: s.arena.copy(key), keyCount: key.count, prefix: prefix(of: key, from: 0),
                                         prefix2: prefix(of: key, from: 8), newest: version))
            s.index.set(key, hash: hash, record)
            s.records.append(record)
            return
        }
        if record.pointee.newest.sequence < sequence {
            record.pointee.newest = Version(value: version.value, valueCount: version.valueCount, sequence: sequence,
                                            older: makeVersion(&s.arena, record.pointee.newest), kind: kind)
            return
        }
        // Older than the key's newest (not how the engine adds): linked where its sequence belongs.
        let node = makeVersion(&s.arena, version)
        guard var after = record.pointee.newest.older, after.pointee.sequence > sequence else {
            node.pointee.older = record.pointee.newest.older
            record.pointee.newest.older = node
            return
        }
        while let o = after.pointee.older, o.pointee.sequence > sequence { after = o }
        node.pointee.older = after.pointee.older
        after.pointee.older = node
    }

    /// A copy of `version` in the arena.
    private static func makeVersion(_ arena: inout Arena, _ version: Version) -> VersionPointer {
        let node = arena.allocate(MemoryLayout<Version>.stride).bindMemory(to: Version.self, capacity: 1)
        node.initialize(to: version)
        return node
    }

    /// The newest entry for `key` with sequence ≤ `snapshot`: a value, a deletion, or nil when
    /// the memtable says nothing about the key at that snapshot.
    public func get(_ key: [UInt8], snapshot: UInt64 = .max) -> Entry? {
        key.withUnsafeBufferPointer { bytes in
            state.withLock { s -> Entry? in
                // The caller's key is the entry's: only the value is copied out.
                s.index.find(bytes, hash: MemtableIndex.hash(bytes))?.version(atOrBelow: snapshot)?.entry(key: key)
            }
        }
    }

    /// Every record so far, in key order: the kept view, with the records added since it was made
    /// sorted and merged in outside the lock. The newest view made is kept for the next walk.
    func sortedView() -> SortedView { viewForWalk().view }

    /// `sortedView`, and the largest sequence in the table when the records it covers were taken:
    /// a walk reads no version above it, so it sees the table as it was at one moment.
    private func viewForWalk() -> (view: SortedView, largest: UInt64) {
        let (kept, fresh, largest) = state.withLock { s -> (SortedView?, RecordList, UInt64) in
            let have = s.sorted?.count ?? 0
            return (s.sorted, RecordList(records: have == s.records.count ? [] : Array(s.records[have...])), s.largestSequence)
        }
        if let kept, fresh.records.isEmpty { return (kept, largest) }
        let view = (kept ?? SortedView(base: [], recent: [])).merging(fresh.records, recentMinimum: recentKeysMinimum)
        state.withLock { s in if (s.sorted?.count ?? 0) < view.count { s.sorted = view } }
        return (view, largest)
    }

    /// Record pointers carried out of the lock (the memtable they point into is kept alive by
    /// the caller).
    struct RecordList: @unchecked Sendable {
        let records: [RecordPointer]
    }

    /// Entries with `lower ≤ key < upper` (nil: unbounded) as of `snapshot`: for each key only the
    /// newest entry at or below the snapshot, deletions included, in key order.
    public func scan(from lower: [UInt8] = [], to upper: [UInt8]? = nil, snapshot: UInt64 = .max) -> [Entry] {
        let cursor = cursor(from: lower, snapshot: snapshot)
        var out: [Entry] = []
        while let e = cursor.next() {
            if let upper, !e.key.isBefore(upper) { break }
            out.append(e)
        }
        return out
    }

    /// A forward cursor over the newest entry per key at or below `snapshot`, from the first key ≥
    /// `lower`, over the table as it is when the cursor is made: neither keys nor versions added
    /// after are seen, whatever `snapshot` (the snapshot is clamped to the table's largest
    /// sequence then).
    public func cursor(from lower: [UInt8], snapshot: UInt64) -> Cursor {
        let (view, largest) = viewForWalk()
        return Cursor(memtable: self, view: view, walk: lower.withUnsafeBufferPointer { view.walk(from: $0) },
                      snapshot: min(snapshot, largest))
    }

    /// Not thread-safe (one consumer); the memtable's lock guards each step's read of a key's
    /// versions. Keeps the memtable (and so its records) alive.
    public final class Cursor {
        let memtable: Memtable
        let view: SortedView
        var walk: SortedView.Walk
        let snapshot: UInt64

        init(memtable: Memtable, view: SortedView, walk: SortedView.Walk, snapshot: UInt64) {
            self.memtable = memtable
            self.view = view
            self.walk = walk
            self.snapshot = snapshot
        }

        public func next() -> Entry? {
            while let record = walk.next(in: view) {
                let version = memtable.state.withLock { _ in VersionRef(version: record.version(atOrBelow: snapshot)) }.version
                // The bytes a version points at never change: copied out without the lock.
                if let version { return version.entry(key: Array(record.keyBytes)) }
            }
            return nil
        }
    }

    /// A version carried out of the lock (the memtable it points into is kept alive by its holder).
    struct VersionRef: @unchecked Sendable {
        let version: Version?
    }

    /// Ends the table's adds (the engine freezes a memtable when it swaps in a new one, under the
    /// lock that orders its adds): its chains never change again, so `frozenEntries` may read
    /// them without the lock. An add after this is an engine bug and traps (writes only ever
    /// reach the active memtable, which is never frozen).
    public func freeze() { state.withLock { $0.frozen = true } }

    /// The newest entry of each key in key order, deletions included. Freezes the table first
    /// (a no-op for one the engine froze already), sorts what no walk has sorted yet (on the
    /// caller's thread, outside the lock), then reads the records without the lock, so a flush
    /// writing the table out never holds up a reader of it.
    public func frozenEntries() -> FrozenEntries {
        state.withLock { $0.frozen = true }
        return FrozenEntries(memtable: self, view: sortedView())
    }

    /// See `frozenEntries`. Keeps the memtable (and so its records) alive while it walks.
    public struct FrozenEntries: IteratorProtocol {
        let memtable: Memtable
        let view: SortedView
        var walk = SortedView.Walk(base: 0, recent: 0)

        init(memtable: Memtable, view: SortedView) {
            self.memtable = memtable
            self.view = view
        }

        public mutating func next() -> Entry? {
            guard let record = walk.next(in: view) else { return nil }
            return record.pointee.newest.entry(key: Array(record.keyBytes))
        }
    }

    /// The arena's blocks (tests: a table is a few large allocations, not one per entry).
    var arenaBlocks: Int { state.withLock { $0.arena.blocks.count } }

    /// The smallest sequence number in the table (nil when empty).
    public var smallestSequence: UInt64? { state.withLock { $0.count == 0 ? nil : $0.smallestSequence } }

    /// Every entry in table order, all versions (tests and diagnostics; a flush writes only the
    /// newest entry of each key, `frozenEntries`).
    public func allEntries() -> [Entry] {
        let view = sortedView()
        return state.withLock { _ in
            var out: [Entry] = []
            var walk = SortedView.Walk(base: 0, recent: 0)
            while let record = walk.next(in: view) {
                let key = Array(record.keyBytes)
                out.append(record.pointee.newest.entry(key: key))
                var v = record.pointee.newest.older
                while let x = v {
                    out.append(x.pointee.entry(key: key))
                    v = x.pointee.older
                }
            }
            return out
        }
    }
}
