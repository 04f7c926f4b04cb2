public import NIOCore
public import CairnCore

/// What a server connection hands to the node. Implementations must be thread-safe: methods are
/// called on the connection's event loop and must not block it.
public protocol RequestDispatcher: Sendable {
    /// Answers a peer's `hello` (`remote`: the connection's far end, for messages): the handshake
    /// now pending, whose `ack` is sent back, or the error sent instead (the connection is then
    /// closed). The connection carries no internode message until `verifyHelloProof` succeeds.
    func acceptHello(_ hello: Hello, remote: String?) -> Result<PendingHello, ErrorReply>
    /// Checks the `hello-proof` that followed `pending`: the peer's name, after which the
    /// connection carries internode messages from it; or why not (nothing is answered, the proof
    /// is one-way, and the connection is closed).
    func verifyHelloProof(_ proof: HelloProof, for pending: PendingHello, remote: String?) -> Result<NodeName, ErrorReply>
    /// Takes one request. Exactly one reply must eventually be sent through `responder`.
    func dispatch(_ envelope: Envelope, fromPeer: Bool, responder: Responder)
    /// Counts frames that could not be decoded (for metrics); called on the event loop.
    func recordProtocolError(_ error: WireError)
    /// A connection is being closed because of a non-protocol error (I/O error, reset).
    func recordConnectionError(_ error: any Error)
    /// A connection stopped being read: its peer is not reading its replies
    /// (`limits.max_unflushed_reply_bytes`) or has too many requests unanswered
    /// (`limits.max_requests_per_connection`). Called on the event loop, once per pause.
    func recordReadPause()
    /// A one-way message (request id 0) that could not be taken (a reply type, an internode
    /// message before `hello`, a stream signal for no stream it may use); nothing is answered.
    func recordDroppedOneWay(_ type: MessageType, reason: String)
    /// A peer opens a stream to this node: a sink for it, or the error the opener gets. Called on
    /// the connection's event loop (or a network task); must not block.
    func acceptStream(_ request: InboundStreamRequest) -> Result<any StreamSink, ErrorReply>
}

extension RequestDispatcher {
    /// Default: no peers (a dispatcher for clients only).
    public func acceptHello(_ hello: Hello, remote: String?) -> Result<PendingHello, ErrorReply> {
        .failure(ErrorReply(code: .handshakeRejected, message: "this endpoint accepts no peers"))
    }
    public func verifyHelloProof(_ proof: HelloProof, for pending: PendingHello, remote: String?) -> Result<NodeName, ErrorReply> {
        .failure(ErrorReply(code: .handshakeRejected, message: "this endpoint accepts no peers"))
    }
    public func recordConnectionError(_ error: any Error) {}
    public func recordReadPause() {}
    public func recordDroppedOneWay(_ type: MessageType, reason: String) {}
    public func acceptStream(_ request: InboundStreamRequest) -> Result<any StreamSink, ErrorReply> {
        .failure(ErrorReply(code: .unknownMessage, message: "this node accepts no streams"))
    }
}

/// Sends the reply to one request: over a connection's channel, or to an in-memory network.
/// Thread-safe; any number of replies may be sent from any task, but a request should get
/// exactly one.
public struct Responder: Sendable {
    private enum Route: Sendable {
        case channel(any Channel, maxFrameBytes: Int)
        /// The connection's reply batch (`ServerConnectionHandler`): the frames of replies sent
        /// within one event-loop tick go out in one buffer and one flush.
        case batch(ReplyBatch, any Channel)
        case deliver(@Sendable (Message) -> Void)
    }

    public let requestID: UInt64
    private let route: Route

    /// Replies as frames on `channel`; a reply larger than `maxFrameBytes` is replaced by an
    /// error (the peer would refuse the frame).
    public init(channel: any Channel, requestID: UInt64, maxFrameBytes: Int) {
        self.requestID = requestID
        route = .channel(channel, maxFrameBytes: maxFrameBytes)
    }

    init(batch: ReplyBatch, channel: any Channel, requestID: UInt64) {
        self.requestID = requestID
        route = .batch(batch, channel)
    }

    /// Replies by handing the message to `deliver` (a network without sockets).
    public init(requestID: UInt64, deliver: @escaping @Sendable (Message) -> Void) {
        self.requestID = requestID
        route = .deliver(deliver)
    }

    /// The responder of a one-way message: every answer is dropped.
    public static let discarding = Responder(requestID: 0) { _ in }

    /// The connection the request came on, when it came on one.
    public var channel: (any Channel)? {
        switch route {
        case .channel(let c, _), .batch(_, let c): c
        case .deliver: nil
        }
    }

