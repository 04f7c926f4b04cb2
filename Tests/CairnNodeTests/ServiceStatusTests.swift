import Testing
@testable import CairnNode

@Suite struct ServiceStatusTests {
    @Test func lifecycleMessagesInOrderAndOnlyOnce() {
        var s = ServiceStatus()
        do { let r = s.on(.listening(address: "127.0.0.1:7401")); #expect(r == ["STATUS=starting: listening on 127.0.0.1:7401; connecting to peers"]) }
        do { let r = s.on(.peersChanged(up: 1, of: 2)); #expect(r == []) }          // not serving yet: no READY, no status
        do { let r = s.on(.serving(peersUp: 1, peers: 2)); #expect(r == ["READY=1\nSTATUS=serving; peers up 1 of 2"]) }
        do { let r = s.on(.serving(peersUp: 2, peers: 2)); #expect(r == []) }       // READY is sent once
        do { let r = s.on(.peersChanged(up: 2, of: 2)); #expect(r == ["STATUS=serving; peers up 2 of 2"]) }
        do { let r = s.on(.peersChanged(up: 2, of: 2)); #expect(r == []) }          // unchanged status is not repeated
        do { let r = s.on(.unhealthy("storage did not answer")); #expect(r == ["STATUS=serving; peers up 2 of 2; unhealthy: storage did not answer (watchdog pings withheld)"]) }
        do { let r = s.on(.healthy); #expect(r == ["STATUS=serving; peers up 2 of 2"]) }
        do { let r = s.on(.draining(inflight: 3)); #expect(r == ["STOPPING=1\nSTATUS=shutting down: draining 3 in-flight requests"]) }
        do { let r = s.on(.draining(inflight: 0)); #expect(r == []) }
        do { let r = s.on(.peersChanged(up: 0, of: 2)); #expect(r == []) }
        do { let r = s.on(.stopped); #expect(r == ["STATUS=stopped"]) }
        do { let r = s.on(.stopped); #expect(r == []) }
    }

    @Test func recoveryExtendsTheStartTimeoutWhileItProgresses() {
        var s = ServiceStatus(recoveryReportEvery: .seconds(1), recoveryExtension: .seconds(10))
        let t0 = ContinuousClock.now
        do { let r = s.on(.recovering(done: 0, total: 200, at: t0)); #expect(r == ["STATUS=recovering storage: 0%\nEXTEND_TIMEOUT_USEC=10000000"]) }
        do { let r = s.on(.recovering(done: 50, total: 200, at: t0 + .milliseconds(500))); #expect(r == []) }   // rate limited
        do { let r = s.on(.recovering(done: 50, total: 200, at: t0 + .seconds(1))); #expect(r == ["STATUS=recovering storage: 25%\nEXTEND_TIMEOUT_USEC=10000000"]) }
        do { let r = s.on(.recovering(done: 50, total: 200, at: t0 + .seconds(3))); #expect(r == []) }          // no progress, no extension
        _ = s.on(.serving(peersUp: 0, peers: 0))
        do { let r = s.on(.recovering(done: 200, total: 200, at: t0 + .seconds(9))); #expect(r == []) }         // after READY: ignored
    }
}

@Suite struct WatchdogTimerTests {
    @Test func checksAtHalfTheIntervalAndPingsOnlyAfterAPassingTimelyCheck() {
        let t0 = ContinuousClock.now
        var w = WatchdogTimer(interval: .seconds(10), now: t0)
        #expect(w.pingEvery == .seconds(5) && w.checkBound == .milliseconds(2500))
        do { let r = w.checkDue(at: t0); #expect(r) }
        #expect(w.decide(failure: nil, started: t0, finished: t0 + .milliseconds(3)) == .ping)
        do { let r = w.checkDue(at: t0 + .seconds(3)); #expect(!r) }
        #expect(w.sleepTime(from: t0 + .seconds(3)) == .seconds(2))
        do { let r = w.checkDue(at: t0 + .seconds(5)); #expect(r) }
        #expect(w.decide(failure: "vnode 3 did not answer", started: t0, finished: t0) == .withhold("vnode 3 did not answer"))
        do { let r = w.checkDue(at: t0 + .seconds(10)); #expect(r) }
        guard case .withhold(let why) = w.decide(failure: nil, started: t0 + .seconds(10), finished: t0 + .seconds(13)) else {
            Issue.record("a slow check must withhold the ping")
            return
        }
        #expect(why.contains("over its"))
    }
}
