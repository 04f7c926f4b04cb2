import Testing
import NIOCore
import NIOEmbedded
@testable import CairnWire
import CairnCore
import Synchronization

/// Records what the server handler passes on; answers every request with `pong`-like replies.
final class RecordingDispatcher: RequestDispatcher, @unchecked Sendable {
    // Only touched on the embedded channel's (single) thread.
    var dispatched: [Envelope] = []
    var protocolErrors: [WireError] = []
    var dropped: [MessageType] = []
    let acceptsHello: Bool
    /// The proof this dispatcher accepts (the handshake's MACs are CairnNode's; here a stand-in).
    static let goodProof = HelloProof(mac: [7, 7, 7])

    /// What every request is answered with.
    let reply: Message

    init(acceptHello: Bool = true, reply: Message = .writeReply(WriteReply(context: .empty, writtenTimestampMillis: 0, concurrent: []))) {
        self.acceptsHello = acceptHello
        self.reply = reply
    }

    func acceptHello(_ hello: Hello, remote: String?) -> Result<PendingHello, ErrorReply> {
        guard acceptsHello else { return .failure(ErrorReply(code: .handshakeRejected, message: "no")) }
        return .success(PendingHello(hello: hello, ack: HelloAck(cluster: hello.cluster, node: "me", nonce: Array(repeating: 2, count: 16), mac: [1])))
    }

    func verifyHelloProof(_ proof: HelloProof, for pending: PendingHello, remote: String?) -> Result<NodeName, ErrorReply> {
        guard proof == Self.goodProof, let node = try? NodeName(pending.hello.node) else {
            return .failure(ErrorReply(code: .handshakeRejected, message: "bad proof"))
        }
        return .success(node)
    }

    func recordDroppedOneWay(_ type: MessageType, reason: String) { dropped.append(type) }

    func dispatch(_ envelope: Envelope, fromPeer: Bool, responder: Responder) {
        dispatched.append(envelope)
        responder.reply(reply)
    }

    func recordProtocolError(_ error: WireError) { protocolErrors.append(error) }
}

private func makeChannel(_ dispatcher: RecordingDispatcher, limits: Limits = Limits()) throws -> EmbeddedChannel {
    let channel = EmbeddedChannel()
    try channel.pipeline.syncOperations.addHandler(FrameDecoder.handler(limits: limits))
    try channel.pipeline.syncOperations.addHandler(ServerConnectionHandler(dispatcher: dispatcher, limits: limits))
    try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 7401)).wait()
    #expect(channel.isActive)
    return channel
}

private func send(_ channel: EmbeddedChannel, _ bytes: [UInt8]) throws {
    var buf = channel.allocator.buffer(capacity: bytes.count)
    buf.writeBytes(bytes)
    try channel.writeInbound(buf)
}

/// Every reply frame written so far, decoded.
private func replies(_ channel: EmbeddedChannel) throws -> [Envelope] {
    // Replies sent through a responder are written by a task on the loop (one flush per batch).
    channel.embeddedEventLoop.run()
    var out: [Envelope] = []
    while var buf = try channel.readOutbound(as: ByteBuffer.self) {
        while buf.readableBytes >= 4 {
            let n = Int(buf.readInteger(as: UInt32.self) ?? 0)
            guard let body = buf.readBytes(length: n) else { break }
            out.append(try WireCodec.decodeBody(body, limits: Limits()))
        }
    }
    return out
}

private func helloFrom(_ node: String) -> Hello {
    Hello(cluster: "c", node: node, nonce: Array(repeating: 1, count: WireCodec.nonceBytes))
}

private func errorCode(_ e: Envelope) -> ErrorCode? {
    if case .error(let r) = e.message { return r.code }
    return nil
}

