public import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif
public import CairnCore

/// Why a request over a `Connection` got no reply. The cases separate "certainly not delivered"
/// from "outcome unknown", which the coordinator and the client must report truthfully.
public enum ConnectionError: Error, Sendable, Hashable, CustomStringConvertible {
    /// Could not connect: nothing was sent.
    case connectFailed(String)
    /// The request was not written to the socket: it was certainly not delivered.
    case notSent(String)
    /// The connection closed after the request was written: it may have been delivered.
    case lost(String)
    /// No reply before the deadline: it may have been delivered.
    case timedOut(afterMillis: UInt32)
    /// Too many requests already waiting on this connection (`maxPending`): not sent.
    case tooManyPending(Int)
    /// The peer answered with bytes we could not decode.
    case protocolViolation(String)
    /// The caller stopped waiting (its task was cancelled) after the request was handed to the
    /// connection: it may have been delivered. Its pending slot is released at once.
    case abandoned

    /// True when the request certainly did not reach the peer.
    public var certainlyNotDelivered: Bool {
        switch self {
        case .connectFailed, .notSent, .tooManyPending: true
        case .lost, .timedOut, .protocolViolation, .abandoned: false
        }
    }

    public var description: String {
        switch self {
        case .connectFailed(let s): "connect failed: \(s)"
        case .notSent(let s): "not sent: \(s)"
        case .lost(let s): "connection lost: \(s)"
        case .timedOut(let ms): "timed out after \(ms) ms"
        case .tooManyPending(let n): "\(n) requests already pending on the connection"
        case .protocolViolation(let s): "protocol violation: \(s)"
        case .abandoned: "abandoned by the caller before a reply"
        }
    }
}

/// Where a request's reply goes: a promise (an awaiting caller), or a callback run on the event
/// loop (`requestSoon`: no promise, no future, no extra closure per request).
enum ReplySink: Sendable {
    case promise(EventLoopPromise<Message>)
    case callback(@Sendable (Result<Message, ConnectionError>) -> Void)

    func succeed(_ reply: Message) {
        switch self {
        case .promise(let p): p.succeed(reply)
        case .callback(let done): done(.success(reply))
        }
    }

    func fail(_ error: ConnectionError) {
        switch self {
        case .promise(let p): p.fail(error)
        case .callback(let done): done(.failure(error))
        }
    }

    /// The waiting caller a cancellation names (`AbandonRequest`); callbacks are never abandoned.
    var future: ObjectIdentifier? {
        if case .promise(let p) = self { return ObjectIdentifier(p.futureResult) }
        return nil
    }
}

/// A request on its way into the multiplexer; without a reply sink, a one-way message
/// (request id 0: the receiver never answers it).
struct OutboundRequest: Sendable {
    let message: Message
    let timeoutMillis: UInt32
    let reply: ReplySink?
}

/// An outbound user event: the caller waiting on the request whose reply future this names has
/// been cancelled; fail it with `.abandoned` and free its slot.
struct AbandonRequest: Sendable {
    let future: ObjectIdentifier
}

/// The reply deadlines of one connection's waiting requests, earliest first, so one timer serves
/// them all: a request answered in time costs no timer of its own. Entries of requests no longer
/// waiting are dropped lazily (when they reach the front, or in a rebuild once they outnumber
/// the live ones: at most `2 × live + 1024` entries). Pure; owned by `RequestMultiplexer` on its
/// event loop.
struct DeadlineQueue {
    struct Entry: Equatable {
        let id: UInt64
        let deadline: NIODeadline
    }
    private var entries: [Entry] = []
    private var head = 0

    /// Entries held, live or not (for tests and the bound).
    var count: Int { entries.count - head }

    /// The earliest deadline held (possibly of a request no longer waiting).
    var earliest: NIODeadline? { head < entries.count ? entries[head].deadline : nil }

