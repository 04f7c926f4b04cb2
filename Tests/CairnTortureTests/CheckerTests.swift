import Testing
import Foundation
@testable import CairnTorture

@Suite struct CheckerTests {
    func a(_ key: String, _ e: UInt64, _ o: AttemptOutcome) -> Attempt {
        Attempt(client: 0, key: key, element: e, startMillis: 0, endMillis: 1, outcome: o)
    }

    @Test func everyClassIsCountedAndTheSummaryLineHasTheAgreedForm() {
        let attempts = [
            a("k", 1, .ok), a("k", 2, .ok),                      // 2 lost
            a("k", 3, .unknown("timeout")), a("k", 4, .unknown("not reached")),
            a("k", 5, .failed("unavailable")), a("k", 6, .failed("unavailable")),
            a("j", 7, .ok),
        ]
        let finals: [String: FinalRead] = ["k": .elements([1, 3, 5, 99]), "j": .elements([7])]
        let r = CheckResult.check(attempts: attempts, finals: finals)
        #expect(r.acknowledged == 3 && r.acknowledgedPresent == 2)
        #expect(r.lost.map(\.element) == [2])
        #expect(r.unknownPresent == 1 && r.unknownAbsent == 1)
        #expect(r.failedButPresent.map(\.element) == [5] && r.failedAbsent == 1)
        #expect(r.phantom.map(\.element) == [99])
        #expect(!r.passed)
        #expect(r.summary == "acknowledged=3 lost=1 unknown_present=1 unknown_absent=1 failed_but_present=1 phantom=1")
    }

    @Test func aCleanRunPassesAndAnUnreadableKeyDoesNot() {
        let attempts = [a("k", 1, .ok), a("k", 2, .unknown("timeout"))]
        #expect(CheckResult.check(attempts: attempts, finals: ["k": .elements([1])]).passed)
        let r = CheckResult.check(attempts: attempts, finals: ["k": .unreadable("not reached")])
        #expect(!r.passed && r.acknowledged == 1 && r.lost.isEmpty)
    }

    @Test func setValuesRoundTripAndForeignBytesAreRejected() {
        #expect(SetValue.decode(SetValue.encode([3, 1, 2])) == [1, 2, 3])
        #expect(String(decoding: SetValue.encode([10, 2]), as: UTF8.self) == "2,10")
        #expect(SetValue.decode([]) == [])
        #expect(SetValue.decode(Array("1,x".utf8)) == nil)
        #expect(SetValue.decode(Array("1,,2".utf8)) == nil)
        #expect(SetValue.decode(Array("18446744073709551615".utf8)) == [UInt64.max])
        #expect(SetValue.decode(Array("18446744073709551616".utf8)) == nil, "past UInt64: not a list this harness wrote")
        #expect(SetValue.decode(Array("1,".utf8)) == nil && SetValue.decode(Array(",1".utf8)) == nil)
    }
}

