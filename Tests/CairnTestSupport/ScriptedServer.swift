import CairnCore
public import CairnWire
import NIOCore
import NIOPosix
public import Synchronization

/// A node stand-in for client and CLI tests: the real server handler with a scripted dispatcher
/// that answers every request the same way. Thread-safe.
public final class ScriptedServer: RequestDispatcher {
    public enum Behavior: Sendable {
        case answer(Message)
        case refuse(ErrorCode)
        /// Never answers (a paused node).
        case silent
        /// A write reply with a trailing byte: a frame no client can decode.
        case undecodable
    }

    public let behavior: Behavior
    /// Requests dispatched so far.
    public let received = Atomic<Int>(0)
    /// Requests dispatched so far per client connection (keyed by its channel).
    public let receivedPerConnection = Mutex<[ObjectIdentifier: Int]>([:])
    /// Connections accepted so far.
    public let accepted = Atomic<Int>(0)
    private let channel = Mutex<(any Channel)?>(nil)

    public init(_ behavior: Behavior) { self.behavior = behavior }

    public func recordProtocolError(_ error: WireError) {}

    public func dispatch(_ envelope: Envelope, fromPeer: Bool, responder: Responder) {
        received.wrappingAdd(1, ordering: .relaxed)
        if let channel = responder.channel { receivedPerConnection.withLock { $0[ObjectIdentifier(channel), default: 0] += 1 } }
        switch behavior {
        case .answer(let m): responder.reply(m)
        case .refuse(let code): responder.fail(ErrorReply(code: code, message: "scripted \(code)"))
        case .silent: break
        case .undecodable:
            var body = WireCodec.encodeBody(Envelope(requestID: envelope.requestID, message: .writeReply(
                WriteReply(context: .empty, writtenTimestampMillis: 1, concurrent: []))))
            body.append(0xEE)
            guard let channel = responder.channel else { return }
            var buffer = channel.allocator.buffer(capacity: body.count + 4)
            buffer.writeInteger(UInt32(body.count))
            buffer.writeBytes(body)
            channel.writeAndFlush(buffer, promise: nil)
        }
    }

    /// Listens on an ephemeral loopback port; returns "127.0.0.1:port".
    public func start() async throws -> String {
        let limits = Limits()
        let ch = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { c in
                self.accepted.wrappingAdd(1, ordering: .relaxed)
                return c.eventLoop.makeCompletedFuture {
                    try c.pipeline.syncOperations.addHandler(FrameDecoder.handler(limits: limits))
                    try c.pipeline.syncOperations.addHandler(ServerConnectionHandler(dispatcher: self, limits: limits))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        channel.withLock { $0 = ch }
        return "127.0.0.1:\(ch.localAddress?.port ?? 0)"
    }

    public func stop() async { try? await channel.withLock { $0 }?.close() }
}