    /// Adds a request's deadline (in order: appended when no earlier than the last, the common
    /// case of equal timeouts; else inserted where it belongs).
    mutating func add(_ id: UInt64, _ deadline: NIODeadline) {
        let e = Entry(id: id, deadline: deadline)
        guard let last = entries.last, head < entries.count, deadline < last.deadline else { return entries.append(e) }
        var lo = head, hi = entries.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if entries[mid].deadline <= deadline { lo = mid + 1 } else { hi = mid }
        }
        entries.insert(e, at: lo)
    }

    /// Drops entries of requests no longer waiting from the front, and rebuilds from the live
    /// ones when dead entries dominate.
    mutating func trim(live: Int, isLive: (UInt64) -> Bool) {
        while head < entries.count, !isLive(entries[head].id) { head += 1 }
        if head == entries.count {
            entries.removeAll(keepingCapacity: true)
            head = 0
        } else if count > 2 * live + 1024 {
            entries = entries[head...].filter { isLive($0.id) }
            head = 0
        } else if head > 1024, head > entries.count / 2 {
            entries.removeFirst(head)
            head = 0
        }
    }

    /// Removes and returns the ids of live requests whose deadline is at or before `now`, in
    /// deadline order (dropping dead entries on the way).
    mutating func expire(at now: NIODeadline, isLive: (UInt64) -> Bool) -> [UInt64] {
        var due: [UInt64] = []
        while head < entries.count, entries[head].deadline <= now || !isLive(entries[head].id) {
            if isLive(entries[head].id) { due.append(entries[head].id) }
            head += 1
        }
        return due
    }
}

