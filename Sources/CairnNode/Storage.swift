public import CairnCore
public import CairnStorage

/// The seam between vnodes and the bytes on disk. One store per node; keys are grouped by
/// partition, so a partition's data is one contiguous range in key order (bytewise).
///
/// Isolation:
/// - Point calls (`get`, `getDurable`, `lastApplied`, `apply`, `apply(partition:batch:)`, `delete`) are
///   synchronous and may block on disk. Call them on `executor(for: partition)`: the vnode of
///   `partition` is an actor on that executor, so they run there, never on the cooperative pool.
///   A store whose point calls never block (the memory store) names no executor: call them from
///   anywhere. Other callers move there with `onExecutor(of:_:)`.
/// - Partition-wide calls (`fold`, `count`, `drop`) and the lifecycle are async; a store whose
///   engine blocks runs them on an executor of its own.
///
/// Contract:
/// - `apply` and `apply(partition:batch:)` make their writes visible to later `get`s before
///   they return and never suspend, so a caller on the partition's executor that reads and then
///   writes is atomic against every other caller there (a vnode's read-modify-write);
/// - a batch writes several keys of one partition all or nothing (one log record); a key given
///   twice takes its last value;
/// - `getDurable` sees only writes that are as durable as the sync mode promises (under
///   `always`: synced); what it returns can never be lost by a power cut;
/// - `waitDurable(token)` returns once that write is as durable as the store's sync mode
///   promises, and throws if it never will be; a vnode acknowledges a write only after it
///   returns; `waitDurable(lastApplied)` covers every write applied so far;
/// - `fold` visits the partition's keys in key order from one snapshot: writes applied while it
///   runs are not seen, and nothing it visits is torn by a batch; a fold resumed after a key
///   reads a newer snapshot;
/// - `drop` removes every key of the partition written before it (one range deletion), durably
///   when it returns; its caller stops the partition's vnode first;
/// - `StorageError.corruption` from a read is a data error for the keys it covers; any other
///   thrown error means the store cannot be trusted: the vnode fails and is restarted by its
///   supervisor.
/// Implementations are thread-safe.
public protocol PartitionStore: Sendable {
    /// The serial executor that point calls for `partition` run on (nil: they never block; any
    /// caller may make them). The same partition always gets the same executor.
    func executor(for partition: PartitionID) -> (any SerialExecutor)?
    /// The key's newest value (durable or not).
    func get(partition: PartitionID, key: [UInt8]) throws -> [UInt8]?
    /// The newest durable value of the key (see the contract above).
    func getDurable(partition: PartitionID, key: [UInt8]) throws -> [UInt8]?
    /// `getDurable` answered without blocking on I/O, from any thread (an event loop's), or
    /// `.needsDisk`: then call `getDurable` on the partition's executor. Any error also answers
    /// `.needsDisk`, for `getDurable` to report. Default: always `.needsDisk`.
    func getDurableInMemory(partition: PartitionID, key: [UInt8]) -> InMemoryRead
    /// A token covering every write applied so far.
    var lastApplied: DurabilityToken { get }
    func apply(partition: PartitionID, key: [UInt8], value: [UInt8]) throws -> DurabilityToken
    /// Writes every pair atomically (one log record); an empty batch writes nothing and returns
    /// `lastApplied`.
    func apply(partition: PartitionID, batch: [(key: [UInt8], value: [UInt8])]) throws -> DurabilityToken
    /// Removes these keys of `partition` atomically (one log record); absent keys are ignored.
    func delete(partition: PartitionID, keys: [[UInt8]]) throws -> DurabilityToken
    func waitDurable(_ token: DurabilityToken) async throws
    /// `waitDurable` for callers that must not suspend: `done` gets nil once `token` is durable,
    /// else the error; exactly once, on whichever thread ends the wait (the caller's when it
    /// already is).
    func whenDurable(_ token: DurabilityToken, _ done: @escaping @Sendable ((any Error)?) -> Void)
    /// Visits, in key order, every key of `partition` after `after` (nil: from the first) with
    /// its value, from one snapshot, until `visit` returns `.stop`. `visit` runs on the store's
    /// executor: it must be short and must not wait for the store's other work. Returns the
    /// accumulator and where to resume (the last key visited when stopped early, nil when the
    /// partition ended).
    func fold<Accumulator: Sendable>(partition: PartitionID, after: [UInt8]?, into initial: Accumulator,
                                     _ visit: @Sendable (inout Accumulator, _ key: [UInt8], _ value: [UInt8]) throws -> FoldStep)
        async throws -> PartitionFold<Accumulator>
    /// Number of keys stored for `partition` (a fold: for metrics and tests).
    func count(partition: PartitionID) async throws -> Int
    /// Drops every key of `partition` (a vnode handed off): one range deletion, durable on return.
    func drop(partition: PartitionID) async throws
    func close() async throws
    /// Stops without syncing or marking anything clean, as a crashed process leaves it.
    func abandon() async
    /// Whether data survives a restart.
    var isPersistent: Bool { get }
    /// The node's actor epoch, kept with the data (nil: not persistent; the node draws a fresh
    /// epoch at every start, so it never reuses a dot).
    var persistentEpoch: UInt64? { get }
    /// The engine's counters, for `/metrics` (nil when the store has none).
    var storageStatistics: Database.Statistics? { get }
    /// Whether `waitDurable` returning means the write is on stable storage (a synced log): what
    /// a replica's acknowledgement reports as `durable`.
    var acknowledgesDurably: Bool { get }
    /// A snapshot of `partition` as of this call (taken before it returns, so a caller on the
    /// partition's executor knows exactly which writes it holds). Its pages read that snapshot.
    func snapshot(partition: PartitionID) throws -> PartitionSnapshot
    /// A node metadata value (small; nil: unset). Names are the store's own, not keys of any
    /// partition.
    func metadata(_ name: String) throws -> [UInt8]?
    /// Sets (nil: removes) metadata values, synced before returning, whatever the sync mode.
    func setMetadata(_ values: [(name: String, value: [UInt8]?)]) async throws
    /// Sets a metadata value as a point call (`apply`): ordered with the partitions' writes, so
    /// a write applied after it is never durable without it.
    func applyMetadata(_ name: String, _ value: [UInt8]) throws -> DurabilityToken
    /// Replaces the store's side file `name` (beside its data, not in it) with `bytes`,
    /// atomically and synced: state saved at a clean shutdown for the next start.
    func saveSideFile(_ name: String, _ bytes: [UInt8]) async throws
    /// Reads side file `name` and removes it (nil: none), so whatever a later run finds was
    /// written by the run before it.
    func takeSideFile(_ name: String) async throws -> [UInt8]?
    /// The store was created by this run: its directory held no data of an earlier one (a new
    /// node, or one whose disk was replaced or wiped).
    var createdFresh: Bool { get }
    /// The previous run of this store shut down cleanly (what it saved at close is current).
    var openedAfterCleanShutdown: Bool { get }
    /// The store held no data when it opened (a new store, or one that keeps nothing across
    /// restarts): every partition's anti-entropy tree starts empty, with nothing to build.
    var openedEmpty: Bool { get }
    /// As `fold`, but a stretch of storage that cannot be read (a block that fails its checksum)
    /// is passed over instead of failing the fold: its keys are left out, exactly as a point read
    /// (`get`) cannot answer them. The damage is reported by `damagedTables()`.
    func foldReadable<Accumulator: Sendable>(partition: PartitionID, after: [UInt8]?, into initial: Accumulator,
                                             _ visit: @Sendable (inout Accumulator, _ key: [UInt8], _ value: [UInt8]) throws -> FoldStep)
        async throws -> PartitionFold<Accumulator>
    /// As `foldReadable`, with the store sequence each pair was written at (`lastApplied` order:
    /// a pair at or below a `lastApplied` taken earlier was already there then).
    func foldVersions<Accumulator: Sendable>(partition: PartitionID, after: [UInt8]?, into initial: Accumulator,
                                             _ visit: @Sendable (inout Accumulator, _ key: [UInt8], _ value: [UInt8], _ sequence: UInt64) throws -> FoldStep)
        async throws -> PartitionFold<Accumulator>
    /// Tables of the store known to be damaged, with the partitions their key ranges cover.
    func damagedTables() -> [StoreDamage]
    /// Sets damaged table `table` aside (out of compaction; its readable blocks still serve).
    /// Returns false if it was already set aside or is gone.
    func quarantine(table: UInt64) async throws -> Bool
    /// The store's tables and their sizes, for verification (`verify(table:)`); empty for a
    /// store without any.
    func tables() -> [(table: UInt64, bytes: UInt64)]
    /// Reads table `table` through and checks every block, recording damage (`damagedTables()`).
    /// Returns the bytes read and the number of damaged blocks (or tables) found.
    func verify(table: UInt64) async throws -> (bytes: Int, damaged: Int)
}

