public import CairnCore
import NIOCore

// Streams: ordered chunks from one node to another on a data channel of their own, with flow
// control. Shared by the socket transport (a data connection per peer) and the in-memory network.
// Byte grammar: Docs/wire-protocol.md §9.
//
// The contract, for both transports:
// - A stream is opened by its sender (`Transport.openStream`), which the receiver accepts or
//   refuses through the handler registered for the stream's `kind`.
// - Chunks reach the receiver's `StreamSink` in the order `send` was called, each exactly once.
// - A chunk is acknowledged when the sink's `receive` returned for it; acknowledgements are
//   cumulative (`OutboundStream.acknowledgedChunks`). A resumable transfer (handoff) restarts
//   after the last item of the last acknowledged chunk.
// - Flow control: at most `StreamSettings.windowBytes` of chunks are unacknowledged at once (one
//   chunk of any size up to `maxChunkBytes` may always be in flight alone); `send` waits for room.
// - `finish()` returns once the sink's `finish()` returned: the whole stream was consumed.
// - A stream ends exactly once on each side: finished, cancelled by the sender, aborted by the
//   receiver (its sink threw, or it overran the receiver's window), or lost with its link.

/// What a stream carries; the receiver picks its handler by it. Unknown kinds are refused.
public struct StreamKind: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// One partition's keys, for handoff (issue 12).
    public static let handoff = StreamKind(rawValue: 1)
    /// A partition range's keys or hashes, for anti-entropy (issue 14).
    public static let antiEntropy = StreamKind(rawValue: 2)
    public var description: String {
        switch self {
        case .handoff: "handoff"
        case .antiEntropy: "anti-entropy"
        default: "kind \(rawValue)"
        }
    }
}

/// Limits of streams (config keys `transport.stream_window_bytes`,
/// `transport.max_streams_per_peer`, `limits.max_frame_bytes`).
public struct StreamSettings: Sendable, Hashable {
    /// Unacknowledged chunk bytes a sender may have in flight on one stream.
    public var windowBytes: Int = 4 << 20
    /// Streams open at once to one peer (sender side) and from one peer (receiver side).
    public var maxStreamsPerPeer: Int = 4
    /// `limits.max_frame_bytes`: a chunk's frame must fit in it.
    public var maxFrameBytes: Int = Limits().maxFrameBytes
    /// A stream-open header's limit on the wire.
    public static let maxHeaderBytes = 1 << 16
    /// Frame bytes around a chunk's data: header 10, stream id 8, blob length ≤ 10.
    static let chunkOverhead = 28

    public init() {}

    /// The largest chunk `send` accepts: its `stream-chunk` frame body fits in `maxFrameBytes`.
    public var maxChunkBytes: Int { max(1, maxFrameBytes - Self.chunkOverhead) }
    /// Bytes a receiver queues for one stream before it aborts it: what a sender honouring the
    /// same window can have in flight.
    public var receiverQueueLimit: Int { max(windowBytes, maxChunkBytes) }
}

/// Why a stream failed. `acknowledgedChunks` of the stream says how far the receiver got.
public enum StreamError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The open did not get through (connect, handshake, timeout); see its delivery certainty.
    case connection(ConnectionError)
    /// The receiver refused the open: no handler for the kind, its per-peer limit, not serving.
    case refused(ErrorReply)
    /// This node already has `transport.max_streams_per_peer` streams open to the peer; nothing sent.
    case tooManyStreams(limit: Int)
    /// A chunk over `StreamSettings.maxChunkBytes`; nothing sent, the stream stays usable.
    case chunkTooLarge(bytes: Int, limit: Int)
    /// The receiver ended the stream (its handler failed, or the sender overran its window).
    case aborted(String)
    /// The link failed (connection closed, node gone): chunks past `acknowledgedChunks` may or
    /// may not have been consumed.
    case lost(String)
    /// This side cancelled the stream (`cancel`, or the sending task was cancelled).
    case cancelled(String)
    /// `send` after `finish`.
    case alreadyFinished

    public var description: String {
        switch self {
        case .connection(let e): "stream not opened: \(e)"
        case .refused(let e): "stream refused: \(e.message)"
        case .tooManyStreams(let n): "\(n) streams already open to the peer (transport.max_streams_per_peer)"
        case .chunkTooLarge(let n, let limit): "chunk of \(n) bytes exceeds \(limit) (limits.max_frame_bytes)"
        case .aborted(let s): "stream aborted by the receiver: \(s)"
        case .lost(let s): "stream lost: \(s)"
        case .cancelled(let s): "stream cancelled: \(s)"
        case .alreadyFinished: "stream already finished"
        }
    }
}

