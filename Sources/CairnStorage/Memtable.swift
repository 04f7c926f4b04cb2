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
/// Isolation: thread-safe; writers and readers take a short lock (the engine has one writer, the
/// commit path). Once frozen (`freeze`) the table takes no adds and a flush walks it without the
/// lock (`frozenEntries`). Bound: `approximateBytes` grows with every insert; the engine swaps in a fresh
/// memtable when it passes `write_buffer_bytes`.
public final class Memtable: Sendable {
    public struct Entry: Sendable, Hashable {
        public let key: [UInt8]
        public let sequence: UInt64
        public let kind: EntryKind
        public let value: [UInt8]
    }

    /// What a skip-list node holds besides its links. The prefixes come last, next to the
    /// tower: a step of a search reads a node's prefix and then its link at that level, so the
    /// two sit within a few words of each other.
    struct NodeFields {
        let key: [UInt8]
        let value: [UInt8]
        let sequence: UInt64
        let height: UInt8
        let kind: EntryKind
        /// The key's first 8 bytes and its next 8, big-endian, zero-padded: most comparisons end
        /// here without touching the key's own allocation. Two words, because stored keys begin
        /// with a space byte and a partition number: within a partition the first word alone
        /// leaves 3 bytes of the user's key.
        let prefix: UInt64
        let prefix2: UInt64
    }

    /// A skip-list node: its fields, then its tower of links in the same allocation (one cache
    /// miss per node a search visits, where a tower of its own cost a second). Nodes are owned
    /// by `State.nodes` (so dropping a memtable frees them one by one, never by a recursive chain
    /// of releases) and linked by unowned pointers (no reference counting while a search walks
    /// the list). Links and fields are written only under the memtable's lock, and never after
    /// the table is frozen (fields change when an update takes a key's newest node: see `add`).
    final class Node: ManagedBuffer<NodeFields, Unmanaged<Node>?> {
        static func make(key: [UInt8], sequence: UInt64, kind: EntryKind, value: [UInt8], height: Int) -> Node {
            let fields = NodeFields(key: key, value: value, sequence: sequence, height: UInt8(truncatingIfNeeded: height), kind: kind,
                                    prefix: prefix(of: key, from: 0), prefix2: prefix(of: key, from: 8))
            let node = unsafeDowncast(create(minimumCapacity: height) { _ in fields }, to: Node.self)
            node.withUnsafeMutablePointerToElements { $0.initialize(repeating: nil, count: height) }
            return node
        }

        @inline(__always) var key: [UInt8] { header.key }
        @inline(__always) var value: [UInt8] { header.value }
        @inline(__always) var sequence: UInt64 { header.sequence }
        @inline(__always) var kind: EntryKind { header.kind }
        @inline(__always) var height: Int { Int(header.height) }
        @inline(__always) var prefix: UInt64 { header.prefix }
        @inline(__always) var prefix2: UInt64 { header.prefix2 }
        /// The tower: `height` links, level 0 first. Valid while the node lives.
        @inline(__always) var next: UnsafeMutablePointer<Unmanaged<Node>?> { withUnsafeMutablePointerToElements { $0 } }

        var entry: Entry { Entry(key: key, sequence: sequence, kind: kind, value: value) }

        @inline(__always)
        func successor(_ level: Int) -> Node? { next[level]?.takeUnretainedValue() }

        static func prefix(of key: [UInt8], from start: Int) -> UInt64 {
            var p: UInt64 = 0
            for i in start..<(start + 8) { p = p << 8 | UInt64(i < key.count ? key[i] : 0) }
            return p
        }

        /// Whether this node comes before `(key, seq)` (`prefixes` are the key's): key ascending,
        /// sequence descending. Zero padding never inverts the order where the words differ: a
        /// padded byte stands for "shorter", which sorts first.
        @inline(__always)
        func isBefore(_ key: [UInt8], _ prefixes: (UInt64, UInt64), _ seq: UInt64) -> Bool {
            if prefix != prefixes.0 { return prefix < prefixes.0 }
            if prefix2 != prefixes.1 { return prefix2 < prefixes.1 }
            let c = self.key.compareBytes(key)
            return c < 0 || (c == 0 && sequence > seq)
        }
    }

