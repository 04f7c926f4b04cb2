import Testing
@testable import CairnNode
import CairnCore

private func name(_ s: String) -> NodeName { (try? NodeName(s)) ?? { fatalError("bad test name") }() }
private let n1 = name("n1"), n2 = name("n2"), n3 = name("n3"), n4 = name("n4")

private func targets(primaries: [NodeName] = [n1, n2, n3], fallbacks: [NodeName] = [], local: NodeName = n1) -> [ReplicaTarget] {
    primaries.map { ReplicaTarget(node: $0, address: "\($0):1", isPrimary: true, isLocal: $0 == local) }
        + fallbacks.map { ReplicaTarget(node: $0, address: "\($0):1", isPrimary: false, isLocal: $0 == local) }
}

private func w(_ w: Quorum, pw: Quorum = .count(0), n: Int = 3) throws -> QuorumRequirement {
    try QuorumRequirement(name: "W", quorum: w, primary: pw, n: n)
}

private func failure(_ d: [WriteCoordination.Directive]) -> QuorumFailure? {
    for x in d { if case .respond(.quorumFailed(let f)) = x { return f } }
    return nil
}

@Suite struct WriteCoordinationTests {
    @Test func quorumWriteAnswersAtWAndFinishesWhenAllAnswered() throws {
        var m = WriteCoordination(operation: .put, requirement: try w(.count(2)), replicas: targets(), timeoutMillis: 1000)
        #expect(m.start(down: [:]) == [.applyLocally])
        #expect(m.localApplied() == [.replicate(to: [n2, n3])])
        #expect(m.replicaAcked(n3) == [.respond(.acknowledged)])
        #expect(m.replicaAcked(n3) == [])                     // duplicate ignored
        #expect(m.replicaAcked(n2) == [.finish])
        #expect(m.isFinished)
        #expect(m.deadlinePassed() == [])
    }

    /// The stamped write goes out while the local copy syncs; the local copy counts once
    /// durable. W = 2 is met by the two other replicas alone.
    @Test func theStampedWriteIsReplicatedWhileTheLocalCopySyncs() throws {
        var m = WriteCoordination(operation: .put, requirement: try w(.count(2)), replicas: targets(), timeoutMillis: 1000)
        #expect(m.start(down: [:]) == [.applyLocally])
        #expect(m.localStamped() == [.replicate(to: [n2, n3])])
        #expect(m.localStamped() == [])                       // once
        #expect(m.replicaAcked(n2) == [])
        #expect(m.replicaAcked(n3) == [.respond(.acknowledged)])
        #expect(m.receipt.map(\.node) == ["n2", "n3"])
        #expect(m.localApplied(durable: true) == [.finish])
        #expect(m.localApplied(durable: true) == [])          // once
        #expect(m.isFinished)
    }

    /// W = 3: the answer waits for the local sync too.
    @Test func wAllWaitsForTheLocalSync() throws {
        var m = WriteCoordination(operation: .put, requirement: try w(.all), replicas: targets(), timeoutMillis: 1000)
        _ = m.start(down: [:])
        _ = m.localStamped()
        #expect(m.replicaAcked(n2) == [])
        #expect(m.replicaAcked(n3) == [])
        #expect(m.localApplied() == [.respond(.acknowledged), .finish])
        #expect(m.receipt.map(\.node) == ["n2", "n3", "n1"])
    }

    /// A local sync that fails after the stamp: the write is out with the replicas, so it is
    /// that replica's failure (not the coordinator's), and W may still be met without it.
    @Test func aLocalFailureAfterTheStampCountsAsThatReplicasFailure() throws {
        var all = WriteCoordination(operation: .put, requirement: try w(.all), replicas: targets(), timeoutMillis: 1000)
        _ = all.start(down: [:])
        _ = all.localStamped()
        _ = all.replicaAcked(n2)
        let d = all.localFailed("sync failed")   // W = 3 is impossible now
        let f = try #require(failure(d))
        #expect(f.kind == .notReached)
        #expect(f.replicas.first { $0.node == "n1" }?.outcome == .failed("sync failed"))
        #expect(all.replicaAcked(n3) == [.finish])

        var two = WriteCoordination(operation: .put, requirement: try w(.count(2)), replicas: targets(), timeoutMillis: 1000)
        _ = two.start(down: [:])
        _ = two.localStamped()
        #expect(two.localFailed("sync failed") == [])
        #expect(two.localRejected("too late") == [])           // only before the stamp
        #expect(two.replicaAcked(n2) == [])
        #expect(two.replicaAcked(n3) == [.respond(.acknowledged), .finish])
    }

