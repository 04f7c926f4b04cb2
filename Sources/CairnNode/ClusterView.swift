import CairnCore
import CairnRing
import CairnWire

/// What this node knows of the cluster: the ring, N, and every member's address, at one
/// `version`. Immutable; a membership change publishes a new view with a higher version
/// (`ClusterViews`).
struct ClusterView: Sendable {
    let version: UInt64
    let me: NodeName
    let clusterName: String
    let ring: Ring
    let n: Int
    let addresses: [NodeName: HostPort]

    init(config: NodeConfig, members: [MemberAddress], version: UInt64 = 1) throws {
        self.version = version
        me = config.name
        clusterName = config.clusterName
        ring = try Ring(partitionCount: config.ringSize, members: members.map(\.name))
        n = min(config.nVal, members.count)
        addresses = Dictionary(uniqueKeysWithValues: members.map { ($0.name, $0.address) })
    }

    func address(_ node: NodeName) -> String { addresses[node]?.description ?? node.value }

    /// The key's partition and its primaries in preference-list order.
    func placement(forKey key: [UInt8]) -> (PartitionID, [ReplicaTarget]) {
        let p = ring.partition(forKey: key)
        let targets = ring.preferenceList(for: p, n: n).map {
            ReplicaTarget(node: $0, address: address($0), isPrimary: true, isLocal: $0 == me)
        }
        return (p, targets)
    }
}

/// The node's cluster view as a versioned value that changes over time: coordinators read
/// `current` (once per request, so one request sees one view), and the vnode manager and the
/// socket transport follow `updates()`. Today the only source is the static member list of the
/// config, published once at start; gossip (issue 12) publishes later versions.
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
            for c in s.subscribers.values { c.yield(view) }
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