@Suite struct ServerHandlerTests {
    @Test func wellFormedRequestsReachTheDispatcherInOrder() throws {
        let d = RecordingDispatcher()
        let ch = try makeChannel(d)
        var bytes: [UInt8] = []
        for i in 1...3 { bytes += WireCodec.encodeFrame(Envelope(requestID: UInt64(i), message: .get(GetRequest(key: [UInt8(i)])))) }
        // Split the stream at awkward places: frames must reassemble.
        try send(ch, Array(bytes[0..<3]))
        try send(ch, Array(bytes[3..<17]))
        try send(ch, Array(bytes[17...]))
        #expect(d.dispatched.map(\.requestID) == [1, 2, 3])
        #expect(try replies(ch).map(\.requestID) == [1, 2, 3])
        #expect(ch.isActive)
    }

    /// The replies of one loop tick leave in one buffer and one flush, and each counts as an
    /// answered request: with `max_requests_per_connection` requests answered that way, the next
    /// ones are dispatched at once, not held.
    @Test func repliesOfOneTickLeaveInOneBufferAndEachCountsAsAnswered() throws {
        let d = RecordingDispatcher()
        var limits = Limits()
        limits.maxRequestsPerConnection = 3
        let ch = try makeChannel(d, limits: limits)
        let counter = FlushCounter()
        try ch.pipeline.syncOperations.addHandler(counter, position: .first)
        func frames(_ ids: ClosedRange<Int>) -> [UInt8] {
            ids.flatMap { WireCodec.encodeFrame(Envelope(requestID: UInt64($0), message: .get(GetRequest(key: [UInt8($0)])))) }
        }
        try send(ch, frames(1...3))
        #expect(d.dispatched.count == 3)
        ch.embeddedEventLoop.run()
        var buffers: [ByteBuffer] = []
        while let b = try ch.readOutbound(as: ByteBuffer.self) { buffers.append(b) }
        #expect(buffers.count == 1, "three replies, one buffer")
        #expect(counter.flushes == 1)
        var buf = try #require(buffers.first)
        var ids: [UInt64] = []
        while buf.readableBytes >= 4, let n = buf.readInteger(as: UInt32.self), let body = buf.readBytes(length: Int(n)) {
            ids.append(try WireCodec.decodeBody(body, limits: Limits()).requestID)
        }
        #expect(ids == [1, 2, 3])
        #expect(buf.readableBytes == 0)
        try send(ch, frames(4...6))
        #expect(d.dispatched.map(\.requestID) == [1, 2, 3, 4, 5, 6], "all three answered: nothing held")
        #expect(try replies(ch).map(\.requestID) == [4, 5, 6])
    }

    /// A reply whose frame would exceed `max_frame_bytes` leaves as an error for the same
    /// request, in the same buffer as its neighbours, and counts as answered.
    @Test func anOversizedReplyIsReplacedByAnErrorInItsBatch() throws {
        var limits = Limits()
        limits.maxFrameBytes = 300
        let d = RecordingDispatcher(reply: .error(ErrorReply(code: .storage, message: String(repeating: "x", count: 400))))
        let ch = try makeChannel(d, limits: limits)
        try send(ch, (1...2).flatMap { WireCodec.encodeFrame(Envelope(requestID: UInt64($0), message: .get(GetRequest(key: [1])))) })
        ch.embeddedEventLoop.run()
        var buffers: [ByteBuffer] = []
        while let b = try ch.readOutbound(as: ByteBuffer.self) { buffers.append(b) }
        #expect(buffers.count == 1)
        var buf = try #require(buffers.first)
        var answers: [Envelope] = []
        while buf.readableBytes >= 4, let n = buf.readInteger(as: UInt32.self), let body = buf.readBytes(length: Int(n)) {
            #expect(Int(n) <= limits.maxFrameBytes)
            answers.append(try WireCodec.decodeBody(body, limits: limits))
        }
        #expect(answers.map(\.requestID) == [1, 2] && buf.readableBytes == 0)
        for a in answers {
            guard case .error(let e) = a.message else { Issue.record("not an error: \(a.message.type)"); continue }
            #expect(e.code == .internalError && e.message.contains("exceeds limits.max_frame_bytes 300"))
        }
    }

