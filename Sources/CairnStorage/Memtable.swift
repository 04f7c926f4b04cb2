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
/// Isolation: thread-safe; writers and readers take a short lock (the engine has one writer, the
/// commit path). Bound: `approximateBytes` grows with every insert; the engine swaps in a fresh
/// memtable when it passes `write_buffer_bytes`.
public final class Memtable: Sendable {
    public struct Entry: Sendable, Hashable {
        public let key: [UInt8]
        public let sequence: UInt64
        public let kind: EntryKind
        public let value: [UInt8]
    }

    final class Node {
        let entry: Entry?
        var next: [Node?]
        init(_ entry: Entry?, height: Int) {
            self.entry = entry
            self.next = Array(repeating: nil, count: height)
        }
    }

    struct State {
        let head = Node(nil, height: Memtable.maxHeight)
        var height = 1
        var count = 0
        var bytes = 0
        var rng: UInt64 = 0x2545_F491_4F6C_DD1D
        var smallestSequence: UInt64 = .max
    }

    static let maxHeight = 12
    fileprivate let state = Mutex(State())

    public init() {}

    public var count: Int { state.withLock { $0.count } }
    /// Keys, values and per-entry overhead (a good estimate of the memory used).
    public var approximateBytes: Int { state.withLock { $0.bytes } }

    /// Whether `e` comes before `(key, seq)` in the table's order: key ascending, sequence descending.
    @inline(__always)
    static func entryBefore(_ e: Entry, _ key: [UInt8], _ seq: UInt64) -> Bool {
        let c = e.key.compareBytes(key)
        return c < 0 || (c == 0 && e.sequence > seq)
    }

    /// Adds an entry. (key, sequence) pairs are unique: the engine issues each sequence once.
    public func add(key: [UInt8], sequence: UInt64, kind: EntryKind, value: [UInt8]) {
        state.withLock { s in
            var update = [Node](repeating: s.head, count: Self.maxHeight)
            var x = s.head
            for level in stride(from: s.height - 1, through: 0, by: -1) {
                // Advance while the next entry comes before the new one in table order.
                while let n = x.next[level], let e = n.entry, Self.entryBefore(e, key, sequence) { x = n }
                update[level] = x
            }
            // Random height: each level with probability 1/4 (xorshift; deterministic per table).
            var height = 1
            while height < Self.maxHeight {
                s.rng ^= s.rng << 13
                s.rng ^= s.rng >> 7
                s.rng ^= s.rng << 17
                if s.rng & 3 != 0 { break }
                height += 1
            }
            if height > s.height {
                for level in s.height..<height { update[level] = s.head }
                s.height = height
            }
            let node = Node(Entry(key: key, sequence: sequence, kind: kind, value: value), height: height)
            for level in 0..<height {
                node.next[level] = update[level].next[level]
                update[level].next[level] = node
            }
            s.count += 1
            // Key, value, the node and its three array headers: close to what the heap really holds.
            s.bytes += key.count + value.count + 128 + 8 * height
            s.smallestSequence = min(s.smallestSequence, sequence)
        }
    }

    /// The newest entry for `key` with sequence ≤ `snapshot`: a value, a deletion, or nil when
    /// the memtable says nothing about the key at that snapshot.
    public func get(_ key: [UInt8], snapshot: UInt64 = .max) -> Entry? {
        state.withLock { s in
            guard let n = Self.seek(s, key, snapshot), let e = n.entry, e.key == key else { return nil }
            return e
        }
    }

    /// The first node at or after (key, seq) in table order.
    private static func seek(_ s: State, _ key: [UInt8], _ seq: UInt64) -> Node? {
        var x = s.head
        for level in stride(from: s.height - 1, through: 0, by: -1) {
            while let n = x.next[level], let e = n.entry, Self.entryBefore(e, key, seq) { x = n }
        }
        return x.next[0]
    }

    /// Entries with `lower ≤ key < upper` (nil: unbounded) as of `snapshot`: for each key only the
    /// newest entry at or below the snapshot, deletions included, in key order. A consistent view:
    /// entries added later carry larger sequences and are skipped.
    public func scan(from lower: [UInt8] = [], to upper: [UInt8]? = nil, snapshot: UInt64 = .max) -> [Entry] {
        state.withLock { s in
            var out: [Entry] = []
            var node = Self.seek(s, lower, .max)
            var lastKey: [UInt8]?
            while let n = node, let e = n.entry {
                if let upper, !e.key.isBefore(upper) { break }
                if e.sequence <= snapshot && e.key != lastKey {
                    out.append(e)
                    lastKey = e.key
                }
                node = n.next[0]
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
                while let n = node, let e = n.entry {
                    node = n.next[0]
                    if e.sequence <= snapshot && e.key != lastKey {
                        lastKey = e.key
                        return e
                    }
                }
                return nil
            }
        }
    }

    /// The smallest sequence number in the table (nil when empty).
    public var smallestSequence: UInt64? { state.withLock { $0.count == 0 ? nil : $0.smallestSequence } }

    /// Every entry in table order (all versions): what a flush writes.
    public func allEntries() -> [Entry] {
        state.withLock { s in
            var out: [Entry] = []
            out.reserveCapacity(s.count)
            var node = s.head.next[0]
            while let n = node, let e = n.entry {
                out.append(e)
                node = n.next[0]
            }
            return out
        }
    }
}
