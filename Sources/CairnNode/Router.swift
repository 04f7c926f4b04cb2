import CairnCore
import CairnWire
import Logging
import Synchronization

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
/// Supervision: every request (and the coordinator actor it creates) is a child task of `run()`,
/// which returns after `finish()` once the last one has ended.
final class RequestService: Sendable {
    typealias Job = @Sendable () async -> Void
    private let jobs: AsyncStream<Job>
    private let continuation: AsyncStream<Job>.Continuation
    private let inflight = Atomic<Int>(0)
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

    func finish() { continuation.finish() }

    /// True once a no-op job ran through the group (false if the service has finished).
    /// Not counted against the bound: it checks the group is alive, not that it has room.
    func probe() async -> Bool {
        let ran = OneShot<Bool>()
        if case .terminated = continuation.yield({ ran.deliver(true) }) { return false }
        return await ran.wait(onCancel: false)
    }

    func run() async {
        await withDiscardingTaskGroup { group in
            for await job in jobs {
                group.addTask { await job() }
            }
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
        let accepted = core.requests.submit { [core] in
            await core.handle(envelope.message, fromPeer: fromPeer, responder: responder)
        }
        if !accepted {
            if let op = envelope.message.operation { core.metrics.count(op, .overloaded) }
            responder.fail(ErrorReply(code: .overloaded, message:
                "node \(core.config.name) has \(core.requests.limit) requests in flight (limits.max_inflight_requests); retry later"))
        }
    }
}

extension Message {
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
