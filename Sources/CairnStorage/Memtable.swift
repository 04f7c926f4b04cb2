import Synchronization

/// What one entry of the memtable (and later of a table) says about its key.
public enum EntryKind: UInt8, Sendable, Hashable {
    case deletion = 0
    case value = 1
}

/// The in-memory table: every write since the last flush, ordered by (key ascending, sequence
/// descending), so the first entry of a key at or below a snapshot's sequence is what a reader at
/// that snapshot sees.
///
/// A skip list of our own (swift-collections' sorted containers are not production-ready), with
/// the probabilistic balance of Pugh's original (p = 1/4, 12 levels: fine up to ~16 M entries).
/// Beside the list, a hash index from each key to its newest entry answers a point read in one
/// probe (a key the table does not hold, the common case once keys live in tables, costs no walk
/// at all); the list orders scans, and serves a read at a snapshot older than the key's newest entry.
///
/// Memory: nodes, keys and values are copied into an arena of large blocks (`Arena`) and the
/// index is one flat array, so a table of a hundred thousand entries is about a hundred
/// allocations (one per 256 KiB of entries) rather than three per entry.
/// A flush walks entries laid out in order of arrival rather than scattered over the heap, and
/// dropping the table frees its blocks: freeing one object per entry, from the flush thread,
/// into the allocator arenas of the threads that made them, held those threads' every `malloc`
/// for tens of milliseconds after each flush.
///
/// Isolation: thread-safe; writers and readers take a short lock (the engine has one writer, the
/// commit path). Once frozen (`freeze`) the table takes no adds and a flush walks it without the
/// lock (`frozenEntries`). Bound: `approximateBytes` (the arena's bytes in use and the index's
/// slots in use; not the index's reserved room) grows with every insert; the engine swaps in a
/// fresh memtable when it passes `write_buffer_bytes`. A node, and the bytes it points at, live until the table is freed:
/// cursors and walks keep the table alive.
public final class Memtable: Sendable {
    public struct Entry: Sendable, Hashable {
        public let key: [UInt8]
        public let sequence: UInt64
        public let kind: EntryKind
        public let value: [UInt8]
    }

    /// A skip-list node, in the arena: these fields, then its tower of `height` links (level 0
    /// first). Key and value bytes are elsewhere in the arena; a key's nodes share one copy of
    /// its bytes. Fields and links are written only under the memtable's lock, and never after
    /// the table is frozen (fields change when an update takes a key's newest node: see `add`).
    /// The prefixes sit next to the tower: a step of a search reads a node's prefix and then its
    /// link at that level.
    struct Node {
        var key: UnsafePointer<UInt8>
        var value: UnsafePointer<UInt8>
        var keyCount: Int
        var valueCount: Int
        var sequence: UInt64
        var kind: EntryKind
        var height: UInt8
        /// The key's first 8 bytes and its next 8, big-endian, zero-padded: most comparisons end
        /// here without touching the key's bytes. Two words, because stored keys begin with a
        /// space byte and a partition number: within a partition the first word alone leaves 3
        /// bytes of the user's key.
        var prefix: UInt64
        var prefix2: UInt64
    }
    typealias NodePointer = UnsafeMutablePointer<Node>

    /// Reached only under `state`'s lock (and, once frozen, read by walks without it).
    struct State: ~Copyable, @unchecked Sendable {
        var arena = Arena()
        var index: MemtableIndex
        var head: NodePointer
        var height = 1
        var count = 0
        /// Set by `freeze`: no add follows, so the links are read without the lock.
        var frozen = false
        var rng: UInt64 = 0x2545_F491_4F6C_DD1D
        var smallestSequence: UInt64 = .max

        init(expectedKeys: Int) {
            index = MemtableIndex(expectedKeys: expectedKeys)
            head = Memtable.makeNode(&arena, Node(key: Memtable.noBytes, value: Memtable.noBytes, keyCount: 0, valueCount: 0, sequence: 0,
                                                  kind: .deletion, height: UInt8(Memtable.maxHeight), prefix: 0, prefix2: 0))
        }