    /// Past the deadline with the stamp out but the local sync not done: not a coordinator
    /// timeout (the write went out), the replicas' answers decide.
    @Test func theDeadlineAfterTheStampIsDecidedByTheReplicas() throws {
        var m = WriteCoordination(operation: .put, requirement: try w(.count(2)), replicas: targets(), timeoutMillis: 1000)
        _ = m.start(down: [:])
        _ = m.localStamped()
        _ = m.replicaAcked(n2)
        let d = m.deadlinePassed()
        let f = try #require(failure(d))
        #expect(f.kind == .notReached && f.achieved == 1)
        #expect(!d.contains(.respond(.coordinatorTimedOut(afterMillis: 1000))))
    }

    @Test func tooFewReachableIsUnavailableAndNothingIsApplied() throws {
        var m = WriteCoordination(operation: .put, requirement: try w(.all), replicas: targets(), timeoutMillis: 1000)
        let d = m.start(down: [n3: "connection refused"])
        let f = try #require(failure(d))
        #expect(f.kind == .unavailable)
        #expect(f.achieved == 2 && f.required == 3)
        #expect(f.replicas.map(\.node) == ["n3"])
        #expect(!d.contains(.applyLocally))
        #expect(d.last == .finish)
    }

    @Test func aSilentReplicaMakesWAllNotReachedAtTheDeadline() throws {
        var m = WriteCoordination(operation: .put, requirement: try w(.all), replicas: targets(), timeoutMillis: 1000)
        _ = m.start(down: [:])
        _ = m.localApplied()
        #expect(m.replicaAcked(n2) == [])
        let d = m.deadlinePassed()
        let f = try #require(failure(d))
        #expect(f.kind == .notReached)
        #expect(f.achieved == 2)
        #expect(f.replicas.first { $0.node == "n3" }?.outcome == .timedOut(afterMillis: 1000))
        #expect(f.description.contains("n3:1 timed out after 1000 ms"))
        // n3 gets a hint; the request finishes once it is kept.
        #expect(d.contains(.keepHint(for: [n3])) && !d.contains(.finish) && !m.isFinished)
        #expect(m.hintKept() == [.finish])
    }

    @Test func failsAsSoonAsWCannotBeReached() throws {
        var m = WriteCoordination(operation: .delete, requirement: try w(.all), replicas: targets(), timeoutMillis: 1000)
        _ = m.start(down: [:])
        _ = m.localApplied()
        let d = m.replicaFailed(n2, .connectionLost("reset"))
        #expect(failure(d)?.kind == .notReached)
        #expect(!m.isFinished)                                 // still waiting for n3
        #expect(m.replicaAcked(n3) == [])                      // and for n2's hint
        #expect(m.hintKept() == [.finish])
    }

    @Test func pwCountsOnlyPrimaries() throws {
        // n3 is down: n4 stands in for it. W=2 is met by n1 and n4; PW=2 needs n2.
        let replicas = targets(fallbacks: [n4])
        var m = WriteCoordination(operation: .put, requirement: try w(.count(2), pw: .count(2)), replicas: replicas, timeoutMillis: 1000)
        #expect(m.start(down: [n3: "dead"]) == [.applyLocally])
        #expect(m.localApplied() == [.replicate(to: [n2, n4])])
        #expect(m.replicaAcked(n4) == [])                      // W=2 met, PW=2 not yet
        let d = m.replicaFailed(n2, .timedOut(afterMillis: 1000))
        let f = try #require(failure(d))
        #expect(f.requirement == "PW" && f.achieved == 1 && f.candidates == 3)
        #expect(d.contains(.keepHint(for: [n2])))
    }