    @Test func garbageInsideAFrameGetsAnErrorAndTheConnectionContinues() throws {
        let d = RecordingDispatcher()
        let ch = try makeChannel(d)
        // A frame with a valid header but a payload that is not a get request.
        var w = ByteWriter()
        w.writeU32(14)
        w.writeU8(WireCodec.protocolVersion)
        w.writeU8(MessageType.get.rawValue)
        w.writeU64(5)
        w.writeRaw([0xFF, 0xFF, 0xFF, 0xFF])
        try send(ch, w.bytes)
        let r = try replies(ch)
        #expect(r.count == 1 && r[0].requestID == 5 && errorCode(r[0]) == .malformed)
        #expect(ch.isActive)
        try send(ch, WireCodec.encodeFrame(Envelope(requestID: 6, message: .ping)))
        #expect(try replies(ch).map(\.message) == [.pong])
    }

    @Test func unknownVersionAndTypeGetErrorsWithTheirRequestID() throws {
        let d = RecordingDispatcher()
        let ch = try makeChannel(d)
        var frame = WireCodec.encodeFrame(Envelope(requestID: 9, message: .ping))
        frame[4] = 9
        try send(ch, frame)
        var frame2 = WireCodec.encodeFrame(Envelope(requestID: 10, message: .ping))
        frame2[5] = 0x1F
        try send(ch, frame2)
        let r = try replies(ch)
        #expect(r.map(\.requestID) == [9, 10])
        #expect(r.map(errorCode) == [.unsupportedVersion, .unknownMessage])
        #expect(d.dispatched.isEmpty)
        #expect(ch.isActive)
    }

    @Test func aTwoGiBLengthPrefixIsRefusedWithoutAllocatingAndCloses() throws {
        let d = RecordingDispatcher()
        let ch = try makeChannel(d)
        try send(ch, [0x80, 0x00, 0x00, 0x00, 1, 2, 3])
        let r = try replies(ch)
        #expect(r.count == 1 && errorCode(r[0]) == .frameTooLarge)
        #expect(!ch.isActive)
        #expect(d.protocolErrors == [.frameTooLarge(length: 0x8000_0000, limit: Limits().maxFrameBytes)])
    }

    @Test func aFrameShorterThanTheHeaderIsRefused() throws {
        let d = RecordingDispatcher()
        let ch = try makeChannel(d)
        try send(ch, [0, 0, 0, 3, 1, 2, 3])
        #expect(try replies(ch).map(errorCode) == [.malformed])
        #expect(!ch.isActive)
    }

    @Test func aTruncatedFrameAtEOFIsReportedNotDispatched() throws {
        let d = RecordingDispatcher()
        let ch = try makeChannel(d)
        let frame = WireCodec.encodeFrame(Envelope(requestID: 1, message: .get(GetRequest(key: [1, 2, 3]))))
        try send(ch, Array(frame.dropLast(2)))
        #expect(d.dispatched.isEmpty)
        _ = try? ch.finish()
        #expect(d.protocolErrors.contains { if case .truncatedFrame = $0 { true } else { false } })
    }

    /// Internode messages are refused before the handshake completes, including between the
    /// answered hello and its proof; the verified proof (one-way, never answered) opens them.
    @Test func internodeMessagesRequireAHandshake() throws {
        let d = RecordingDispatcher()
        let ch = try makeChannel(d)
        let rg = Message.replicaGet(ReplicaGet(partition: PartitionID(1), key: [1]))
        try send(ch, WireCodec.encodeFrame(Envelope(requestID: 1, message: rg)))
        #expect(try replies(ch).map(errorCode) == [.handshakeRequired])
        try send(ch, WireCodec.encodeFrame(Envelope(requestID: 2, message: .hello(helloFrom("n2")))))
        let ack = try replies(ch)
        #expect(ack.count == 1)
        if case .helloAck = ack.first?.message {} else { Issue.record("expected helloAck, got \(ack)") }
        try send(ch, WireCodec.encodeFrame(Envelope(requestID: 3, message: rg)))
        #expect(try replies(ch).map(errorCode) == [.handshakeRequired], "a hello without its proof is no handshake")
        try send(ch, WireCodec.encodeFrame(Envelope(requestID: 0, message: .helloProof(RecordingDispatcher.goodProof))))
        #expect(try replies(ch).isEmpty, "the proof is one-way")
        try send(ch, WireCodec.encodeFrame(Envelope(requestID: 4, message: rg)))
        #expect(d.dispatched.map(\.requestID) == [4])
        #expect(ch.isActive)
    }