    /// Walks the list from `start` at `level` while the next node comes before `(key, seq)`;
    /// returns the last node that does (or `start`). No reference counting on the way.
    @inline(__always)
    static func advance(_ start: Unmanaged<Node>, level: Int, _ key: [UInt8], _ prefix: (UInt64, UInt64), _ seq: UInt64) -> Unmanaged<Node> {
        var x = start
        while let n = x._withUnsafeGuaranteedRef({ $0.next[level] }), n._withUnsafeGuaranteedRef({ $0.isBefore(key, prefix, seq) }) {
            x = n
        }
        return x
    }

    /// A key of the hash index: hashed as one run of bytes (an array's own hashing feeds the
    /// hasher byte by byte).
    struct IndexKey: Hashable {
        let bytes: [UInt8]
        func hash(into h: inout Hasher) { bytes.withUnsafeBytes { h.combine(bytes: $0) } }
    }

    struct State {
        let head = Node.make(key: [], sequence: 0, kind: .deletion, value: [], height: Memtable.maxHeight)
        var nodes: [Node] = []
        /// Each key's entry of highest sequence (nodes are owned by `nodes`).
        var newest: [IndexKey: Unmanaged<Node>] = [:]
        var height = 1
        var count = 0
        var bytes = 0
        /// Set by `freeze`: no add follows, so the links are read without the lock.
        var frozen = false
        var rng: UInt64 = 0x2545_F491_4F6C_DD1D
        var smallestSequence: UInt64 = .max
    }

    static let maxHeight = 12
    fileprivate let state = Mutex(State())

    /// `expectedKeys`: distinct keys the table will likely hold (the engine passes its previous
    /// memtable's), reserved in the index up front so filling it never rehashes the index.
    public init(expectedKeys: Int = 0) {
        if expectedKeys > 0 {
            state.withLock { s in
                s.newest.reserveCapacity(expectedKeys)
                s.nodes.reserveCapacity(expectedKeys)
            }
        }
    }

    /// Distinct keys in the table.
    public var keyCount: Int { state.withLock { $0.newest.count } }

    public var count: Int { state.withLock { $0.count } }
    /// Keys, values and per-entry overhead (a good estimate of the memory used).
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
    /// every snapshot taken before the add).
    public func add(key: [UInt8], sequence: UInt64, kind: EntryKind, value: [UInt8]) {
        state.withLock { s in
            precondition(!s.frozen, "an add to a frozen memtable")
            let height = Self.randomHeight(&s.rng)
            let indexed = IndexKey(bytes: key)
            let current = s.newest[indexed]
            let supersedes = current?._withUnsafeGuaranteedRef { $0.sequence < sequence } ?? false
            if supersedes, let current, current._withUnsafeGuaranteedRef({ height <= $0.height }) {
                current._withUnsafeGuaranteedRef { newest in
                    let previous = newest.header
                    let moved = Node.make(key: previous.key, sequence: previous.sequence, kind: previous.kind, value: previous.value,
                                          height: height)
                    s.nodes.append(moved)
                    let link = Unmanaged.passUnretained(moved)
                    for level in 0..<height {
                        moved.next[level] = newest.next[level]
                        newest.next[level] = link
                    }
                    newest.header = NodeFields(key: previous.key, value: value, sequence: sequence, height: previous.height, kind: kind,
                                               prefix: previous.prefix, prefix2: previous.prefix2)
                }
                s.count += 1
                s.bytes += key.count + value.count + 144 + 8 * height
                s.smallestSequence = min(s.smallestSequence, sequence)
                return
            }
            let head = Unmanaged.passUnretained(s.head)
            // The predecessors at each level, on the stack (an add allocates only its node).
            withUnsafeTemporaryAllocation(of: Unmanaged<Node>.self, capacity: Self.maxHeight) { update in
                update.initialize(repeating: head)
                var x = head
                let prefix = (Node.prefix(of: key, from: 0), Node.prefix(of: key, from: 8))
                for level in stride(from: s.height - 1, through: 0, by: -1) {
                    // Advance while the next entry comes before the new one in table order.
                    x = Self.advance(x, level: level, key, prefix, sequence)
                    update[level] = x
                }
                if height > s.height { s.height = height }
                let node = Node.make(key: key, sequence: sequence, kind: kind, value: value, height: height)
                s.nodes.append(node)
                let link = Unmanaged.passUnretained(node)
                for level in 0..<height {
                    node.next[level] = update[level]._withUnsafeGuaranteedRef { $0.next[level] }
                    update[level]._withUnsafeGuaranteedRef { $0.next[level] = link }
                }
                s.count += 1
                // Key, value, the node, its tower and the owner slot: close to what the heap holds.
                s.bytes += key.count + value.count + 144 + 8 * height
                if current == nil {
                    // An index slot (key reference and node pointer) at the dictionary's load factor.
                    s.bytes += 32
                }
                if current == nil || supersedes { s.newest[indexed] = link }
            }
            s.smallestSequence = min(s.smallestSequence, sequence)
        }
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
        state.withLock { s in
            guard let newest = s.newest[IndexKey(bytes: key)] else { return nil }
            if let e = newest._withUnsafeGuaranteedRef({ $0.sequence <= snapshot ? $0.entry : nil }) { return e }
            guard let n = Self.seek(s, key, snapshot), n.key == key else { return nil }
            return n.entry
        }
    }