    @Test func localFailureIsReportedAndNothingIsReplicated() throws {
        var m = WriteCoordination(operation: .put, requirement: try w(.count(1)), replicas: targets(), timeoutMillis: 1000)
        _ = m.start(down: [:])
        #expect(m.localFailed("disk full") == [.respond(.coordinatorFailed("disk full")), .finish])
        #expect(m.replicaAcked(n2) == [])
    }

    @Test func wOfOneAnswersRightAfterTheLocalApply() throws {
        var m = WriteCoordination(operation: .put, requirement: try w(.count(1)), replicas: targets(), timeoutMillis: 1000)
        _ = m.start(down: [n2: "down"])
        // No fallback among the candidates: n2 gets a hint, and the acknowledgement waits for it
        // (a coordinator crashing right after answering still replays it).
        #expect(m.localApplied() == [.replicate(to: [n3]), .keepHint(for: [n2])])
        #expect(m.isHoldingAcknowledgement)
        #expect(m.hintKept() == [.respond(.acknowledged)])
        #expect(m.replicaAcked(n3) == [.finish])
    }

    /// Past the deadline a held acknowledgement goes out without waiting for its hints (the W
    /// copies are what was promised); the machine still finishes only once they are kept.
    @Test func theDeadlineReleasesAHeldAcknowledgement() throws {
        var m = WriteCoordination(operation: .put, requirement: try w(.count(1)), replicas: targets(), timeoutMillis: 1000)
        _ = m.start(down: [n2: "down"])
        #expect(m.localApplied() == [.replicate(to: [n3]), .keepHint(for: [n2])])
        let d = m.deadlinePassed()
        #expect(d == [.keepHint(for: [n3]), .respond(.acknowledged)])
        #expect(!m.isFinished)
        #expect(m.hintKept() == [])
        #expect(m.hintKept() == [.finish])
        #expect(m.hintKept() == [])
    }
}

@Suite struct ReadCoordinationTests {
    private func object(_ v: String, actor: String, ctx: VersionVector = VersionVector()) throws -> VersionedObject {
        var o = VersionedObject()
        try o.update(context: ctx, value: Sibling(value: Array(v.utf8), timestampMillis: 1), actor: ActorID(node: actor, epoch: 1))
        return o
    }

    @Test func answersWithTheMergeOfRAnswersAndReportsDivergence() throws {
        var m = ReadCoordination(requirement: try QuorumRequirement(name: "R", quorum: .count(2), primary: .count(0), n: 3),
                                 replicas: targets(), timeoutMillis: 1000)
        #expect(m.start(down: [:]) == [.fetch(from: [n1, n2, n3])])
        let a = try object("a", actor: "n1")
        let b = try object("b", actor: "n2")
        #expect(m.replied(n1, a) == [])
        let d = m.replied(n2, b)
        guard case .respond(.answered(let merged?)) = d.first else { Issue.record("expected an answer, got \(d)"); return }
        #expect(Set(merged.values.map(\.value)) == [Array("a".utf8), Array("b".utf8)])
        // Every copy differs from the merge: each primary is repaired with it, and the
        // machine finishes once the repairs reported.
        let all = VersionedObject.sync([a, b])
        #expect(m.replied(n3, nil) == [.repair(targets: [n1, n2, n3], object: all)])
        #expect(m.repairAcked(n1) == [])
        #expect(m.repairFailed(n2, "timed out") == [])
        #expect(m.repairAcked(n3) == [.finish(divergent: [n1, n2, n3])])
        #expect(m.isFinished)
    }

    @Test func notFoundIsAnAnswer() throws {
        var m = ReadCoordination(requirement: try QuorumRequirement(name: "R", quorum: .count(2), primary: .count(0), n: 3),
                                 replicas: targets(), timeoutMillis: 1000)
        _ = m.start(down: [:])
        _ = m.replied(n2, nil)
        #expect(m.replied(n3, nil) == [.respond(.answered(nil))])
    }

