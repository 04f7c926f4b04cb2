import Testing
import CairnAntiEntropy
import CairnCore

private func node(_ s: String) -> NodeName { try! NodeName(s) }   // literals: cannot fail

@Suite struct AntiEntropyScheduleTests {
    private let t0 = ContinuousClock.now
    private let minute = Duration.seconds(60)
    private let a = node("n2"), b = node("n3")

    private func schedule(slots: Int = 2, sweep: Duration = .seconds(3600), seed: UInt64 = 1) -> AntiEntropySchedule {
        AntiEntropySchedule(settings: .init(exchangeInterval: minute, maxConcurrentExchanges: slots, sweepInterval: sweep), seed: seed)
    }

    private func partitions(_ n: Int, refilling: Set<Int> = []) -> [AntiEntropySchedule.Partition] {
        (0..<n).map { AntiEntropySchedule.Partition(id: PartitionID(UInt32($0)), refilling: refilling.contains($0), peers: [a, b]) }
    }

    /// Runs the timer every `step` from `start` for `span`, ending each exchange at once; the
    /// instants each partition was exchanged.
    private func drive(_ s: inout AntiEntropySchedule, _ ps: [AntiEntropySchedule.Partition], from start: ContinuousClock.Instant,
                       for span: Duration, step: Duration = .milliseconds(100)) -> [PartitionID: [ContinuousClock.Instant]] {
        var at: [PartitionID: [ContinuousClock.Instant]] = [:]
        var now = start
        while now <= start + span {
            for (p, _) in s.exchangesDue(now: now, ps) {
                at[p, default: []].append(now)
                s.release(p)
                s.ended(p, .completed, refilling: false, now: now)
            }
            now += step
        }
        return at
    }

    @Test func firstExchangesSpreadOverOneIntervalAndRefillingOnesGoAtOnce() {
        var s = schedule(slots: 64)
        let ps = partitions(32, refilling: [5])
        let first = drive(&s, ps, from: t0, for: minute)
        #expect(first.count == 32, "every partition is exchanged within the first interval")
        #expect(first[PartitionID(5)]?.first == t0)
        let starts = Set(first.values.compactMap(\.first))
        #expect(starts.count > 16, "first exchanges spread out: \(starts.count) distinct instants")
    }

    @Test func eachNextExchangeIsAnIntervalLaterWithinAQuarterAndPeersTakeTurns() {
        var s = schedule(slots: 64)
        let ps = partitions(8)
        var peersSeen: [PartitionID: [NodeName]] = [:]
        var times: [PartitionID: [ContinuousClock.Instant]] = [:]
        var now = t0
        while now <= t0 + .seconds(600) {
            for (p, peer) in s.exchangesDue(now: now, ps) {
                peersSeen[p, default: []].append(peer)
                times[p, default: []].append(now)
                s.release(p)
                s.ended(p, .completed, refilling: false, now: now)
            }
            now += .milliseconds(100)
        }
        for (p, ts) in times {
            #expect(ts.count >= 7, "partition \(p) exchanged \(ts.count) times in 10 intervals")
            for (x, y) in zip(ts, ts.dropFirst()) {
                let gap = x.duration(to: y)
                #expect(gap >= .seconds(45) && gap <= .milliseconds(75_100), "gap \(gap)")
            }
            let seen = peersSeen[p] ?? []
            #expect(zip(seen, seen.dropFirst()).allSatisfy { $0 != $1 }, "peers alternate: \(seen)")
        }
    }

    @Test func slotsBoundRunningExchangesAndAPartitionNeverRunsTwice() {
        var s = schedule(slots: 2)
        let ps = partitions(6, refilling: Set(0..<6))
        let due = s.exchangesDue(now: t0, ps)
        #expect(due.count == 2)
        let later = s.exchangesDue(now: t0 + .seconds(1), ps)
        #expect(later.isEmpty, "no free slot")
        let tookWhileFull = s.take(PartitionID(4))
        #expect(!tookWhileFull, "the operator waits for a slot too")
        s.release(due[0].0)
        let tookRunning = s.take(due[1].0)
        #expect(!tookRunning, "a partition never has two exchanges")
        let took = s.take(PartitionID(4))
        #expect(took)
        #expect(s.exchanging == [due[1].0, PartitionID(4)])
    }

