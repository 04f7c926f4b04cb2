import Testing
@testable import CairnNode
import CairnCore
import CairnWire
import Synchronization
import CairnTestSupport


/// A stream sink that records what it got; with a gate, each chunk waits for a permit.
final class CollectingSink: StreamSink {
    let chunks = Locked<[[UInt8]]>([])
    let finished = Locked(false)
    let cancelReason = Locked<String?>(nil)
    let gate: Gate?
    let failAt: Int?

    init(gate: Gate? = nil, failAt: Int? = nil) {
        self.gate = gate
        self.failAt = failAt
    }

    var count: Int { chunks.value.count }
    var bytes: Int { chunks.value.reduce(0) { $0 + $1.count } }

    func receive(_ chunk: [UInt8]) async throws {
        if let gate { await gate.pass() }
        if let failAt, count == failAt { throw ValidationError("sink refuses chunk \(failAt)") }
        chunks.withLock { $0.append(chunk) }
    }

    func finish() async throws { finished.withLock { $0 = true } }
    func cancelled(_ reason: String) async { cancelReason.withLock { $0 = reason } }
}

/// A node stand-in: records what is dispatched to it (answering `pong`) and accepts streams into
/// `sink` (or refuses them when nil).
private final class Recorder: RequestDispatcher {
    let received = Locked<[Message]>([])
    let sink: CollectingSink?
    init(sink: CollectingSink? = nil) { self.sink = sink }
    func recordProtocolError(_ error: WireError) {}
    func dispatch(_ envelope: Envelope, fromPeer: Bool, responder: Responder) {
        received.withLock { $0.append(envelope.message) }
        responder.reply(.pong)
    }
    func acceptStream(_ request: InboundStreamRequest) -> Result<any StreamSink, ErrorReply> {
        guard let sink else { return .failure(ErrorReply(code: .unknownMessage, message: "no streams here")) }
        return .success(sink)
    }
    var count: Int { received.value.count }
}