    @Test func unavailableAndNotReached() throws {
        let r3 = try QuorumRequirement(name: "R", quorum: .all, primary: .count(0), n: 3)
        var u = ReadCoordination(requirement: r3, replicas: targets(), timeoutMillis: 1000)
        let du = u.start(down: [n2: "refused"])
        guard case .respond(.quorumFailed(let fu)) = du.first else { Issue.record("\(du)"); return }
        #expect(fu.kind == .unavailable && fu.description.hasPrefix("R=3 unavailable: 2 of 3 replicas reachable"))

        var t = ReadCoordination(requirement: r3, replicas: targets(), timeoutMillis: 500)
        _ = t.start(down: [:])
        _ = t.replied(n1, nil)
        _ = t.replied(n2, nil)
        let dt = t.deadlinePassed()
        guard case .respond(.quorumFailed(let ft)) = dt.first else { Issue.record("\(dt)"); return }
        #expect(ft.description == "R=3 not reached: 2 of 3 replicas answered; n3:1 timed out after 500 ms")
    }
}

private let n5 = name("n5")

private func acked(_ d: [WriteCoordination.Directive]) -> Bool { d.contains(.respond(.acknowledged)) }

/// Sloppy quorum, hints and the durability receipt in the write machine (issue 13).
@Suite struct SloppyWriteTests {
    @Test func aDownPrimaryIsReplacedByTheNextLiveFallback() throws {
        var m = WriteCoordination(operation: .put, requirement: try w(.count(3)), replicas: targets(fallbacks: [n4, n5]), timeoutMillis: 1000)
        #expect(m.start(down: [n2: "dead", n4: "dead"]) == [.applyLocally])
        // n4 is down too: n5 stands in for n2.
        #expect(m.replicas.map(\.node) == [n1, n2, n3, n5])
        #expect(m.replicas.last?.standsInFor == n2)
        #expect(m.localApplied(durable: true) == [.replicate(to: [n3, n5])])
        #expect(m.replicaAcked(n5, durable: false) == [])
        #expect(m.replicaAcked(n3, durable: true) == [.respond(.acknowledged), .finish])
        #expect(m.receipt == [
            ReplicaAck(node: "n1", role: .primary, durable: true),
            ReplicaAck(node: "n5", role: .fallback(for: "n2"), durable: false),
            ReplicaAck(node: "n3", role: .primary, durable: true),
        ])
    }

    @Test func twoPrimariesDownStillTakeWTwoButNotPWTwo() throws {
        // Coordinated by a fallback (n4) because n1 and n2 are down: W=2 through n4 and n5.
        let candidates = targets(primaries: [n1, n2, n3], fallbacks: [n4, n5], local: n4)
        var m = WriteCoordination(operation: .put, requirement: try w(.count(2)), replicas: candidates, timeoutMillis: 1000)
        #expect(m.start(down: [n1: "dead", n2: "dead"]) == [.applyLocally])
        #expect(m.replicas.filter { !$0.isPrimary }.map { "\($0.node)>\($0.standsInFor?.value ?? "")" } == ["n4>n1", "n5>n2"])
        #expect(m.localApplied() == [.replicate(to: [n3, n5])])
        #expect(acked(m.replicaAcked(n5)))
        // PW=2 cannot be met by fallbacks: unavailable, nothing applied.
        var p = WriteCoordination(operation: .put, requirement: try w(.count(2), pw: .count(2)), replicas: candidates, timeoutMillis: 1000)
        let d = p.start(down: [n1: "dead", n2: "dead"])
        let f = try #require(failure(d))
        #expect(f.kind == .unavailable && f.requirement == "PW" && f.achieved == 1)
        #expect(!d.contains(.applyLocally))
    }

    @Test func withoutSloppyQuorumNoFallbackIsUsed() throws {
        var m = WriteCoordination(operation: .put, requirement: try w(.count(3)), replicas: targets(fallbacks: [n4]), timeoutMillis: 1000,
                                  sloppy: false)
        let f = try #require(failure(m.start(down: [n2: "dead"])))
        #expect(f.kind == .unavailable && f.achieved == 2 && f.candidates == 3)
        var two = WriteCoordination(operation: .put, requirement: try w(.count(2)), replicas: targets(fallbacks: [n4]), timeoutMillis: 1000,
                                    sloppy: false)
        _ = two.start(down: [n2: "dead"])
        #expect(two.replicas.map(\.node) == [n1, n2, n3])
        #expect(two.localApplied() == [.replicate(to: [n3]), .keepHint(for: [n2])])
    }

    @Test func hintsGoToThePrimaryThatMissedTheWriteOnce() throws {
        var m = WriteCoordination(operation: .put, requirement: try w(.count(1)), replicas: targets(fallbacks: [n4]), timeoutMillis: 1000)
        _ = m.start(down: [n2: "dead"])                       // n4 stands in for n2
        _ = m.localApplied()
        // The fallback fails: n2 is owed a hint. n3 stays silent until the deadline: n3 too.
        #expect(m.replicaFailed(n4, .failed("disk")).first == .keepHint(for: [n2]))
        #expect(m.deadlinePassed().first == .keepHint(for: [n3]))
        #expect(m.deadlinePassed() == [])
    }

    @Test func aFallbackAckStandsForItsPrimaryWithoutAHint() throws {
        var m = WriteCoordination(operation: .put, requirement: try w(.count(2)), replicas: targets(fallbacks: [n4]), timeoutMillis: 1000)
        _ = m.start(down: [n3: "dead"])
        let all = m.localApplied() + m.replicaAcked(n4) + m.replicaAcked(n2)
        #expect(!all.contains { if case .keepHint = $0 { true } else { false } })
        #expect(all.last == .finish)
    }

    @Test func aNotReachedFailureListsRolesAndDurability() throws {
        var m = WriteCoordination(operation: .put, requirement: try w(.all), replicas: targets(fallbacks: [n4]), timeoutMillis: 1000)
        _ = m.start(down: [n3: "dead"])
        _ = m.localApplied(durable: true)
        _ = m.replicaAcked(n4, durable: true)
        let f = try #require(failure(m.replicaFailed(n2, .connectionLost("reset"))))
        #expect(f.kind == .notReached)
        #expect(f.replicas.first { $0.node == "n4" }.map { ($0.role, $0.durable, $0.outcome) }! == (.fallback(for: "n3"), true, .acknowledged))
        #expect(f.replicas.first { $0.node == "n3" }?.outcome == .notSent("dead"))
    }

    @Test func selectionNeverUsesALocalFallbackForAReadUnlessNeeded() throws {
        let candidates = targets(fallbacks: [n4], local: n4)
        #expect(ReplicaSelection.choose(candidates, down: [:], sloppy: true).replicas.map(\.node) == [n1, n2, n3])
        #expect(ReplicaSelection.choose(candidates, down: [:], sloppy: true, coordinatorIsFallback: true).replicas.map(\.node) == [n1, n2, n3, n4])
        let down = ReplicaSelection.choose(candidates, down: [n2: "dead"], sloppy: true)
        #expect(down.replicas.last.map { ($0.node, $0.standsInFor) }! == (n4, n2))
        #expect(down.unplaced.isEmpty)
        let none = ReplicaSelection.choose(targets(), down: [n2: "dead", n3: "dead"], sloppy: true)
        #expect(none.unplaced == [n2, n3])
    }
}

