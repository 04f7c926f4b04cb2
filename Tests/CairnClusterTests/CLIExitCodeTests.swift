import Testing
import CairnCore
import CairnWire
import NIOCore
import NIOPosix
import Synchronization

/// A node stand-in that answers every request the same way.
private final class OneAnswerServer: RequestDispatcher {
    enum Answer: Sendable {
        case error(ErrorCode)
        /// A write reply with a trailing byte: a frame the client cannot decode.
        case undecodable
    }

    let answer: Answer
    let channel = Mutex<(any Channel)?>(nil)

    init(_ answer: Answer) { self.answer = answer }

    func validateHello(_ hello: Hello) -> Result<Hello, ErrorReply> { .failure(ErrorReply(code: .handshakeRejected, message: "no")) }
    func recordProtocolError(_ error: WireError) {}

    func dispatch(_ envelope: Envelope, fromPeer: Bool, responder: Responder) {
        switch answer {
        case .error(let code):
            responder.fail(ErrorReply(code: code, message: "scripted \(code)"))
        case .undecodable:
            var body = WireCodec.encodeBody(Envelope(requestID: envelope.requestID, message: .writeReply(
                WriteReply(context: .empty, writtenTimestampMillis: 1, concurrent: []))))
            body.append(0xEE)
            var buffer = responder.channel.allocator.buffer(capacity: body.count + 4)
            buffer.writeInteger(UInt32(body.count))
            buffer.writeBytes(body)
            responder.channel.writeAndFlush(buffer, promise: nil)
        }
    }

    func start() async throws -> String {
        let limits = Limits()
        let ch = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { c in
                c.eventLoop.makeCompletedFuture {
                    try c.pipeline.syncOperations.addHandler(FrameDecoder.handler(limits: limits))
                    try c.pipeline.syncOperations.addHandler(ServerConnectionHandler(dispatcher: self, limits: limits))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        channel.withLock { $0 = ch }
        return "127.0.0.1:\(ch.localAddress?.port ?? 0)"
    }

    func stop() async { try? await channel.withLock { $0 }?.close() }
}

/// Issue 10: a write whose outcome is unknown exits 3, as the README promises — including a
/// storage error from the coordinator and a reply the CLI cannot decode. Errors that certainly
/// applied nothing stay 1.
@Suite(.timeLimit(.minutes(1)))
struct CLIExitCodeTests {
    private func cairn(_ address: String, _ args: [String]) throws -> ProcessResult {
        try runProcess(try Repo.binary("cairn"), ["--node", address, "--timeout", "5000"] + args)
    }

    @Test(arguments: [ErrorCode.storage, .internalError])
    func aWriteThatFailedOnTheServerHasAnUnknownOutcome(code: ErrorCode) async throws {
        let server = OneAnswerServer(.error(code))
        let address = try await server.start()
        #expect(try cairn(address, ["put", "k", "v"]).status == 3)
        #expect(try cairn(address, ["delete", "k"]).status == 3)
        #expect(try cairn(address, ["get", "k"]).status == 1, "a read applies nothing: an ordinary error")
        await server.stop()
    }

    @Test func anUndecodableWriteReplyHasAnUnknownOutcome() async throws {
        let server = OneAnswerServer(.undecodable)
        let address = try await server.start()
        let put = try cairn(address, ["put", "k", "v", "--json"])
        #expect(put.status == 3)
        #expect(put.stdout.contains("\"kind\""))
        await server.stop()
    }

    @Test func aWriteThatCertainlyAppliedNothingIsAnOrdinaryError() async throws {
        let server = OneAnswerServer(.error(.invalidArgument))
        let address = try await server.start()
        #expect(try cairn(address, ["put", "k", "v"]).status == 1)
        await server.stop()
    }
}