        /// The arena's bytes in use past the head node, and the index's slots at its average
        /// load (two thirds): an empty table counts 0, however large its index was reserved.
        var bytes: Int { arena.used - Memtable.nodeBytes(height: Memtable.maxHeight) + index.count * MemoryLayout<MemtableIndex.Slot>.stride * 3 / 2 }
    }

    static let maxHeight = 12
    /// Where the head node's empty key and value point (never read: their length is 0).
    nonisolated(unsafe) static let noBytes: UnsafePointer<UInt8> = {
        let p = UnsafeMutablePointer<UInt8>.allocate(capacity: 1)
        p.initialize(to: 0)
        return UnsafePointer(p)
    }()
    fileprivate let state: Mutex<State>

    /// `expectedKeys`: distinct keys the table will likely hold (the engine passes its previous
    /// memtable's), reserved in the index up front so filling it never rehashes the index.
    public init(expectedKeys: Int = 0) {
        state = Mutex(State(expectedKeys: max(expectedKeys, 0)))
    }

    /// Bytes a node of `height` takes in the arena (fields and tower).
    static func nodeBytes(height: Int) -> Int { MemoryLayout<Node>.stride + height * MemoryLayout<NodePointer?>.stride }

    static func prefix(of key: UnsafeBufferPointer<UInt8>, from start: Int) -> UInt64 {
        var p: UInt64 = 0
        for i in start..<(start + 8) { p = p << 8 | UInt64(i < key.count ? key[i] : 0) }
        return p
    }
}

extension UnsafeMutablePointer where Pointee == Memtable.Node {
    /// The tower: `height` links, level 0 first. Valid while the memtable lives.
    @inline(__always) var next: UnsafeMutablePointer<Memtable.NodePointer?> {
        UnsafeMutableRawPointer(self + 1).assumingMemoryBound(to: Memtable.NodePointer?.self)
    }
    @inline(__always) var keyBytes: UnsafeBufferPointer<UInt8> { UnsafeBufferPointer(start: pointee.key, count: pointee.keyCount) }
    @inline(__always) var entry: Memtable.Entry { entry(key: Array(keyBytes)) }
    /// The entry with `key`, which must equal this node's key.
    @inline(__always) func entry(key: [UInt8]) -> Memtable.Entry {
        Memtable.Entry(key: key, sequence: pointee.sequence, kind: pointee.kind,
                       value: Array(UnsafeBufferPointer(start: pointee.value, count: pointee.valueCount)))
    }
    @inline(__always) func successor(_ level: Int) -> Memtable.NodePointer? { next[level] }
    @inline(__always) func hasKey(_ key: UnsafeBufferPointer<UInt8>) -> Bool {
        pointee.key == key.baseAddress && pointee.keyCount == key.count || Coding.compare(keyBytes, key) == 0
    }
    @inline(__always) func sameKey(as other: Memtable.NodePointer) -> Bool { hasKey(other.keyBytes) }

