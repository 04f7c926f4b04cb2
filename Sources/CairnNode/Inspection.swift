public import CairnCore
import CairnAntiEntropy
import CairnRing

/// What a node holds and believes about placement, for the simulator's end-of-run checks
/// (every partition on exactly its ring's owners, no stray copies, no transfer left over). Read
/// only; nothing here is on a request's path.
public struct PlacementSnapshot: Sendable {
    /// The ring state's version (0: the node has joined no cluster).
    public var ringVersion: UInt64
    public var claimant: NodeName?
    /// Members in the ring, with their status (`joining`, `valid`, `leaving`, `exiting`).
    public var members: [(name: NodeName, status: String)]
    public var partitionCount: Int
    public var nVal: Int
    /// Whether a committed plan is still in progress, and its transfers not yet complete.
    public var planInProgress: Bool
    public var pendingTransfers: Int
    /// Changes staged and not committed.
    public var staged: Int
    /// Each partition's replicas in this node's ring (preference-list order).
    public var replicas: [UInt32: [NodeName]]
    /// Keys this node's storage holds, per partition (partitions holding none are absent).
    public var stored: [UInt32: Int]
    /// Partitions this node runs a vnode for.
    public var vnodes: Set<UInt32>
    /// Outbound transfers running on this node now, with their age.
    public var running: [(partition: UInt32, from: NodeName, to: NodeName, age: Duration)]
}

extension CairnNode {
    /// This node's placement snapshot (nil before `start`). Counts every partition's live keys
    /// in storage (tombstones left out: replicas collect them each at its own pace), so it
    /// costs a pass over the partition table: for tests and the simulator.
    public func placement() async -> PlacementSnapshot? {
        guard let agent = core.membership else { return nil }
        let ring = agent.ring
        var stored: [UInt32: Int] = [:]
        if let backend = core.backend, let ring {
            let limits = config.limits
            for i in 0..<ring.partitionCount {
                let n = (try? await backend.foldReadable(partition: PartitionID(UInt32(i)), after: nil, into: 0) { n, _, value in
                    if let o = try? VersionedObject.decode(value, limits: limits), !o.isDeleted { n += 1 }
                    return .continue
                }.accumulator) ?? 0
                if n > 0 { stored[UInt32(i)] = n }
            }
        }
        var replicas: [UInt32: [NodeName]] = [:]
        if let ring { for p in ring.ring.partitions { replicas[p.index] = ring.replicas(of: p) } }
        let running = await runningTransfers()
        return PlacementSnapshot(
            ringVersion: ring?.version ?? 0, claimant: ring?.claimant, members: ring?.members.map { ($0.name, $0.status.description) } ?? [],
            partitionCount: ring?.partitionCount ?? 0, nVal: ring?.nVal ?? 0, planInProgress: ring?.isPlanInProgress ?? false,
            pendingTransfers: ring?.pendingTransfers.count ?? 0, staged: ring?.staged.count ?? 0, replicas: replicas, stored: stored,
            vnodes: Set(core.vnodes.partitions.map(\.index)), running: running)
    }

    /// Outbound transfers running on this node now, with their age (cheap: no storage pass).
    public func runningTransfers() async -> [(partition: UInt32, from: NodeName, to: NodeName, age: Duration)] {
        let now = core.clock.now()
        return (await core.handoff?.progress() ?? []).map { t in
            (partition: t.progress.partition.home.index, from: t.progress.from, to: t.progress.to, age: now - t.startedAt)
        }
    }

    /// Hints this node holds, and fallback copies it has not handed to their primaries yet.
    public var pendingCatchUp: (hints: Int, fallbackCopies: Int) {
        (core.hints?.total ?? 0, core.vnodes.fallbackPartitions.count)
    }

    /// The key's primaries in this node's ring (preference-list order; empty before joining).
    public func replicas(ofKey key: [UInt8]) -> [NodeName] { core.view?.placement(forKey: key).1.map(\.node) ?? [] }

    /// This node's own copy of `key` (its primary vnode's, durable writes only, as a replica
    /// answers a `replica-get`); nil when it holds none. Throws when it runs no primary vnode for
    /// the key's partition (it is no replica of it), or the vnode cannot read it.
    public func localCopy(of key: [UInt8]) async throws -> VersionedObject? {
        guard let p = core.view?.partition(forKey: key) else { throw ValidationError("node \(config.name) has joined no cluster") }
        guard let vnode = core.vnodes.vnode(for: p) else {
            throw ValidationError("node \(config.name) runs no vnode for partition \(p.index): it is no replica of the key")
        }
        return try await vnode.get(key)
    }

    /// Runs anti-entropy exchanges now, as `cairn repair` does: every partition this node holds
    /// (or those of `partitions`) with each other reachable primary, until none ends truncated.
    /// Returns how many exchanges ran, the partitions of those that failed, and how many
    /// partitions were skipped (no other replica reachable, or not yet this node's); all empty
    /// when anti-entropy is off.
    public func repairNow(partitions: [PartitionID]? = nil) async -> (exchanges: Int, failed: [PartitionID], skipped: Int) {
        guard let manager = core.antiEntropy, config.antiEntropy.enabled else { return (0, [], 0) }
        let (records, skipped) = await manager.repair(partitions)
        let failed = Set(records.filter { $0.outcome == "failed" }.map(\.partition))
        return (records.count, failed.sorted(), skipped.count)
    }

    /// Hints this node dropped since it started (not kept, expired or unreadable).
    public var hintsDropped: Int { core.hints?.droppedTotal ?? 0 }

    /// Partitions of this node whose copy is refilling (after a lost disk, damaged storage or
    /// a long absence) until an exchange of each completes.
    public var refillingPartitions: Int { core.vnodes.partitions.count { core.antiEntropyState.isRefilling($0) } }

    /// The root of this node's anti-entropy tree of `key`'s partition (nil: it holds no primary
    /// copy of it, or no tree is ready).
    public func treeRoot(ofKey key: [UInt8]) async -> UInt64? {
        guard let p = core.view?.partition(forKey: key), let vnode = core.vnodes.vnode(for: p) else { return nil }
        return await vnode.treeRoot()
    }

    /// Every key this node stores in `key`'s partition: its version hash (what a tree build
    /// from storage sums: damaged storage and objects that do not decode are passed over, as a
    /// build passes over them) and whether only a tombstone is left of it. Nil: no primary copy
    /// of the partition here.
    public func storedVersions(ofKey key: [UInt8]) async throws -> [[UInt8]: (hash: UInt64, deleted: Bool)]? {
        guard let p = core.view?.partition(forKey: key), core.vnodes.vnode(for: p) != nil, let backend = core.backend else { return nil }
        let limits = config.limits
        return try await backend.foldReadable(partition: p, after: nil, into: [[UInt8]: (hash: UInt64, deleted: Bool)]()) { versions, k, value in
            if let o = try? VersionedObject.decode(value, limits: limits) { versions[k] = (KeyVersionHash.hash(key: k, object: o), o.isDeleted) }
            return .continue
        }.accumulator
    }

    /// The partition `key` belongs to in this node's ring (nil before joining).
    public func partition(ofKey key: [UInt8]) -> PartitionID? { core.view?.partition(forKey: key) }

    /// How this node's failure detector holds each member now (`alive`, `suspect`, `dead`).
    public func livenessTable() -> [NodeName: String] {
        guard let ring = core.membership?.ring else { return [:] }
        var out: [NodeName: String] = [:]
        for m in ring.members where m.name != config.name { out[m.name] = core.liveness.status(of: m.name)?.description ?? "unknown" }
        return out
    }
}
