import Foundation
public import NIOCore
import NIOHTTP1
import NIOPosix
import DequeModule

/// etcd v3 through its JSON gateway (`POST /v3/kv/put`, `/v3/kv/range`) over one HTTP/1.1
/// keep-alive connection per worker; workers are spread over the endpoints.
public final class EtcdTarget: LoadTarget {
    let endpoints: Endpoints

    public init(endpoints: [String], group: (any EventLoopGroup)? = nil) throws(TargetError) {
        self.endpoints = try Endpoints(scheme: "etcd", endpoints, group: group)
    }

    public var description: String { endpoints.description }

    public func session(index: Int) async throws(TargetError) -> any TargetSession {
        let (host, port) = endpoints.pick(index)
        return try await EtcdConnection.connect(host: host, port: port, group: endpoints.group)
    }

    public func close() async {}
}

/// Collects one response at a time, in order, for requests sent on a keep-alive connection.
final class HTTPResponseCollector: ChannelDuplexHandler {
    typealias InboundIn = HTTPClientResponsePart
    typealias OutboundIn = (HTTPClientRequestPart, EventLoopPromise<(UInt, [UInt8])>?)
    typealias OutboundOut = HTTPClientRequestPart

    /// Bound on a response body (a range reply for one key is small).
    static let maxBody = 64 << 20
    private var waiting = Deque<EventLoopPromise<(UInt, [UInt8])>>()
    private var status: UInt = 0
    private var body: [UInt8] = []

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let (part, reply) = unwrapOutboundIn(data)
        if let reply { waiting.append(reply) }
        context.write(wrapOutboundOut(part), promise: promise)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            status = h.status.code
            body = []
        case .body(var b):
            if body.count + b.readableBytes > Self.maxBody {
                fail(TargetError("server", "etcd response over \(Self.maxBody) bytes"))
                context.close(promise: nil)
                return
            }
            body += b.readBytes(length: b.readableBytes) ?? []
        case .end:
            waiting.popFirst()?.succeed((status, body))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        fail(TargetError("connection", "etcd connection closed"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        fail(TargetError("connection", "\(error)"))
        context.close(promise: nil)
    }

    private func fail(_ e: TargetError) {
        while let p = waiting.popFirst() { p.fail(e) }
    }
}

final class EtcdConnection: TargetSession {
    let channel: any Channel
    let host: String

    init(channel: any Channel, host: String) {
        self.channel = channel
        self.host = host
    }

    static func connect(host: String, port: Int, group: any EventLoopGroup) async throws(TargetError) -> EtcdConnection {
        do {
            let ch = try await ClientBootstrap(group: group)
                .channelOption(.tcpOption(.tcp_nodelay), value: 1)
                .channelInitializer { c in
                    c.eventLoop.makeCompletedFuture {
                        try c.pipeline.syncOperations.addHTTPClientHandlers()
                        try c.pipeline.syncOperations.addHandler(HTTPResponseCollector())
                    }
                }
                .connect(host: host, port: port).get()
            return EtcdConnection(channel: ch, host: "\(host):\(port)")
        } catch {
            throw TargetError("connection", "etcd \(host):\(port): \(error)")
        }
    }

    func post(_ path: String, _ json: [String: String]) async throws(TargetError) -> [String: Any] {
        let payload: Data
        do { payload = try JSONSerialization.data(withJSONObject: json) } catch { throw TargetError("invalid", "\(error)") }
        var head = HTTPRequestHead(version: .http1_1, method: .POST, uri: path)
        head.headers.add(name: "Host", value: host)
        head.headers.add(name: "Content-Type", value: "application/json")
        head.headers.add(name: "Content-Length", value: "\(payload.count)")
        var buf = channel.allocator.buffer(capacity: payload.count)
        buf.writeBytes(payload)
        let promise = channel.eventLoop.makePromise(of: (UInt, [UInt8]).self)
        let noReply: EventLoopPromise<(UInt, [UInt8])>? = nil
        channel.write((HTTPClientRequestPart.head(head), promise), promise: nil)
        channel.write((HTTPClientRequestPart.body(.byteBuffer(buf)), noReply), promise: nil)
        channel.writeAndFlush((HTTPClientRequestPart.end(nil), noReply)).whenFailure { promise.fail(TargetError("connection", "\($0)")) }
        let (status, body): (UInt, [UInt8])
        do {
            (status, body) = try await promise.futureResult.get()
        } catch let e as TargetError {
            throw e
        } catch {
            throw TargetError("connection", "\(error)")
        }
        guard status == 200 else {
            throw TargetError(status == 503 ? "unavailable" : "server", "etcd \(path) HTTP \(status): \(String(decoding: body.prefix(200), as: UTF8.self))")
        }
        guard let object = (try? JSONSerialization.jsonObject(with: Data(body))) as? [String: Any] else {
            throw TargetError("server", "etcd \(path) returned non-JSON")
        }
        return object
    }

    func read(_ key: [UInt8]) async throws(TargetError) -> ReadResult {
        let reply = try await post("/v3/kv/range", ["key": Data(key).base64EncodedString()])
        guard let kvs = reply["kvs"] as? [[String: Any]], let first = kvs.first else { return ReadResult(values: []) }
        guard let v = first["value"] as? String, let data = Data(base64Encoded: v) else {
            // etcd omits an empty value.
            return ReadResult(values: [[]])
        }
        return ReadResult(values: [Array(data)])
    }

    func write(_ key: [UInt8], _ value: [UInt8]) async throws(TargetError) {
        _ = try await post("/v3/kv/put", ["key": Data(key).base64EncodedString(), "value": Data(value).base64EncodedString()])
    }

    func delete(_ key: [UInt8]) async throws(TargetError) {
        _ = try await post("/v3/kv/deleterange", ["key": Data(key).base64EncodedString()])
    }

    func close() async { try? await channel.close() }
}