    /// Whether this node comes before `(key, seq)` (`prefixes` are the key's): key ascending,
    /// sequence descending. Zero padding never inverts the order where the words differ: a
    /// padded byte stands for "shorter", which sorts first.
    @inline(__always)
    func isBefore(_ key: UnsafeBufferPointer<UInt8>, _ prefixes: (UInt64, UInt64), _ seq: UInt64) -> Bool {
        if pointee.prefix != prefixes.0 { return pointee.prefix < prefixes.0 }
        if pointee.prefix2 != prefixes.1 { return pointee.prefix2 < prefixes.1 }
        let c = Coding.compare(keyBytes, key)
        return c < 0 || (c == 0 && pointee.sequence > seq)
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

/// The memtable's point index: each key's newest node, by open addressing with linear probing
/// over one flat array of (hash, node) slots, at most three quarters full. Not thread-safe: the
/// memtable's lock guards it. Node pointers stay valid for the memtable's life. Not copyable: it
/// owns its slots.
struct MemtableIndex: ~Copyable {
    struct Slot {
        var hash: Int
        var node: Memtable.NodePointer?
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

    func find(_ key: UnsafeBufferPointer<UInt8>, hash: Int) -> Memtable.NodePointer? { slots[position(key, hash)].node }

    /// Makes `node` the entry for `key` (inserting the key when new).
    mutating func set(_ key: UnsafeBufferPointer<UInt8>, hash: Int, _ node: Memtable.NodePointer) {
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
    /// Walks the list from `start` at `level` while the next node comes before `(key, seq)`;
    /// returns the last node that does (or `start`).
    @inline(__always)
    static func advance(_ start: NodePointer, level: Int, _ key: UnsafeBufferPointer<UInt8>, _ prefix: (UInt64, UInt64),
                        _ seq: UInt64) -> NodePointer {
        var x = start
        while let n = x.next[level], n.isBefore(key, prefix, seq) { x = n }
        return x
    }

    /// Distinct keys in the table.
    public var keyCount: Int { state.withLock { $0.index.count } }

    public var count: Int { state.withLock { $0.count } }
    /// The arena's bytes in use (nodes, keys, values) and the index's slots: close to the memory
    /// the table's entries hold (0 when empty).
    public var approximateBytes: Int { state.withLock { $0.bytes } }

    /// Adds an entry. (key, sequence) pairs are unique: the engine issues each sequence once.
    ///
    /// A key the table already holds at a lower sequence (an update: the common write once a key
    /// is hot) usually takes no search: the new entry's random height is drawn first, and when it
    /// is no taller than the key's newest node (found through the index), that node takes the new
    /// version in place and its previous contents move to a node of the drawn height linked right
    /// after it at each of its levels, which is exactly where table order puts them. Every node's
    /// height stays drawn from the same distribution (a displaced version's only capped by the
    /// node before it, with a taller draw taking the searching path), so runs of a hot key's old
    /// versions are skipped over like any others and searches stay logarithmic. A cursor parked
    /// on the rewritten node still finds the version its snapshot sees (the new one is above
    /// every snapshot taken before the add). The key's bytes are copied once per table.
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
        let height = randomHeight(&s.rng)
        let hash = MemtableIndex.hash(key)
        let current = s.index.find(key, hash: hash)
        let supersedes = current.map { $0.pointee.sequence < sequence } ?? false
        let valueCopy = s.arena.copy(value)
        s.smallestSequence = min(s.smallestSequence, sequence)
        s.count += 1
        if supersedes, let newest = current, height <= Int(newest.pointee.height) {
            var previous = newest.pointee
            previous.height = UInt8(truncatingIfNeeded: height)
            let moved = makeNode(&s.arena, previous)
            for level in 0..<height {
                moved.next[level] = newest.next[level]
                newest.next[level] = moved
            }
            newest.pointee.value = valueCopy
            newest.pointee.valueCount = value.count
            newest.pointee.sequence = sequence
            newest.pointee.kind = kind
            return
        }
        // A key the table holds shares its bytes; a new one is copied.
        let keyCopy = current.map { UnsafePointer($0.pointee.key) } ?? s.arena.copy(key)
        let prefix = (Self.prefix(of: key, from: 0), Self.prefix(of: key, from: 8))
        let node = makeNode(&s.arena, Node(key: keyCopy, value: valueCopy, keyCount: key.count,
                                           valueCount: value.count, sequence: sequence, kind: kind,
                                           height: UInt8(truncatingIfNeeded: height), prefix: prefix.0, prefix2: prefix.1))
        // The predecessors at each level, on the stack.
        withUnsafeTemporaryAllocation(of: NodePointer.self, capacity: maxHeight) { update in
            update.initialize(repeating: s.head)
            var x = s.head
            for level in stride(from: s.height - 1, through: 0, by: -1) {
                // Advance while the next entry comes before the new one in table order.
                x = advance(x, level: level, key, prefix, sequence)
                update[level] = x
            }
            if height > s.height { s.height = height }
            for level in 0..<height {
                node.next[level] = update[level].next[level]
                update[level].next[level] = node
            }
        }
        if current == nil || supersedes { s.index.set(key, hash: hash, node) }
    }

    /// A node with `fields` (its `height` included) and an empty tower, in the arena.
    private static func makeNode(_ arena: inout Arena, _ fields: Node) -> NodePointer {
        let height = Int(fields.height)
        let node = arena.allocate(nodeBytes(height: height)).bindMemory(to: Node.self, capacity: 1)
        node.initialize(to: fields)
        UnsafeMutableRawPointer(node + 1).bindMemory(to: NodePointer?.self, capacity: height).initialize(repeating: nil, count: height)
        return node
    }

    /// A node height: each level above the first with probability 1/4 (xorshift; deterministic
    /// per table).
    private static func randomHeight(_ rng: inout UInt64) -> Int {
        var height = 1
        while height < maxHeight {
            rng ^= rng << 13
            rng ^= rng >> 7
            rng ^= rng << 17
            if rng & 3 != 0 { break }
            height += 1
        }
        return height
    }

    /// The newest entry for `key` with sequence ≤ `snapshot`: a value, a deletion, or nil when
    /// the memtable says nothing about the key at that snapshot.
    public func get(_ key: [UInt8], snapshot: UInt64 = .max) -> Entry? {
        key.withUnsafeBufferPointer { bytes in
            state.withLock { s -> Entry? in
                guard let newest = s.index.find(bytes, hash: MemtableIndex.hash(bytes)) else { return nil }
                // The caller's key is the entry's: only the value is copied out.
                if newest.pointee.sequence <= snapshot { return newest.entry(key: key) }
                guard let n = Self.seek(s, bytes, snapshot), n.hasKey(bytes) else { return nil }
                return n.entry(key: key)
            }
        }
    }

    /// The first node at or after (key, seq) in table order.
    private static func seek(_ s: borrowing State, _ key: UnsafeBufferPointer<UInt8>, _ seq: UInt64) -> NodePointer? {
        var x = s.head
        let prefix = (Self.prefix(of: key, from: 0), Self.prefix(of: key, from: 8))
        for level in stride(from: s.height - 1, through: 0, by: -1) { x = advance(x, level: level, key, prefix, seq) }
        return x.successor(0)
    }

    private static func seek(_ s: borrowing State, _ key: [UInt8], _ seq: UInt64) -> NodePointer? {
        key.withUnsafeBufferPointer { seek(s, $0, seq) }
    }

    /// Entries with `lower ≤ key < upper` (nil: unbounded) as of `snapshot`: for each key only the
    /// newest entry at or below the snapshot, deletions included, in key order. A consistent view:
    /// entries added later carry larger sequences and are skipped.
    public func scan(from lower: [UInt8] = [], to upper: [UInt8]? = nil, snapshot: UInt64 = .max) -> [Entry] {
        state.withLock { s in
            var out: [Entry] = []
            var node = Self.seek(s, lower, .max)
            var last: NodePointer?
            while let n = node {
                if let upper, !upper.withUnsafeBufferPointer({ Coding.compare(n.keyBytes, $0) < 0 }) { break }
                if n.pointee.sequence <= snapshot && !(last.map { n.sameKey(as: $0) } ?? false) {
                    out.append(n.entry)
                    last = n
                }
                node = n.successor(0)
            }
            return out
        }
    }

    /// A forward cursor over the newest entry per key at or below `snapshot`, from the first key ≥
    /// `lower`. Sees a consistent view: later inserts carry larger sequences and are skipped.
    public func cursor(from lower: [UInt8], snapshot: UInt64) -> Cursor {
        Cursor(memtable: self, node: state.withLock { NodeRef(pointer: Self.seek($0, lower, .max)) }.pointer, snapshot: snapshot)
    }

    /// A node pointer carried out of the lock (the memtable it points into is kept alive by its holder).
    struct NodeRef: @unchecked Sendable {
        let pointer: NodePointer?
    }

    /// Not thread-safe (one consumer); the memtable's lock guards each step. Keeps the memtable
    /// (and so its nodes) alive.
    public final class Cursor {
        let memtable: Memtable
        var node: NodePointer?
        let snapshot: UInt64
        var last: NodePointer?

        init(memtable: Memtable, node: NodePointer?, snapshot: UInt64) {
            self.memtable = memtable
            self.node = node
            self.snapshot = snapshot
        }

        public func next() -> Entry? {
            memtable.state.withLock { _ in
                while let n = node {
                    node = n.successor(0)
                    if n.pointee.sequence <= snapshot && !(last.map { n.sameKey(as: $0) } ?? false) {
                        last = n
                        return n.entry
                    }
                }
                return nil
            }
        }
    }

    /// Ends the table's adds (the engine freezes a memtable when it swaps in a new one, under the
    /// lock that orders its adds): its links never change again, so `frozenEntries` may walk
    /// them without the lock. An add after this is an engine bug and traps (writes only ever
    /// reach the active memtable, which is never frozen).
    public func freeze() { state.withLock { $0.frozen = true } }

    /// The newest entry of each key in key order, deletions included. Freezes the table first
    /// (a no-op for one the engine froze already), then walks the list without taking the lock,
    /// so a flush writing the table out never holds up a reader of it.
    public func frozenEntries() -> FrozenEntries {
        let first = state.withLock { s in
            s.frozen = true
            return NodeRef(pointer: s.head.successor(0))
        }
        return FrozenEntries(memtable: self, node: first.pointer)
    }

    /// See `frozenEntries`. Keeps the memtable (and so its nodes) alive while it walks.
    public struct FrozenEntries: IteratorProtocol {
        let memtable: Memtable
        var node: NodePointer?

        public mutating func next() -> Entry? {
            guard let n = node else { return nil }
            // The first node of a key is its newest entry (sequence descending within a key).
            var after = n.successor(0)
            while let a = after, a.sameKey(as: n) { after = a.successor(0) }
            node = after
            return n.entry
        }
    }

    /// Checks the skip list's shape (tests): each level in table order, every node of a level on
    /// the one below it, each node linked at exactly its height's levels. Returns how many nodes
    /// each height has (index 0: height 1).
    func shape() -> (valid: Bool, heights: [Int]) {
        state.withLock { s in
            var heights = [Int](repeating: 0, count: Self.maxHeight)
            var valid = true
            var below: Set<NodePointer> = []
            for level in 0..<Self.maxHeight {
                var here: Set<NodePointer> = []
                var previous: NodePointer?
                var node = s.head.successor(level)
                while let n = node {
                    let height = Int(n.pointee.height)
                    if height <= level { valid = false }
                    if level > 0 && !below.contains(n) { valid = false }
                    if let p = previous, !p.isBefore(n.keyBytes, (n.pointee.prefix, n.pointee.prefix2), n.pointee.sequence) { valid = false }
                    if level == 0 { heights[height - 1] += 1 }
                    here.insert(n)
                    previous = n
                    node = n.successor(level)
                }
                if level == 0 && here.count != s.count { valid = false }
                below = here
            }
            return (valid, heights)
        }
    }

    /// The arena's blocks (tests: a table is a few large allocations, not one per entry).
    var arenaBlocks: Int { state.withLock { $0.arena.blocks.count } }

    /// The smallest sequence number in the table (nil when empty).
    public var smallestSequence: UInt64? { state.withLock { $0.count == 0 ? nil : $0.smallestSequence } }

    /// Every entry in table order, all versions (tests and diagnostics; a flush writes only the
    /// newest entry of each key, `frozenEntries`).
    public func allEntries() -> [Entry] {
        state.withLock { s in
            var out: [Entry] = []
            out.reserveCapacity(s.count)
            var node = s.head.successor(0)
            while let n = node {
                out.append(n.entry)
                node = n.successor(0)
            }
            return out
        }
    }
}
