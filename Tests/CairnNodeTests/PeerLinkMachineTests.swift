import Testing
@testable import CairnNode
import CairnCore
import CairnWire

/// `PeerLinkMachine` alone: no sockets, no sleeps; time is whatever instant the test passes in.
@Suite struct PeerLinkMachineTests {
    typealias Directive = PeerLinkMachine.Directive

    let peer: NodeName
    let address = HostPort(host: "127.0.0.1", port: 7402)
    /// This node (n1, the dialer) and its peer (n2), sharing a secret.
    let mine: ClusterHandshake
    let theirs: ClusterHandshake
    let nonce = [UInt8](repeating: 1, count: 32)
    let hello: Hello
    let ack: HelloAck
    let goodAck: Message
    let t0 = ContinuousClock.now

    init() throws {
        peer = try NodeName("n2")
        let secret = ClusterSecret(bytes: Array("machine-test-secret-0123456789".utf8))
        mine = ClusterHandshake(cluster: "c1", me: try NodeName("n1"), secret: secret)
        theirs = ClusterHandshake(cluster: "c1", me: peer, secret: secret)
        hello = mine.hello(nonce: nonce)
        ack = try theirs.answer(hello, nonce: [UInt8](repeating: 2, count: 32), remote: nil).get().ack
        goodAck = .helloAck(ack)
    }

    func ms(_ n: Int64) -> Duration { .milliseconds(n) }

    func machine(min: Duration = .milliseconds(100), max: Duration = .milliseconds(800)) -> PeerLinkMachine {
        PeerLinkMachine(peer: peer, address: address, handshake: mine, minBackoff: min, maxBackoff: max)
    }

    enum Stage: CaseIterable, Sendable { case idle, connecting, handshaking, up, backingOff }

    /// A fresh machine brought to `stage` the normal way.
    func machine(at stage: Stage) -> PeerLinkMachine {
        var m = machine()
        if stage == .idle { return m }
        _ = m.start()
        if stage == .connecting { return m }
        if stage == .backingOff {
            _ = m.connectFailed("connect failed: refused", at: t0)
            return m
        }
        _ = m.connected(nonce: nonce)
        if stage == .handshaking { return m }
        _ = m.handshakeReplied(goodAck, at: t0)
        return m
    }

    /// The wait the directives ask for, if any.
    func wait(_ d: [Directive]) -> Duration? {
        for x in d { if case .sleep(let s) = x { return s } }
        return nil
    }

    /// Fails one connect attempt at `now`, then wakes at the end of the backoff; returns the wait.
    func failOnce(_ m: inout PeerLinkMachine, at now: inout ContinuousClock.Instant) -> Duration? {
        let w = wait(m.connectFailed("connect failed: connection refused", at: now))
        if let w {
            now = now.advanced(by: w)
            #expect(m.backoffEnded(at: now) == [.connect])
        }
        return w
    }

    // MARK: Handshake

