import Testing
@testable import CairnSim
import CairnCore
import CairnMembership

/// Ring changes on the simulator: real nodes join (knowing only seeds), leave (handing off
/// their data, then exiting) and are removed (crashed for good) through the admin verbs, with
/// crashes and partitions, under the set-add workload.
@Suite struct MembershipSimulationTests {
    /// A fixed set of seeds mixing join, leave, remove, crash and partition: no acknowledged
    /// add lost, no phantom; at the end every partition is on exactly N replicas, its ring's
    /// owners, with no copy left elsewhere, and no transfer ran past its bound.
    @Test func seedsMixingJoinLeaveRemoveCrashAndPartitionKeepEveryAddAndPlacement() async throws {
        var base = SetAddScenario()
        base.duration = .seconds(12)
        base.faults = [.join, .leave, .remove, .crash, .partition]
        let s = base
        var injected: [String: Int] = [:]
        var acknowledged = 0
        // Between them: joins, leaves, a removal, crashes, splits and cuts (the trace of each).
        for seed: UInt64 in [3, 4, 6] {
            let r = await offPool { s.run(seed: seed) }
            injected.merge(r.injected, uniquingKeysWith: +)
            acknowledged += r.acknowledged
            #expect(r.violations.isEmpty, "seed \(seed): \(r.violations.first ?? "") — reproduce: cairn-sim --seed \(seed) --duration 12s --faults join,leave,remove,crash,partition --trace")
        }
        #expect(acknowledged > 100)
        for kind in ["join", "leave", "remove", "crash", "partition"] {
            #expect(injected[kind, default: 0] > 0, "no \(kind) in the seeds: \(injected)")
        }
    }

    /// The failure-detection goals at 5 and 16 members, on virtual time (seeded, so the
    /// figures are the same on every run).
    @Test(arguments: [5, 16]) func failureDetectionMeetsItsGoals(members: Int) throws {
        var e = DetectionExperiment(members: members)
        e.trials = members == 5 ? 5 : 4
        e.lossMemberDays = members == 5 ? 0.25 : 0.1
        let seeds: ClosedRange<UInt64> = members == 5 ? 1...2 : 1...1
        let f = try e.run(seeds: seeds)
        #expect(f.failures(e.settings).isEmpty, "\(members) members: \(f.failures(e.settings))")
        #expect(f.crashDetection.count == e.trials * seeds.count)
    }
}

/// The deleted-key check tells a deleted write that came back from a later write beside it.
@Suite struct DeletedKeyCheckTests {
    @Test func liveValueDotsNameEachLiveValueAndSkipTombstones() throws {
        let a = ActorID(node: "n1", epoch: 7)
        let b = ActorID(node: "n2", epoch: 9)
        let live = Sibling(value: [1], timestampMillis: 1)
        let tomb = Sibling.tombstone(timestampMillis: 2)
        // Entry values are newest first: values[i] carries (actor, counter - i).
        let object = try #require(VersionedObject(entries: [
            .init(actor: a, counter: 3, values: [live, tomb]),
            .init(actor: b, counter: 1, values: [tomb]),
        ].sorted { $0.actor < $1.actor }, anonymous: []))
        #expect(SetAddScenario.liveValueDots(object) == [Dot(actor: a, counter: 3)])
        // Covered by a delete's context {a: 3}: the deleted write came back (a violation);
        // with context {a: 2} it is a later write beside the delete.
        let dots = SetAddScenario.liveValueDots(object)
        #expect(dots.allSatisfy { $0.counter <= VersionVector([(a, 3)])[$0.actor] })
        #expect(dots.allSatisfy { $0.counter > VersionVector([(a, 2)])[$0.actor] })
    }
}
