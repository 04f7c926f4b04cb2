public import CairnCore
public import CairnStorage

/// The seam between vnodes and the bytes on disk. One backend per node; keys are grouped by
/// partition so a vnode's data is one contiguous range.
///
/// Contract:
/// - `apply` makes a write visible to subsequent `get`s before it returns (it never suspends, so
///   a vnode's read-modify-write is atomic within the vnode actor);
/// - `getDurable` sees only writes that are as durable as the sync mode promises (under
///   `always`: synced); what it returns can never be lost by a power cut;
/// - `waitDurable(token)` returns once that write is as durable as the backend's sync mode
///   promises, and throws if it never will be; a vnode acknowledges a write only after it returns;
///   `waitDurable(lastApplied)` covers every write applied so far;
/// - `StorageError.corruption` from a read is a data error for the keys it covers; any other
///   thrown error means the backend cannot be trusted: the vnode fails and is restarted by its
///   supervisor.
/// Implementations must be thread-safe.
public protocol StorageBackend: Sendable {
    func get(partition: PartitionID, key: [UInt8]) throws -> [UInt8]?
    /// The newest durable value of the key (see the contract above).
    func getDurable(partition: PartitionID, key: [UInt8]) throws -> [UInt8]?
    /// A token covering every write applied so far.
    var lastApplied: DurabilityToken { get }
    func apply(partition: PartitionID, key: [UInt8], value: [UInt8]) throws -> DurabilityToken
    func waitDurable(_ token: DurabilityToken) async throws
    /// Number of keys stored for `partition` (for metrics and tests).
    func count(partition: PartitionID) throws -> Int
    func close() async throws
    /// Stops without syncing or marking anything clean, as a crashed process leaves it.
    func abandon() async
    /// Whether data survives a restart.
    var isPersistent: Bool { get }
    /// The node's actor epoch, kept with the data (nil: not persistent; the node draws a fresh
    /// epoch at every start, so it never reuses a dot).
    var persistentEpoch: UInt64? { get }
    /// The engine's counters, for `/metrics` (nil when the backend has none).
    var storageStatistics: Database.Statistics? { get }
}

extension StorageBackend {
    public func abandon() async {}
    public var persistentEpoch: UInt64? { nil }
    public var storageStatistics: Database.Statistics? { nil }
}

/// Identifies one applied write for `waitDurable`. Opaque to vnodes.
public struct DurabilityToken: Hashable, Sendable {
    public let sequence: UInt64
    public init(sequence: UInt64) { self.sequence = sequence }
}

/// The in-memory backend: a dictionary per partition behind a lock. Not persistent: a node using
/// it takes a fresh actor epoch on every start. For tests and `storage.backend = memory`.
public final class MemoryBackend: StorageBackend {
    private struct State {
        var partitions: [PartitionID: [[UInt8]: [UInt8]]] = [:]
        var sequence: UInt64 = 0
    }

    private let state = Locked(State())

    public init() {}

    public var isPersistent: Bool { false }

    public func get(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? {
        state.withLock { $0.partitions[partition]?[key] }
    }

    /// Nothing here survives a restart, so everything applied is as durable as it gets.
    public func getDurable(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? {
        try get(partition: partition, key: key)
    }

    public var lastApplied: DurabilityToken { DurabilityToken(sequence: state.withLock { $0.sequence }) }

    public func apply(partition: PartitionID, key: [UInt8], value: [UInt8]) throws -> DurabilityToken {
        state.withLock { s in
            s.partitions[partition, default: [:]][key] = value
            s.sequence &+= 1
            return DurabilityToken(sequence: s.sequence)
        }
    }

    public func waitDurable(_ token: DurabilityToken) async throws {}

    public func count(partition: PartitionID) throws -> Int {
        state.withLock { $0.partitions[partition]?.count ?? 0 }
    }

    public func close() async throws {}
}
