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
}
