import Testing
import CairnWire
import CairnCore

private let ok = Message.writeReply(WriteReply(context: .empty, writtenTimestampMillis: 1, concurrent: []))
private let busy = ErrorReply(code: .overloaded, message: "busy")
private let draining = ErrorReply(code: .shuttingDown, message: "draining")
private let unsent = ConnectionError.connectFailed("refused")
private let lost = ConnectionError.lost("reset")

/// The failover rule on its own: candidates, replies and failures in, directives out.
@Suite struct FailoverTests {
    @Test func theFirstSuccessIsDelivered() {
        var f = Failover(candidates: 3, idempotent: false)
        #expect(f.directive == .tryCandidate(0))
        #expect(f.received(ok) == .deliver(ok))
        #expect(f.attempts.isEmpty)
    }

    @Test func aNonRefusalErrorIsDeliveredNotRetried() {
        let storage = Message.error(ErrorReply(code: .storage, message: "disk"))
        var f = Failover(candidates: 2, idempotent: false)
        #expect(f.received(storage) == .deliver(storage))
    }

    @Test func aRefusalMovesOn() {
        var f = Failover(candidates: 2, idempotent: false)
        #expect(f.received(.error(busy)) == .tryCandidate(1))
        #expect(f.received(ok) == .deliver(ok))
        #expect(f.attempts == [Failover.Attempt(candidate: 0, outcome: .refused(busy))])
    }

    @Test func notDeliveredMovesOn() {
        for error in [unsent, .notSent("closed"), .tooManyPending(8)] {
            var f = Failover(candidates: 2, idempotent: false)
            #expect(f.failed(error) == .tryCandidate(1))
            #expect(f.received(ok) == .deliver(ok))
        }
    }

    @Test func aWriteThatMayHaveBeenDeliveredStops() {
        for error in [lost, .timedOut(afterMillis: 500), .abandoned] {
            var f = Failover(candidates: 3, idempotent: false)
            #expect(f.failed(unsent) == .tryCandidate(1))
            #expect(f.failed(error) == .giveUp(.maybeApplied(candidate: 1, error)))
        }
    }

    @Test func aReadThatMayHaveBeenDeliveredMovesOnAndEndsTimedOut() {
        var f = Failover(candidates: 3, idempotent: true)
        #expect(f.failed(.timedOut(afterMillis: 500)) == .tryCandidate(1))
        #expect(f.received(.error(busy)) == .tryCandidate(2))
        #expect(f.failed(unsent) == .exhausted(Failover.Summary(kind: .timedOut, attempts: [
            Failover.Attempt(candidate: 0, outcome: .maybeDelivered(.timedOut(afterMillis: 500))),
            Failover.Attempt(candidate: 1, outcome: .refused(busy)),
            Failover.Attempt(candidate: 2, outcome: .notDelivered(unsent)),
        ])))
    }

    @Test func aReadThatMayHaveBeenDeliveredStillTakesALaterAnswer() {
        var f = Failover(candidates: 2, idempotent: true)
        #expect(f.failed(lost) == .tryCandidate(1))
        #expect(f.received(ok) == .deliver(ok))
    }

    @Test func anUndecodableReplyStopsEvenForReads() {
        for idempotent in [false, true] {
            var f = Failover(candidates: 2, idempotent: idempotent)
            let directive = f.failed(.protocolViolation("bad frame"))
            #expect(directive == .giveUp(.undecodableReply(candidate: 0, why: "bad frame")))
            if case .giveUp(let g) = directive { #expect(g.error == .protocolViolation("bad frame")) }
        }
    }

    @Test func everyCandidateRefusingIsOverloaded() {
        var f = Failover(candidates: 2, idempotent: false)
        #expect(f.received(.error(busy)) == .tryCandidate(1))
        let end = f.received(.error(draining))
        #expect(end == .exhausted(Failover.Summary(kind: .overloaded, attempts: [
            Failover.Attempt(candidate: 0, outcome: .refused(busy)),
            Failover.Attempt(candidate: 1, outcome: .refused(draining)),
        ])))
        if case .exhausted(let s) = end { #expect(s.certainlyNotApplied) }
    }

    @Test func refusedAndUnreachableIsUnreachable() {
        var f = Failover(candidates: 2, idempotent: false)
        #expect(f.received(.error(busy)) == .tryCandidate(1))
        let end = f.failed(unsent)
        #expect(end == .exhausted(Failover.Summary(kind: .unreachable, attempts: [
            Failover.Attempt(candidate: 0, outcome: .refused(busy)),
            Failover.Attempt(candidate: 1, outcome: .notDelivered(unsent)),
        ])))
        if case .exhausted(let s) = end { #expect(s.certainlyNotApplied) }
    }

    @Test func noCandidatesIsUnreachableAtOnce() {
        for count in [0, -1] {
            let f = Failover(candidates: count, idempotent: true)
            #expect(f.candidates == 0)
            #expect(f.directive == .exhausted(Failover.Summary(kind: .unreachable, attempts: [])))
        }
    }

    @Test func aFinalDirectiveIgnoresLaterEvents() {
        var delivered = Failover(candidates: 2, idempotent: false)
        #expect(delivered.received(ok) == .deliver(ok))
        #expect(delivered.failed(unsent) == .deliver(ok))
        #expect(delivered.received(.error(busy)) == .deliver(ok))

        var gaveUp = Failover(candidates: 2, idempotent: false)
        let stop = gaveUp.failed(lost)
        #expect(gaveUp.received(ok) == stop)

        var none = Failover(candidates: 0, idempotent: false)
        #expect(none.received(ok) == none.directive)
        #expect(none.attempts.isEmpty)
    }
}
