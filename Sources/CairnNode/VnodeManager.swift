public import CairnCore
import CairnRing
import Logging

/// Why a vnode runs on this node: it is one of the partition's N replicas (`primary`; also while
/// a transfer copies the partition into it), or it holds writes sloppy quorum gave it for
/// primaries that were down (`fallback`), until it hands them to the partition's primaries.
/// The two keep their data apart (`PartitionID.fallbackSpace`).
public enum VnodeRole: Hashable, Sendable, Comparable {
    case primary
    case fallback
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

    /// The storage partition holding this vnode's data.
    public var space: PartitionID { role == .primary ? partition : partition.fallbackSpace }

    /// Also the vnode's child id under the vnode supervisor.
    public var description: String {
        switch role {
        case .primary: "vnode-\(partition.index)"
        case .fallback: "fallback-\(partition.index)"
        }
    }
}

/// The pure half of the vnode manager: which vnodes a view asks this node to run, and what to
/// do to get from the running set to that one.
///
/// A vnode the view no longer assigns is retired: it stops serving; its data stays on disk until
/// the handoff manager has handed it on (the plan's transfer, or a leftover copy) and drops it.
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

    /// The vnodes to run: what `view` asks for, and a fallback vnode for each partition in
    /// `fallbacks` (those holding sloppy-quorum writes not yet handed to their primaries).
    static func desired(by view: ClusterView, fallbacks: Set<PartitionID>) -> Set<VnodeKey> {
        desired(by: view).union(fallbacks.map { VnodeKey(partition: $0, role: .fallback) })
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
    /// Partitions whose fallback vnode runs here (started by a sloppy-quorum write, or found
    /// holding data at start), until its handoff retires it. Guarded by `applied`'s lock too:
    /// every change to the running set happens under that one lock.
    private let fallbacks = Locked<Set<PartitionID>>([])
    /// Lists the partitions whose fallback copy holds data (at start).
    private let probeFallbacks: @Sendable () async -> [PartitionID]
    private let metrics: NodeMetrics?

    init(table: VnodeTable, supervisor: Supervisor, views: ClusterViews, logger: Logger, metrics: NodeMetrics? = nil,
         probeFallbacks: @escaping @Sendable () async -> [PartitionID] = { [] }, make: @escaping @Sendable (VnodeKey) -> Vnode) {
        self.probeFallbacks = probeFallbacks
        self.metrics = metrics
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
            let plan = VnodePlan.reconcile(running: table.keys, desired: VnodePlan.desired(by: view, fallbacks: fallbacks.value))
            for d in plan {
                switch d {
                case .start(let key):
                    let v = make(key)
                    table.insert(v)
                    supervisor.spawn(v)
                case .retire(let key):
                    table.remove(key)
                    supervisor.terminate(key.description)
                    guard key.role == .primary else { continue }
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

    /// This node's fallback vnode of `p`, started (under the vnode supervisor) if none runs.
    func ensureFallback(_ p: PartitionID) -> Vnode {
        applied.withLock { _ in
            if let v = table.fallback(for: p) { return v }
            fallbacks.withLock { _ = $0.insert(p) }
            let v = make(VnodeKey(partition: p, role: .fallback))
            table.insert(v)
            supervisor.spawn(v)
            metrics?.fallbackVnodes.record(fallbacks.value.count)
            logger.info("fallback vnode started", metadata: ["partition": "\(p.index)"])
            return v
        }
    }

    /// Stops this node's fallback vnode of `p` (its copy was handed to the primaries): out of
    /// the table, then refusing requests; returns once a write already inside it is applied.
    func retireFallback(_ p: PartitionID) async {
        let retired: Vnode? = applied.withLock { _ in
            fallbacks.withLock { _ = $0.remove(p) }
            let key = VnodeKey(partition: p, role: .fallback)
            guard let v = table.remove(key) else { return nil }
            supervisor.terminate(key.description)
            metrics?.fallbackVnodes.record(fallbacks.value.count)
            return v
        }
        await retired?.stopServing()
    }

    /// Starts a fallback vnode for every partition whose fallback copy holds data (a restart
    /// keeps them, to be handed off), then follows the views until cancelled.
    func run() async throws {
        for p in await probeFallbacks() { _ = ensureFallback(p) }
        for await view in views.updates() {
            apply(view)
        }
    }
}
