public import NIOCore
public import CairnCore

/// What a server connection hands to the node. Implementations must be thread-safe: methods are
/// called on the connection's event loop and must not block it.
public protocol RequestDispatcher: Sendable {
    /// Checks an internode handshake; on success the connection may carry internode messages.
    func validateHello(_ hello: Hello) -> Result<Hello, ErrorReply>
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
}

extension RequestDispatcher {
    public func recordConnectionError(_ error: any Error) {}
    public func recordReadPause() {}
}

/// Sends the reply to one request: over a connection's channel, or to an in-memory network.
/// Thread-safe; any number of replies may be sent from any task, but a request should get
/// exactly one.
public struct Responder: Sendable {
    private enum Route: Sendable {
        case channel(any Channel, maxFrameBytes: Int)
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

    /// Replies by handing the message to `deliver` (a network without sockets).
    public init(requestID: UInt64, deliver: @escaping @Sendable (Message) -> Void) {
        self.requestID = requestID
        route = .deliver(deliver)
    }

    /// The connection the request came on, when it came on one.
    public var channel: (any Channel)? {
        if case .channel(let c, _) = route { return c }
        return nil
    }

    public func reply(_ message: Message) {
        switch route {
        case .deliver(let deliver):
            deliver(message)
        case .channel(let channel, let maxFrameBytes):
            var frame = WireCodec.encodeFrame(Envelope(requestID: requestID, message: message))
            if frame.count - WireCodec.lengthBytes > maxFrameBytes {
                frame = WireCodec.encodeFrame(Envelope(requestID: requestID, message: .error(ErrorReply(
                    code: .internalError, message: "reply of \(frame.count) bytes exceeds limits.max_frame_bytes \(maxFrameBytes)"))))
            }
            channel.writeAndFlush(channel.allocator.buffer(frame), promise: nil)
        }
    }

    public func fail(_ error: ErrorReply) { reply(.error(error)) }
}

/// The per-connection server handler: decodes frames, enforces the handshake for internode
/// messages, answers protocol errors, and passes requests to the dispatcher.
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
/// socket read of requests. Every reply a `Responder` writes passes through `write` here, which
/// is how answered requests are counted.
///
/// Isolation: a channel handler; all state is touched on the channel's event loop only.
public final class ServerConnectionHandler: ChannelDuplexHandler {
    public typealias InboundIn = ByteBuffer
    public typealias OutboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    private let dispatcher: any RequestDispatcher
    private let limits: Limits
    private var isPeer = false
    /// Requests read but not dispatched yet (only while paused), oldest first.
    private var held = CircularBuffer<Envelope>()
    /// Requests dispatched and not yet answered.
    private var unanswered = 0
    /// A read the pipeline asked for while paused; issued when the pause ends.
    private var readDeferred = false

    public init(dispatcher: any RequestDispatcher, limits: Limits) {
        self.dispatcher = dispatcher
        self.limits = limits
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
            send(context, Envelope(requestID: error.requestID ?? 0, message: .error(ErrorReply(code: error.errorCode, message: error.description))))
            return
        }
        let id = envelope.requestID
        switch envelope.message {
        case .hello(let hello):
            switch dispatcher.validateHello(hello) {
            case .success(let ack):
                isPeer = true
                send(context, Envelope(requestID: id, message: .helloAck(ack)))
            case .failure(let err):
                send(context, Envelope(requestID: id, message: .error(err)))
                context.close(promise: nil)
            }
        case let m where !m.type.isRequest:
            send(context, Envelope(requestID: id, message: .error(ErrorReply(code: .unknownMessage, message: "\(m.type) is not a request"))))
        case let m where m.type.isInternode && !isPeer:
            send(context, Envelope(requestID: id, message: .error(ErrorReply(code: .handshakeRequired, message: "internode message \(m.type) before hello"))))
        case .ping:
            send(context, Envelope(requestID: id, message: .pong))
        default:
            if held.isEmpty && mayDispatch(context) {
                dispatch(context, envelope)
            } else {
                held.append(envelope)
            }
        }
    }

    private func dispatch(_ context: ChannelHandlerContext, _ envelope: Envelope) {
        unanswered += 1
        dispatcher.dispatch(envelope, fromPeer: isPeer, responder: Responder(channel: context.channel, requestID: envelope.requestID,
                                                                              maxFrameBytes: limits.maxFrameBytes))
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

    /// Replies written by `Responder`s (one per dispatched request).
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

    private func send(_ context: ChannelHandlerContext, _ envelope: Envelope) {
        context.writeAndFlush(wrapOutboundOut(context.channel.allocator.frame(envelope)), promise: nil)
    }
}