/// Read repair and sloppy reads in the read machine (issue 13).
@Suite struct ReadRepairTests {
    private func object(_ v: String, actor: String, ctx: VersionVector = VersionVector()) throws -> VersionedObject {
        var o = VersionedObject()
        try o.update(context: ctx, value: Sibling(value: Array(v.utf8), timestampMillis: 1), actor: ActorID(node: actor, epoch: 1))
        return o
    }

    private func r(_ q: Quorum, pr: Quorum = .count(0)) throws -> QuorumRequirement {
        try QuorumRequirement(name: "R", quorum: q, primary: pr, n: 3)
    }

    @Test func identicalCopiesAreNeverRepaired() throws {
        let a = try object("a", actor: "n1")
        var m = ReadCoordination(requirement: try r(.count(2)), replicas: targets(), timeoutMillis: 1000)
        _ = m.start(down: [:])
        _ = m.replied(n1, a)
        #expect(m.replied(n2, a) == [.respond(.answered(a))])
        #expect(m.replied(n3, a) == [.finish(divergent: [])])
    }

    @Test func aStaleOrMissingPrimaryGetsTheMergeNotANewVersion() throws {
        let old = try object("v1", actor: "n1")
        var new = old
        try new.update(context: old.context, value: Sibling(value: Array("v2".utf8), timestampMillis: 2), actor: ActorID(node: "n1", epoch: 1))
        var m = ReadCoordination(requirement: try r(.count(2)), replicas: targets(), timeoutMillis: 1000)
        _ = m.start(down: [:])
        _ = m.replied(n1, new)
        _ = m.replied(n2, old)
        let d = m.replied(n3, nil)
        #expect(d == [.repair(targets: [n2, n3], object: new)])
        // The repair carries exactly the newest copy: no dot that no replica had.
        guard case .repair(_, let sent) = d.first else { return }
        #expect(sent.context == new.context)
        #expect(m.repairAcked(n2) == [])
        #expect(m.repairAcked(n3) == [.finish(divergent: [n2, n3])])
    }

