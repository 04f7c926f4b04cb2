import CairnCore
import CairnWire
import Logging
import NIOCore
import NIOPosix
import Synchronization

/// Runs the jobs of tasks that prefer it on one NIO event loop: a request that arrived on a
/// loop runs there, and so do its coordinator's sends and the replies it writes, without a hop
/// to the cooperative pool and back. Work that blocks goes to the store threads (vnodes' own
/// executors), never here.
final class EventLoopTaskExecutor: TaskExecutor {
    let loop: any EventLoop

    init(_ loop: any EventLoop) { self.loop = loop }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        loop.execute { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}

/// One `EventLoopTaskExecutor` per event loop, made on first use. Thread-safe.
final class LoopExecutors: Sendable {
    private let table = Locked<[ObjectIdentifier: EventLoopTaskExecutor]>([:])

    /// The executor of the event loop running the caller (nil off every NIO loop).
    func current() -> EventLoopTaskExecutor? {
        guard let loop = MultiThreadedEventLoopGroup.currentEventLoop else { return nil }
        let id = ObjectIdentifier(loop as AnyObject)
        return table.withLock { t in
            if let e = t[id] { return e }
            let e = EventLoopTaskExecutor(loop)
            t[id] = e
            return e
        }
    }
}

/// The node's lifecycle as clients see it.
public enum NodeState: String, Sendable {
    /// Not yet serving: binding, recovering, connecting to peers.
    case starting
    case serving
    /// Graceful shutdown: new requests are refused, in-flight ones finish.
    case draining
    case stopped
}

/// The bounded queue between connections and request work, and the group that runs it.
///
/// Bound: at most `limit` requests queued or running (`limits.max_inflight_requests`, gauge
/// `cairn_inflight_requests`); beyond it requests are refused with `overloaded` at once.
/// Supervision: a request runs as a task of this service: queued ones as children of `run()`'s
/// group (on the cooperative pool), those `start(on:)` begins on their connection's event loop as
/// tasks it registers. `run()` returns after `finish()` once the last of either has ended;
/// cancelling it cancels them all.
final class RequestService: Sendable {
    typealias Job = @Sendable () async -> Void
    private let jobs: AsyncStream<Job>
    private let continuation: AsyncStream<Job>.Continuation
    private let inflight = Atomic<Int>(0)
    private struct Started {
        var next: UInt64 = 0
        /// Requests `start(on:)` began and not yet ended, by serial id. At most `limit` (each
        /// is counted in flight).
        var tasks: [UInt64: Task<Void, Never>] = [:]
        /// Set by `finish()`: nothing starts after that.
        var closed = false
    }
    private let started = Locked(Started())
    /// Notified when the last started request ends after the service closed.
    private let startedEnded = Condition()
    let limit: Int
    private let metrics: NodeMetrics

    init(limit: Int, metrics: NodeMetrics) {
        self.limit = limit
        self.metrics = metrics
        (jobs, continuation) = AsyncStream.makeStream(of: Job.self)
    }

    var inflightCount: Int { inflight.load(ordering: .relaxed) }
    /// Notified whenever the in-flight count drops to zero.
    let drained = Condition()

    /// Counts a request in flight, within the bound; false (nothing counted) when it is reached.
    /// A request served outside the group (`NodeCore.serveReplicaDirectly`) counts itself so,
    /// and calls `end` once answered.
    func begin() -> Bool {
        let now = inflight.wrappingAdd(1, ordering: .relaxed).newValue
        if now > limit {
            inflight.wrappingSubtract(1, ordering: .relaxed)
            return false
        }
        metrics.inflight.record(now)
        return true
    }

    /// Ends a request `begin` counted.
    func end() {
        let left = inflight.wrappingSubtract(1, ordering: .relaxed).newValue
        metrics.inflight.record(left)
        if left == 0 { drained.notifyAll() }
    }

    /// Queues `job`; false if the bound is reached or the service finished.
    func submit(_ job: @escaping Job) -> Bool {
        guard begin() else { return false }
        let wrapped: Job = { [self] in
            await job()
            end()
        }
        if case .terminated = continuation.yield(wrapped) {
            inflight.wrappingSubtract(1, ordering: .relaxed)
            return false
        }
        return true
    }