    /// The first node at or after (key, seq) in table order.
    private static func seek(_ s: State, _ key: [UInt8], _ seq: UInt64) -> Node? {
        var x = Unmanaged.passUnretained(s.head)
        let prefix = (Node.prefix(of: key, from: 0), Node.prefix(of: key, from: 8))
        for level in stride(from: s.height - 1, through: 0, by: -1) { x = advance(x, level: level, key, prefix, seq) }
        return x._withUnsafeGuaranteedRef { $0.successor(0) }
    }

    /// Entries with `lower ≤ key < upper` (nil: unbounded) as of `snapshot`: for each key only the
    /// newest entry at or below the snapshot, deletions included, in key order. A consistent view:
    /// entries added later carry larger sequences and are skipped.
    public func scan(from lower: [UInt8] = [], to upper: [UInt8]? = nil, snapshot: UInt64 = .max) -> [Entry] {
        state.withLock { s in
            var out: [Entry] = []
            var node = Self.seek(s, lower, .max)
            var lastKey: [UInt8]?
            while let n = node {
                if let upper, !n.key.isBefore(upper) { break }
                if n.sequence <= snapshot && n.key != lastKey {
                    out.append(n.entry)
                    lastKey = n.key
                }
                node = n.successor(0)
            }
            return out
        }
    }

    /// A forward cursor over the newest entry per key at or below `snapshot`, from the first key ≥
    /// `lower`. Sees a consistent view: later inserts carry larger sequences and are skipped.
    public func cursor(from lower: [UInt8], snapshot: UInt64) -> Cursor {
        Cursor(memtable: self, node: state.withLock { Self.seek($0, lower, .max) }, snapshot: snapshot)
    }

    /// Not thread-safe (one consumer); the memtable's lock guards each step.
    public final class Cursor {
        let memtable: Memtable
        var node: Node?
        let snapshot: UInt64
        var lastKey: [UInt8]?

        init(memtable: Memtable, node: Node?, snapshot: UInt64) {
            self.memtable = memtable
            self.node = node
            self.snapshot = snapshot
        }

        public func next() -> Entry? {
            memtable.state.withLock { _ in
                while let n = node {
                    node = n.successor(0)
                    if n.sequence <= snapshot && n.key != lastKey {
                        lastKey = n.key
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
        state.withLock { s in
            s.frozen = true
            return FrozenEntries(memtable: self, node: s.head.successor(0))
        }
    }

    /// See `frozenEntries`. Keeps the memtable (and so its nodes) alive while it walks.
    public struct FrozenEntries: IteratorProtocol {
        let memtable: Memtable
        var node: Node?

        public mutating func next() -> Entry? {
            guard let n = node else { return nil }
            // The first node of a key is its newest entry (sequence descending within a key).
            var after = n.successor(0)
            while let a = after, a.key == n.key { after = a.successor(0) }
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
            var below: Set<ObjectIdentifier> = []
            for level in 0..<Self.maxHeight {
                var here: Set<ObjectIdentifier> = []
                var previous: Node?
                var node = s.head.successor(level)
                while let n = node {
                    if n.height <= level { valid = false }
                    if level > 0 && !below.contains(ObjectIdentifier(n)) { valid = false }
                    if let p = previous, !p.isBefore(n.key, (n.prefix, n.prefix2), n.sequence) { valid = false }
                    if level == 0 { heights[n.height - 1] += 1 }
                    here.insert(ObjectIdentifier(n))
                    previous = n
                    node = n.successor(level)
                }
                if level == 0 && here.count != s.nodes.count { valid = false }
                below = here
            }
            return (valid, heights)
        }
    }

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
