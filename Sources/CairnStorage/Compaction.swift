import Dispatch
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Leveled compaction: which tables to merge next. Pure (no I/O): the worker asks, then performs.
///
/// Level 0 holds flushed memtables (overlapping, newest first); each deeper level is a sorted run
/// of disjoint tables, ten times larger than the one above. A compaction merges tables of level L
/// with the tables of L+1 they overlap and writes the result to L+1. ARCHITECTURE.md says why
/// leveled and not size-tiered.
public struct CompactionPolicy: Sendable, Hashable {
    /// Level 0 is compacted once it holds this many tables (`l0_compaction_trigger`).
    public var level0Trigger = 4
    /// Writes are delayed (1 ms each) while level 0 holds this many (`l0_slowdown_trigger`).
    public var level0Slowdown = 8
    /// Writes wait for compaction while level 0 holds this many (`l0_stop_trigger`).
    public var level0Stop = 12
    /// Level 1's target size; level n's is this × 10^(n-1) (`level_base_bytes`).
    public var levelBaseBytes: UInt64 = 64 << 20
    /// Compaction output is cut into tables of about this size (`target_file_bytes`).
    public var targetFileBytes: UInt64 = 8 << 20
    public static let levels = 7

    public init() {}

    public func maxBytes(level: Int) -> UInt64 {
        var b = levelBaseBytes
        for _ in 1..<max(level, 1) { b = b.multipliedReportingOverflow(by: 10).overflow ? .max : b * 10 }
        return b
    }
}

/// One compaction to perform: `inputs` of `level` merged with `overlaps` of `outputLevel`.
public struct CompactionPlan: Sendable, Hashable {
    public var level: Int
    public var outputLevel: Int
    public var inputs: [TableMeta]
    public var overlaps: [TableMeta]
    /// No overlap below and nothing to drop: only the manifest changes (the file moves down a level).
    public var isTrivialMove: Bool { inputs.count == 1 && overlaps.isEmpty && level != outputLevel && level > 0 }
    public var all: [TableMeta] { inputs + overlaps }
}

extension CompactionPolicy {
    /// The most urgent compaction for `version`, or nil. Order: level 0 past its trigger; the
    /// level furthest over its size target; a table still holding data a range tombstone hides.
    /// `pointers`: per level, the last key compacted (round-robin through a level's key space).
    public func pick(_ version: Version, pointers: [Int: [UInt8]] = [:]) -> CompactionPlan? {
        let l0 = version.tables[0] ?? []
        var best: (score: Double, level: Int)?
        if l0.count >= level0Trigger { best = (Double(l0.count) / Double(level0Trigger), 0) }
        for level in 1..<(Self.levels - 1) {
            let size = (version.tables[level] ?? []).totalSize
            let score = Double(size) / Double(maxBytes(level: level))
            if score >= 1, score > best?.score ?? 0 { best = (score, level) }
        }
        if let (_, level) = best {
            let tables = version.tables[level] ?? []
            let inputs: [TableMeta]
            if level == 0 {
                inputs = tables
            } else {
                let after = pointers[level].flatMap { p in tables.first { p.isBefore($0.smallest) } }
                guard let first = after ?? tables.first else { return nil }
                inputs = [first]
            }
            return plan(version, level: level, inputs: inputs)
        }
        // A table holding entries older than a tombstone that covers part of it: rewrite it so the
        // hidden data goes and the tombstone can retire.
        for t in version.tombstones {
            for level in 0..<Self.levels {
                guard let victim = (version.tables[level] ?? []).first(where: { $0.mayHoldEntriesHidden(by: t) }) else { continue }
                let inputs = level == 0 ? (version.tables[0] ?? []) : [victim]
                var p = plan(version, level: level, inputs: inputs)
                // At the deepest populated level, rewrite in place rather than move down.
                if level > 0, p.overlaps.isEmpty, !hasData(version, below: level, overlapping: inputs) {
                    p.outputLevel = level
                }
                return p
            }
        }
        return nil
    }

    func plan(_ version: Version, level: Int, inputs: [TableMeta]) -> CompactionPlan {
        let lower = inputs.map(\.smallest).min { $0.isBefore($1) } ?? []
        let upperInclusive = inputs.map(\.largest).max { $0.isBefore($1) } ?? []
        let output = min(level + 1, Self.levels - 1)
        let overlaps = (version.tables[output] ?? []).filter {
            !$0.largest.isBefore(lower) && !upperInclusive.isBefore($0.smallest)
        }
        return CompactionPlan(level: level, outputLevel: output, inputs: inputs, overlaps: overlaps)
    }

    func hasData(_ version: Version, below level: Int, overlapping tables: [TableMeta]) -> Bool {
        for deeper in (level + 1)..<Self.levels {
            for t in version.tables[deeper] ?? [] {
                if tables.contains(where: { !$0.largest.isBefore(t.smallest) && !t.largest.isBefore($0.smallest) }) {
                    return true
                }
            }
        }
        return false
    }
}

/// Keeps background writing under `bytesPerSecond` (config `compaction_bytes_per_second`; 0 means
/// unlimited) by sleeping the calling (background) thread once it runs ahead of its budget.
struct RateLimiter {
    let bytesPerSecond: UInt64
    private var start = DispatchTime.now().uptimeNanoseconds
    private var bytes: UInt64 = 0
    private(set) var sleptNanoseconds: UInt64 = 0

    init(bytesPerSecond: UInt64) { self.bytesPerSecond = bytesPerSecond }

    mutating func spent(_ n: UInt64) {
        guard bytesPerSecond > 0 else { return }
        bytes += n
        let due = bytes.multipliedReportingOverflow(by: 1_000_000_000).partialValue / bytesPerSecond
        let elapsed = DispatchTime.now().uptimeNanoseconds - start
        if due > elapsed {
            let wait = min(due - elapsed, 1_000_000_000)
            sleptNanoseconds += wait
            usleep(UInt32(wait / 1000))
        }
    }
}

/// A wake-up flag a background loop waits on: `notify` sets it (waking the waiter if any),
/// `wait` returns at once if it is set and clears it. One waiter at a time. Thread-safe.
final class WakeSignal: Sendable {
    struct State {
        var pending = false
        var waiter: CheckedContinuation<Void, Never>?
    }
    private let state = Mutex(State())

    func notify() {
        let c: CheckedContinuation<Void, Never>? = state.withLock { s in
            if let w = s.waiter {
                s.waiter = nil
                return w
            }
            s.pending = true
            return nil
        }
        c?.resume()
    }

    func wait() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now: Bool = state.withLock { s in
                if s.pending {
                    s.pending = false
                    return true
                }
                s.waiter = c
                return false
            }
            if now { c.resume() }
        }
    }
}

/// Wakes every waiting writer when background work changes the write limits (a flush finished,
/// level 0 shrank, the database closed). A generation counter closes the race between a writer's
/// check and its wait: `wait(after:)` returns at once if a notify came since `current` was read.
/// Thread-safe.
final class Broadcast: Sendable {
    private let state = Mutex<(generation: UInt64, waiters: [CheckedContinuation<Void, Never>])>((0, []))

    var current: UInt64 { state.withLock { $0.generation } }

    /// Returns once `notifyAll` has run after generation `seen`.
    func wait(after seen: UInt64) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = state.withLock { s in
                if s.generation != seen { return true }
                s.waiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    func notifyAll() {
        let all = state.withLock { s in
            s.generation &+= 1
            defer { s.waiters = [] }
            return s.waiters
        }
        for c in all { c.resume() }
    }
}
