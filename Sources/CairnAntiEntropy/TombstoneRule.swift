/// When a tombstone may be collected (Docs/anti-entropy.md, "Tombstones"). Pure.
///
/// A tombstone (an object whose every sibling is a deletion) is dropped from a replica only when
/// nothing can bring back what it deleted:
///
/// - every other primary of its partition is known to hold it: for each, an exchange this node
///   began *after* the tombstone was applied here completed (in sync, or with every difference
///   repaired both ways; not truncated, not failed). Storage sequences say "after": the store's
///   last applied sequence is taken when an exchange begins, and the tombstone's own sequence
///   must be at or below it;
/// - no hint or fallback copy of the partition is pending anywhere: not here, and not on any
///   member asked (every member must have answered);
/// - the partition is not refilling here (a disk loss, damage, or a node away longer than the
///   hint window) and not being transferred;
/// - the tombstone is at least `graceMillis` old (its newest deletion's timestamp).
///
/// Collecting is safe against a later write reusing a dot only together with the vnode's
/// counter floor (`DVVSet.event(actor:value:floor:)`), which the caller keeps.
public struct TombstoneRule: Sendable, Hashable {
    /// `tombstones.grace`.
    public var graceMillis: UInt64

    public init(graceMillis: UInt64) { self.graceMillis = graceMillis }

    /// Why a tombstone is kept.
    public enum Block: String, Sendable, Hashable, CaseIterable {
        /// Younger than the grace period.
        case grace
        /// Some other primary has not completed an exchange begun after the tombstone was applied here.
        case notExchanged = "not_exchanged"
        /// Hints or fallback copies of the partition are pending (here or on a member).
        case pendingHandoff = "pending_handoff"
        /// A member could not be asked whether it holds hints or fallback copies.
        case memberUnreachable = "member_unreachable"
        /// This copy is refilling: what it holds is not known to be complete.
        case refilling
        /// The partition is being transferred to or from this node.
        case transferring
    }

    /// What this node knows of one partition it holds as a primary.
    public struct Partition: Sendable, Hashable {
        /// The partition's other primaries now.
        public var otherPrimaries: [String]
        /// Per peer: the store's last applied sequence when the newest exchange with it that
        /// completed (untruncated) began. A peer with none is missing.
        public var exchangedAt: [String: UInt64]
        /// Hints or fallback copies of the partition held here.
        public var pendingHere: Bool
        /// A member (or the peer in its last exchange) said it holds hints or fallback copies of it.
        public var pendingElsewhere: Bool
        /// Some member did not answer whether it holds any.
        public var memberUnknown: Bool
        public var refilling: Bool
        public var transferring: Bool

        public init(otherPrimaries: [String], exchangedAt: [String: UInt64], pendingHere: Bool = false, pendingElsewhere: Bool = false,
                    memberUnknown: Bool = false, refilling: Bool = false, transferring: Bool = false) {
            self.otherPrimaries = otherPrimaries
            self.exchangedAt = exchangedAt
            self.pendingHere = pendingHere
            self.pendingElsewhere = pendingElsewhere
            self.memberUnknown = memberUnknown
            self.refilling = refilling
            self.transferring = transferring
        }
    }

    /// The partition's horizon: the newest sequence every other primary is known to hold
    /// (tombstones applied at or below it are held everywhere), or why none of its tombstones
    /// may be collected. A partition with no other primary (N = 1) has nothing to wait for.
    public func horizon(_ p: Partition) -> Result<UInt64, BlockedPartition> {
        if p.refilling { return .failure(BlockedPartition(.refilling)) }
        if p.transferring { return .failure(BlockedPartition(.transferring)) }
        if p.pendingHere || p.pendingElsewhere { return .failure(BlockedPartition(.pendingHandoff)) }
        if p.memberUnknown { return .failure(BlockedPartition(.memberUnreachable)) }
        var horizon = UInt64.max
        for peer in p.otherPrimaries {
            guard let at = p.exchangedAt[peer] else { return .failure(BlockedPartition(.notExchanged)) }
            horizon = min(horizon, at)
        }
        return .success(horizon)
    }

    /// Whether one tombstone may go: nil if so, else why not. `sequence` is the store sequence
    /// it was applied at here, `newestMillis` its newest deletion's timestamp.
    public func decide(sequence: UInt64, newestMillis: UInt64, nowMillis: UInt64, horizon: Result<UInt64, BlockedPartition>) -> Block? {
        switch horizon {
        case .failure(let why): return why.block
        case .success(let h):
            if nowMillis < newestMillis || nowMillis - newestMillis < graceMillis { return .grace }
            return sequence <= h ? nil : .notExchanged
        }
    }

    /// A partition-wide reason (an `Error` so it can be a `Result`'s failure).
    public struct BlockedPartition: Error, Sendable, Hashable {
        public var block: Block
        public init(_ block: Block) { self.block = block }
    }
}