    @Test func aRejectedHandshakeClosesTheConnection() throws {
        let d = RecordingDispatcher(acceptHello: false)
        let ch = try makeChannel(d)
        try send(ch, WireCodec.encodeFrame(Envelope(requestID: 1, message: .hello(helloFrom("n9")))))
        #expect(try replies(ch).map(errorCode) == [.handshakeRejected])
        #expect(!ch.isActive)
    }

    /// A proof that does not verify closes the connection, unanswered; nothing sent before it was
    /// served as internode traffic.
    @Test func aFailedProofClosesTheConnection() throws {
        let d = RecordingDispatcher()
        let ch = try makeChannel(d)
        try send(ch, WireCodec.encodeFrame(Envelope(requestID: 1, message: .hello(helloFrom("n2")))))
        #expect(try replies(ch).count == 1)
        try send(ch, WireCodec.encodeFrame(Envelope(requestID: 0, message: .helloProof(HelloProof(mac: [9])))))
        #expect(try replies(ch).isEmpty)
        #expect(!ch.isActive)
        #expect(d.dispatched.isEmpty)
    }

    /// A proof with no answered hello before it, or sent as a request, ends the connection too.
    @Test func aProofOutOfTurnClosesTheConnection() throws {
        let d = RecordingDispatcher()
        let unasked = try makeChannel(d)
        try send(unasked, WireCodec.encodeFrame(Envelope(requestID: 0, message: .helloProof(RecordingDispatcher.goodProof))))
        #expect(!unasked.isActive)
        #expect(d.dropped == [.helloProof])
        let asRequest = try makeChannel(d)
        try send(asRequest, WireCodec.encodeFrame(Envelope(requestID: 1, message: .hello(helloFrom("n2")))))
        #expect(try replies(asRequest).count == 1)
        try send(asRequest, WireCodec.encodeFrame(Envelope(requestID: 2, message: .helloProof(RecordingDispatcher.goodProof))))
        #expect(try replies(asRequest).map(errorCode) == [.malformed])
        #expect(!asRequest.isActive)
        #expect(d.dispatched.isEmpty)
    }

    @Test func repliesAreNotAcceptedAsRequests() throws {
        let d = RecordingDispatcher()
        let ch = try makeChannel(d)
        try send(ch, WireCodec.encodeFrame(Envelope(requestID: 4, message: .pong)))
        #expect(try replies(ch).map(errorCode) == [.unknownMessage])
        #expect(d.dispatched.isEmpty)
    }
}

/// Counts the flushes that pass it.
private final class FlushCounter: ChannelOutboundHandler, @unchecked Sendable {
    typealias OutboundIn = ByteBuffer
    var flushes = 0
    func flush(context: ChannelHandlerContext) {
        flushes += 1
        context.flush()
    }
}

@Suite struct OutboundBatchTests {
    /// Items handed over before the loop runs go out in order with one flush; a later item
    /// starts a new batch.
    @Test func itemsOfOneTickShareAFlushAndKeepTheirOrder() throws {
        let counter = FlushCounter()
        let ch = EmbeddedChannel(handler: counter)
        let batch = OutboundBatch<ByteBuffer>(channel: ch) { channel, b in channel.write(b, promise: nil) }
        for i in 1...3 { batch.send(ByteBuffer(bytes: [UInt8(i)])) }
        #expect(try ch.readOutbound(as: ByteBuffer.self) == nil)  // nothing before the loop runs
        ch.embeddedEventLoop.run()
        var seen: [UInt8] = []
        while let b = try ch.readOutbound(as: ByteBuffer.self) { seen += Array(b.readableBytesView) }
        #expect(seen == [1, 2, 3])
        #expect(counter.flushes == 1)
        batch.send(ByteBuffer(bytes: [4]))
        ch.embeddedEventLoop.run()
        #expect(try ch.readOutbound(as: ByteBuffer.self) == ByteBuffer(bytes: [4]))
        #expect(counter.flushes == 2)
    }
}

