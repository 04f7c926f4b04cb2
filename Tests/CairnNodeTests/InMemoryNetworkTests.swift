import Testing
@testable import CairnNode
import CairnCore
import CairnWire
import Synchronization

/// A node stand-in on the in-memory network: answers every request with `pong`, counting them.
private final class Echo: RequestDispatcher {
    let received = Atomic<Int>(0)
    func recordProtocolError(_ error: WireError) {}
    func dispatch(_ envelope: Envelope, fromPeer: Bool, responder: Responder) {
        received.wrappingAdd(1, ordering: .relaxed)
        responder.reply(.pong)
    }
}


/// The network seam's in-memory side: delays, loss, duplication and partitions on virtual time.
@Suite(.timeLimit(.minutes(3))) struct InMemoryNetworkTests {
    let a = try! NodeName("a")   // literals: cannot fail
    let b = try! NodeName("b")

    private func send(_ t: some Transport, to node: NodeName, timeout: UInt32 = 1000) async -> Result<Message, ConnectionError> {
        do throws(ConnectionError) {
            return .success(try await t.send(to: node, .ping, timeoutMillis: timeout))
        } catch {
            return .failure(error)
        }
    }

    @Test func aRequestIsDeliveredAfterItsDelayAndAnsweredAfterTheReplyDelay() async throws {
        let clock = ManualClock()
        var faults = InMemoryNetwork.Faults()
        faults.delay = .milliseconds(10) ... .milliseconds(10)
        let net = InMemoryNetwork(clock: clock, seed: 1, faults: faults)
        let echo = Echo()
        net.attach(a, Echo())
        net.attach(b, echo)
        let call = Task { await send(net.transport(for: a), to: b) }
        try await settle("the request is on its way") { clock.sleeping >= 2 }   // its delay and the caller's deadline
        #expect(echo.received.load(ordering: .relaxed) == 0)
        clock.advance(by: .milliseconds(10))
        try await settle("delivered") { echo.received.load(ordering: .relaxed) == 1 }
        try await settle("the reply is on its way") { clock.sleeping >= 2 }
        clock.advance(by: .milliseconds(10))
        #expect(try await call.value.get() == .pong)
    }

    @Test func aNodeThatIsNotRunningRefusesAtOnceAndIsReportedDown() async throws {
        let net = InMemoryNetwork(clock: ManualClock(), seed: 1)
        net.attach(a, Echo())
        net.attach(b, Echo())
        net.detach(b)
        let t = net.transport(for: a)
        guard case .failure(let e) = await send(t, to: b) else { Issue.record("delivered to a stopped node"); return }
        #expect(e.certainlyNotDelivered)
        #expect(t.downReasons([a, b]).keys.sorted() == [b])
        #expect(t.peerCount == 1 && t.upCount == 0)
    }

    @Test func aRefusedNodeIsDownBothWaysUntilHealed() async throws {
        let net = InMemoryNetwork(clock: ManualClock(), seed: 1)
        net.attach(a, Echo())
        net.attach(b, Echo())
        net.refuse(b)
        guard case .failure(let toB) = await send(net.transport(for: a), to: b), toB.certainlyNotDelivered else {
            Issue.record("reached a refusing node"); return
        }
        guard case .failure(let fromB) = await send(net.transport(for: b), to: a), fromB.certainlyNotDelivered else {
            Issue.record("a refusing node reached out"); return
        }
        #expect(net.transport(for: a).downReasons([b]).keys.sorted() == [b])
        net.heal()
        #expect(try await send(net.transport(for: a), to: b).get() == .pong)
        #expect(net.transport(for: a).downReasons([b]).isEmpty)
    }

    /// A paused node (SIGSTOP) receives nothing until resumed, then gets what was held; a caller
    /// whose deadline passed meanwhile has timed out (outcome unknown), not been refused.
    @Test func aPausedNodeGetsItsMessagesOnlyAfterResuming() async throws {
        let clock = ManualClock()
        let net = InMemoryNetwork(clock: clock, seed: 1)
        let echo = Echo()
        net.attach(a, Echo())
        net.attach(b, echo)
        net.pause(b)
        #expect(net.transport(for: a).downReasons([b]).isEmpty, "a paused node's connections stay up")
        let late = Task { await send(net.transport(for: a), to: b, timeout: 100) }
        try await settle("the caller waits for its deadline") { clock.sleeping >= 1 }
        clock.advance(by: .milliseconds(100))
        guard case .failure(let e) = await late.value, !e.certainlyNotDelivered else { Issue.record("a paused node answered or refused"); return }
        #expect(echo.received.load(ordering: .relaxed) == 0)
        let patient = Task { await send(net.transport(for: a), to: b, timeout: 10_000) }
        try await settle("the second caller waits") { clock.sleeping >= 1 }
        net.resume(b)
        try await settle("both held requests are delivered") { echo.received.load(ordering: .relaxed) == 2 }
        #expect(try await patient.value.get() == .pong)
    }

    @Test func aCutLinkIsSilentUntilTheDeadlineAndOneWay() async throws {
        let clock = ManualClock()
        let net = InMemoryNetwork(clock: clock, seed: 1)
        let echoA = Echo(), echoB = Echo()
        net.attach(a, echoA)
        net.attach(b, echoB)
        net.cut(from: a, to: b)
        let call = Task { await send(net.transport(for: a), to: b, timeout: 500) }
        try await settle("the caller waits for its deadline") { clock.sleeping == 1 }
        clock.advance(by: .milliseconds(500))
        guard case .failure(let e) = await call.value else { Issue.record("crossed a cut link"); return }
        #expect(e == .timedOut(afterMillis: 500) && !e.certainlyNotDelivered)
        #expect(echoB.received.load(ordering: .relaxed) == 0)
        // The other way, requests arrive but their replies (a to b) are lost.
        let back = Task { await send(net.transport(for: b), to: a, timeout: 500) }
        try await settle("a received b's request") { echoA.received.load(ordering: .relaxed) == 1 }
        try await settle("b waits for its deadline") { clock.sleeping == 1 }
        clock.advance(by: .milliseconds(500))
        guard case .failure(.timedOut) = await back.value else { Issue.record("a reply crossed a cut link"); return }
        net.heal()
        #expect(try await send(net.transport(for: a), to: b).get() == .pong)
    }

    @Test func aDuplicatedRequestReachesTheReceiverTwiceAndTheCallerOnce() async throws {
        var faults = InMemoryNetwork.Faults()
        faults.duplication = 1
        let net = InMemoryNetwork(clock: ManualClock(), seed: 1, faults: faults)
        let echo = Echo()
        net.attach(a, Echo())
        net.attach(b, echo)
        #expect(try await send(net.transport(for: a), to: b).get() == .pong)
        try await settle("the duplicate arrived") { echo.received.load(ordering: .relaxed) == 2 }
    }

    /// The same seed draws the same faults, in the order requests are sent.
    @Test func theSameSeedDrawsTheSameFaults() {
        func decisions(seed: UInt64) -> [String] {
            var faults = InMemoryNetwork.Faults()
            faults.loss = 0.3
            faults.duplication = 0.2
            faults.delay = .milliseconds(1) ... .milliseconds(50)
            let net = InMemoryNetwork(clock: ManualClock(), seed: seed, faults: faults)
            net.attach(a, Echo())
            net.attach(b, Echo())
            return (0..<200).map { _ in
                let p = net.plan(from: a, to: b)
                return "\(p.requestLost) \(p.replyLost) \(p.duplicate) \(p.requestDelay) \(p.replyDelay)"
            }
        }
        let first = decisions(seed: 42)
        #expect(first.contains { $0.hasPrefix("true") } && first.contains { $0.hasPrefix("false") })
        #expect(decisions(seed: 42) == first)
        #expect(decisions(seed: 43) != first)
    }
}