/// A damaged table and what it covers (`PartitionStore.damagedTables`).
public struct StoreDamage: Sendable, Hashable {
    /// The table's file number (the name of `NNNNNN.sst`).
    public var table: UInt64
    /// The ring partitions (primary copies) whose keys lie in the table's key range, as an
    /// inclusive range of indexes; nil when it holds none (only fallback copies, hints or
    /// metadata). The caller clamps it to its ring.
    public var partitions: ClosedRange<UInt32>?
    /// Whether the table is already set aside.
    public var quarantined: Bool
    /// The table's size on disk.
    public var bytes: UInt64

    public init(table: UInt64, partitions: ClosedRange<UInt32>?, quarantined: Bool, bytes: UInt64) {
        self.table = table
        self.partitions = partitions
        self.quarantined = quarantined
        self.bytes = bytes
    }
}

/// A partition's keys as of one moment, read page by page (`PartitionStore.snapshot`). Holding it
/// keeps the engine from dropping what it references: read it through, then let it go.
public struct PartitionSnapshot: Sendable {
    /// Up to `limit` pairs after `after` (nil: from the first), in key order; fewer than `limit`
    /// only at the partition's end.
    public let page: @Sendable (_ after: [UInt8]?, _ limit: Int) async throws -> [(key: [UInt8], value: [UInt8])]