    public func reply(_ message: Message) {
        switch route {
        case .deliver(let deliver):
            deliver(message)
        case .channel(let channel, let maxFrameBytes):
            // The reply's frame; an error in its place when it would exceed `maxFrameBytes`.
            var w = ByteWriter(capacity: WireCodec.frameCapacity)
            WireCodec.appendFrame(Envelope(requestID: requestID, message: message), maxFrameBytes: maxFrameBytes, into: &w)
            channel.writeAndFlush(channel.allocator.buffer(w.bytes), promise: nil)
        case .batch(let batch, _):
            batch.send(Envelope(requestID: requestID, message: message))
        }
    }

    public func fail(_ error: ErrorReply) { reply(.error(error)) }
}

/// The per-connection server handler: decodes frames, enforces the handshake for internode
/// messages, answers protocol errors, and passes requests to the dispatcher.
///
/// Handshake (Docs/wire-protocol.md §8): a `hello` the dispatcher accepts is answered with its
/// `hello-ack` and leaves the handshake pending; only the one-way `hello-proof` that the
/// dispatcher then verifies makes the connection a peer's. Until then internode messages are
/// refused (`handshakeRequired`) as before any hello; a refused hello or proof closes the
/// connection. A new `hello` starts over (the connection is no peer's until its proof).
///
/// A frame that cannot be decoded gets an error reply and the connection keeps going (the frame
/// boundary is intact); an oversized or truncated frame gets an error reply and the connection
/// is closed. Neither affects other connections.
///
/// Backpressure: requests are dispatched only while the channel is writable (its unsent bytes
/// stay under the high water mark the node sets from `limits.max_unflushed_reply_bytes`) and
/// fewer than `limits.max_requests_per_connection` of them are unanswered. Otherwise requests
/// already read wait here, in order, and the handler stops asking the socket for more until both
/// hold again; so a peer that pipelines requests without reading replies makes the node buffer at
/// most about `max_requests_per_connection` replies plus `max_unflushed_reply_bytes`, plus one
/// socket read of requests. Answered requests are counted as their replies are written: a
/// batch of replies (`writeReplies`, one buffer for every frame of a loop tick) by its frames,
/// any other reply a `Responder` writes as it passes through `write` here.
///
/// One-way messages (request id 0, Docs/wire-protocol.md §2) are never answered, errors included:
/// a one-way frame that fails to decode or may not be taken is counted
/// (`recordProtocolError`, `recordDroppedOneWay`) and dropped; one that is taken is dispatched
/// like a request whose answer is discarded, without counting against
/// `max_requests_per_connection` (`max_inflight_requests` still bounds it).
///
/// Streams (§9): after `hello`, a `stream-open` asks the dispatcher for a sink; the stream's
/// chunks are fed to it in order by a `StreamInbox` (bounded by `streams.receiverQueueLimit`),
/// whose acknowledgements go back as one-way frames. Stream frames bypass the request
/// backpressure above: the sender's window bounds them. When the connection closes, every stream
/// on it is cancelled.
///
/// Isolation: a channel handler; all state is touched on the channel's event loop only.
public final class ServerConnectionHandler: ChannelDuplexHandler {
    public typealias InboundIn = ByteBuffer
    public typealias OutboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    private let dispatcher: any RequestDispatcher
    private let limits: Limits
    private let streams: StreamSettings
    private var isPeer = false
    /// The peer's node name, once its `hello-proof` was verified.
    private var peerNode: NodeName?
    /// The answered `hello` whose `hello-proof` is awaited.
    private var pendingHello: PendingHello?
    /// Streams open on this connection, by stream id.
    private var inbound: [UInt64: StreamInbox] = [:]
    private var context: ChannelHandlerContext?
    /// Requests read but not dispatched yet (only while paused), oldest first.
    private var held = CircularBuffer<Envelope>()
    /// Requests dispatched and not yet answered.
    private var unanswered = 0
    /// This connection's replies, written and flushed once per batch (made with the first
    /// request; it refers back to the handler until the handler is removed).
    private var replies: ReplyBatch?
    /// A read the pipeline asked for while paused; issued when the pause ends.
    private var readDeferred = false

    public init(dispatcher: any RequestDispatcher, limits: Limits, streams: StreamSettings = StreamSettings()) {
        self.dispatcher = dispatcher
        self.limits = limits
        self.streams = streams
    }

