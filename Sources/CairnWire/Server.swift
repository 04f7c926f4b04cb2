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
}

extension RequestDispatcher {
    public func recordConnectionError(_ error: any Error) {}
}

/// Sends the reply to one request. Thread-safe; any number of replies may be sent from any task,
/// but a request should get exactly one.
public struct Responder: Sendable {
    public let channel: any Channel
    public let requestID: UInt64
    /// Replies larger than this are replaced by an error (the peer would refuse the frame).
    public let maxFrameBytes: Int

    public init(channel: any Channel, requestID: UInt64, maxFrameBytes: Int) {
        self.channel = channel
        self.requestID = requestID
        self.maxFrameBytes = maxFrameBytes
    }

    public func reply(_ message: Message) {
        var frame = WireCodec.encodeFrame(Envelope(requestID: requestID, message: message))
        if frame.count - WireCodec.lengthBytes > maxFrameBytes {
            frame = WireCodec.encodeFrame(Envelope(requestID: requestID, message: .error(ErrorReply(
                code: .internalError, message: "reply of \(frame.count) bytes exceeds limits.max_frame_bytes \(maxFrameBytes)"))))
        }
        channel.writeAndFlush(channel.allocator.buffer(frame), promise: nil)
    }

    public func fail(_ error: ErrorReply) { reply(.error(error)) }
}

/// The per-connection server handler: decodes frames, enforces the handshake for internode
/// messages, answers protocol errors, and passes requests to the dispatcher.
///
/// A frame that cannot be decoded gets an error reply and the connection keeps going (the frame
/// boundary is intact); an oversized or truncated frame gets an error reply and the connection
/// is closed. Neither affects other connections.
public final class ServerConnectionHandler: ChannelInboundHandler {
    public typealias InboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    private let dispatcher: any RequestDispatcher
    private let limits: Limits
    private var isPeer = false

    public init(dispatcher: any RequestDispatcher, limits: Limits) {
        self.dispatcher = dispatcher
        self.limits = limits
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
            dispatcher.dispatch(envelope, fromPeer: isPeer, responder: Responder(channel: context.channel, requestID: id, maxFrameBytes: limits.maxFrameBytes))
        }
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