/// The sending end of a stream. Thread-safe, but `send` and `finish` are for one caller at a
/// time: chunks go out in the order their `send` calls reserved window room.
public protocol OutboundStream: AnyObject, Sendable {
    /// Chunks the receiver's handler has consumed (its `receive` returned), in order.
    var acknowledgedChunks: UInt64 { get }
    /// Sends one chunk (at most `StreamSettings.maxChunkBytes`), waiting while the window is
    /// full. Returning means the chunk was handed to the link, not that it was consumed.
    /// Cancelling the waiting task cancels the stream.
    func send(_ chunk: [UInt8]) async throws(StreamError)
    /// Ends the stream and waits until the receiver consumed every chunk and its end.
    /// Cancelling the waiting task cancels the stream.
    func finish() async throws(StreamError)
    /// Ends the stream early; the receiver's sink gets `cancelled(reason)`. No-op once ended.
    func cancel(_ reason: String)
    /// Returns once the receiver consumed at least `count` chunks; throws the stream's failure
    /// if it ends before (a stream that finished normally has consumed every chunk it sent).
    /// Cancelling the waiting task ends the wait (throws `cancelled`), not the stream.
    func waitAcknowledged(atLeast count: UInt64) async throws(StreamError)
}

/// The receiving end of a stream, given by the handler that accepted it. Methods are called one
/// at a time, in order, never concurrently: `receive` per chunk, then exactly one of `finish`
/// (the sender finished and every chunk was received) or `cancelled` (the sender cancelled, the
/// link failed, or the sender overran the window). After `receive` or `finish` throws, nothing
/// more is called and the sender sees `aborted` with the error's description. A link failure is
/// reported after the call in progress returns.
public protocol StreamSink: Sendable {
    /// Consumes one chunk; returning acknowledges it (backpressure: the next chunk waits).
    func receive(_ chunk: [UInt8]) async throws
    /// The stream is complete; returning lets the sender's `finish()` return.
    func finish() async throws
    func cancelled(_ reason: String) async
}

/// A stream being opened to this node.
public struct InboundStreamRequest: Sendable {
    public var from: NodeName
    public var kind: StreamKind
    public var header: [UInt8]
    /// The remote end of the connection it came on ("host:port"); nil in memory.
    public var remote: String?
    public init(from: NodeName, kind: StreamKind, header: [UInt8], remote: String?) {
        self.from = from
        self.kind = kind
        self.header = header
        self.remote = remote
    }
}

/// A node's handler for one stream kind: a sink for the stream, or the error the sender gets.
/// Called on an event loop (sockets) or a network task: must not block.
public typealias StreamAcceptor = @Sendable (InboundStreamRequest) -> Result<any StreamSink, ErrorReply>

/// The sender's side of one stream, whatever carries it: the window, acknowledgements, and the
/// stream's single ending. The transport supplies `transmit` (puts chunk, end and cancel on the
/// link, in call order) and reports what comes back (`acknowledged`, `aborted`, `failed`).
///
/// Isolation: a class whose state sits behind a lock; waiters are continuations resumed on every
/// change. `onTerminal` runs exactly once, when the stream ended (any way).
public final class StreamOutbox: OutboundStream {
    public enum Outgoing: Sendable {
        case chunk([UInt8])
        case end(chunkCount: UInt64)
        case cancel(String)
    }

    private struct State {
        var sizes = CircularBuffer<Int>()
        var unackedBytes = 0
        var sent: UInt64 = 0
        var acked: UInt64 = 0
        var finishing = false
        var done = false
        var failure: StreamError?
        var nextWaiter: UInt64 = 0
        var waiters: [UInt64: CheckedContinuation<Void, Never>] = [:]
        var ended: Bool { done || failure != nil }
    }

    public let id: UInt64
    public let settings: StreamSettings
    private let state = Locked(State())
    private let transmit: @Sendable (StreamOutbox, Outgoing) -> Void
    private let onWindowWait: @Sendable () -> Void
    private let onTerminal: @Sendable () -> Void

    /// - Parameters:
    ///   - transmit: puts one message on the link; must not block or call back into the outbox
    ///     synchronously (report a failed write later with `failed`).
    ///   - onWindowWait: a `send` found the window full (counted in a metric).
    public init(id: UInt64, settings: StreamSettings, transmit: @escaping @Sendable (StreamOutbox, Outgoing) -> Void,
                onWindowWait: @escaping @Sendable () -> Void = {}, onTerminal: @escaping @Sendable () -> Void = {}) {
        self.id = id
        self.settings = settings
        self.transmit = transmit
        self.onWindowWait = onWindowWait
        self.onTerminal = onTerminal
    }