    /// Starts `job` at once as a task preferring `executor` (a connection's event loop), counted
    /// in flight like a queued one; false if the bound is reached or the service finished.
    func start(on executor: any TaskExecutor, _ job: @escaping Job) -> Bool {
        guard begin() else { return false }
        let registered: Bool = started.withLock { s in
            guard !s.closed else { return false }
            let id = s.next
            s.next &+= 1
            // Enqueued on the loop: it runs after this returns (and takes the lock only then).
            s.tasks[id] = Task(executorPreference: executor) { [self] in
                await job()
                // Only `run()` waits, and only once closed: no notify on an ordinary request's path.
                let last = started.withLock { s in
                    s.tasks.removeValue(forKey: id)
                    return s.closed && s.tasks.isEmpty
                }
                if last { startedEnded.notifyAll() }
                end()
            }
            return true
        }
        if !registered { end() }
        return registered
    }

    private var startedCount: Int { started.withLock { $0.tasks.count } }

    func finish() {
        started.withLock { $0.closed = true }
        continuation.finish()
    }

    /// True once a no-op job ran through the group (false if the service has finished).
    /// Not counted against the bound: it checks the group is alive, not that it has room.
    func probe() async -> Bool {
        let ran = OneShot<Bool>()
        if case .terminated = continuation.yield({ ran.deliver(true) }) { return false }
        return await ran.wait(onCancel: false)
    }

    func run() async {
        await withTaskCancellationHandler {
            await withDiscardingTaskGroup { group in
                for await job in jobs {
                    group.addTask { await job() }
                }
            }
            // The queue is finished (so is `start`, or run() was cancelled): wait for the
            // requests started on loops, as a group waits for its children, cancelled or not.
            started.withLock { $0.closed = true }
            if startedCount > 0 {
                // Not cancellable: a cancelled run() still waits for them (they are cancelled).
                await Task { _ = await startedEnded.wait(until: { self.startedCount == 0 }) }.value
            }
        } onCancel: {
            let running = started.withLock { s in
                s.closed = true
                return s.tasks.sorted { $0.key < $1.key }.map(\.value)
            }
            for t in running { t.cancel() }
        }
    }
}

/// Implements the server side of the protocol: validates requests, routes them to a coordinator
/// (or forwards writes to a replica), and serves internode replica operations.
///
/// Isolation: `dispatch` and the handshake run on a connection's event loop and only enqueue;
/// the work runs in `RequestService`'s task group.
final class Router: RequestDispatcher {
    let core: NodeCore
    /// Built from the config alone (cluster name, node name, secret), not from the cluster view.
    let handshake: ClusterHandshake
    private let loopExecutors = LoopExecutors()

    init(core: NodeCore) {
        self.core = core
        handshake = ClusterHandshake(config: core.config)
    }

    /// Refused with `notReady` until the node started (has a cluster view), as before.
    func acceptHello(_ hello: Hello, remote: String?) -> Result<PendingHello, ErrorReply> {
        guard core.view != nil else { return .failure(ErrorReply(code: .notReady, message: "node \(core.config.name) is starting")) }
        return handshake.answer(hello, nonce: ClusterHandshake.makeNonce(), remote: remote).mapError(refused)
    }

    func verifyHelloProof(_ proof: HelloProof, for pending: PendingHello, remote: String?) -> Result<NodeName, ErrorReply> {
        handshake.verify(proof, for: pending, remote: remote).mapError(refused)
    }

    /// Logs and counts a handshake this node refused as the acceptor.
    private func refused(_ refusal: HandshakeRefusal) -> ErrorReply {
        core.metrics.countHandshakeRejection(refusal.reason, inbound: true)
        core.logger.error("\(refusal.message)", metadata: ["reason": "\(refusal.reason.rawValue)"])
        return refusal.errorReply
    }

    func recordConnectionError(_ error: any Error) {
        core.logger.debug("connection closed after an error", metadata: ["error": "\(error)"])
    }

    func recordReadPause() {
        core.metrics.readPauses.increment()
    }

    func recordProtocolError(_ error: WireError) {
        core.metrics.protocolErrors.increment()
        core.logger.debug("protocol error", metadata: ["error": "\(error)"])
    }

    func recordDroppedOneWay(_ type: MessageType, reason: String) {
        core.metrics.protocolErrors.increment()
        core.logger.debug("one-way message dropped", metadata: ["type": "\(type)", "reason": "\(reason)"])
    }

