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
        #expect(d.last == .finish)
    }

    @Test func failsAsSoonAsWCannotBeReached() throws {
        var m = WriteCoordination(operation: .delete, requirement: try w(.all), replicas: targets(), timeoutMillis: 1000)
        _ = m.start(down: [:])
        _ = m.localApplied()
        let d = m.replicaFailed(n2, .connectionLost("reset"))
        #expect(failure(d)?.kind == .notReached)
        #expect(!m.isFinished)                                 // still waiting for n3
        #expect(m.replicaAcked(n3) == [.finish])
    }

    @Test func pwCountsOnlyPrimaries() throws {
        let replicas = targets(primaries: [n1, n2], fallbacks: [n4])
        var m = WriteCoordination(operation: .put, requirement: try w(.count(2), pw: .count(2)), replicas: replicas, timeoutMillis: 1000)
        _ = m.start(down: [:])
        _ = m.localApplied()
        #expect(m.replicaAcked(n4) == [])                      // W=2 met, PW=2 not yet
        let d = m.replicaFailed(n2, .timedOut(afterMillis: 1000))
        let f = try #require(failure(d))
        #expect(f.requirement == "PW" && f.achieved == 1 && f.candidates == 2)
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
        #expect(m.localApplied() == [.replicate(to: [n3]), .respond(.acknowledged)])
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
        #expect(m.replied(n3, nil) == [.finish(divergent: [n1, n2, n3])])
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
