import Testing
import CairnCore
@testable import CairnRing

/// Test names are literals known to be valid.
private func name(_ s: String) -> NodeName {
    do { return try NodeName(s) } catch { preconditionFailure("\(s) is not a valid test name") }
}

private func address(_ i: Int) -> HostPort { HostPort(host: "127.0.0.1", port: 7400 + i) }

private func cluster(_ count: Int, q: Int = 64, n: Int = 3) throws -> RingState {
    try RingState.bootstrap(cluster: "c", partitionCount: q, nVal: n, members: (1...count).map { (name("n\($0)"), address($0)) })
}

/// Completes every pending transfer, checking after each that no partition's replicas include
/// a node that has neither been a replica since before the plan nor received its copy.
private func completeAll(_ s: RingState) throws -> RingState {
    var s = s
    let before = s
    for t in s.pendingTransfers {
        s = s.completing(t)
        try checkPlacementSafety(s, before: before, done: Set(before.transfers.filter { $0 <= t }))
    }
    return s
}

private func checkPlacementSafety(_ s: RingState, before: RingState, done: Set<PartitionTransfer>) throws {
    for p in s.ring.partitions {
        for r in s.replicas(of: p) {
            let wasReplica = before.ring.preferenceList(for: p, n: before.nVal).contains(r)
            let received = done.contains { $0.partition == p && $0.to == r }
            #expect(wasReplica || received, "\(r) serves \(p) without its data")
        }
    }
}