    public init(page: @escaping @Sendable (_ after: [UInt8]?, _ limit: Int) async throws -> [(key: [UInt8], value: [UInt8])]) {
        self.page = page
    }

    /// A snapshot of sorted pairs held in memory.
    public init(sorted entries: [(key: [UInt8], value: [UInt8])]) {
        self.page = { after, limit in
            let start = after.map { a in entries.firstIndex { a.lexicographicallyPrecedes($0.key) } ?? entries.endIndex } ?? entries.startIndex
            return Array(entries[start..<min(entries.endIndex, start + max(limit, 1))])
        }
    }
}

extension PartitionStore {
    /// In a task that awaits `waitDurable`.
    public func whenDurable(_ token: DurabilityToken, _ done: @escaping @Sendable ((any Error)?) -> Void) {
        Task {
            do { try await waitDurable(token) } catch { return done(error) }
            done(nil)
        }
    }

    public func abandon() async {}
    public func getDurableInMemory(partition: PartitionID, key: [UInt8]) -> InMemoryRead { .needsDisk }

    /// Whether `partition` holds a key storage can read: a fold that stops at the first.
    public func holdsAnyKey(partition: PartitionID) async throws -> Bool {
        try await foldReadable(partition: partition, after: nil, into: false) { found, _, _ in
            found = true
            return .stop
        }.accumulator
    }

    public var persistentEpoch: UInt64? { nil }
    public var storageStatistics: Database.Statistics? { nil }
    public var acknowledgesDurably: Bool { false }
    public var createdFresh: Bool { false }
    public var openedAfterCleanShutdown: Bool { false }
    public var openedEmpty: Bool { false }

    /// A store without damage detection reads as `fold` does.
    public func foldReadable<Accumulator: Sendable>(partition: PartitionID, after: [UInt8]?, into initial: Accumulator,
                                                    _ visit: @Sendable (inout Accumulator, _ key: [UInt8], _ value: [UInt8]) throws -> FoldStep)
        async throws -> PartitionFold<Accumulator> {
        try await fold(partition: partition, after: after, into: initial, visit)
    }
    public func damagedTables() -> [StoreDamage] { [] }
    /// A store that keeps no sequences reports every pair as written just now (`UInt64.max`):
    /// nothing is ever known to predate anything.
    public func foldVersions<Accumulator: Sendable>(partition: PartitionID, after: [UInt8]?, into initial: Accumulator,
                                                    _ visit: @Sendable (inout Accumulator, _ key: [UInt8], _ value: [UInt8], _ sequence: UInt64) throws -> FoldStep)
        async throws -> PartitionFold<Accumulator> {
        try await foldReadable(partition: partition, after: after, into: initial) { acc, key, value in try visit(&acc, key, value, .max) }
    }
    /// A store that keeps nothing across restarts needs no record.
    public func applyMetadata(_ name: String, _ value: [UInt8]) throws -> DurabilityToken { lastApplied }
    public func quarantine(table: UInt64) async throws -> Bool { false }
    public func tables() -> [(table: UInt64, bytes: UInt64)] { [] }
    public func verify(table: UInt64) async throws -> (bytes: Int, damaged: Int) { (0, 0) }