    public func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    public func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        replies = nil   // the batch's writer holds the handler
    }

    private func mayDispatch(_ context: ChannelHandlerContext) -> Bool {
        context.channel.isWritable && unanswered < limits.maxRequestsPerConnection
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var body = unwrapInboundIn(data)
        let bytes = body.readBytes(length: body.readableBytes) ?? []
        let envelope: Envelope
        do {
            envelope = try WireCodec.decodeBody(bytes, limits: limits)
        } catch {
            dispatcher.recordProtocolError(error)
            if error.requestID == 0 { return }   // one-way: never answered
            send(context, Envelope(requestID: error.requestID ?? 0, message: .error(ErrorReply(code: error.errorCode, message: error.description))))
            return
        }
        let id = envelope.requestID
        let type = envelope.message.type
        if type.isStreamSignal || (id == 0 && !type.isRequest) {
            return takeOneWay(envelope.message)
        }
        if id == 0 && type.isInternode && !isPeer && type != .hello && type != .helloProof {
            return dispatcher.recordDroppedOneWay(type, reason: "internode message before hello")
        }
        switch envelope.message {
        case .hello(let hello):
            isPeer = false
            peerNode = nil
            pendingHello = nil
            switch dispatcher.acceptHello(hello, remote: remote(context)) {
            case .success(let pending):
                pendingHello = pending
                send(context, Envelope(requestID: id, message: .helloAck(pending.ack)))
            case .failure(let err):
                send(context, Envelope(requestID: id, message: .error(err)))
                context.close(promise: nil)
            }
        case .helloProof(let proof):
            takeProof(context, proof, requestID: id)
        case let m where !m.type.isRequest:
            send(context, Envelope(requestID: id, message: .error(ErrorReply(code: .unknownMessage, message: "\(m.type) is not a request"))))
        case let m where m.type.isInternode && !isPeer:
            send(context, Envelope(requestID: id, message: .error(ErrorReply(code: .handshakeRequired, message: "internode message \(m.type) before hello"))))
        case .ping:
            send(context, Envelope(requestID: id, message: .pong))
        case .streamOpen(let open):
            self.open(context, open, requestID: id)
        default:
            if held.isEmpty && mayDispatch(context) {
                dispatch(context, envelope)
            } else {
                held.append(envelope)
            }
        }
    }

    private func dispatch(_ context: ChannelHandlerContext, _ envelope: Envelope) {
        if envelope.requestID == 0 {
            return dispatcher.dispatch(envelope, fromPeer: isPeer, responder: .discarding)
        }
        unanswered += 1
        let batch = replies ?? {
            let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
            return ReplyBatch(channel: context.channel, maxFrameBytes: limits.maxFrameBytes) { bytes, frames in
                handler.value.writeReplies(bytes, frames: frames)
            }
        }()
        replies = batch
        dispatcher.dispatch(envelope, fromPeer: isPeer, responder: Responder(batch: batch, channel: context.channel, requestID: envelope.requestID))
    }

    /// Dispatches held requests while allowed, then resumes reading if a read was deferred.
    private func resume(_ context: ChannelHandlerContext) {
        while !held.isEmpty && mayDispatch(context) { dispatch(context, held.removeFirst()) }
        if readDeferred && held.isEmpty && mayDispatch(context) {
            readDeferred = false
            context.read()
        }
    }

    public func read(context: ChannelHandlerContext) {
        if held.isEmpty && mayDispatch(context) {
            context.read()
        } else if !readDeferred {
            readDeferred = true
            dispatcher.recordReadPause()
        }
    }

    /// A batch of reply frames, written as one buffer (one allocation, one piece for the socket
    /// write) and flushed, each counted as an answered request. Dropped when the handler is gone
    /// (the connection closed). On the event loop.
    private func writeReplies(_ bytes: [UInt8], frames: Int) {
        guard let context else { return }
        var buffer = context.channel.allocator.buffer(capacity: bytes.count)
        buffer.writeBytes(bytes)
        unanswered = max(0, unanswered - frames)
        context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
        if readDeferred || !held.isEmpty { resume(context) }
    }

    /// Replies a `Responder` writes outside a batch (one per dispatched request).
    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        unanswered = max(0, unanswered - 1)
        context.write(data, promise: promise)
        if readDeferred || !held.isEmpty { resume(context) }
    }

    public func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { resume(context) }
        context.fireChannelWritabilityChanged()
    }

    public func channelInactive(context: ChannelHandlerContext) {
        held.removeAll()   // nobody is left to answer
        let open = inbound
        inbound = [:]
        for s in open.values { s.linkFailed("connection closed") }
        context.fireChannelInactive()
    }

    public func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let wire = error as? WireError {
            dispatcher.recordProtocolError(wire)
            let reply = Envelope(requestID: 0, message: .error(ErrorReply(code: wire.errorCode, message: wire.description)))
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(channel.allocator.frame(reply))).whenComplete { _ in
                channel.close(promise: nil)
            }
        } else {
            dispatcher.recordConnectionError(error)
            context.close(promise: nil)
        }
    }

    /// Writes a reply; never for a one-way message (request id 0), except the connection-level
    /// errors sent from `errorCaught`.
    private func send(_ context: ChannelHandlerContext, _ envelope: Envelope) {
        guard envelope.requestID != 0 else { return }
        context.writeAndFlush(wrapOutboundOut(context.channel.allocator.frame(envelope)), promise: nil)
    }

    // MARK: Handshake

    /// The dialer's `hello-proof`: one-way, never answered. Verified against the pending hello,
    /// it makes the connection a peer's; anything else ends the handshake and the connection.
    private func takeProof(_ context: ChannelHandlerContext, _ proof: HelloProof, requestID: UInt64) {
        let pending = pendingHello
        pendingHello = nil
        guard requestID == 0 else {
            send(context, Envelope(requestID: requestID, message: .error(ErrorReply(code: .malformed, message: "hello-proof is one-way: request id must be 0"))))
            return context.close(promise: nil)
        }
        guard let pending else {
            dispatcher.recordDroppedOneWay(.helloProof, reason: "hello-proof without an answered hello")
            return context.close(promise: nil)
        }
        switch dispatcher.verifyHelloProof(proof, for: pending, remote: remote(context)) {
        case .success(let node):
            isPeer = true
            peerNode = node
        case .failure:
            context.close(promise: nil)
        }
    }

    /// "host:port" of the connection's far end, when known.
    private func remote(_ context: ChannelHandlerContext) -> String? {
        context.channel.remoteAddress.map { "\($0.ipAddress ?? "?"):\($0.port ?? 0)" }
    }

    // MARK: Streams

    private func open(_ context: ChannelHandlerContext, _ open: StreamOpen, requestID: UInt64) {
        guard requestID != 0 else { return dispatcher.recordDroppedOneWay(.streamOpen, reason: "stream-open must be a request") }
        guard let peer = peerNode else {
            return send(context, Envelope(requestID: requestID, message: .error(ErrorReply(code: .handshakeRequired, message: "stream-open before hello"))))
        }
        guard inbound[open.streamID] == nil else {
            return send(context, Envelope(requestID: requestID, message: .error(ErrorReply(code: .malformed, message: "stream \(open.streamID) is already open"))))
        }
        switch dispatcher.acceptStream(InboundStreamRequest(from: peer, kind: open.kind, header: open.header, remote: remote(context))) {
        case .failure(let error):
            send(context, Envelope(requestID: requestID, message: .error(error)))
        case .success(let sink):
            let loop = context.eventLoop
            let handler = NIOLoopBound(self, eventLoop: loop)
            let streamID = open.streamID
            let inbox = StreamInbox(sink: sink, queueLimit: streams.receiverQueueLimit, signal: { signal in
                let message: Message = switch signal {
                case .ack(let n, let final): .streamAck(StreamAck(streamID: streamID, acknowledged: n, final: final))
                case .abort(let reason): .streamAbort(StreamCancel(streamID: streamID, reason: reason))
                }
                loop.execute { handler.value.emit(message) }
            }, onTerminal: {
                loop.execute { handler.value.inbound.removeValue(forKey: streamID) }
            })
            inbound[streamID] = inbox
            send(context, Envelope(requestID: requestID, message: .streamAccept))
        }
    }

    /// A one-way frame that is not a request to dispatch: stream signals (on the receiving side,
    /// chunk, end and cancel) and reply types sent with id 0. Never answered.
    private func takeOneWay(_ message: Message) {
        guard isPeer else { return dispatcher.recordDroppedOneWay(message.type, reason: "internode message before hello") }
        switch message {
        case .streamChunk(let c): inbound[c.streamID]?.deliver(.chunk(c.data))
        case .streamEnd(let e): inbound[e.streamID]?.deliver(.end(chunkCount: e.chunkCount))
        case .streamCancel(let c): inbound[c.streamID]?.deliver(.cancel(c.reason))
        default: dispatcher.recordDroppedOneWay(message.type, reason: "not accepted by a server")
        }
        // A signal for a stream no longer open (it ended while the frame was in flight) is dropped.
    }

    /// Writes a one-way frame (stream signals) straight to the channel, past this handler's
    /// reply accounting.
    private func emit(_ message: Message) {
        guard let context else { return }
        context.writeAndFlush(wrapOutboundOut(context.channel.allocator.frame(Envelope(requestID: 0, message: message))), promise: nil)
    }
}