@Suite struct RingStateTests {
    @Test func bootstrapMakesEveryMemberValidAndTheFirstClaimant() throws {
        let s = try cluster(3)
        #expect(s.version == 1)
        #expect(s.claimant == name("n1"))
        #expect(s.members.map(\.status) == [.valid, .valid, .valid])
        #expect(!s.isPlanInProgress)
        for p in s.ring.partitions { #expect(Set(s.replicas(of: p)).count == 3) }
        #expect(try cluster(3) == s, "bootstrapping from the same list gives the same state")
    }

    @Test func aJoinMovesOwnershipOnlyAsItsTransfersComplete() throws {
        var s = try cluster(3).joining(name("n4"), at: address(4))
        #expect(s.member(name("n4"))?.status == .joining)
        #expect(s.staged == [.join(name("n4"))])
        #expect(s.owned(by: name("n4")) == 0)
        let plan = try s.plan()
        #expect(plan.ownedAfter[name("n4")] == 16)
        #expect(plan.ownedBefore[name("n4")] == nil)
        #expect(plan.transfers.allSatisfy { $0.to == name("n4") })
        #expect(plan.lost.isEmpty && plan.atRisk.isEmpty)
        s = try s.committing()
        #expect(s.isPlanInProgress && s.staged.isEmpty)
        #expect(s.transfers == plan.transfers)
        // Nothing flips before its copy is complete.
        #expect(s.owned(by: name("n4")) == 0)
        for t in s.transfers { #expect(s.vnodePartitions(of: name("n4")).contains(t.partition)) }
        let first = try #require(s.transfers.first)
        let sameP = s.transfers.filter { $0.partition == first.partition }
        // The per-partition check agrees with the whole set, for every member and partition,
        // before and after some transfers complete.
        func agree(_ s: RingState) {
            for m in s.members.map(\.name) {
                let all = s.vnodePartitions(of: m)
                for p in s.ring.partitions { #expect(s.runsVnode(of: m, for: p) == all.contains(p)) }
            }
        }
        agree(s)
        for t in sameP { s = s.completing(t) }
        agree(s)
        #expect(s.hasFlipped(first.partition))
        #expect(s.replicas(of: first.partition).contains(name("n4")))
        s = try completeAll(s)
        #expect(!s.isPlanInProgress)
        #expect(s.member(name("n4"))?.status == .valid)
        #expect(s.owned(by: name("n4")) == 16)
        #expect(s.ring.members == [name("n1"), name("n2"), name("n3"), name("n4")])
    }

    /// A partition copied to two new nodes flips when both copies are complete: the node whose
    /// copy completed first keeps running its vnode meanwhile (a vnode stopped and started again
    /// would refuse the forwarded writes in between, and its copy would look left over).
    @Test func aReceiverWhoseCopyCompletedKeepsItsVnodeUntilThePartitionFlips() throws {
        var s = try cluster(3).joining(name("n4"), at: address(4)).joining(name("n5"), at: address(5)).committing()
        let byPartition = Dictionary(grouping: s.transfers, by: \.partition)
        let (p, pair) = try #require(byPartition.sorted { $0.key < $1.key }.first { Set($0.value.map(\.to)).count >= 2 })
        let first = try #require(pair.first)
        s = s.completing(first)
        #expect(!s.hasFlipped(p))
        #expect(s.vnodePartitions(of: first.to).contains(p))
        #expect(s.runsVnode(of: first.to, for: p))
        s = try completeAll(s)
        #expect(!s.isPlanInProgress)
        #expect(s.vnodePartitions(of: first.to).contains(p) == s.replicas(of: p).contains(first.to))
    }

    @Test func aLeaveHandsTheLeaversDataOverThenItExitsAndIsForgotten() throws {
        var s = try cluster(4).stagingLeave(name("n2"))
        let plan = try s.plan()
        #expect(plan.transfers.allSatisfy { $0.from == name("n2") })
        #expect(plan.ownedAfter[name("n2")] == nil)
        s = try s.committing()
        #expect(s.member(name("n2"))?.status == .leaving)
        s = try completeAll(s)
        #expect(s.member(name("n2"))?.status == .exiting)
        #expect(s.owned(by: name("n2")) == 0)
        #expect(s.vnodePartitions(of: name("n2")).isEmpty)
        #expect(s.departed.isEmpty, "an exiting member has not departed yet")
        s = try s.forgetting(name("n2"))
        #expect(s.member(name("n2")) == nil)
        #expect(s.departed == [name("n2")])
        #expect(throws: ValidationError.self) { try s.stagingLeave(name("n2")) }
    }

    @Test func departedMembersAreRecordedBoundedAndClearedByAJoin() throws {
        var s = try cluster(4).stagingRemove(name("n3"))
        s = try completeAll(try s.committing())
        #expect(s.departed == [name("n3")], "a removed member departs when the plan completes")
        let decoded = try RingState(decoding: s.encoded())
        #expect(decoded == s && decoded.departed == [name("n3")])
        // The same name joins again (an emptied node): it is no longer departed.
        s = try s.joining(name("n3"), at: address(3))
        #expect(s.departed.isEmpty)
        // At most maxDeparted names, the newest kept.
        var big = try cluster(2, q: 16)
        for i in 0..<(RingState.maxDeparted + 5) {
            big = try completeAll(try big.joining(name("j\(i)"), at: address(100 + i)).committing())
            big = try big.stagingRemove(name("j\(i)"))
            big = try completeAll(try big.committing())
        }
        #expect(big.departed.count == RingState.maxDeparted)
        #expect(big.departed.last == name("j\(RingState.maxDeparted + 4)"))
        #expect(try RingState(decoding: big.encoded()) == big)
    }

    @Test func aFormatOneStateIsStillReadWithNoneDeparted() throws {
        let s = try cluster(3, q: 16)
        var old = s.encoded()
        // Format 1: the same bytes without the departed list (an empty one is one varint 0).
        #expect(old.first == 2 && old.last == 0)
        old[0] = 1
        old.removeLast()
        let read = try RingState(decoding: old)
        #expect(read == s)
    }

    @Test func aRemovedMembersReplicasAreRebuiltFromTheSurvivors() throws {
        var s = try cluster(4).stagingRemove(name("n3"))
        let plan = try s.plan(down: [name("n3")])
        #expect(!plan.transfers.isEmpty)
        #expect(plan.transfers.allSatisfy { $0.from != name("n3") })
        #expect(plan.atRisk.isEmpty, "3 live replicas remain for every partition")
        s = try s.committing()
        s = try completeAll(s)
        #expect(s.member(name("n3")) == nil, "a removed member is forgotten when the plan completes")
        for p in s.ring.partitions { #expect(!s.replicas(of: p).contains(name("n3"))) }
    }

    @Test func shrinkingBelowNValNeedsNoCopyAndGrowingCopiesFromAStayingReplica() throws {
        var s = try cluster(2).stagingLeave(name("n2"))
        #expect(try s.plan().transfers.isEmpty)
        s = try s.committing()
        #expect(!s.isPlanInProgress, "a plan without transfers completes at once")
        #expect(s.member(name("n2"))?.status == .exiting)
        var g = try cluster(1).joining(name("n2"), at: address(2))
        let plan = try g.plan()
        #expect(plan.transfers.count == 64, "n2 becomes a replica of every partition")
        #expect(plan.transfers.allSatisfy { $0.from == name("n1") })
        g = try completeAll(try g.committing())
        for p in g.ring.partitions { #expect(g.replicas(of: p).count == 2) }
    }

    @Test func operatorMistakesGetClearErrors() throws {
        let s = try cluster(3)
        func reason(_ body: () throws -> RingState) -> String {
            do { _ = try body(); return "no error" } catch let e as ValidationError { return e.reason } catch { return "\(error)" }
        }
        #expect(reason { try s.stagingLeave(name("n7")) } == "n7 is not a member")
        #expect(reason { try s.committing() } == "no changes are staged")
        let leaving = try s.stagingLeave(name("n2"))
        #expect(try leaving.stagingLeave(name("n2")) == leaving, "staging the same change twice is harmless")
        #expect(reason { try leaving.stagingRemove(name("n2")) } == "staged changes conflict: leave n2 is already staged")
        #expect(reason { try s.stagingRemove(name("n1")) }.contains("claimant"))
        #expect(reason { try s.joining(name("n4"), at: address(1)) } == "n1 already uses 127.0.0.1:7401")
        #expect(reason { try s.joining(name("n2"), at: address(9)) } == "n2 is already a member at 127.0.0.1:7402")
        #expect(try s.joining(name("n2"), at: address(2)) == s, "a repeated join changes nothing")
        let all = try s.stagingLeave(name("n2")).stagingLeave(name("n3")).stagingLeave(name("n1"))
        #expect(reason { try all.committing() } == "staged changes conflict: no member would be left")
        let inProgress = try s.joining(name("n4"), at: address(4)).committing().joining(name("n5"), at: address(5))
        #expect(reason { try inProgress.committing() }.hasPrefix("a plan is in progress"))
        let cleared = try s.joining(name("n4"), at: address(4)).clearingStaged()
        #expect(cleared.member(name("n4")) == nil && cleared.staged.isEmpty)
    }

    @Test func unknownAndRepeatedCompletionsChangeNothing() throws {
        let s = try cluster(3).joining(name("n4"), at: address(4)).committing()
        let bogus = PartitionTransfer(partition: PartitionID(0), from: name("n9"), to: name("n4"))
        #expect(s.completing(bogus) == s)
        let t = try #require(s.transfers.first)
        let once = s.completing(t)
        #expect(once.completing(t) == once)
    }

    @Test(arguments: [1, 2, 3, 4, 5])
    func randomHistoriesKeepPlacementSafeAndTheEncodingExact(seed: UInt64) throws {
        var rng = SplitMix64(seed: seed)
        var s = try cluster(3, q: 32)
        var nextNode = 4
        for _ in 0..<60 {
            let valid = s.members.filter { $0.status == .valid }.map(\.name)
            switch rng.next() % 6 {
            case 0 where !s.isPlanInProgress && s.members.count < 9:
                s = try s.joining(name("n\(nextNode)"), at: address(nextNode))
                nextNode += 1
            case 1 where valid.count > 2:
                let v = valid[Int(rng.next() % UInt64(valid.count))]
                if !s.staged.contains(where: { $0.node == v }) { s = try s.stagingLeave(v) }
            case 2 where valid.count > 2:
                let v = valid[Int(rng.next() % UInt64(valid.count))]
                if v != s.claimant, !s.staged.contains(where: { $0.node == v }) { s = try s.stagingRemove(v) }
            case 3 where !s.isPlanInProgress && !s.staged.isEmpty:
                if (try? s.plan()) != nil { s = try s.committing() }
            case 4:
                let before = s
                let pending = s.pendingTransfers
                if !pending.isEmpty {
                    s = s.completing(pending[Int(rng.next() % UInt64(pending.count))])
                    try checkPlacementSafety(s, before: before, done: before.completed.union(s.completed))
                }
            default:
                for m in s.members where m.status == .exiting { s = try s.forgetting(m.name) }
            }
            let decoded = try RingState(decoding: s.encoded())
            #expect(decoded == s)
            for p in s.ring.partitions {
                let replicas = s.replicas(of: p)
                #expect(Set(replicas).count == replicas.count)
                #expect(replicas.count == min(s.nVal, s.effectiveRing(for: p).members.count))
                #expect(replicas.allSatisfy { s.member($0) != nil }, "every replica is a member")
            }
        }
    }

    @Test func mergeIsCommutativeAssociativeAndIdempotent() throws {
        // Branching histories: several claimants taking over and moving on independently.
        var rng = SplitMix64(seed: 99)
        let root = try cluster(4, q: 16)
        var states = [root]
        for i in 0..<40 {
            let base = states[Int(rng.next() % UInt64(states.count))]
            let valid = base.members.filter { $0.status == .valid }.map(\.name)
            var next = base
            switch rng.next() % 4 {
            case 0: next = try base.takingOver(by: valid[Int(rng.next() % UInt64(valid.count))])
            case 1 where !base.isPlanInProgress: next = try base.joining(name("x\(i)"), at: address(100 + i))
            case 2 where !base.staged.isEmpty && !base.isPlanInProgress: next = (try? base.committing()) ?? base.clearingStaged()
            default: next = base.pendingTransfers.first.map { base.completing($0) } ?? base.clearingStaged()
            }
            states.append(next)
        }
        for _ in 0..<300 {
            let a = states[Int(rng.next() % UInt64(states.count))]
            let b = states[Int(rng.next() % UInt64(states.count))]
            let c = states[Int(rng.next() % UInt64(states.count))]
            #expect(RingState.merged(a, b) == RingState.merged(b, a))
            #expect(RingState.merged(a, a) == a)
            #expect(RingState.merged(RingState.merged(a, b), c) == RingState.merged(a, RingState.merged(b, c)))
        }
    }

    @Test func damagedEncodingsThrowAndNeverTrap() throws {
        let s = try cluster(3, q: 16).joining(name("n4"), at: address(4)).committing()
        let bytes = s.encoded()
        for cut in 0..<bytes.count {
            #expect(throws: DecodeError.self) { try RingState(decoding: Array(bytes[..<cut])) }
        }
        var rng = SplitMix64(seed: 7)
        var rejected = 0
        for _ in 0..<2000 {
            var b = bytes
            b[Int(rng.next() % UInt64(b.count))] ^= UInt8(truncatingIfNeeded: rng.next() | 1)
            if (try? RingState(decoding: b)) == nil { rejected += 1 }
        }
        #expect(rejected > 0)
        #expect(throws: DecodeError.self) { try RingState(decoding: bytes + [0]) }
    }
}
