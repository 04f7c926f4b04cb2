import Testing
@testable import CairnMembership
import CairnCore

private func node(_ s: String) -> NodeName { try! NodeName(s) }   // literals: cannot fail

private let n1 = node("n1"), n2 = node("n2"), n3 = node("n3"), n4 = node("n4"), n5 = node("n5")
private let t0 = ContinuousClock.now

/// The timings these tests were written in (memberlist's LAN values: 1 s, 500 ms, α = 4, β = 6),
/// so each expectation reads in whole seconds; the defaults are tuned by `cairn-sim --detection`.
private let timing: SWIMSettings = {
    var s = SWIMSettings()
    s.probeInterval = .seconds(1)
    s.probeTimeout = .milliseconds(500)
    s.suspicionMultiplier = 4
    s.suspicionMaxMultiplier = 6
    return s
}()

/// n1 with four peers, all alive.
private func instance(seed: UInt64 = 1) -> SWIMInstance {
    var s = SWIMInstance(me: n1, settings: timing, seed: seed, now: t0)
    for m in [n2, n3, n4, n5] { _ = s.add(m) }
    return s
}

private func sends(_ ds: [SWIMDirective]) -> [(NodeName, SWIMMessage)] {
    ds.compactMap { if case .send(let to, let m) = $0 { (to, m) } else { nil } }
}

private func changes(_ ds: [SWIMDirective]) -> [SWIMDirective] {
    ds.filter { if case .statusChanged = $0 { true } else { false } }
}

/// The one ping in `ds`: its target and sequence.
private func ping(_ ds: [SWIMDirective]) -> (NodeName, UInt64)? {
    for (to, m) in sends(ds) { if case .ping(let seq, _) = m { return (to, seq) } }
    return nil
}

@Suite struct SWIMTests {
    @Test func addingAMemberReportsItAlive() {
        var s = SWIMInstance(me: n1, settings: timing, seed: 1, now: t0)
        #expect(s.add(n2) == [.statusChanged(n2, from: nil, to: .alive, incarnation: 0)])
        #expect(s.add(n2).isEmpty && s.add(n1).isEmpty, "known members and itself are not added again")
    }

    /// A direct probe answered: no suspicion, health untouched, the next probe goes to another
    /// member one interval later.
    @Test func aProbeAnsweredDirectly() throws {
        var s = instance()
        let (target, seq) = try #require(ping(s.tick(now: t0)))
        #expect(seq == 1)
        #expect(s.received(.ack(sequence: seq, target: target, updates: []), from: target, now: t0 + .milliseconds(10)).isEmpty)
        #expect(s.localHealth == 0)
        #expect(s.tick(now: t0 + .milliseconds(999)).isEmpty, "nothing before the interval")
        let (second, seq2) = try #require(ping(s.tick(now: t0 + .seconds(1))))
        #expect(second != target && seq2 == 2)
    }

    /// No ack in time: k = 3 others are asked to probe; an ack relayed by one of them clears it.
    @Test func anIndirectProbeThatSucceeds() throws {
        var s = instance()
        let (target, seq) = try #require(ping(s.tick(now: t0)))
        let requests = sends(s.tick(now: t0 + .milliseconds(500)))
        #expect(requests.count == 3)
        #expect(Set(requests.map(\.0)).count == 3 && !requests.map(\.0).contains(target) && !requests.map(\.0).contains(n1))
        for (_, m) in requests {
            guard case .pingRequest(let rseq, let rtarget, _) = m else { Issue.record("expected a ping request, got \(m)"); return }
            #expect(rseq == seq && rtarget == target)
        }
        let helper = requests[0].0
        #expect(s.received(.ack(sequence: seq, target: target, updates: []), from: helper, now: t0 + .milliseconds(700)).isEmpty)
        #expect(changes(s.tick(now: t0 + .seconds(1))).isEmpty && s.status(of: target) == .alive && s.localHealth == 0)
    }

    /// No ack through the helpers either: the target is suspected; every helper nacked, so only
    /// the failed probe counts against local health.
    @Test func aFailedProbeSuspectsTheTarget() throws {
        var s = instance()
        let (target, seq) = try #require(ping(s.tick(now: t0)))
        let helpers = sends(s.tick(now: t0 + .milliseconds(500))).map(\.0)
        for h in helpers { _ = s.received(.nack(sequence: seq, target: target), from: h, now: t0 + .milliseconds(900)) }
        let out = s.tick(now: t0 + .seconds(1))
        #expect(changes(out) == [.statusChanged(target, from: .alive, to: .suspect, incarnation: 0)])
        #expect(s.status(of: target) == .suspect && s.localHealth == 1)
    }

