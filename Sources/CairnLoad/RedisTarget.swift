public import NIOCore
import NIOPosix
import DequeModule

/// Redis over RESP2 on a raw NIO connection per worker: `GET`, `SET` (and `DEL`).
public final class RedisTarget: LoadTarget {
    let endpoints: Endpoints

    public init(endpoints: [String], group: (any EventLoopGroup)? = nil) throws(TargetError) {
        self.endpoints = try Endpoints(scheme: "redis", endpoints, group: group)
    }

    public var description: String { endpoints.description }

    public func session(index: Int) async throws(TargetError) -> any TargetSession {
        let (host, port) = endpoints.pick(index)
        return try await RESPConnection.connect(host: host, port: port, group: endpoints.group)
    }

    public func close() async {}
}

/// A RESP2 reply.
public enum RESPValue: Equatable, Sendable {
    case simple(String)
    case error(String)
    case integer(Int64)
    case bulk([UInt8]?)
    case array([RESPValue]?)
}

/// RESP2 encoding and incremental decoding (pure).
public enum RESP {
    public static func command(_ parts: [[UInt8]]) -> [UInt8] {
        var out = Array("*\(parts.count)\r\n".utf8)
        for p in parts {
            out += Array("$\(p.count)\r\n".utf8)
            out += p
            out += [13, 10]
        }
        return out
    }

    /// `command(parts)` written straight into `buf` (no intermediate arrays or strings).
    public static func write(_ parts: [[UInt8]], into buf: inout ByteBuffer) {
        buf.writeInteger(UInt8(ascii: "*"))
        writeDecimal(parts.count, into: &buf)
        for p in parts {
            buf.writeInteger(UInt8(ascii: "$"))
            writeDecimal(p.count, into: &buf)
            buf.writeBytes(p)
            buf.writeInteger(UInt16(0x0D0A))
        }
    }

    static func writeDecimal(_ n: Int, into buf: inout ByteBuffer) {
        var digits: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
                     UInt8, UInt8, UInt8, UInt8) = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        var x = max(n, 0)
        var count = 0
        withUnsafeMutableBytes(of: &digits) { d in
            repeat {
                d[19 - count] = UInt8(ascii: "0") + UInt8(x % 10)
                x /= 10
                count += 1
            } while x > 0 && count < 20
            buf.writeBytes(UnsafeRawBufferPointer(rebasing: d[(20 - count)...]))
        }
        buf.writeInteger(UInt16(0x0D0A))
    }

    public struct DecodeError: Error, Sendable { public let reason: String }

    /// Decodes one value from `bytes` starting at `offset`; nil if more bytes are needed.
    /// Bulk lengths are limited to 512 MiB (Redis's own limit).
    public static func decode(_ bytes: UnsafeRawBufferPointer, _ offset: inout Int) throws(DecodeError) -> RESPValue? {
        let start = offset
        guard offset < bytes.count else { return nil }
        let type = bytes[offset]
        offset += 1
        switch type {
        case UInt8(ascii: "+"), UInt8(ascii: "-"):
            guard let line = readLine(bytes, &offset) else { offset = start; return nil }
            return type == UInt8(ascii: "+") ? .simple(line) : .error(line)
        case UInt8(ascii: ":"):
            guard let n = try readInteger(bytes, &offset) else { offset = start; return nil }
            return .integer(n)
        case UInt8(ascii: "$"):
            guard let n = try readInteger(bytes, &offset) else { offset = start; return nil }
            guard n >= -1, n <= 512 << 20 else { throw DecodeError(reason: "bad bulk length \(n)") }
            if n == -1 { return .bulk(nil) }
            let len = Int(n)
            guard bytes.count - offset >= len + 2 else { offset = start; return nil }
            let data = [UInt8](UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + len]))
            offset += len + 2
            return .bulk(data)
        case UInt8(ascii: "*"):
            guard let n = try readInteger(bytes, &offset) else { offset = start; return nil }
            guard n >= -1, n <= 1 << 20 else { throw DecodeError(reason: "bad array length \(n)") }
            if n == -1 { return .array(nil) }
            var items: [RESPValue] = []
            for _ in 0..<n {
                guard let v = try decode(bytes, &offset) else { offset = start; return nil }
                items.append(v)
            }
            return .array(items)
        default:
            throw DecodeError(reason: "unknown RESP type byte \(type)")
        }
    }

    /// A signed decimal terminated by CRLF; nil if incomplete. At most 19 digits.
    static func readInteger(_ bytes: UnsafeRawBufferPointer, _ offset: inout Int) throws(DecodeError) -> Int64? {
        var i = offset
        var negative = false
        if i < bytes.count && bytes[i] == UInt8(ascii: "-") {
            negative = true
            i += 1
        }
        var value: Int64 = 0
        var digits = 0
        while i < bytes.count {
            let c = bytes[i]
            if c == 13 {
                guard i + 1 < bytes.count else { return nil }
                guard bytes[i + 1] == 10, digits > 0 else { throw DecodeError(reason: "bad integer line") }
                offset = i + 2
                return negative ? -value : value
            }
            guard c >= 48 && c <= 57, digits < 18 else { throw DecodeError(reason: "bad integer line") }
            value = value * 10 + Int64(c - 48)
            digits += 1
            i += 1
        }
        return nil
    }

    static func readLine(_ bytes: UnsafeRawBufferPointer, _ offset: inout Int) -> String? {
        var i = offset
        while i + 1 < bytes.count {
            if bytes[i] == 13 && bytes[i + 1] == 10 {
                let s = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[offset..<i]), as: UTF8.self)
                offset = i + 2
                return s
            }
            i += 1
        }
        return nil
    }
}