/// Assigns request ids, writes frames, and matches replies to waiting requests by id; fails each
/// waiting request exactly once on timeout or connection loss. One timer per connection, armed
/// for the earliest deadline (`DeadlineQueue`). One-way messages go out with
/// request id 0 (never assigned to a request); frames that arrive with id 0 are one-way messages
/// from the peer (stream acknowledgements) and go to `oneWay`.
///
/// Isolation: a channel handler; all state is touched on the channel's event loop only.
/// Bound: at most `maxPending` requests wait at once (`transport.max_pending_per_connection`).
final class RequestMultiplexer: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = OutboundRequest
    typealias OutboundOut = ByteBuffer

    private struct Waiting {
        let reply: ReplySink
        let timeoutMillis: UInt32
    }

    private var waiting: [UInt64: Waiting] = [:]
    private var deadlines = DeadlineQueue()
    /// The timer and the deadline it is armed for (nil: none armed).
    private var armed: (timer: Scheduled<Void>, at: NIODeadline)?
    private var nextID: UInt64 = 1
    private let maxPending: Int
    private let limits: Limits
    private var closed = false
    private let oneWay: (@Sendable (Message) -> Void)?

    init(maxPending: Int, limits: Limits, oneWay: (@Sendable (Message) -> Void)? = nil) {
        self.maxPending = maxPending
        self.limits = limits
        self.oneWay = oneWay
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let outbound = unwrapOutboundIn(data)
        if closed {
            outbound.reply?.fail(ConnectionError.notSent("connection closed"))
            promise?.fail(ConnectionError.notSent("connection closed"))
            return
        }
        guard let reply = outbound.reply else {
            let bytes = WireCodec.encodeFrame(Envelope(requestID: 0, message: outbound.message))
            guard bytes.count - WireCodec.lengthBytes <= limits.maxFrameBytes else {
                promise?.fail(ConnectionError.notSent("message of \(bytes.count) bytes exceeds limits.max_frame_bytes \(limits.maxFrameBytes)"))
                return
            }
            context.write(wrapOutboundOut(context.channel.allocator.buffer(bytes)), promise: promise)
            return
        }
        let request = outbound
        if waiting.count >= maxPending {
            reply.fail(ConnectionError.tooManyPending(waiting.count))
            promise?.fail(ConnectionError.tooManyPending(waiting.count))
            return
        }
        let id = nextID
        nextID &+= 1  // 2^64 requests per connection will not happen; id 0 is one-way, so skip it.
        if nextID == 0 { nextID = 1 }
        let ms = request.timeoutMillis
        waiting[id] = Waiting(reply: reply, timeoutMillis: ms)
        deadlines.add(id, context.eventLoop.now + .milliseconds(Int64(ms)))
        arm(context.eventLoop)
        let written = context.eventLoop.makePromise(of: Void.self)
        written.futureResult.assumeIsolated().whenComplete { result in
            if case .failure(let error) = result, let w = self.waiting.removeValue(forKey: id) {
                w.reply.fail((error as? ConnectionError) ?? ConnectionError.notSent("\(error)"))
            }
            promise?.completeWith(result)
        }
        let bytes = WireCodec.encodeFrame(Envelope(requestID: id, message: request.message))
        if bytes.count - WireCodec.lengthBytes > limits.maxFrameBytes {
            // The peer would refuse it and close the connection, failing every other request on it.
            written.fail(ConnectionError.notSent("request of \(bytes.count) bytes exceeds limits.max_frame_bytes \(limits.maxFrameBytes)"))
            return
        }
        context.write(wrapOutboundOut(context.channel.allocator.buffer(bytes)), promise: written)
    }

    func triggerUserOutboundEvent(context: ChannelHandlerContext, event: Any, promise: EventLoopPromise<Void>?) {
        guard let abandon = event as? AbandonRequest else {
            return context.triggerUserOutboundEvent(event, promise: promise)
        }
        // Rare (only cancelled callers), so a scan of at most `maxPending` entries is fine.
        if let (id, w) = waiting.first(where: { $0.value.reply.future == abandon.future }) {
            waiting.removeValue(forKey: id)
            w.reply.fail(ConnectionError.abandoned)
        }
        promise?.succeed()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var body = unwrapInboundIn(data)
        let bytes = body.readBytes(length: body.readableBytes) ?? []
        do {
            let envelope = try WireCodec.decodeBody(bytes, limits: limits)
            if envelope.requestID == 0 {
                // One-way from the peer (stream signals), or an error about the whole connection.
                oneWay?(envelope.message)
                return
            }
            if let w = waiting.removeValue(forKey: envelope.requestID) {
                deadlines.trim(live: waiting.count) { waiting[$0] != nil }
                w.reply.succeed(envelope.message)
            }
            // A reply for an id no longer waiting arrived after its timeout: dropped.
        } catch {
            if let id = error.requestID, let w = waiting.removeValue(forKey: id) {
                w.reply.fail(ConnectionError.protocolViolation(error.description))
            } else {
                context.close(promise: nil)
            }
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed = true
        let all = waiting
        waiting = [:]
        armed?.timer.cancel()
        armed = nil
        deadlines = DeadlineQueue()
        for w in all.values {
            w.reply.fail(ConnectionError.lost("connection closed"))
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    /// Arms the timer for the earliest deadline held, unless it is armed for that one or an
    /// earlier one (then it fires early, finds nothing due, and re-arms).
    private func arm(_ loop: any EventLoop) {
        guard let next = deadlines.earliest else { return }
        if let armed {
            guard next < armed.at else { return }
            armed.timer.cancel()
        }
        let timer = loop.assumeIsolated().scheduleTask(deadline: next) { self.deadlinePassed(loop) }
        armed = (timer, next)
    }

    /// Fails every waiting request whose deadline passed, then re-arms.
    private func deadlinePassed(_ loop: any EventLoop) {
        armed = nil
        for id in deadlines.expire(at: loop.now, isLive: { waiting[$0] != nil }) {
            if let w = waiting.removeValue(forKey: id) { w.reply.fail(ConnectionError.timedOut(afterMillis: w.timeoutMillis)) }
        }
        if !closed { arm(loop) }
    }
}

/// One multiplexed TCP connection to a node: many requests in flight, replies matched by id.
///
/// Thread-safe. A `Connection` never reconnects; callers (the client pool, the node's peer links)
/// replace it when `isActive` turns false.
public final class Connection: Sendable {
    public let channel: any Channel
    /// "host:port" of the remote end, for messages.
    public let remote: String
    /// Requests handed over within one event-loop tick share one flush.
    private let outbound: OutboundBatch<OutboundRequest>

    init(channel: any Channel, remote: String) {
        self.channel = channel
        self.remote = remote
        outbound = OutboundBatch(channel: channel) { channel, request in
            // On the event loop. An active channel's pipeline hands the write to the multiplexer,
            // which answers the request whatever happens to it; a closed one would drop it.
            guard channel.isActive else {
                request.reply?.fail(.notSent("connection closed"))
                return
            }
            channel.write(request, promise: nil)
        }
    }

    /// - Parameter oneWay: receives the one-way messages (request id 0) the peer sends, on the
    ///   connection's event loop; must not block.
    public static func connect(host: String, port: Int, group: any EventLoopGroup, limits: Limits,
                               maxPending: Int = 4096, connectTimeout: TimeAmount = .seconds(2),
                               oneWay: (@Sendable (Message) -> Void)? = nil) async throws(ConnectionError) -> Connection {
        let bootstrap = ClientBootstrap(group: group)
            .connectTimeout(connectTimeout)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(FrameDecoder.handler(limits: limits))
                    try channel.pipeline.syncOperations.addHandler(RequestMultiplexer(maxPending: maxPending, limits: limits, oneWay: oneWay))
                }
            }
        do {
            let channel = try await bootstrap.connect(host: host, port: port).get()
            return Connection(channel: channel, remote: "\(host):\(port)")
        } catch {
            throw .connectFailed("\(host):\(port): \(Self.describe(error))")
        }
    }

    public var isActive: Bool { channel.isActive }

    /// Sends `message` and waits for its reply, at most `timeoutMillis`. Cancelling the calling
    /// task ends the wait at once (`.abandoned`, or `.notSent` if it was cancelled before the
    /// request was handed over) and frees the request's pending slot.
    public func request(_ message: Message, timeoutMillis: UInt32) async throws(ConnectionError) -> Message {
        if Task.isCancelled { throw .notSent("the caller was cancelled before sending") }
        let promise = channel.eventLoop.makePromise(of: Message.self)
        let request = OutboundRequest(message: message, timeoutMillis: max(timeoutMillis, 1), reply: .promise(promise))
        outbound.send(request)
        // The abandon event is enqueued after the batch that writes the request (scheduled by
        // this request, or by an earlier one and not yet run), so the multiplexer sees them in order.
        let (channel, future) = (channel, ObjectIdentifier(promise.futureResult))
        do {
            return try await withTaskCancellationHandler {
                try await promise.futureResult.get()
            } onCancel: {
                channel.triggerUserOutboundEvent(AbandonRequest(future: future), promise: nil)
            }
        } catch let e as ConnectionError {
            throw e
        } catch {
            throw .lost(Self.describe(error))
        }
    }

    /// `request` for a caller that must not suspend: `done` is called exactly once, on the
    /// connection's event loop, with the reply or the failure (timeout, connection loss, a
    /// request the multiplexer refused). Nothing cancels it; the timeout bounds it.
    public func requestSoon(_ message: Message, timeoutMillis: UInt32,
                            _ done: @escaping @Sendable (Result<Message, ConnectionError>) -> Void) {
        outbound.send(OutboundRequest(message: message, timeoutMillis: max(timeoutMillis, 1), reply: .callback(done)))
    }

    /// Sends `message` one-way (request id 0): the peer never answers it. The future fails if it
    /// could not be written (connection closed, frame over `limits.max_frame_bytes`): certainly
    /// not delivered; success means written to the socket, not received.
    @discardableResult
    public func cast(_ message: Message) -> EventLoopFuture<Void> {
        let written = channel.eventLoop.makePromise(of: Void.self)
        channel.writeAndFlush(OutboundRequest(message: message, timeoutMillis: 0, reply: nil), promise: written)
        return written.futureResult
    }

    public func close() {
        channel.close(promise: nil)
    }

    public static func describe(_ error: any Error) -> String {
        if let e = error as? IOError { return String(cString: strerror(e.errnoCode)).lowercased() }
        if let e = error as? ChannelError {
            switch e {
            case .connectTimeout(let t): return "connect timed out after \(t.nanoseconds / 1_000_000) ms"
            case .ioOnClosedChannel, .alreadyClosed: return "connection closed"
            default: return "\(e)"
            }
        }
        if let e = error as? NIOConnectionError {
            if let first = e.connectionErrors.first { return describe(first.error) }
            return "could not resolve \(e.host)"
        }
        return "\(error)"
    }
}