    @Test func fallbacksCountForRButAreNotRepaired() throws {
        let a = try object("a", actor: "n1")
        var m = ReadCoordination(requirement: try r(.count(2)), replicas: targets(fallbacks: [n4]), timeoutMillis: 1000)
        #expect(m.start(down: [n3: "dead"]) == [.fetch(from: [n1, n2, n4])])
        _ = m.replied(n1, a)
        // The fallback holds nothing: its "not found" counts only once the primaries are in.
        #expect(m.replied(n4, nil) == [])
        // n2 is stale; n4 (a fallback) is not repaired.
        #expect(m.replied(n2, nil) == [.respond(.answered(a)), .repair(targets: [n2], object: a)])
        // PR=3 cannot be met with a primary down.
        var p = ReadCoordination(requirement: try r(.all, pr: .all), replicas: targets(fallbacks: [n4]), timeoutMillis: 1000)
        guard case .respond(.quorumFailed(let f)) = p.start(down: [n3: "dead"]).first else { Issue.record("expected PR unavailable"); return }
        #expect(f.kind == .unavailable && f.requirement == "PR")
    }

    @Test func fallbacksThatNeverSawTheKeyCannotOutvoteALivePrimary() throws {
        // Two primaries down: their fallbacks answer "not found" first. The one live primary
        // holds the value: R=2 waits for it instead of answering "not found".
        let a = try object("a", actor: "n1")
        var m = ReadCoordination(requirement: try r(.count(2)), replicas: targets(fallbacks: [n4, n5]), timeoutMillis: 1000)
        #expect(m.start(down: [n2: "dead", n3: "dead"]) == [.fetch(from: [n1, n4, n5])])
        #expect(m.replied(n4, nil) == [])
        #expect(m.replied(n5, nil) == [])
        #expect(m.replied(n1, a).first == .respond(.answered(a)))
        // With the key nowhere, the misses do count once the primary answered.
        var none = ReadCoordination(requirement: try r(.count(2)), replicas: targets(fallbacks: [n4, n5]), timeoutMillis: 1000)
        _ = none.start(down: [n2: "dead", n3: "dead"])
        _ = none.replied(n4, nil)
        #expect(none.replied(n1, nil).first == .respond(.answered(nil)))
    }

    @Test func aRefillingReplicasNotFoundCountsOnlyOnceEveryPrimaryAnswered() throws {
        let a = try object("a", actor: "n1")
        // n3 lost its disk and answers first: R=2 waits for a primary that can answer.
        var m = ReadCoordination(requirement: try r(.count(2)), replicas: targets(), timeoutMillis: 1000)
        _ = m.start(down: [:])
        #expect(m.replied(n3, nil, refilling: true) == [])
        #expect(m.replied(n2, nil) == [])
        #expect(m.replied(n1, a).first == .respond(.answered(a)))
        // Every primary answered and none holds the key (a new cluster: all refilling): absent.
        var fresh = ReadCoordination(requirement: try r(.count(2)), replicas: targets(), timeoutMillis: 1000)
        _ = fresh.start(down: [:])
        _ = fresh.replied(n1, nil, refilling: true)
        #expect(fresh.replied(n2, nil, refilling: true) == [])
        #expect(fresh.replied(n3, nil, refilling: true).first == .respond(.answered(nil)))
        // A refilling replica's value counts like any other (it arrived after the loss).
        var found = ReadCoordination(requirement: try r(.count(1)), replicas: targets(), timeoutMillis: 1000)
        _ = found.start(down: [:])
        #expect(found.replied(n3, a, refilling: true).first == .respond(.answered(a)))
        // A stale replica's (away past the hint window) does not: it may be an old version whose
        // deletion it missed. Merged with the others', it is answered.
        var old = ReadCoordination(requirement: try r(.count(1)), replicas: targets(), timeoutMillis: 1000)
        _ = old.start(down: [:])
        #expect(old.replied(n3, a, stale: true) == [])
        #expect(old.replied(n1, a).first == .respond(.answered(a)))
        // With a primary down and the other failing, its value alone is not reached.
        var alone = ReadCoordination(requirement: try r(.count(1)), replicas: targets(local: n2), timeoutMillis: 1000, sloppy: false)
        _ = alone.start(down: [n1: "dead"])
        #expect(alone.replied(n3, a, stale: true) == [])
        let d = alone.replicaFailed(n2, .failed("disk"))
        guard case .respond(.quorumFailed(let f)) = d.first else { Issue.record("expected not reached, got \(d)"); return }
        #expect(f.kind == .notReached)
    }

