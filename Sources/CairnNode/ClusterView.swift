import CairnCore
import CairnRing
import CairnWire

/// What this node knows of the cluster: the ring, N, and every member's address. Immutable;
/// membership changes (a later capability: gossip) replace it as a whole.
struct ClusterView: Sendable {
    let me: NodeName
    let clusterName: String
    let ring: Ring
    let n: Int
    let addresses: [NodeName: HostPort]

    init(config: NodeConfig, members: [MemberAddress]) throws {
        me = config.name
        clusterName = config.clusterName
        ring = try Ring(partitionCount: config.ringSize, members: members.map(\.name))
        n = min(config.nVal, members.count)
        addresses = Dictionary(uniqueKeysWithValues: members.map { ($0.name, $0.address) })
    }

    var hello: Hello { Hello(cluster: clusterName, node: me.value, ringFingerprint: ring.fingerprint, nVal: n) }

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