/// Matches replies to requests in order (RESP has no ids; replies come back in request order).
final class RESPHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = (ByteBuffer, EventLoopPromise<RESPValue>)
    typealias OutboundOut = ByteBuffer

    /// Who gets the next reply: a promise (async callers) or a callback (the driven loop).
    enum Waiter {
        case promise(EventLoopPromise<RESPValue>)
        case callback((Result<RESPValue, TargetError>) -> Void)

        func complete(_ r: Result<RESPValue, TargetError>) {
            switch self {
            case .promise(let p): p.completeWith(r.mapError { $0 as any Error })
            case .callback(let f): f(r)
            }
        }
    }

    private var waiting = Deque<Waiter>()
    private var buffer: ByteBuffer?
    private var context: ChannelHandlerContext?

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let (bytes, reply) = unwrapOutboundIn(data)
        waiting.append(.promise(reply))
        context.write(wrapOutboundOut(bytes), promise: promise)
    }

    /// Sends from this handler's position (no trip through the pipeline, no boxing) and hands the
    /// reply to `reply`. Must be called on the channel's event loop.
    func sendDirect(_ bytes: ByteBuffer, reply: @escaping (Result<RESPValue, TargetError>) -> Void) {
        guard let context, context.channel.isActive else {
            return reply(.failure(TargetError("connection", "redis connection closed")))
        }
        waiting.append(.callback(reply))
        context.writeAndFlush(wrapOutboundOut(bytes), promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if buffer == nil { buffer = incoming } else { buffer?.writeBuffer(&incoming) }
        guard var buf = buffer else { return }
        do {
            while buf.readableBytes > 0 {
                var consumed = 0
                let value = try buf.withUnsafeReadableBytes { raw throws(RESP.DecodeError) -> RESPValue? in
                    try RESP.decode(raw, &consumed)
                }
                guard let value else { break }
                buf.moveReaderIndex(forwardBy: consumed)
                waiting.popFirst()?.complete(.success(value))
            }
            buffer = buf.readableBytes > 0 ? buf : nil
        } catch {
            failAll(TargetError("server", "undecodable RESP reply: \(error.reason)"))
            context.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        failAll(TargetError("connection", "redis connection closed"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        failAll(TargetError("connection", "\(error)"))
        context.close(promise: nil)
    }

    private func failAll(_ e: TargetError) {
        while let w = waiting.popFirst() { w.complete(.failure(e)) }
    }
}

final class RESPConnection: EventLoopDrivenSession {
    let handler: NIOLoopBound<RESPHandler>

    /// Issues the driver's requests one after another from the reply callback, on the event loop.
    func runClosedLoop(_ driver: ClosedLoopDriver) async {
        let loop = channel.eventLoop
        let done = loop.makePromise(of: Void.self)
        let handler = self.handler
        loop.execute {
            // One loop per worker, one request in flight: the plan in flight lives here, and one
            // callback serves every reply.
            var current: ClosedLoopDriver.Plan?
            var onReply: ((Result<RESPValue, TargetError>) -> Void)?
            func issue() {
                guard let plan = driver.next() else {
                    onReply = nil
                    return done.succeed()
                }
                current = plan
                if let onReply { handler.value.sendDirect(self.encode(plan), reply: onReply) }
            }
            onReply = { result in
                guard let plan = current else { return }
                let (values, error) = Self.outcome(of: plan, result)
                driver.finish(plan, values: values, error: error)
                if error != nil, !self.channel.isActive {
                    onReply = nil
                    return done.succeed()
                }
                issue()
            }
            issue()
        }
        try? await done.futureResult.get()
    }

    /// Sends one plan from the connection's event loop; `finish` runs there with the outcome.
    func start(_ plan: ClosedLoopDriver.Plan, then finish: @escaping @Sendable ([[UInt8]]?, TargetError?) -> Void) {
        let handler = self.handler
        channel.eventLoop.execute {
            handler.value.sendDirect(self.encode(plan)) { result in
                let (values, error) = Self.outcome(of: plan, result)
                finish(values, error)
            }
        }
    }

    private func encode(_ plan: ClosedLoopDriver.Plan) -> ByteBuffer {
        var buf = channel.allocator.buffer(capacity: plan.key.count + (plan.value?.count ?? 0) + 48)
        if let v = plan.value {
            RESP.write([Self.set, plan.key, v], into: &buf)
        } else {
            RESP.write([Self.get, plan.key], into: &buf)
        }
        return buf
    }

    /// The values a GET returned (nil for a SET), or why the request failed.
    private static func outcome(of plan: ClosedLoopDriver.Plan, _ result: Result<RESPValue, TargetError>) -> ([[UInt8]]?, TargetError?) {
        switch result {
        case .success(.bulk(let v)) where plan.value == nil: (v.map { [$0] } ?? [], nil)
        case .success(.simple("OK")) where plan.value != nil: (nil, nil)
        case .success(.error(let e)): (nil, TargetError("server", e))
        case .success(let other): (nil, TargetError("server", "unexpected reply \(other)"))
        case .failure(let e): (nil, e)
        }
    }

    static let get = Array("GET".utf8)
    static let set = Array("SET".utf8)

    let channel: any Channel

    init(channel: any Channel, handler: NIOLoopBound<RESPHandler>) {
        self.channel = channel
        self.handler = handler
    }

    static func connect(host: String, port: Int, group: any EventLoopGroup) async throws(TargetError) -> RESPConnection {
        do {
            let ch = try await ClientBootstrap(group: group)
                .channelOption(.tcpOption(.tcp_nodelay), value: 1)
                .channelInitializer { c in c.eventLoop.makeCompletedFuture { try c.pipeline.syncOperations.addHandler(RESPHandler()) } }
                .connect(host: host, port: port).get()
            let handler = try await ch.eventLoop.submit {
                NIOLoopBound(try ch.pipeline.syncOperations.handler(type: RESPHandler.self), eventLoop: ch.eventLoop)
            }.get()
            return RESPConnection(channel: ch, handler: handler)
        } catch {
            throw TargetError("connection", "redis \(host):\(port): \(error)")
        }
    }

    func send(_ parts: [[UInt8]]) async throws(TargetError) -> RESPValue {
        var buf = channel.allocator.buffer(capacity: parts.reduce(16) { $0 + $1.count + 16 })
        RESP.write(parts, into: &buf)
        let promise = channel.eventLoop.makePromise(of: RESPValue.self)
        channel.writeAndFlush((buf, promise)).whenFailure { promise.fail(TargetError("connection", "\($0)")) }
        do {
            return try await promise.futureResult.get()
        } catch let e as TargetError {
            throw e
        } catch {
            throw TargetError("connection", "\(error)")
        }
    }

    func read(_ key: [UInt8]) async throws(TargetError) -> ReadResult {
        switch try await send([Array("GET".utf8), key]) {
        case .bulk(let v?): return ReadResult(values: [v])
        case .bulk(nil): return ReadResult(values: [])
        case .error(let e): throw TargetError("server", e)
        case let other: throw TargetError("server", "unexpected GET reply \(other)")
        }
    }

    func write(_ key: [UInt8], _ value: [UInt8]) async throws(TargetError) {
        switch try await send([Array("SET".utf8), key, value]) {
        case .simple("OK"): return
        case .error(let e): throw TargetError("server", e)
        case let other: throw TargetError("server", "unexpected SET reply \(other)")
        }
    }

    func delete(_ key: [UInt8]) async throws(TargetError) {
        switch try await send([Array("DEL".utf8), key]) {
        case .integer: return
        case .error(let e): throw TargetError("server", e)
        case let other: throw TargetError("server", "unexpected DEL reply \(other)")
        }
    }

    func close() async { try? await channel.close() }
}