    @Test func aGoodHandshakeGoesUp() throws {
        var m = machine()
        #expect(m.state == .idle && m.downReason == "not yet connected" && m.attempts == 0)
        #expect(m.start() == [.connect])
        #expect(m.state == .connecting && m.downReason == "not yet connected")
        #expect(m.connected(nonce: nonce) == [.sendHello(hello)])
        #expect(m.state == .handshaking && !m.isUp)
        let proof = try #require(try? mine.proof(for: ack, to: hello, dialled: peer, at: "127.0.0.1:7402").get())
        #expect(m.handshakeReplied(goodAck, at: t0) == [
            .sendProof(proof),
            .log(.info, "peer link up", metadata: ["peer": "n2", "address": "127.0.0.1:7402"]),
            .markUp,
        ])
        #expect(m.state == .up && m.isUp && m.downReason == nil && m.attempts == 1)
        #expect(try theirs.verify(proof, for: PendingHello(hello: hello, ack: ack), remote: nil).get() == (try NodeName("n1")),
                "the proof it sends is the one the peer accepts")
    }

    /// Each attempt's hello carries the nonce it was given: an ack to an earlier hello fails.
    @Test func anAckToAnotherAttemptsHelloIsRefused() {
        var m = machine(at: .connecting)
        _ = m.connected(nonce: [UInt8](repeating: 3, count: 32))
        #expect(m.handshakeReplied(goodAck, at: t0).contains(.countRejection(.secret)))
        #expect(!m.isUp)
    }

    enum BadAck: CaseIterable, Sendable { case otherCluster, otherNode, otherVersion, otherSecret, tampered }

    /// An ack that fails any check of the new contract (cluster, the node dialled, protocol
    /// version, the secret) keeps the link down, logs and counts why; only a failed secret proof
    /// also tells the acceptor (the refusal proof). Ring, N and members are not in the contract.
    @Test(arguments: BadAck.allCases)
    func aRefusedAckClosesLogsCountsAndBacksOff(bad: BadAck) throws {
        var m = machine(at: .handshaking)
        var forged = ack
        let reason: HandshakeRefusal.Reason
        switch bad {
        case .otherCluster:
            forged = try ClusterHandshake(cluster: "c9", me: peer, secret: .empty).answer(Hello(cluster: "c9", node: "n1", nonce: nonce), nonce: nonce, remote: nil).get().ack
            reason = .cluster
        case .otherNode:
            forged = try ClusterHandshake(cluster: "c1", me: try NodeName("n3"), secret: .empty).answer(hello, nonce: nonce, remote: nil).get().ack
            reason = .node
        case .otherVersion:
            forged.protocolVersion = 9
            reason = .protocolVersion
        case .otherSecret:
            forged = try ClusterHandshake(cluster: "c1", me: peer, secret: ClusterSecret(bytes: Array("another-secret-0123456789".utf8)))
                .answer(hello, nonce: nonce, remote: nil).get().ack
            reason = .secret
        case .tampered:
            forged.nonce[0] ^= 1
            reason = .secret
        }
        guard case .failure(let refusal) = mine.proof(for: forged, to: hello, dialled: peer, at: "127.0.0.1:7402") else {
            Issue.record("\(bad) accepted")
            return
        }
        #expect(refusal.reason == reason)
        let told: [Directive] = reason == .secret ? [.sendProof(ClusterHandshake.refusal)] : []
        #expect(m.handshakeReplied(.helloAck(forged), at: t0) == told + [
            .close(reason: "handshake refused: \(refusal.message)"),
            .log(.error, refusal.message, metadata: ["peer": "n2", "address": "127.0.0.1:7402", "reason": reason.rawValue]),
            .countRejection(reason),
            .sleep(ms(100)),
        ])
        #expect(m.state == .backingOff(until: t0 + ms(100)))
        #expect(m.downReason == "handshake refused: \(refusal.message)" && !m.isUp && m.attempts == 1)
    }

    @Test func notReadyIsLoggedAtDebug() {
        var m = machine(at: .handshaking)
        #expect(m.handshakeReplied(.error(ErrorReply(code: .notReady, message: "node n2 is starting")), at: t0) == [
            .close(reason: "handshake rejected: node n2 is starting"),
            .log(.debug, "peer not ready yet", metadata: ["peer": "n2"]),
            .sleep(ms(100)),
        ])
        #expect(m.downReason == "handshake rejected: node n2 is starting")
    }

    @Test func otherRejectionsAreLoggedAtError() {
        var m = machine(at: .handshaking)
        let e = ErrorReply(code: .handshakeRejected, message: "n1 is not a member of cluster c1")
        #expect(m.handshakeReplied(.error(e), at: t0) == [
            .close(reason: "handshake rejected: n1 is not a member of cluster c1"),
            .log(.error, "peer rejected handshake", metadata: ["peer": "n2", "reason": "n1 is not a member of cluster c1"]),
            .sleep(ms(100)),
        ])
        #expect(m.downReason == "handshake rejected: n1 is not a member of cluster c1")
    }

    @Test func anUnexpectedReplyOrNoReplyFailsTheAttemptQuietly() {
        var m = machine(at: .handshaking)
        #expect(m.handshakeReplied(.pong, at: t0) == [.close(reason: "unexpected handshake reply pong"), .sleep(ms(100))])
        var n = machine(at: .handshaking)
        #expect(n.handshakeFailed(.timedOut(afterMillis: 1000), at: t0) == [
            .close(reason: "handshake failed: timed out after 1000 ms"), .sleep(ms(100)),
        ])
        #expect(n.downReason == "handshake failed: timed out after 1000 ms")
    }

    @Test func aConnectFailureClosesNothingOpenAndKeepsItsReasonWhileRetrying() {
        var m = machine(at: .connecting)
        #expect(m.connectFailed("connect failed: 127.0.0.1:7402: connection refused", at: t0) == [
            .close(reason: "connect failed: 127.0.0.1:7402: connection refused"), .sleep(ms(100)),
        ])
        #expect(m.backoffEnded(at: t0 + ms(100)) == [.connect])
        #expect(m.state == .connecting)
        #expect(m.downReason == "connect failed: 127.0.0.1:7402: connection refused", "the last failure stands until the next outcome")
    }

    // MARK: Up and closed

    @Test func anUpLinkThatClosesWarnsAndBacksOff() {
        var m = machine(at: .up)
        #expect(m.closed(at: t0) == [
            .close(reason: "connection closed"),
            .log(.warning, "peer link down", metadata: ["peer": "n2", "reason": "connection closed"]),
            .sleep(ms(100)),
        ])
        #expect(m.state == .backingOff(until: t0 + ms(100)) && m.downReason == "connection closed")
    }

    // MARK: Backoff

    @Test func backoffDoublesToTheMaximum() {
        var m = machine(min: ms(100), max: ms(800))
        var now = t0
        _ = m.start()
        var waits: [Duration] = []
        for _ in 0..<6 { if let w = failOnce(&m, at: &now) { waits.append(w) } }
        #expect(waits == [ms(100), ms(200), ms(400), ms(800), ms(800), ms(800)])
        #expect(now == t0 + ms(3100))
    }

    @Test func backoffResetsAfterALinkThatWasUp() {
        var m = machine(min: ms(100), max: ms(800))
        var now = t0
        _ = m.start()
        for _ in 0..<4 { _ = failOnce(&m, at: &now) }
        #expect(m.nextBackoff == ms(800))
        _ = m.connected(nonce: nonce)
        _ = m.handshakeReplied(goodAck, at: now)
        #expect(m.nextBackoff == ms(800), "going up alone does not reset it")
        #expect(wait(m.closed(at: now)) == ms(100))
        now = now + ms(100)
        #expect(m.backoffEnded(at: now) == [.connect])
        #expect(failOnce(&m, at: &now) == ms(200))
    }

    @Test func failingWithoutGoingUpDoesNotResetTheBackoff() {
        var m = machine(min: ms(100), max: ms(800))
        var now = t0
        _ = m.start()
        _ = failOnce(&m, at: &now)
        _ = m.connected(nonce: nonce)
        #expect(wait(m.handshakeReplied(.error(ErrorReply(code: .notReady, message: "starting")), at: now)) == ms(200))
    }

    @Test func wakingBeforeTheDeadlineSleepsTheRest() {
        var m = machine(at: .backingOff)
        #expect(m.backoffEnded(at: t0 + ms(30)) == [.sleep(ms(70))])
        #expect(m.state == .backingOff(until: t0 + ms(100)))
        #expect(m.backoffEnded(at: t0 + ms(250)) == [.connect], "a late wake-up reconnects at once")
    }

    @Test func aMaximumBelowTheMinimumIsRaisedToIt() {
        var m = machine(min: ms(500), max: ms(100))
        var now = t0
        _ = m.start()
        #expect(failOnce(&m, at: &now) == ms(500))
        #expect(failOnce(&m, at: &now) == ms(500))
    }

    // MARK: Attempts

    @Test func attemptsCountEveryAttemptThatEnded() {
        var m = machine()
        var now = t0
        #expect(m.start() == [.connect])
        #expect(m.attempts == 0, "an attempt in flight has not ended")
        _ = failOnce(&m, at: &now)
        #expect(m.attempts == 1)
        _ = m.connected(nonce: nonce)
        _ = m.handshakeFailed(.lost("connection closed"), at: now)
        #expect(m.attempts == 2)
        _ = m.backoffEnded(at: now + ms(1000))
        _ = m.connected(nonce: nonce)
        _ = m.handshakeReplied(goodAck, at: now)
        #expect(m.attempts == 3, "going up ends an attempt")
        _ = m.closed(at: now)
        #expect(m.attempts == 3, "the close of an up link is not another attempt")
        _ = m.cancelled()
        #expect(m.attempts == 3)
    }

    // MARK: Cancellation

    @Test(arguments: Stage.allCases)
    func cancellationStopsFromEveryState(stage: Stage) {
        var m = machine(at: stage)
        let expected: [Directive] = switch stage {
        case .idle, .backingOff: [.stop]
        case .connecting, .handshaking: [.close(reason: "stopped"), .stop]
        case .up: [.close(reason: "stopped"), .log(.warning, "peer link down", metadata: ["peer": "n2", "reason": "stopped"]), .stop]
        }
        #expect(m.cancelled() == expected)
        #expect(m.state == .stopped && m.downReason == "stopped" && !m.isUp)
        #expect(m.cancelled() == [], "stopping twice does nothing")
        // Nothing brings a stopped link back.
        #expect(m.start() == [])
        #expect(m.connected(nonce: nonce) == [])
        #expect(m.connectFailed("connect failed: refused", at: t0) == [])
        #expect(m.handshakeReplied(goodAck, at: t0) == [])
        #expect(m.handshakeFailed(.lost("connection closed"), at: t0) == [])
        #expect(m.closed(at: t0) == [])
        #expect(m.backoffEnded(at: t0 + .seconds(60)) == [])
        #expect(m.state == .stopped)
    }

    // MARK: Events out of turn

    @Test func eventsThatDoNotApplyAreIgnored() {
        var idle = machine()
        #expect(idle.connected(nonce: nonce) == [] && idle.closed(at: t0) == [] && idle.backoffEnded(at: t0) == [])
        var connecting = machine(at: .connecting)
        #expect(connecting.start() == [])
        #expect(connecting.handshakeReplied(goodAck, at: t0) == [], "no hello was sent")
        var upLink = machine(at: .up)
        #expect(upLink.connected(nonce: nonce) == [] && upLink.handshakeReplied(goodAck, at: t0) == [])
        #expect(upLink.connectFailed("late", at: t0) == [] && upLink.state == .up)
        var backingOff = machine(at: .backingOff)
        #expect(backingOff.closed(at: t0) == [] && backingOff.connected(nonce: nonce) == [])
        #expect(backingOff.state == .backingOff(until: t0 + ms(100)))
    }
}
