import Testing
import CairnAntiEntropy

/// The tombstone collection rule, case by case: each condition alone must keep a tombstone.
@Suite struct TombstoneRuleTests {
    let rule = TombstoneRule(graceMillis: 3_600_000)
    let hour: UInt64 = 3_600_000
    let now: UInt64 = 100 * 3_600_000

    /// Both other primaries exchanged after sequence 500; nothing pending.
    var settled: TombstoneRule.Partition {
        TombstoneRule.Partition(otherPrimaries: ["n2", "n3"], exchangedAt: ["n2": 700, "n3": 500])
    }

    func decide(_ p: TombstoneRule.Partition, sequence: UInt64 = 400, age: UInt64 = 2 * 3_600_000) -> TombstoneRule.Block? {
        rule.decide(sequence: sequence, newestMillis: now - age, nowMillis: now, horizon: rule.horizon(p))
    }

    @Test func anOldTombstoneEveryPrimaryHoldsIsCollected() {
        #expect(decide(settled) == nil)
        #expect(decide(settled, sequence: 500) == nil, "applied exactly at the horizon: held at the exchange's start")
        #expect(rule.horizon(settled) == .success(500), "the horizon is the oldest peer's")
    }

    @Test func aTombstoneAppliedAfterAnyPeersLastExchangeBeganIsKept() {
        #expect(decide(settled, sequence: 501) == .notExchanged)
        #expect(decide(settled, sequence: 10_000) == .notExchanged)
    }

    @Test func aPeerNeverExchangedWithKeepsEveryTombstone() {
        var p = settled
        p.exchangedAt["n3"] = nil
        #expect(decide(p, sequence: 1) == .notExchanged)
        // A primary that replaced another (the ring changed) starts with no exchange either.
        p = settled
        p.otherPrimaries = ["n2", "n4"]
        #expect(decide(p, sequence: 1) == .notExchanged)
    }

    @Test func youngerThanTheGraceIsKept() {
        #expect(decide(settled, age: hour - 1) == .grace)
        #expect(decide(settled, age: hour) == nil)
        // A timestamp in this node's future (clock skew) is young, not old.
        #expect(rule.decide(sequence: 1, newestMillis: now + 5, nowMillis: now, horizon: rule.horizon(settled)) == .grace)
    }

    @Test func pendingHintsOrFallbackCopiesKeepEveryTombstone() {
        var p = settled
        p.pendingHere = true
        #expect(decide(p, sequence: 1) == .pendingHandoff)
        p = settled
        p.pendingElsewhere = true
        #expect(decide(p, sequence: 1) == .pendingHandoff)
    }

    @Test func aMemberThatCouldNotBeAskedKeepsEveryTombstone() {
        var p = settled
        p.memberUnknown = true
        #expect(decide(p, sequence: 1) == .memberUnreachable)
    }

    @Test func aRefillingOrTransferringCopyKeepsEveryTombstone() {
        var p = settled
        p.refilling = true
        #expect(decide(p, sequence: 1) == .refilling)
        p = settled
        p.transferring = true
        #expect(decide(p, sequence: 1) == .transferring)
    }

    @Test func withNoOtherPrimaryOnlyTheGraceApplies() {
        let alone = TombstoneRule.Partition(otherPrimaries: [], exchangedAt: [:])
        #expect(decide(alone, sequence: .max) == nil)
        #expect(decide(alone, age: 0) == .grace)
    }

    /// Whatever the state, a tombstone is collected only if every condition holds.
    @Test func collectionNeedsEveryConditionAtOnce() {
        for mask in 0..<(1 << 7) {
            var p = settled
            if mask & 1 != 0 { p.exchangedAt["n2"] = nil }
            if mask & 2 != 0 { p.pendingHere = true }
            if mask & 4 != 0 { p.pendingElsewhere = true }
            if mask & 8 != 0 { p.memberUnknown = true }
            if mask & 16 != 0 { p.refilling = true }
            if mask & 32 != 0 { p.transferring = true }
            let young = mask & 64 != 0
            let result = decide(p, age: young ? 10 : 2 * hour)
            #expect((result == nil) == (mask == 0), "mask \(mask): \(String(describing: result))")
        }
    }
}