    @Test func aRefillingMissWithAPrimaryDownIsNotReachedAndSaysWhy() throws {
        // n1 (which may hold the key) is down; n2 missed the write; n3 lost its disk.
        var m = ReadCoordination(requirement: try r(.count(2)), replicas: targets(local: n2), timeoutMillis: 1000, sloppy: false)
        #expect(m.start(down: [n1: "dead"]) == [.fetch(from: [n2, n3])])
        #expect(m.replied(n2, nil) == [])
        let d = m.replied(n3, nil, refilling: true)
        guard case .respond(.quorumFailed(let f)) = d.first else { Issue.record("expected not reached, got \(d)"); return }
        #expect(f.kind == .notReached && f.achieved == 1)
        #expect(f.description.contains("refilling"))
        // The same in a blocking read.
        var b = ReadCoordination(requirement: try r(.count(2)), replicas: targets(local: n2), timeoutMillis: 1000, sloppy: false, repair: .blocking)
        _ = b.start(down: [n1: "dead"])
        _ = b.replied(n2, nil)
        guard case .respond(.quorumFailed(let g))? = b.replied(n3, nil, refilling: true).first else { Issue.record("blocking read answered"); return }
        #expect(g.kind == .notReached)
        // With R=1, the healthy replica's miss alone is an answer.
        var one = ReadCoordination(requirement: try r(.count(1)), replicas: targets(local: n2), timeoutMillis: 1000, sloppy: false)
        _ = one.start(down: [n1: "dead"])
        _ = one.replied(n3, nil, refilling: true)
        #expect(one.replied(n2, nil).first == .respond(.answered(nil)))
    }

    @Test func aBlockingReadAnswersOnlyOnceRReplicasHoldTheMerge() throws {
        let a = try object("a", actor: "n1")
        var m = ReadCoordination(requirement: try r(.count(2)), replicas: targets(), timeoutMillis: 1000, repair: .blocking)
        _ = m.start(down: [:])
        #expect(m.replied(n1, a) == [])
        #expect(m.replied(n2, nil) == [])                     // R answers, but only one holds `a`
        #expect(m.replied(n3, nil) == [.repair(targets: [n2, n3], object: a)])
        #expect(m.repairFailed(n3, "timed out") == [])
        #expect(m.repairAcked(n2) == [.respond(.answered(a)), .finish(divergent: [n2, n3])])
    }

    @Test func aBlockingReadWhoseRepairsFailIsNotReached() throws {
        let a = try object("a", actor: "n1")
        var m = ReadCoordination(requirement: try r(.count(2)), replicas: targets(), timeoutMillis: 1000, repair: .blocking)
        _ = m.start(down: [:])
        _ = m.replied(n1, a)
        _ = m.replied(n2, nil)
        _ = m.replied(n3, nil)
        _ = m.repairFailed(n2, "timed out")
        let d = m.repairFailed(n3, "reset")
        guard case .respond(.quorumFailed(let f)) = d.first else { Issue.record("expected not reached, got \(d)"); return }
        #expect(f.kind == .notReached && f.achieved == 1)
        #expect(f.description.contains("stale and not repaired: timed out"))
    }
}