    /// A store without snapshots of its own (test doubles): the partition's pairs read at once.
    public func snapshot(partition: PartitionID) throws -> PartitionSnapshot {
        throw StorageError.invalidArgument("this store takes no snapshots")
    }

    public func metadata(_ name: String) throws -> [UInt8]? { nil }
    public func setMetadata(_ values: [(name: String, value: [UInt8]?)]) async throws {}
    public func saveSideFile(_ name: String, _ bytes: [UInt8]) async throws {}
    public func takeSideFile(_ name: String) async throws -> [UInt8]? { nil }

    /// Runs `body` where `partition`'s point calls belong: on `executor(for: partition)` (one hop
    /// there, one back), or inline when the store names none. For callers other than the
    /// partition's vnode (health probes, tools, tests).
    public func onExecutor<T: Sendable>(of partition: PartitionID, _ body: @Sendable () throws -> T) async throws -> T {
        guard let executor = executor(for: partition) else { return try body() }
        return try await ExecutorLane(executor).run(body)
    }
}

/// Whether a fold goes on after the key just visited.
public enum FoldStep: Sendable, Hashable {
    case `continue`
    /// The key just visited is the last one: the fold returns it as `resumeAfter`.
    case stop
}

/// What a fold ends with: the accumulator, and the key to pass as `after` to go on (nil: the
/// partition has no keys after those visited).
public struct PartitionFold<Accumulator> {
    public var accumulator: Accumulator
    public var resumeAfter: [UInt8]?

    public init(accumulator: Accumulator, resumeAfter: [UInt8]?) {
        self.accumulator = accumulator
        self.resumeAfter = resumeAfter
    }
}

extension PartitionFold: Sendable where Accumulator: Sendable {}

/// Identifies one applied write for `waitDurable`. Opaque to vnodes.
public struct DurabilityToken: Hashable, Sendable {
    public let sequence: UInt64
    public init(sequence: UInt64) { self.sequence = sequence }
}

/// An actor with no state of its own on a given executor: `run` executes a closure there (one
/// hop there, one back). How async code moves a blocking call onto a store's executor.
actor ExecutorLane {
    private nonisolated let executor: any SerialExecutor
    nonisolated var unownedExecutor: UnownedSerialExecutor { executor.asUnownedSerialExecutor() }

    init(_ executor: any SerialExecutor) { self.executor = executor }

    func run<T: Sendable>(_ body: @Sendable () throws -> T) throws -> T { try body() }
}

/// The in-memory store: a dictionary per partition behind a lock. Point calls take the lock
/// only (no executor: they never block). Not persistent: a node using it takes a fresh actor
/// epoch on every start. For tests and `storage.backend = memory`.
///
/// A fold copies the partition's keys after `after` under the lock (its snapshot) and sorts
/// them: O(n log n) per call, fine for the sizes this store serves.
public final class MemoryBackend: PartitionStore {
    /// A stored value and the sequence of the write that stored it.
    private struct Stored {
        var value: [UInt8]
        var sequence: UInt64
    }

    private struct State {
        var partitions: [PartitionID: [[UInt8]: Stored]] = [:]
        var metadata: [String: [UInt8]] = [:]
        var sequence: UInt64 = 0
    }

    private let state = Locked(State())

    public init() {}

    public var isPersistent: Bool { false }
    /// Nothing survives a restart: every start is empty.
    public var openedEmpty: Bool { true }

    public func executor(for partition: PartitionID) -> (any SerialExecutor)? { nil }