    /// Hands a stream to the handler registered for its kind, within
    /// `transport.max_streams_per_peer` streams from that peer (else `overloaded`, counted in
    /// `cairn_streams_refused_total`). Refused while the node is not serving.
    func acceptStream(_ request: InboundStreamRequest) -> Result<any StreamSink, ErrorReply> {
        switch core.state {
        case .serving: break
        case .starting: return .failure(ErrorReply(code: .notReady, message: "node \(core.config.name) is starting"))
        case .draining, .stopped: return .failure(ErrorReply(code: .shuttingDown, message: "node \(core.config.name) is shutting down"))
        }
        guard let acceptor = core.streamAcceptors.withLock({ $0[request.kind] }) else {
            return .failure(ErrorReply(code: .unknownMessage, message: "node \(core.config.name) accepts no \(request.kind) streams"))
        }
        let (limit, peer, core) = (core.config.maxStreamsPerPeer, request.from, core)
        let reserved = core.inboundStreams.withLock { open in
            guard open[peer, default: 0] < limit else { return false }
            open[peer, default: 0] += 1
            return true
        }
        guard reserved else {
            core.metrics.streamsRefused.increment()
            return .failure(ErrorReply(code: .overloaded, message:
                "\(limit) streams from \(peer) already open on \(core.config.name) (transport.max_streams_per_peer)"))
        }
        let unreserve: @Sendable () -> Void = {
            core.inboundStreams.withLock { open in
                open[peer, default: 1] -= 1
                if open[peer] == 0 { open.removeValue(forKey: peer) }
            }
        }
        switch acceptor(request) {
        case .success(let sink):
            core.metrics.streamsIn.opened()
            return .success(CountedSink(sink) {
                unreserve()
                core.metrics.streamsIn.closed()
            })
        case .failure(let error):
            unreserve()
            return .failure(error)
        }
    }

    func dispatch(_ envelope: Envelope, fromPeer: Bool, responder: Responder) {
        // Gossip is cheap, one-way and must not wait behind (or be refused with) key requests:
        // a node too busy to hear its peers would be suspected.
        if fromPeer, let agent = core.membership {
            switch envelope.message {
            case .gossip(let bytes): return agent.receiveGossip(bytes)
            case .clusterStatePush(let bytes):
                // Adopting a state persists it (file syncs): not on the event loop.
                Task(executorPreference: core.taskExecutor) { agent.receiveState(bytes, from: "pushed by a peer") }
                return
            default: break
            }
        }
        switch core.state {
        case .serving: break
        case .starting: return responder.fail(ErrorReply(code: .notReady, message: "node \(core.config.name) is starting"))
        case .draining, .stopped: return responder.fail(ErrorReply(code: .shuttingDown, message: "node \(core.config.name) is shutting down"))
        }
        if fromPeer, core.serveReplicaDirectly(envelope.message, responder: responder) { return }
        if core.coordinateDirectly(envelope.message, responder: responder) { return }
        let accepted: Bool
        if core.taskExecutor == nil, envelope.message.runsOnItsLoop, let loop = loopExecutors.current() {
            accepted = core.requests.start(on: loop) { [core] in
                await core.handle(envelope.message, fromPeer: fromPeer, responder: responder)
            }
        } else {
            accepted = core.requests.submit { [core] in
                await core.handle(envelope.message, fromPeer: fromPeer, responder: responder)
            }
        }
        if !accepted {
            if let op = envelope.message.operation { core.metrics.count(op, .overloaded) }
            responder.fail(ErrorReply(code: .overloaded, message:
                "node \(core.config.name) has \(core.requests.limit) requests in flight (limits.max_inflight_requests); retry later"))
        }
    }
}

extension Message {
    /// Key requests and replica requests: they block on nothing (storage work runs on the
    /// vnodes' store threads), so their tasks run on the connection's event loop. Admin verbs,
    /// anti-entropy and the rest may sync files or scan: the cooperative pool.
    var runsOnItsLoop: Bool {
        switch self {
        case .get, .put, .delete, .replicaGet, .replicaPut: true
        default: false
        }
    }

    var operation: OperationKind? {
        switch self {
        case .get: .get
        case .put: .put
        case .delete: .delete
        default: nil
        }
    }
}

/// A sink that calls `release` once, when its stream ended on this side (finish returned or
/// threw, receive threw, or cancelled).
private final class CountedSink: StreamSink {
    let sink: any StreamSink
    let released = Atomic<Bool>(false)
    let release: @Sendable () -> Void

    init(_ sink: any StreamSink, release: @escaping @Sendable () -> Void) {
        self.sink = sink
        self.release = release
    }

    private func end() {
        if !released.exchange(true, ordering: .relaxed) { release() }
    }

    func receive(_ chunk: [UInt8]) async throws {
        do { try await sink.receive(chunk) } catch {
            end()
            throw error
        }
    }

    func finish() async throws {
        defer { end() }
        try await sink.finish()
    }

    func cancelled(_ reason: String) async {
        await sink.cancelled(reason)
        end()
    }
}
