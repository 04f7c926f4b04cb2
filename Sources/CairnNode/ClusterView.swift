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

    init(state: RingState?, me: NodeName, clusterName: String, version: UInt64) {
        self.version = version
        self.me = me
        self.clusterName = state?.cluster ?? clusterName
        self.state = state
        addresses = Dictionary(state?.members.map { ($0.name, $0.address) } ?? [], uniquingKeysWith: { a, _ in a })
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
        guard let state else { return (PartitionID(0), []) }
        let (p, primaries) = placement(forKey: key)
        let fallbacks = state.fallbacks(of: p, count: state.nVal).map {
            ReplicaTarget(node: $0, address: address($0), isPrimary: false, isLocal: $0 == me)
        }
        return (p, primaries + fallbacks)
    }

    /// The key's partition and its replicas in preference-list order (none before joining).
    func placement(forKey key: [UInt8]) -> (PartitionID, [ReplicaTarget]) {
        guard let state else { return (PartitionID(0), []) }
        let p = state.partition(forKey: key)
        let targets = state.replicas(of: p).map {
            ReplicaTarget(node: $0, address: address($0), isPrimary: true, isLocal: $0 == me)
        }
        return (p, targets)
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