/// One timer per connection: requests time out at their own deadlines, in order, whatever order
/// they were sent in; answered requests leave nothing behind.
@Suite struct RequestDeadlineTests {
    private func at(_ ms: Int64) -> NIODeadline { .uptimeNanoseconds(0) + .milliseconds(ms) }

    @Test func deadlinesComeOutInOrderAndOnlyForRequestsStillWaiting() {
        var q = DeadlineQueue()
        q.add(1, at(100))
        q.add(2, at(100))
        q.add(3, at(50))    // shorter timeout, sent later: goes first
        q.add(4, at(200))
        var live: Set<UInt64> = [1, 2, 3, 4]
        #expect(q.earliest == at(50))
        live.remove(2)
        #expect(q.expire(at: at(99), isLive: live.contains) == [3])
        live.remove(3)
        #expect(q.expire(at: at(150), isLive: live.contains) == [1])
        live.remove(1)
        #expect(q.earliest == at(200))
        #expect(q.expire(at: at(199), isLive: live.contains) == [])
        #expect(q.expire(at: at(200), isLive: live.contains) == [4])
        #expect(q.count == 0 && q.earliest == nil)
    }

    @Test func answeredRequestsDoNotAccumulateBehindAWaitingOne() {
        var q = DeadlineQueue()
        let live: Set<UInt64> = [0]
        q.add(0, at(10_000))
        for id in UInt64(1)...20_000 {
            q.add(id, at(10_000 + Int64(id)))
            q.trim(live: live.count, isLive: live.contains)   // answered at once
            #expect(q.count <= 2 * live.count + 1024 + 1)
        }
        #expect(q.expire(at: at(100_000), isLive: live.contains) == [0])
        #expect(q.count == 0)
    }

    @Test func theMultiplexerFailsEachRequestAtItsDeadlineAndDeliversTheRest() throws {
        let ch = EmbeddedChannel()
        try ch.pipeline.syncOperations.addHandler(RequestMultiplexer(maxPending: 16, limits: Limits()))
        let loop = ch.embeddedEventLoop
        let box = Mutex<[Int: Result<Message, any Error>]>([:])
        var results: [Int: Result<Message, any Error>] { box.withLock { $0 } }
        // Odd requests wait on a promise, even ones on a callback (`requestSoon`'s sink).
        func request(_ n: Int, _ ms: UInt32) {
            if n % 2 == 0 {
                let sink = ReplySink.callback { r in box.withLock { $0[n] = r.mapError { $0 as any Error } } }
                ch.write(OutboundRequest(message: .ping, timeoutMillis: ms, reply: sink), promise: nil)
                return
            }
            let p = loop.makePromise(of: Message.self)
            p.futureResult.whenComplete { r in box.withLock { $0[n] = r } }
            ch.write(OutboundRequest(message: .ping, timeoutMillis: ms, reply: .promise(p)), promise: nil)
        }
        request(1, 100)
        request(2, 100)
        request(3, 50)
        ch.flush()
        let frame = WireCodec.encodeFrame(Envelope(requestID: 1, message: .pong))
        try ch.writeInbound(ByteBuffer(bytes: frame.dropFirst(WireCodec.lengthBytes)))
        #expect(try results[1]?.get() == .pong)
        loop.advanceTime(by: .milliseconds(49))
        #expect(results[3] == nil)
        loop.advanceTime(by: .milliseconds(1))
        #expect(Self.error(results[3]) == .timedOut(afterMillis: 50))
        #expect(results[2] == nil)
        loop.advanceTime(by: .milliseconds(50))
        #expect(Self.error(results[2]) == .timedOut(afterMillis: 100))
        request(4, 100)
        _ = try? ch.close().wait()
        #expect(Self.error(results[4]) == .lost("connection closed"))
    }

    private static func error(_ r: Result<Message, any Error>?) -> ConnectionError? {
        guard case .failure(let e)? = r else { return nil }
        return e as? ConnectionError
    }
}