    /// Lifeguard: helpers that did not even nack mean this member's own messages are not getting
    /// through: its health multiplier grows further, and its probes slow down by it.
    @Test func missingNacksRaiseTheLocalHealthMultiplierAndSlowProbing() throws {
        var s = instance()
        _ = s.tick(now: t0)
        _ = s.tick(now: t0 + .milliseconds(500))
        // No acks, no nacks: the probe fails (+1) and no helper nacked (+1); the next probe starts
        // in the same tick, already slowed by the multiplier (× 3).
        let out = s.tick(now: t0 + .seconds(1))
        #expect(s.localHealth == 2)
        let (_, seq) = try #require(ping(out))
        #expect(seq == 2)
        #expect(sends(s.tick(now: t0 + .seconds(1) + .milliseconds(1499))).isEmpty, "the probe timeout is 3 × 500 ms now")
        // Helpers are alive members only: the first target is suspect now, so two are asked.
        #expect(sends(s.tick(now: t0 + .seconds(1) + .milliseconds(1500))).count == 2)
    }

    /// With no confirmation a suspicion lasts β × α × interval = 6 × 4 s; each
    /// independent confirmation shortens it, down to α × … = 4 s with k of them.
    @Test func aSuspicionBecomesDeadAfterItsTimeoutWhichConfirmationsShorten() throws {
        let s0 = instance()
        #expect(s0.suspicionTimeout(confirmations: 0) == .seconds(24))
        #expect(s0.suspicionTimeout(confirmations: 3) == .seconds(4))
        #expect(s0.suspicionTimeout(confirmations: 1) < .seconds(24) && s0.suspicionTimeout(confirmations: 1) > s0.suspicionTimeout(confirmations: 2))

        var s = instance()
        let at = t0 + .seconds(5)
        let suspicion = MemberUpdate(name: n3, status: .suspect, incarnation: 0, by: n2)
        #expect(changes(s.received(.ping(sequence: 9, updates: [suspicion]), from: n2, now: at)) == [.statusChanged(n3, from: .alive, to: .suspect, incarnation: 0)])
        for by in [n4, n5] {
            _ = s.received(.ping(sequence: 10, updates: [MemberUpdate(name: n3, status: .suspect, incarnation: 0, by: by)]), from: by, now: at)
        }
        // Three independent suspecters (n2, n4, n5): the 4 s floor.
        #expect(changes(s.tick(now: at + .milliseconds(3999))).isEmpty)
        #expect(changes(s.tick(now: at + .seconds(4))) == [.statusChanged(n3, from: .suspect, to: .dead, incarnation: 0)])
    }

    /// A suspicion of this member is refuted: a higher incarnation, gossiped as alive, and (as a
    /// sign its own messages may be late) a higher local health multiplier.
    @Test func aSuspicionOfItselfIsRefuted() {
        var s = instance()
        let out = s.received(.ping(sequence: 4, updates: [MemberUpdate(name: n1, status: .suspect, incarnation: 0, by: n2)]), from: n2, now: t0)
        #expect(s.incarnation == 1 && s.localHealth == 1)
        guard case .send(let to, .ack(let seq, let target, let updates))? = out.last else { Issue.record("expected an ack, got \(out)"); return }
        #expect(to == n2 && seq == 4 && target == n1)
        #expect(updates.contains(MemberUpdate(name: n1, status: .alive, incarnation: 1)))
        // An old rumour at a lower incarnation changes nothing.
        _ = s.received(.ping(sequence: 5, updates: [MemberUpdate(name: n1, status: .dead, incarnation: 0)]), from: n3, now: t0)
        #expect(s.incarnation == 1)
    }