    public func get(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? {
        state.withLock { $0.partitions[partition]?[key]?.value }
    }

    /// Nothing here survives a restart, so everything applied is as durable as it gets.
    public func getDurable(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? {
        try get(partition: partition, key: key)
    }

    /// Everything here is in memory: always answered.
    public func getDurableInMemory(partition: PartitionID, key: [UInt8]) -> InMemoryRead {
        .answered(state.withLock { $0.partitions[partition]?[key]?.value })
    }

    public var lastApplied: DurabilityToken { DurabilityToken(sequence: state.withLock { $0.sequence }) }

    public func apply(partition: PartitionID, key: [UInt8], value: [UInt8]) throws -> DurabilityToken {
        try apply(partition: partition, batch: [(key, value)])
    }

    public func apply(partition: PartitionID, batch: [(key: [UInt8], value: [UInt8])]) throws -> DurabilityToken {
        state.withLock { s in
            guard !batch.isEmpty else { return DurabilityToken(sequence: s.sequence) }
            s.sequence &+= 1
            for (key, value) in batch { s.partitions[partition, default: [:]][key] = Stored(value: value, sequence: s.sequence) }
            return DurabilityToken(sequence: s.sequence)
        }
    }

    public func delete(partition: PartitionID, keys: [[UInt8]]) throws -> DurabilityToken {
        state.withLock { s in
            guard !keys.isEmpty else { return DurabilityToken(sequence: s.sequence) }
            for key in keys { s.partitions[partition]?[key] = nil }
            s.sequence &+= 1
            return DurabilityToken(sequence: s.sequence)
        }
    }

    public func applyMetadata(_ name: String, _ value: [UInt8]) throws -> DurabilityToken {
        state.withLock { s in
            s.metadata[name] = value
            s.sequence &+= 1
            return DurabilityToken(sequence: s.sequence)
        }
    }

    public func waitDurable(_ token: DurabilityToken) async throws {}

    /// Copies and sorts the partition under the lock: O(n log n).
    public func snapshot(partition: PartitionID) throws -> PartitionSnapshot {
        PartitionSnapshot(sorted: sorted(partition, after: nil).map { (key: $0.key, value: $0.value.value) })
    }

    public func metadata(_ name: String) throws -> [UInt8]? { state.withLock { $0.metadata[name] } }

    public func setMetadata(_ values: [(name: String, value: [UInt8]?)]) async throws {
        state.withLock { s in for (name, value) in values { s.metadata[name] = value } }
    }

    /// The partition's pairs after `after`, copied under the lock and sorted.
    private func sorted(_ partition: PartitionID, after: [UInt8]?) -> [(key: [UInt8], value: Stored)] {
        state.withLock { s in
            (s.partitions[partition] ?? [:]).filter { after?.lexicographicallyPrecedes($0.key) ?? true }
        }.sorted { $0.key.lexicographicallyPrecedes($1.key) }.map { ($0.key, $0.value) }
    }

    public func fold<Accumulator: Sendable>(partition: PartitionID, after: [UInt8]?, into initial: Accumulator,
                                            _ visit: @Sendable (inout Accumulator, _ key: [UInt8], _ value: [UInt8]) throws -> FoldStep)
        async throws -> PartitionFold<Accumulator> {
        try await foldVersions(partition: partition, after: after, into: initial) { acc, key, value, _ in try visit(&acc, key, value) }
    }

    public func foldVersions<Accumulator: Sendable>(partition: PartitionID, after: [UInt8]?, into initial: Accumulator,
                                                    _ visit: @Sendable (inout Accumulator, _ key: [UInt8], _ value: [UInt8], _ sequence: UInt64) throws -> FoldStep)
        async throws -> PartitionFold<Accumulator> {
        var accumulator = initial
        for (key, stored) in sorted(partition, after: after) {
            if try visit(&accumulator, key, stored.value, stored.sequence) == .stop { return PartitionFold(accumulator: accumulator, resumeAfter: key) }
        }
        return PartitionFold(accumulator: accumulator, resumeAfter: nil)
    }

    public func count(partition: PartitionID) async throws -> Int {
        state.withLock { $0.partitions[partition]?.count ?? 0 }
    }

    public func drop(partition: PartitionID) async throws {
        state.withLock { s in
            s.partitions[partition] = nil
            s.sequence &+= 1
        }
    }

    public func close() async throws {}
}
