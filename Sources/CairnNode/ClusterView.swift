import CairnCore
import CairnRing
import CairnWire

/// What this node knows of the cluster at one local `version`: the gossiped `RingState` (nil
/// while the node has not joined a cluster) and every member's address. Immutable; a newer state
/// publishes a new view with a higher version (`ClusterViews`). A class: every request takes
/// the current view, and a reference is one retain.
final class ClusterView: Sendable {
    /// This node's publish sequence (grows with every view it publishes; not the ring's version,
    /// which is `state.version`).
    let version: UInt64
    let me: NodeName
    let clusterName: String
    let state: RingState?
    let addresses: [NodeName: HostPort]
    /// Every partition's `Placement`, by index, for rings of at most `precomputedPartitions`
    /// partitions (nil above: computed per request). Shared by every request that takes this view.
    private let placements: [Placement]?

    /// Rings up to this many partitions have their placements computed once per view.
    static let precomputedPartitions = 4096

    /// Where a partition's copies live under this view.
    struct Placement: Sendable {
        let partition: PartitionID
        /// In preference-list order.
        let primaries: [ReplicaTarget]
        /// `primaries`, then up to N fallback candidates in ring order.
        let candidates: [ReplicaTarget]
    }

    init(state: RingState?, me: NodeName, clusterName: String, version: UInt64) {
        self.version = version
        self.me = me
        self.clusterName = state?.cluster ?? clusterName
        self.state = state
        let addresses = Dictionary(state?.members.map { ($0.name, $0.address) } ?? [], uniquingKeysWith: { a, _ in a })
        self.addresses = addresses
        if let state, state.ring.partitionCount <= Self.precomputedPartitions {
            placements = state.ring.partitions.map { Self.computePlacement($0, state, me, addresses) }
        } else {
            placements = nil
        }
    }

    private static func computePlacement(_ p: PartitionID, _ state: RingState, _ me: NodeName, _ addresses: [NodeName: HostPort]) -> Placement {
        func target(_ n: NodeName, primary: Bool) -> ReplicaTarget {
            ReplicaTarget(node: n, address: addresses[n]?.description ?? n.value, isPrimary: primary, isLocal: n == me)
        }
        let primaries = state.replicas(of: p).map { target($0, primary: true) }
        return Placement(partition: p, primaries: primaries,
                         candidates: primaries + state.fallbacks(of: p, count: state.nVal).map { target($0, primary: false) })
    }

    /// A view of a cluster bootstrapped from `members` (`cluster.members`, tests).
    convenience init(config: NodeConfig, members: [MemberAddress], version: UInt64 = 1) throws {
        let state = try RingState.bootstrap(cluster: config.clusterName, partitionCount: config.ringSize, nVal: config.nVal,
                                            members: members.map { ($0.name, $0.address) })
        self.init(state: state, me: config.name, clusterName: config.clusterName, version: version)
    }

    /// Whether this node is in the cluster's member list (it may serve requests).
    var isMember: Bool { state?.member(me) != nil }

    func address(_ node: NodeName) -> String { addresses[node]?.description ?? node.value }

    func partition(forKey key: [UInt8]) -> PartitionID? { state?.partition(forKey: key) }

    /// The key's partition, its primaries in preference-list order, then up to N fallback
    /// candidates in ring order (the next distinct members; none before joining).
    func candidates(forKey key: [UInt8]) -> (PartitionID, [ReplicaTarget]) {
        let placement = replicas(forKey: key)
        return (placement.partition, placement.candidates)
    }

    /// The key's partition and its replicas in preference-list order (none before joining).
    func placement(forKey key: [UInt8]) -> (PartitionID, [ReplicaTarget]) {
        let placement = replicas(forKey: key)
        return (placement.partition, placement.primaries)
    }

    /// The key's `Placement` (empty before joining).
    func replicas(forKey key: [UInt8]) -> Placement {
        // Reads the state in place: binding it would copy (retain) every field of the ring state.
        guard let p = state?.partition(forKey: key) else { return Placement(partition: PartitionID(0), primaries: [], candidates: []) }
        if Int(p.index) < placements?.count ?? 0, let placement = placements?[Int(p.index)] { return placement }
        guard let state else { return Placement(partition: PartitionID(0), primaries: [], candidates: []) }
        return Self.computePlacement(p, state, me, addresses)
    }
}

/// The node's cluster view as a versioned value that changes over time: coordinators read
/// `current` (once per request, so one request sees one view), and the vnode manager and the
/// socket transport follow `updates()`. The membership agent publishes a view for every newer
/// ring state it adopts.
///
/// Invariant: versions only grow; `publish` of a version not above the current one is ignored.
/// Thread-safe.
final class ClusterViews: Sendable {
    private struct State {
        var current: ClusterView
        var subscribers: [UInt64: AsyncStream<ClusterView>.Continuation] = [:]
        var nextID: UInt64 = 0
    }
    private let state: Locked<State>

    init(_ initial: ClusterView) { state = Locked(State(current: initial)) }

    var current: ClusterView { state.withLock { $0.current } }

    /// Makes `view` current and tells every subscriber; false (and nothing changes) unless its
    /// version is above the current one.
    @discardableResult
    func publish(_ view: ClusterView) -> Bool {
        state.withLock { s in
            guard view.version > s.current.version else { return false }
            s.current = view
            // In subscription order, not hash order (a simulation replays its seed).
            for (_, c) in s.subscribers.sorted(by: { $0.key < $1.key }) { c.yield(view) }
            return true
        }
    }

    /// The current view, then every later one; a slow subscriber sees only the newest view it
    /// missed (views replace each other, nothing is lost by skipping). Ends when the caller
    /// stops iterating.
    func updates() -> AsyncStream<ClusterView> {
        let (stream, sink) = AsyncStream.makeStream(of: ClusterView.self, bufferingPolicy: .bufferingNewest(1))
        let id: UInt64 = state.withLock { s in
            defer { s.nextID += 1 }
            s.subscribers[s.nextID] = sink
            sink.yield(s.current)
            return s.nextID
        }
        sink.onTermination = { [weak self] _ in _ = self?.state.withLock { $0.subscribers.removeValue(forKey: id) } }
        return stream
    }

    /// Subscribers now (tests).
    var subscriberCount: Int { state.withLock { $0.subscribers.count } }
}
