public import CairnCore
import CairnRing
import Logging

/// Why a vnode runs on this node. Today every vnode is a primary (the node is one of the
/// partition's N owners); sloppy quorum (issue 13) adds fallbacks holding writes for a primary
/// that is down.
public enum VnodeRole: Hashable, Sendable, Comparable {
    case primary
}

/// A vnode's identity on its node: one per (partition, role).
public struct VnodeKey: Hashable, Sendable, Comparable, CustomStringConvertible {
    public let partition: PartitionID
    public let role: VnodeRole

    public init(partition: PartitionID, role: VnodeRole) {
        self.partition = partition
        self.role = role
    }

    public static func < (a: VnodeKey, b: VnodeKey) -> Bool { (a.partition, a.role) < (b.partition, b.role) }

    /// Also the vnode's child id under the vnode supervisor.
    public var description: String {
        switch role {
        case .primary: "vnode-\(partition.index)"
        }
    }
}

/// The pure half of the vnode manager: which vnodes a view asks this node to run, and what to
/// do to get from the running set to that one.
///
/// A vnode the view no longer assigns is retired: it stops serving and its data stays on disk.
/// (Moving that data to the new owners first — handoff — arrives with living membership; with
/// the static member list of today, no view ever retires a vnode.)
struct VnodePlan: Hashable, Sendable {
    enum Directive: Hashable, Sendable {
        case start(VnodeKey)
        case retire(VnodeKey)
    }

    /// The vnodes `view` asks its node to run: a primary for every partition it replicates or a
    /// pending transfer copies into it.
    static func desired(by view: ClusterView) -> Set<VnodeKey> {
        Set((view.state?.vnodePartitions(of: view.me) ?? []).map { VnodeKey(partition: $0, role: .primary) })
    }

    /// Directives taking `running` to `desired`, in key order: retirements first, then starts.
    static func reconcile(running: Set<VnodeKey>, desired: Set<VnodeKey>) -> [Directive] {
        running.subtracting(desired).sorted().map(Directive.retire) + desired.subtracting(running).sorted().map(Directive.start)
    }
}

/// Runs the vnodes each cluster view asks for: follows `ClusterViews`, starts a vnode (in the
/// table, under the vnode supervisor) for every key a view adds, retires those it drops.
///
/// Isolation: `apply` is serialized by a lock and never suspends, so the table always matches
/// the last view applied. Supervision: `run()` (following the views) is a child of the node's
/// supervisor; the vnodes are children of `supervisor`.
final class VnodeManager: SupervisedChild {
    let childName = "vnode-manager"
    let table: VnodeTable
    let supervisor: Supervisor
    private let views: ClusterViews
    private let make: @Sendable (VnodeKey) -> Vnode
    private let logger: Logger
    /// The last view applied (its version orders views; its placement tells who replaced this
    /// node for a partition it retires).
    private let applied = Locked<ClusterView?>(nil)

    init(table: VnodeTable, supervisor: Supervisor, views: ClusterViews, logger: Logger, make: @escaping @Sendable (VnodeKey) -> Vnode) {
        self.table = table
        self.supervisor = supervisor
        self.views = views
        self.logger = logger
        self.make = make
    }

    /// Brings the running vnodes to what `view` asks for (no-op for a view not newer than the
    /// last one applied). Returns the directives performed.
    @discardableResult
    func apply(_ view: ClusterView) -> [VnodePlan.Directive] {
        applied.withLock { last in
            guard view.version > last?.version ?? 0 else { return [] }
            let previous = last
            last = view
            let plan = VnodePlan.reconcile(running: table.keys, desired: VnodePlan.desired(by: view))
            for d in plan {
                switch d {
                case .start(let key):
                    let v = make(key)
                    table.insert(v)
                    supervisor.spawn(v)
                case .retire(let key):
                    table.remove(key)
                    supervisor.terminate(key.description)
                    // Coordinators still on the older ring send here for a while: name the nodes
                    // that now hold this node's copy.
                    let before = Set(previous?.state?.replicas(of: key.partition) ?? [])
                    let now = view.state?.replicas(of: key.partition) ?? []
                    table.movedAway(key.partition, to: now.filter { !before.contains($0) && $0 != view.me })
                }
            }
            if !plan.isEmpty {
                logger.info("vnodes follow the cluster view", metadata: [
                    "view_version": "\(view.version)", "started": "\(plan.count { if case .start = $0 { true } else { false } })",
                    "retired": "\(plan.count { if case .retire = $0 { true } else { false } })", "running": "\(table.count)",
                ])
            }
            return plan
        }
    }

    /// Follows the views until cancelled.
    func run() async throws {
        for await view in views.updates() {
            apply(view)
        }
    }
}