    /// Pinging for another member: its ack is relayed with the asker's sequence; silence becomes
    /// a nack at the probe timeout.
    @Test func indirectProbesAreRelayedOrNacked() throws {
        var s = instance()
        let out = s.received(.pingRequest(sequence: 77, target: n3, updates: []), from: n2, now: t0)
        let (to, seq) = try #require(ping(out))
        #expect(to == n3)
        let relayed = s.received(.ack(sequence: seq, target: n3, updates: []), from: n3, now: t0 + .milliseconds(50))
        guard case .send(n2, .ack(77, n3, _))? = relayed.first else { Issue.record("expected the ack relayed to n2, got \(relayed)"); return }
        let again = s.received(.pingRequest(sequence: 78, target: n4, updates: []), from: n2, now: t0 + .seconds(2))
        #expect(ping(again)?.0 == n4)
        #expect(sends(s.tick(now: t0 + .seconds(2) + .milliseconds(499))).allSatisfy { if case .nack = $0.1 { false } else { true } })
        let nacks = sends(s.tick(now: t0 + .seconds(2) + .milliseconds(500))).filter { if case .nack = $0.1 { true } else { false } }
        #expect(nacks.count == 1 && nacks.first?.0 == n2)
        if case .nack(let nseq, let ntarget)? = nacks.first?.1 { #expect(nseq == 78 && ntarget == n4) }
    }

    /// Indirect probes run for others are bounded (`maxRelays`): a flood of requests is not held.
    @Test func relaysAreBounded() {
        var settings = timing
        settings.maxRelays = 2
        var s = SWIMInstance(me: n1, settings: settings, seed: 1, now: t0)
        for m in [n2, n3, n4] { _ = s.add(m) }
        let pings = (1...4).map { i in ping(s.received(.pingRequest(sequence: UInt64(i), target: n3, updates: []), from: n2, now: t0)) }
        #expect(pings.map { $0 != nil } == [true, true, false, false])
        // At the timeout both held relays nack, and room is free again.
        #expect(sends(s.tick(now: t0 + .milliseconds(500))).filter { if case .nack = $0.1 { true } else { false } }.count == 2)
        #expect(ping(s.received(.pingRequest(sequence: 9, target: n3, updates: []), from: n2, now: t0 + .milliseconds(500))) != nil)
    }

    /// SWIM's precedence: higher incarnation wins; at equal incarnation suspect beats alive and
    /// dead beats both; dead is left only for alive at a higher incarnation.
    @Test func updatesFollowSWIMPrecedence() {
        var s = instance()
        func hear(_ u: MemberUpdate) -> [SWIMDirective] { changes(s.received(.ping(sequence: 1, updates: [u]), from: n5, now: t0)) }
        #expect(hear(MemberUpdate(name: n2, status: .suspect, incarnation: 0, by: n5)) == [.statusChanged(n2, from: .alive, to: .suspect, incarnation: 0)])
        #expect(hear(MemberUpdate(name: n2, status: .alive, incarnation: 0)).isEmpty, "alive at the same incarnation does not clear a suspicion")
        #expect(hear(MemberUpdate(name: n2, status: .alive, incarnation: 1)) == [.statusChanged(n2, from: .suspect, to: .alive, incarnation: 1)])
        #expect(hear(MemberUpdate(name: n2, status: .dead, incarnation: 1)) == [.statusChanged(n2, from: .alive, to: .dead, incarnation: 1)])
        #expect(hear(MemberUpdate(name: n2, status: .suspect, incarnation: 5, by: n5)).isEmpty, "nothing but alive leaves dead")
        #expect(hear(MemberUpdate(name: n2, status: .alive, incarnation: 1)).isEmpty)
        #expect(hear(MemberUpdate(name: n2, status: .alive, incarnation: 2)) == [.statusChanged(n2, from: .dead, to: .alive, incarnation: 2)])
        #expect(hear(MemberUpdate(name: n3, status: .alive, incarnation: 0)).isEmpty, "old news")
    }

    /// The probe order is a shuffled round robin: every live member once per pass; dead ones are
    /// skipped. The same seed gives the same order.
    @Test func everyLiveMemberIsProbedOncePerPass() {
        func pass(seed: UInt64) -> [NodeName] {
            var s = instance(seed: seed)
            _ = s.received(.ping(sequence: 1, updates: [MemberUpdate(name: n4, status: .dead, incarnation: 0)]), from: n2, now: t0)
            var targets: [NodeName] = []
            for i in 0..<3 {
                let at = t0 + .seconds(Int64(i))
                if let (to, seq) = ping(s.tick(now: at)) {
                    targets.append(to)
                    _ = s.received(.ack(sequence: seq, target: to, updates: []), from: to, now: at)
                }
            }
            return targets
        }
        let first = pass(seed: 3)
        #expect(Set(first) == [n2, n3, n5] && first.count == 3)
        #expect(pass(seed: 3) == first)
    }
}

@Suite struct GossipPacketTests {
    @Test func everyMessageRoundTrips() throws {
        let updates = [MemberUpdate(name: n2, status: .suspect, incarnation: 7, by: n3), MemberUpdate(name: n4, status: .dead, incarnation: 1)]
        let messages: [SWIMMessage] = [
            .ping(sequence: 1, updates: updates), .pingRequest(sequence: 2, target: n5, updates: []),
            .ack(sequence: UInt64.max, target: n2, updates: updates), .nack(sequence: 4, target: n3),
        ]
        for m in messages {
            for claimant in [n1, nil] {
                let p = GossipPacket(sender: n1, message: m, ringVersion: 12, ringClaimant: claimant, ringDigest: 0xABCD)
                #expect(try GossipPacket(decoding: p.encoded()) == p)
            }
        }
    }