    public var acknowledgedChunks: UInt64 { state.withLock { $0.acked } }
    /// Chunk bytes sent and not yet acknowledged.
    public var unacknowledgedBytes: Int { state.withLock { $0.unackedBytes } }
    /// True once the stream ended (finished, cancelled, aborted or lost).
    public var isEnded: Bool { state.withLock { $0.ended } }

    public func send(_ chunk: [UInt8]) async throws(StreamError) {
        guard chunk.count <= settings.maxChunkBytes else { throw .chunkTooLarge(bytes: chunk.count, limit: settings.maxChunkBytes) }
        let (window, size) = (settings.windowBytes, chunk.count)
        let fits: @Sendable (State) -> Bool = { s in s.unackedBytes == 0 || s.unackedBytes + size <= window }
        var counted = false
        while true {
            let go: Result<Bool, StreamError> = state.withLock { s in
                if let f = s.failure { return .failure(f) }
                if s.finishing || s.done { return .failure(.alreadyFinished) }
                guard fits(s) else { return .success(false) }
                s.sizes.append(chunk.count)
                s.unackedBytes += chunk.count
                s.sent += 1
                return .success(true)
            }
            switch go {
            case .failure(let e): throw e
            case .success(true):
                transmit(self, .chunk(chunk))
                return
            case .success(false):
                if !counted {
                    counted = true
                    onWindowWait()
                }
                await wait(until: fits)
            }
        }
    }

    public func finish() async throws(StreamError) {
        let end: Result<UInt64?, StreamError> = state.withLock { s in
            if let f = s.failure { return .failure(f) }
            if s.done || s.finishing { return .success(nil) }
            s.finishing = true
            return .success(s.sent)
        }
        if case .success(let n?) = end { transmit(self, .end(chunkCount: n)) }
        if case .failure(let f) = end { throw f }
        await wait { $0.done }
        if let f = state.withLock({ $0.failure }) { throw f }
    }

    public func waitAcknowledged(atLeast count: UInt64) async throws(StreamError) {
        await wait { $0.acked >= count }
        let (acked, failure) = state.withLock { ($0.acked, $0.failure) }
        if acked >= count { return }
        if let failure { throw failure }
        throw .cancelled(Task.isCancelled ? "the waiter was cancelled" : "the stream ended after \(acked) chunks")
    }

    public func cancel(_ reason: String) {
        guard end(.cancelled(reason)) else { return }
        transmit(self, .cancel(reason))
    }

    // MARK: Reports from the transport

    /// The receiver consumed the first `count` chunks (and, when `final`, the end).
    public func acknowledged(_ count: UInt64, final: Bool) {
        let outcome: Bool? = state.withLock { s in
            guard !s.ended else { return nil }
            guard count >= s.acked, count <= s.sent, !final || (s.finishing && count == s.sent) else { return false }
            while s.acked < count, let n = s.sizes.popFirst() {
                s.unackedBytes -= n
                s.acked += 1
            }
            if final { s.done = true }
            return true
        }
        switch outcome {
        case nil: return
        case false?:
            // The receiver's side of the stream is in an unknown state: end it there too, so its
            // sink and its stream slot are released.
            let why = "acknowledgement of \(count) chunks does not match the \(state.withLock { $0.sent }) sent"
            if end(.lost(why)) { transmit(self, .cancel(why)) }
        case true?:
            let (ended, waiters) = state.withLock { s in
                defer { s.waiters = [:] }
                // In registration order, not hash order (a simulation replays its seed).
                return (s.done, s.waiters.sorted { $0.key < $1.key }.map(\.value))
            }
            for w in waiters { w.resume() }
            if ended { onTerminal() }
        }
    }

    /// The receiver aborted the stream.
    public func aborted(_ reason: String) { _ = end(.aborted(reason)) }

    /// The link failed (or the open did not complete).
    public func failed(_ error: StreamError) { _ = end(error) }

    /// Ends the stream with `error` unless it already ended; true if this call ended it.
    private func end(_ error: StreamError) -> Bool {
        let waiters: [CheckedContinuation<Void, Never>]? = state.withLock { s in
            guard !s.ended else { return nil }
            s.failure = error
            defer { s.waiters = [:] }
            return s.waiters.sorted { $0.key < $1.key }.map(\.value)
        }
        guard let waiters else { return false }
        for w in waiters { w.resume() }
        onTerminal()
        return true
    }