/// One-way messages and streams on the in-memory network, on virtual time.
@Suite(.timeLimit(.minutes(3))) struct TransportStreamTests {
    let a = try! NodeName("a")   // literals: cannot fail
    let b = try! NodeName("b")

    /// Advances `clock` 1 ms at a time while something sleeps, until `done` holds.
    private func drive(_ clock: ManualClock, _ what: String, until done: () -> Bool) async throws {
        for _ in 0..<20_000 {
            if done() { return }
            for _ in 0..<20 { await Task.yield() }
            if done() { return }
            if clock.sleeping > 0 { clock.advance(by: .milliseconds(1)) }
        }
        Issue.record("never: \(what)")
        throw CancellationError()
    }

    private func settings(window: Int = 4 << 20, maxStreams: Int = 4) -> StreamSettings {
        var s = StreamSettings()
        s.windowBytes = window
        s.maxStreamsPerPeer = maxStreams
        return s
    }

    private func open(_ t: some Transport, to node: NodeName, timeout: UInt32 = 10_000) async -> Result<any OutboundStream, StreamError> {
        do throws(StreamError) {
            return .success(try await t.openStream(to: node, kind: .handoff, header: [7], timeoutMillis: timeout))
        } catch {
            return .failure(error)
        }
    }

    // MARK: cast

    @Test func aCastIsDeliveredOnceAndItsAnswerGoesNowhere() async throws {
        let clock = ManualClock()
        var faults = InMemoryNetwork.Faults()
        faults.delay = .milliseconds(5) ... .milliseconds(5)
        let net = InMemoryNetwork(clock: clock, seed: 1, faults: faults)
        let rb = Recorder()
        net.attach(a, Recorder())
        net.attach(b, rb)
        net.transport(for: a).cast(to: b, .ping)
        try await settle("the cast is on its way") { clock.sleeping == 1 }
        #expect(rb.count == 0)
        clock.advance(by: .milliseconds(5))
        try await settle("delivered") { rb.count == 1 }
        #expect(rb.received.value == [.ping])
        for _ in 0..<100 { await Task.yield() }
        #expect(clock.sleeping == 0, "no reply travels back")
        #expect(net.counts == (delivered: 1, dropped: 0))
    }

    @Test func aCastIsLostUnderLoss() async throws {
        let clock = ManualClock()
        var faults = InMemoryNetwork.Faults()
        faults.loss = 1
        let net = InMemoryNetwork(clock: clock, seed: 1, faults: faults)
        let rb = Recorder()
        net.attach(a, Recorder())
        net.attach(b, rb)
        for _ in 0..<5 { net.transport(for: a).cast(to: b, .ping) }
        for _ in 0..<200 { await Task.yield() }
        #expect(rb.count == 0)
        #expect(net.counts == (delivered: 0, dropped: 5))
    }

    @Test func aCastAcrossACutIsNeverDeliveredEvenAfterHealing() async throws {
        let clock = ManualClock()
        let net = InMemoryNetwork(clock: clock, seed: 1)
        let rb = Recorder()
        net.attach(a, Recorder())
        net.attach(b, rb)
        net.cut(from: a, to: b)
        net.transport(for: a).cast(to: b, .ping)
        for _ in 0..<200 { await Task.yield() }
        net.heal()
        clock.advance(by: .seconds(10))
        for _ in 0..<200 { await Task.yield() }
        #expect(rb.count == 0)
        // The other direction was never cut.
        let ra = Recorder()
        net.attach(a, ra)
        net.cut(from: a, to: b)
        net.transport(for: b).cast(to: a, .ping)
        try await settle("b to a still flows") { ra.count == 1 }
    }

    @Test func aCastToAPausedNodeIsHeldUntilItResumes() async throws {
        let clock = ManualClock()
        let net = InMemoryNetwork(clock: clock, seed: 1)
        let rb = Recorder()
        net.attach(a, Recorder())
        net.attach(b, rb)
        net.pause(b)
        net.transport(for: a).cast(to: b, .members)
        for _ in 0..<200 { await Task.yield() }
        #expect(rb.count == 0)
        net.resume(b)
        try await settle("delivered after resume") { rb.count == 1 }
        #expect(rb.received.value == [.members])
    }

    @Test func aCastToARefusedOrStoppedNodeIsDropped() async throws {
        let net = InMemoryNetwork(clock: ManualClock(), seed: 1)
        let rb = Recorder()
        net.attach(a, Recorder())
        net.attach(b, rb)
        net.refuse(b)
        net.transport(for: a).cast(to: b, .ping)
        net.heal()
        net.detach(b)
        net.transport(for: a).cast(to: b, .ping)
        for _ in 0..<200 { await Task.yield() }
        #expect(rb.count == 0)
    }

    // MARK: streams

    @Test func aStreamDeliversChunksInOrderAndCompletes() async throws {
        let clock = ManualClock()
        var faults = InMemoryNetwork.Faults()
        faults.delay = .milliseconds(1) ... .milliseconds(30)   // independent delays would reorder
        faults.loss = 0.5                                           // streams do not lose
        faults.duplication = 0.5                                    // nor duplicate
        let net = InMemoryNetwork(clock: clock, seed: 7, faults: faults)
        let sink = CollectingSink()
        net.attach(a, Recorder())
        net.attach(b, Recorder(sink: sink))
        let t = net.transport(for: a, streams: settings(window: 100))
        let outcome = Locked<Result<UInt64, StreamError>?>(nil)
        Task {
            do throws(StreamError) {
                let s = try await t.openStream(to: b, kind: .handoff, header: [], timeoutMillis: 10_000)
                for i in 0..<40 { try await s.send([UInt8(i)] + Array(repeating: 0, count: 20)) }
                try await s.finish()
                outcome.withLock { $0 = .success(s.acknowledgedChunks) }
            } catch {
                outcome.withLock { $0 = .failure(error) }
            }
        }
        try await drive(clock, "the stream completes") { outcome.value != nil }
        #expect(try outcome.value?.get() == 40)
        #expect(sink.chunks.value.map { $0[0] } == (0..<40).map(UInt8.init))
        #expect(sink.finished.value && sink.cancelReason.value == nil)
        try await settle("both ends forgotten") { net.openStreams == 0 }
    }

    @Test func theSenderBlocksAtTheWindowUntilTheReceiverConsumes() async throws {
        let clock = ManualClock()
        let net = InMemoryNetwork(clock: clock, seed: 1)
        let gate = Gate()
        let sink = CollectingSink(gate: gate)
        net.attach(a, Recorder())
        net.attach(b, Recorder(sink: sink))
        let metrics = NodeMetrics(maxInflight: 10)
        let t = net.transport(for: a, streams: settings(window: 100), metrics: metrics)
        let s = try await open(t, to: b).get()
        let chunk = [UInt8](repeating: 1, count: 40)
        try await s.send(chunk)
        try await s.send(chunk)   // 80 of 100 bytes in flight
        let sent = Atomic<Bool>(false)
        let third = Task {
            try await s.send(chunk)
            sent.store(true, ordering: .relaxed)
        }
        for _ in 0..<500 { await Task.yield() }
        let thirdSent = sent.load(ordering: .relaxed)
        #expect(!thirdSent, "120 bytes would exceed the 100-byte window")
        #expect((s as? StreamOutbox)?.unacknowledgedBytes == 80 && s.acknowledgedChunks == 0)
        #expect(metrics.exposition().contains("cairn_stream_window_waits_total 1"))
        gate.release()
        try await third.value
        #expect(s.acknowledgedChunks >= 1)
        gate.release(2)
        try await s.finish()
        #expect(sink.count == 3 && s.acknowledgedChunks == 3)
        #expect(metrics.exposition().contains(#"cairn_streams_open{direction="out"} 0"#))
    }

    @Test func aCutStallsTheStreamUntilHealedAndNothingIsLost() async throws {
        let clock = ManualClock()
        let net = InMemoryNetwork(clock: clock, seed: 1)
        let sink = CollectingSink()
        net.attach(a, Recorder())
        net.attach(b, Recorder(sink: sink))
        let t = net.transport(for: a, streams: settings(window: 100))
        let s = try await open(t, to: b).get()
        try await s.send([0])
        try await settle("the first chunk is consumed") { s.acknowledgedChunks == 1 }
        net.cut(from: a, to: b)
        let sent = Atomic<Int>(1)
        let sender = Task {
            for i in 1..<10 {
                try await s.send([UInt8(i)] + Array(repeating: 0, count: 39))
                sent.store(i + 1, ordering: .relaxed)
            }
            try await s.finish()
        }
        for _ in 0..<500 { await Task.yield() }
        clock.advance(by: .seconds(60))
        for _ in 0..<500 { await Task.yield() }
        #expect(sink.count == 1, "nothing crosses the cut")
        let sentBeforeHeal = sent.load(ordering: .relaxed)
        #expect(sentBeforeHeal == 3, "the sender stalls at the window (2 chunks of 40 bytes in flight)")
        #expect(!((s as? StreamOutbox)?.isEnded ?? true), "a cut stalls, it does not fail")
        net.heal()
        try await sender.value
        #expect(sink.chunks.value.map { $0[0] } == (0..<10).map(UInt8.init))
        #expect(sink.finished.value)
    }

    @Test func aRefusedOrStoppedNodeFailsTheOpenAtOnce() async throws {
        let net = InMemoryNetwork(clock: ManualClock(), seed: 1)
        let sink = CollectingSink()
        net.attach(a, Recorder())
        net.attach(b, Recorder(sink: sink))
        net.refuse(b)
        guard case .failure(.connection(let e)) = await open(net.transport(for: a), to: b), e.certainlyNotDelivered else {
            Issue.record("opened a stream to a refusing node"); return
        }
        net.heal()
        net.detach(b)
        guard case .failure(.connection(let e2)) = await open(net.transport(for: a), to: b), e2.certainlyNotDelivered else {
            Issue.record("opened a stream to a stopped node"); return
        }
        #expect(net.openStreams == 0)
    }

    @Test func detachingTheReceiverFailsAnOpenStreamAtOnce() async throws {
        let clock = ManualClock()
        let net = InMemoryNetwork(clock: clock, seed: 1)
        let gate = Gate()
        let sink = CollectingSink(gate: gate)
        net.attach(a, Recorder())
        net.attach(b, Recorder(sink: sink))
        let s = try await open(net.transport(for: a, streams: settings(window: 10)), to: b).get()
        try await s.send([1, 2, 3])
        let blocked = Task { try await s.send([4, 5, 6, 7, 8, 9, 10, 11]) }
        for _ in 0..<200 { await Task.yield() }
        net.detach(b)
        guard case .failure(let e) = await blocked.result, case .lost? = e as? StreamError else {
            Issue.record("the blocked send did not fail"); return
        }
        gate.release(5)
        try await settle("the receiver's sink is cancelled") { sink.cancelReason.value != nil }
        #expect(sink.finished.value == false)
        #expect(net.openStreams == 0)
    }

    @Test func anOpenIsRefusedWithoutAHandlerAndBeyondThePerPeerLimit() async throws {
        let net = InMemoryNetwork(clock: ManualClock(), seed: 1)
        net.attach(a, Recorder())
        net.attach(b, Recorder(sink: nil))
        guard case .failure(.refused(let e)) = await open(net.transport(for: a), to: b) else {
            Issue.record("a node without a handler accepted"); return
        }
        #expect(e.code == .unknownMessage)
        net.attach(b, Recorder(sink: CollectingSink()))
        let metrics = NodeMetrics(maxInflight: 10)
        let t = net.transport(for: a, streams: settings(maxStreams: 1), metrics: metrics)
        let first = try await open(t, to: b).get()
        guard case .failure(.tooManyStreams(let limit)) = await open(t, to: b) else { Issue.record("over the limit"); return }
        #expect(limit == 1)
        #expect(metrics.exposition().contains("cairn_streams_refused_total 1"))
        try await first.finish()
        try await settle("the first stream is forgotten") { net.openStreams == 0 }
        _ = try await open(t, to: b).get()
    }

    @Test func aSinkThatThrowsAbortsTheStreamAndTheSenderKnowsHowFarItGot() async throws {
        let net = InMemoryNetwork(clock: ManualClock(), seed: 1)
        let sink = CollectingSink(failAt: 2)
        net.attach(a, Recorder())
        net.attach(b, Recorder(sink: sink))
        let s = try await open(net.transport(for: a), to: b).get()
        for i in 0..<4 { try? await s.send([UInt8(i)]) }
        do {
            try await s.finish()
            Issue.record("finished a stream whose sink failed")
        } catch {
            guard case .aborted = error else { Issue.record("\(error)"); return }
        }
        #expect(s.acknowledgedChunks == 2 && sink.count == 2)
    }

    @Test func cancellingTheSenderCancelsTheReceiversSink() async throws {
        let net = InMemoryNetwork(clock: ManualClock(), seed: 1)
        let sink = CollectingSink()
        net.attach(a, Recorder())
        net.attach(b, Recorder(sink: sink))
        let s = try await open(net.transport(for: a), to: b).get()
        try await s.send([1])
        s.cancel("handoff superseded")
        try await settle("the sink hears of it") { sink.cancelReason.value == "handoff superseded" }
        guard case .failure(let e) = await Task(operation: { try await s.send([2]) }).result, case .cancelled? = e as? StreamError else {
            Issue.record("sent on a cancelled stream"); return
        }
        try await settle("both ends forgotten") { net.openStreams == 0 }
    }
}
