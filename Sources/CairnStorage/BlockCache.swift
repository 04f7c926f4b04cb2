import Synchronization

/// A bounded LRU cache of decoded, verified blocks, shared by every table of a database.
///
/// Bound: the sum of cached blocks' sizes stays ≤ `capacityBytes` (config `block_cache_bytes`,
/// default 64 MiB); the least recently used block is evicted first. Sixteen shards, each with its
/// own lock and an equal share of the capacity, so concurrent readers rarely contend.
/// Counters: hits, misses, evictions, bytes in use. Thread-safe.
public final class BlockCache: Sendable {
    public struct Key: Hashable, Sendable {
        let file: UInt64
        let offset: UInt64
    }

    public struct Counters: Sendable, Hashable {
        public var hits = 0
        public var misses = 0
        public var evictions = 0
        public var bytes = 0
        public var entries = 0
    }

    struct Slot {
        var key: Key
        var block: Block
        var charge: Int
        var prev: Int
        var next: Int
    }

    /// One shard: a dictionary into a doubly linked list of slots (head = most recent).
    struct Shard {
        var index: [Key: Int] = [:]
        var slots: [Slot] = []
        var free: [Int] = []
        var head = -1
        var tail = -1
        var counters = Counters()

        mutating func unlink(_ i: Int) {
            let (p, n) = (slots[i].prev, slots[i].next)
            if p >= 0 { slots[p].next = n } else { head = n }
            if n >= 0 { slots[n].prev = p } else { tail = p }
        }

        mutating func pushFront(_ i: Int) {
            slots[i].prev = -1
            slots[i].next = head
            if head >= 0 { slots[head].prev = i }
            head = i
            if tail < 0 { tail = i }
        }
    }

    public let capacityBytes: Int
    final class Locked: Sendable {
        let mutex = Mutex(Shard())
        func withLock<R>(_ body: (inout Shard) -> R) -> R { mutex.withLock { body(&$0) } }
    }
    private let shards: [Locked]
    private let shardCapacity: Int

    public init(capacityBytes: Int = 64 << 20) {
        self.capacityBytes = max(capacityBytes, 0)
        shards = (0..<16).map { _ in Locked() }
        shardCapacity = self.capacityBytes / 16
    }

    private func shard(_ key: Key) -> Int {
        var h = (key.file &* 0x9E37_79B9_7F4A_7C15) ^ (key.offset &* 0xC2B2_AE3D_27D4_EB4F)
        h ^= h >> 29
        return Int(truncatingIfNeeded: h & 15)
    }

    /// Whether `key` is cached; neither counted nor made more recent.
    public func contains(_ key: Key) -> Bool {
        shards[shard(key)].withLock { $0.index[key] != nil }
    }

    /// The cached block, made most recent. `countMiss` false: a miss is not counted (a probe
    /// that falls back to a read which will count it).
    public func get(_ key: Key, countMiss: Bool = true) -> Block? {
        shards[shard(key)].withLock { s in
            guard let i = s.index[key] else {
                if countMiss { s.counters.misses += 1 }
                return nil
            }
            s.counters.hits += 1
            if s.head != i {
                s.unlink(i)
                s.pushFront(i)
            }
            return s.slots[i].block
        }
    }

    /// Caches `block` (charged `charge` bytes), evicting least recently used blocks to stay in bound.
    /// A block larger than a shard's share is not cached.
    public func insert(_ key: Key, _ block: Block, charge: Int) {
        guard charge <= shardCapacity else { return }
        shards[shard(key)].withLock { s in
            if let i = s.index[key] {
                s.counters.bytes += charge - s.slots[i].charge
                s.slots[i].block = block
                s.slots[i].charge = charge
                s.unlink(i)
                s.pushFront(i)
            } else {
                let slot = Slot(key: key, block: block, charge: charge, prev: -1, next: -1)
                let i: Int
                if let f = s.free.popLast() { s.slots[f] = slot; i = f } else { s.slots.append(slot); i = s.slots.count - 1 }
                s.index[key] = i
                s.pushFront(i)
                s.counters.bytes += charge
                s.counters.entries += 1
            }
            while s.counters.bytes > shardCapacity, s.tail >= 0 {
                let victim = s.tail
                s.unlink(victim)
                s.index[s.slots[victim].key] = nil
                s.counters.bytes -= s.slots[victim].charge
                s.counters.entries -= 1
                s.counters.evictions += 1
                // Release the block's memory now; the slot is reused by a later insert.
                s.slots[victim].block = Block.empty
                s.free.append(victim)
            }
        }
    }

    /// Drops every block of `file` (a table deleted by compaction).
    public func evict(file: UInt64) {
        for shard in shards {
            shard.withLock { s in
                for (key, i) in s.index where key.file == file {
                    s.unlink(i)
                    s.index[key] = nil
                    s.counters.bytes -= s.slots[i].charge
                    s.counters.entries -= 1
                    s.slots[i].block = Block.empty
                    s.free.append(i)
                }
            }
        }
    }

    public var counters: Counters {
        shards.reduce(into: Counters()) { total, shard in
            let c = shard.withLock { $0.counters }
            total.hits += c.hits
            total.misses += c.misses
            total.evictions += c.evictions
            total.bytes += c.bytes
            total.entries += c.entries
        }
    }
}