    @Test func damagedPacketsThrow() {
        let bytes = GossipPacket(sender: n1, message: .ping(sequence: 9, updates: [MemberUpdate(name: n2, status: .alive, incarnation: 3)]),
                                 ringVersion: 1, ringClaimant: n1, ringDigest: 2).encoded()
        for cut in 0..<bytes.count {
            #expect(throws: DecodeError.self) { try GossipPacket(decoding: Array(bytes[..<cut])) }
        }
        #expect(throws: DecodeError.self) { try GossipPacket(decoding: bytes + [0]) }
        var badStatus = bytes
        badStatus[badStatus.count - 3] = 9   // the update's status byte
        #expect(throws: DecodeError.self) { try GossipPacket(decoding: badStatus) }
    }
}

@Suite struct SWIMRemoveTests {
    @Test func aRemovedMemberIsNeitherProbedNorGossipedAbout() {
        var s = instance()
        s.remove(n3)
        #expect(s.status(of: n3) == nil)
        #expect(!s.memberNames.contains(n3))
        var now = t0
        for _ in 0..<40 {
            let ds = s.tick(now: now)
            for (to, m) in sends(ds) {
                #expect(to != n3)
                if case .ping(_, let updates) = m { #expect(!updates.contains { $0.name == n3 }) }
            }
            now = now + .milliseconds(250)
        }
    }
}

@Suite struct SWIMDeadlineTests {
    /// A shell sleeps until `nextDeadline`: after a tick it must lie in the future, or the shell
    /// would spin (a probe in flight past the probe interval once made it stick in the past).
    @Test func afterATickTheNextDeadlineIsInTheFuture() {
        var s = instance()
        var now = t0
        for _ in 0..<300 {
            _ = s.tick(now: now)
            #expect(s.nextDeadline > now)
            now = max(s.nextDeadline, now + .milliseconds(1))
        }
        #expect(s.status(of: n2) == .dead, "nobody answers: every peer ends dead")
    }
}

@Suite struct SWIMComebackTests {
    /// A member declared dead while it was cut off pings us again: our ack tells it, it refutes
    /// with a higher incarnation, and it is alive again here.
    @Test func aDeadMemberThatPingsLearnsItAndRefutes() {
        var a = SWIMInstance(me: n1, settings: timing, seed: 1, now: t0)
        var b = SWIMInstance(me: n2, settings: timing, seed: 2, now: t0)
        _ = a.add(n2)
        _ = b.add(n1)
        _ = a.received(.ack(sequence: 0, target: n3, updates: [MemberUpdate(name: n2, status: .dead, incarnation: 0, by: n3)]), from: n3, now: t0)
        #expect(a.status(of: n2) == .dead)
        let acks = sends(a.received(.ping(sequence: 5, updates: []), from: n2, now: t0))
        guard case (n2, .ack(5, n1, let updates))? = acks.first else { Issue.record("no ack to n2"); return }
        #expect(updates.contains { $0.name == n2 && $0.status == .dead })
        let refute = b.received(.ack(sequence: 5, target: n1, updates: updates), from: n1, now: t0)
        #expect(b.incarnation == 1)
        _ = refute
        var now = t0
        var revived = false
        for _ in 0..<20 where !revived {
            now = now + .seconds(1)
            for (to, m) in sends(b.tick(now: now)) where to == n1 {
                _ = a.received(m, from: n2, now: now)
            }
            revived = a.status(of: n2) == .alive
        }
        #expect(revived)
    }
}

@Suite struct SWIMLeaveTests {
    @Test func aLeavingMemberTellsEveryoneItIsDeadAndNeverRefutes() {
        var leaver = SWIMInstance(me: n2, settings: timing, seed: 3, now: t0)
        var peer = SWIMInstance(me: n1, settings: timing, seed: 4, now: t0)
        for m in [n1, n3] { _ = leaver.add(m) }
        _ = peer.add(n2)
        let out = sends(leaver.leave())
        #expect(out.map(\.0) == [n1, n3])
        for (to, m) in out where to == n1 { _ = peer.received(m, from: n2, now: t0) }
        #expect(peer.status(of: n2) == .dead, "dead at once, no suspicion first")
        let incarnation = leaver.incarnation
        _ = leaver.received(.ping(sequence: 9, updates: [MemberUpdate(name: n2, status: .dead, incarnation: incarnation, by: n1)]), from: n1, now: t0)
        #expect(leaver.incarnation == incarnation, "a member that left does not refute")
    }
}