    /// Returns once `ready` holds or the stream ended. Cancelling the task cancels the stream.
    private func wait(until ready: @escaping @Sendable (State) -> Bool) async {
        let id = state.withLock { s in
            s.nextWaiter += 1
            return s.nextWaiter
        }
        await withTaskCancellationHandler {
            while true {
                let satisfied = state.withLock { ready($0) || $0.ended }
                if satisfied { return }
                await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                    let now = state.withLock { s in
                        if ready(s) || s.ended { return true }
                        s.waiters[id] = c
                        return false
                    }
                    if now { c.resume() }
                }
            }
        } onCancel: {
            self.cancel("the sending task was cancelled")
        }
    }
}

/// The receiver's side of one stream: feeds a `StreamSink` in order, one call at a time, and
/// reports acknowledgements and aborts back through `signal`. The transport calls `deliver` with
/// what arrives from the sender (in arrival order, never blocking) and `linkFailed` when the link
/// goes.
///
/// Bound: at most `queueLimit` bytes of chunks wait for the sink; a sender that overruns it gets
/// `abort` and the sink `cancelled`. Isolation: a lock around the queue accounting; the sink runs
/// in one task of its own (on `executor` when given). `onTerminal` runs exactly once.
public final class StreamInbox: Sendable {
    public enum Incoming: Sendable {
        case chunk([UInt8])
        case end(chunkCount: UInt64)
        case cancel(String)
    }

    public enum Signal: Sendable, Hashable {
        case ack(UInt64, final: Bool)
        case abort(String)
    }

    private struct State {
        var queued = 0
        /// Set when the stream must stop before the queue is worked off (link failure, overrun).
        var stopReason: String?
        /// The stop is an overrun: the sender is told (`abort`).
        var abortOnStop = false
        /// The sender ended or cancelled the stream: nothing it sends later is queued (so a peer
        /// repeating `end` or `cancel` cannot grow the queue past its byte bound).
        var inputClosed = false
        var ended = false
    }

    private let state = Locked(State())
    private let items: AsyncStream<Incoming>.Continuation
    private let queueLimit: Int

    public init(sink: any StreamSink, queueLimit: Int, executor: (any TaskExecutor)? = nil,
                signal: @escaping @Sendable (Signal) -> Void, onTerminal: @escaping @Sendable () -> Void = {}) {
        self.queueLimit = queueLimit
        let (stream, continuation) = AsyncStream.makeStream(of: Incoming.self)
        items = continuation
        let state = state
        Task(executorPreference: executor) {
            var count: UInt64 = 0
            func stop(_ reason: String?, abort: String?) async {
                if let abort { signal(.abort(abort)) }
                if let reason { await sink.cancelled(reason) }
                state.withLock { $0.ended = true }
                continuation.finish()
                onTerminal()
            }
            for await item in stream {
                if let (reason, abort) = state.withLock({ s in s.stopReason.map { ($0, s.abortOnStop) } }) {
                    return await stop(reason, abort: abort ? reason : nil)
                }
                switch item {
                case .chunk(let bytes):
                    do {
                        try await sink.receive(bytes)
                    } catch {
                        return await stop(nil, abort: "\(error)")
                    }
                    count += 1
                    state.withLock { $0.queued -= bytes.count }
                    signal(.ack(count, final: false))
                case .end(let n):
                    guard n == count else {
                        return await stop("the sender ended after \(n) chunks, \(count) arrived", abort: "chunk count mismatch")
                    }
                    do {
                        try await sink.finish()
                    } catch {
                        return await stop(nil, abort: "\(error)")
                    }
                    signal(.ack(count, final: true))
                    return await stop(nil, abort: nil)
                case .cancel(let reason):
                    return await stop(reason, abort: nil)
                }
            }
        }
    }

    /// What arrived from the sender, in arrival order. Ignored once the stream stopped.
    public func deliver(_ item: Incoming) {
        enum Admission { case drop, overrun, queue }
        let admission: Admission = state.withLock { s in
            guard !s.ended, s.stopReason == nil, !s.inputClosed else { return .drop }
            switch item {
            case .end, .cancel:
                s.inputClosed = true
            case .chunk(let bytes):
                guard s.queued + bytes.count <= queueLimit else {
                    s.stopReason = "the sender overran the window (\(s.queued + bytes.count) bytes queued, limit \(queueLimit))"
                    s.abortOnStop = true
                    return .overrun
                }
                s.queued += bytes.count
            }
            return .queue
        }
        switch admission {
        case .drop: return
        case .overrun: items.yield(.cancel("window overrun"))
        case .queue: items.yield(item)
        }
    }

    /// The link is gone: the sink gets `cancelled(reason)` after its current call; nothing is
    /// signalled.
    public func linkFailed(_ reason: String) {
        let first = state.withLock { s in
            guard !s.ended, s.stopReason == nil else { return false }
            s.stopReason = reason
            return true
        }
        if first { items.yield(.cancel(reason)) }
    }
}