    @Test func aPartitionWithoutATreeOrPeersOrNotAReplicaIsNotExchanged() {
        var s = schedule(slots: 8)
        let ps = [
            AntiEntropySchedule.Partition(id: PartitionID(0), refilling: true, treeReady: false, peers: [a]),
            AntiEntropySchedule.Partition(id: PartitionID(1), refilling: true, peers: []),
            AntiEntropySchedule.Partition(id: PartitionID(2), refilling: true, replica: false, peers: [a]),
            AntiEntropySchedule.Partition(id: PartitionID(3), refilling: true, peers: [a]),
        ]
        #expect(s.exchangesDue(now: t0, ps).map(\.0) == [PartitionID(3)])
        // Once its tree is ready, a refilling partition goes at the next look.
        var ready = ps
        ready[0].treeReady = true
        #expect(s.exchangesDue(now: t0 + .milliseconds(1), ready).map(\.0) == [PartitionID(0)])
    }

    @Test func truncatedGoesOnInASecondAndFailedRefillsBackOffDoubling() {
        var s = schedule(slots: 8)
        let p = PartitionID(0)
        let ps = partitions(1, refilling: [0])
        func nextRun(after start: ContinuousClock.Instant) -> Duration? {
            var now = start
            while now <= start + .seconds(120) {
                if let (q, _) = s.exchangesDue(now: now, ps).first {
                    s.release(q)
                    return start.duration(to: now)
                }
                now += .milliseconds(50)
            }
            return nil
        }
        #expect(s.exchangesDue(now: t0, ps).count == 1)
        s.release(p)
        s.ended(p, .truncated, refilling: true, now: t0)
        #expect(nextRun(after: t0) == .seconds(1))
        var waits: [Duration] = []
        var now = t0 + .seconds(1)
        for _ in 0..<9 {
            s.ended(p, .failed, refilling: true, now: now)
            guard let w = nextRun(after: now) else { break }
            waits.append(w)
            now += w
        }
        #expect(waits == [.milliseconds(500), .seconds(1), .seconds(2), .seconds(4), .seconds(8), .seconds(16), .seconds(30), .seconds(30), .seconds(30)])
        // A failure of a partition that is not refilling waits for its interval.
        s.ended(p, .completed, refilling: false, now: now)
        _ = nextRun(after: now)
        s.ended(p, .failed, refilling: false, now: now)
        #expect((nextRun(after: now) ?? .zero) >= .seconds(45))
    }

    @Test func oneSweepAtATimeEachAnIntervalApartAndNoneWhenOff() {
        var s = schedule(sweep: minute)
        let ps = (0..<4).map { PartitionID(UInt32($0)) }
        var swept: [PartitionID: [ContinuousClock.Instant]] = [:]
        var now = t0
        while now <= t0 + .seconds(300) {
            if let p = s.sweepDue(now: now, ps) {
                #expect(s.sweepDue(now: now, ps) == nil, "one sweep at a time")
                swept[p, default: []].append(now)
                s.sweepEnded()
            }
            now += .milliseconds(100)
        }
        #expect(swept.count == 4)
        for ts in swept.values {
            for (x, y) in zip(ts, ts.dropFirst()) { #expect(x.duration(to: y) >= .seconds(45) && x.duration(to: y) <= .milliseconds(75_100)) }
        }
        var off = schedule(sweep: .zero)
        var due: [PartitionID] = []
        for i in 0..<100 { if let p = off.sweepDue(now: t0 + .seconds(Int64(i)), ps) { due.append(p) } }
        #expect(due.isEmpty)
    }

    @Test func theSameSeedGivesTheSameTimetable() {
        var x = schedule(seed: 9), y = schedule(seed: 9), z = schedule(seed: 10)
        let ps = partitions(16)
        let tx = drive(&x, ps, from: t0, for: .seconds(200)), ty = drive(&y, ps, from: t0, for: .seconds(200))
        let tz = drive(&z, ps, from: t0, for: .seconds(200))
        #expect(tx == ty)
        #expect(tx != tz)
    }
}