@Suite struct ScheduleTests {
    @Test func theScheduleIsReproducibleFromTheSeedAndOneFaultAtATime() {
        let a = NemesisSchedule(seed: 42, nodes: 5, durationMillis: 120_000)
        #expect(a == NemesisSchedule(seed: 42, nodes: 5, durationMillis: 120_000))
        #expect(a != NemesisSchedule(seed: 43, nodes: 5, durationMillis: 120_000))
        #expect(a.faults.count >= 10)
        for (x, y) in zip(a.faults, a.faults.dropFirst()) { #expect(x.atMillis + x.durationMillis < y.atMillis, "faults overlap") }
        #expect(a.faults.allSatisfy { $0.atMillis + $0.durationMillis <= 117_000 }, "the end of the run is quiet")
        // Over many seeds every kind of fault is drawn.
        var kinds = Set<String>()
        for seed in 1...40 {
            for f in NemesisSchedule(seed: UInt64(seed), nodes: 3, durationMillis: 60_000).faults {
                kinds.insert(String(String(describing: f.fault).prefix(4)))
            }
        }
        #expect(kinds.count == 8, "\(kinds)")
    }

    @Test func partitionsCutTheRightLinks() {
        #expect(Fault.isolate(0).blocked(nodes: 3) == [0: [1, 2], 1: [0], 2: [0]])
        #expect(Fault.oneWay(from: 2, to: 0).blocked(nodes: 3) == [2: [0]])
        let bridge = Fault.bridge(center: 0).blocked(nodes: 5)
        #expect(bridge[0] == nil, "the bridge node reaches everyone")
        #expect(bridge[1] == [3, 4] && bridge[3] == [1, 2])
        let split = Fault.split(minority: [1, 3]).blocked(nodes: 5)
        #expect(split[1] == [0, 2, 4] && split[0] == [1, 3])
        #expect(Fault.kill(1).blocked(nodes: 3).isEmpty)
    }

    @Test func membershipChangesAlternateAndKeepThreeMembers() {
        #expect(MembershipPlan(joins: 2, leaves: 2, removes: 1).order(nodes: 5, minimum: 3) == [.join, .leave, .join, .leave, .remove])
        #expect(MembershipPlan(joins: 1, leaves: 1).order(nodes: 3, minimum: 3) == [.join, .leave], "a join first: 3 members cannot lose one")
        #expect(MembershipPlan(leaves: 2).order(nodes: 4, minimum: 3) == [.leave], "the second leave would leave 2")
        #expect(MembershipPlan(joins: 2).order(nodes: 3, minimum: 3) == [.join, .join])
    }

    /// The disk nemeses are drawn only when selected, among the members, and selecting them
    /// leaves no other kind out; the default schedules are as they were without them.
    @Test func diskFaultsAreDrawnOnlyWhenSelected() {
        func isDisk(_ f: Fault) -> Bool {
            switch f {
            case .wipeDisk, .corruptTable: true
            default: false
            }
        }
        let plain = NemesisSchedule(seed: 3, nodes: 5, durationMillis: 300_000)
        #expect(!plain.faults.contains { isDisk($0.fault) })
        let disk = NemesisSchedule(seed: 3, nodes: 5, durationMillis: 300_000, kinds: FaultKind.standard + [.wipeDisk, .corruptTable])
        #expect(disk.faults.contains { if case .wipeDisk = $0.fault { true } else { false } })
        #expect(disk.faults.contains { if case .corruptTable = $0.fault { true } else { false } })
        #expect(disk.faults.contains { !isDisk($0.fault) })
        let only = NemesisSchedule(seed: 3, nodes: 3, durationMillis: 60_000, kinds: [.wipeDisk, .corruptTable])
        #expect(!only.faults.isEmpty && only.faults.allSatisfy { isDisk($0.fault) })
    }

    @Test func theMembershipNemesisJoinsNewNodesAndNeverLeavesFewerThanThree() {
        let s = NemesisSchedule(seed: 9, nodes: 5, durationMillis: 600_000, kinds: FaultKind.classic + [.membership],
                                membership: MembershipPlan(joins: 2, leaves: 2, removes: 1))
        #expect((s.joins, s.leaves, s.removes) == (2, 2, 1))
        #expect(s.slots == 7, "n6 and n7 join")
        var members = Set(0..<5)
        var joined: [Int] = []
        for f in s.faults {
            #expect(Set(f.members) == members, "\(f.fault) is drawn among the members of its time")
            switch f.fault {
            case .join(let n):
                #expect(!members.contains(n))
                members.insert(n)
                joined.append(n)
            case .leave(let n), .remove(let n):
                #expect(n != 0 && members.contains(n), "n1 stays; only members go")
                members.remove(n)
            case .isolate(let n), .kill(let n), .pause(let n), .delay(let n, _), .drop(let n, _), .bridge(let n), .wipeDisk(let n),
                 .corruptTable(let n): #expect(members.contains(n))
            case .oneWay(let a, let b): #expect(members.contains(a) && members.contains(b))
            case .split(let minority), .clientSplit(let minority): #expect(Set(minority).isSubset(of: members))
            }
            #expect(members.count >= 3)
        }
        #expect(joined == [5, 6])
        #expect(Set(s.finalMembers) == members && members.count == 4)
        let changes = s.faults.filter(\.fault.isMembershipChange)
        #expect(changes.allSatisfy { $0.atMillis <= 480_000 && $0.durationMillis == 0 }, "changes in the first 80 % of the run")
        #expect(s.faults.count > 50, "the other faults still run between the changes")
        // Only the selected kinds: membership alone is just the changes.
        let alone = NemesisSchedule(seed: 9, nodes: 3, durationMillis: 90_000, kinds: [.membership], membership: MembershipPlan(joins: 1, leaves: 1))
        #expect(alone.faults.map(\.fault.membershipVerb) == ["join", "leave"])
        #expect(NemesisSchedule(seed: 9, nodes: 3, durationMillis: 90_000, kinds: []).faults.isEmpty)
    }

    @Test func withoutMembershipASeedDrawsTheSameFaultsAsBefore() {
        // Seed 1, 3 nodes, 60 s, the classic kinds: the schedule printed before kinds were selectable.
        let s = NemesisSchedule(seed: 1, nodes: 3, durationMillis: 60_000, kinds: FaultKind.classic)
        #expect(s.faults.map { "\(String(format: "%.1f", Double($0.atMillis) / 1000)) \($0.fault)" } == [
            "2.5 split: {n3} | rest", "7.0 split: {n2} | rest", "11.3 one-way cut n2 -> n1", "15.1 kill -9 n1", "19.6 SIGSTOP n1",
            "25.1 bridge through n3", "28.4 SIGSTOP n1", "35.7 drop 45% of n2's messages", "40.4 delay n2 outgoing by 39 ms",
            "45.5 isolate n3", "52.7 bridge through n1",
        ])
        #expect(s == NemesisSchedule(seed: 1, nodes: 3, durationMillis: 60_000, kinds: FaultKind.classic + [.membership], membership: MembershipPlan()))
        #expect(s.slots == 3 && s.finalMembers == [0, 1, 2])
        // The default adds client splits.
        let standard = NemesisSchedule(seed: 1, nodes: 3, durationMillis: 60_000)
        #expect(standard.faults.contains { if case .clientSplit = $0.fault { true } else { false } } || NemesisSchedule(seed: 2, nodes: 3, durationMillis: 60_000).faults.contains { if case .clientSplit = $0.fault { true } else { false } })
    }
}
