import NIOCore
import CairnCore
import CairnWire
import Logging

/// This node's connection to one peer: connects, handshakes (`hello`, `hello-ack`, `hello-proof`:
/// cluster name, node name, protocol version and the cluster secret; `ClusterHandshake`), and
/// reconnects with backoff when the connection drops.
///
/// The shell of `PeerLinkMachine`, which decides all of that (states, backoff, attempts, down
/// reasons, what to log); this class only performs its directives: NIO connects and requests,
/// sleeps on the node's clock, logging and `onChange`.
///
/// Isolation: a class whose state (the machine and the current connection) sits behind a lock, so
/// the coordinator path reads "is it up?" and sends without hopping to an actor. `run()` is
/// supervised; it returns only when cancelled. A request goes out only over a connection that
/// completed the handshake; otherwise `send` throws `ConnectionError.notSent` (certainly not
/// delivered), and `cast` drops the message.
///
/// A node has two links per peer: the control link (requests, one-way messages) and, from the
/// first stream on, the data link (streams only; `role` "data"), so bulk transfer never queues
/// ahead of replica traffic. Both handshake and reconnect the same way.
final class PeerLink: SupervisedChild {
    struct State {
        var machine: PeerLinkMachine
        /// The connection being handshaken or up; nil otherwise.
        var connection: Connection?
        /// Our `hello-proof` is written on `connection`. The machine goes up when it accepts
        /// the peer's ack, a moment before the proof goes out: nothing else may use the
        /// connection until then, or the peer reads it before the proof and drops it.
        var proofWritten = false
    }

    /// What the shell reports back to the machine after waiting.
    private enum Event {
        case connected(Connection)
        case connectFailed(String)
        case replied(Message)
        case handshakeFailed(ConnectionError)
        case closed
        case backoffEnded
        case cancelled
    }

    let peer: NodeName
    let address: HostPort
    let childName: String
    private let state: Locked<State>
    private let config: NodeConfig
    private let group: any EventLoopGroup
    private let logger: Logger
    private let onChange: @Sendable () -> Void
    private let clock: any NodeClock
    private let oneWay: (@Sendable (Message) -> Void)?
    private let metrics: NodeMetrics?
    /// Notified whenever the link goes up or down, or an attempt ends.
    let changed = Condition()

    /// - Parameters:
    ///   - role: "peer" for the control link, "data" for the data link (the child's name prefix).
    ///   - oneWay: receives one-way messages the peer sends on this link's connections (stream
    ///     acknowledgements), on the event loop.
    ///   - metrics: where refused handshakes are counted.
    init(peer: NodeName, address: HostPort, handshake: ClusterHandshake, config: NodeConfig, group: any EventLoopGroup,
         logger: Logger, clock: any NodeClock, role: String = "peer", oneWay: (@Sendable (Message) -> Void)? = nil,
         metrics: NodeMetrics? = nil, onChange: @escaping @Sendable () -> Void) {
        self.peer = peer
        self.clock = clock
        self.address = address
        self.oneWay = oneWay
        self.metrics = metrics
        self.childName = "\(role)-\(peer)"
        self.config = config
        self.group = group
        self.logger = logger
        self.onChange = onChange
        let machine = PeerLinkMachine(peer: peer, address: address, handshake: handshake,
                                      minBackoff: .milliseconds(config.reconnectMinMillis),
                                      maxBackoff: .milliseconds(config.reconnectMaxMillis))
        self.state = Locked(State(machine: machine))
    }

    /// nil while connected and handshaken; else why not.
    var downReason: String? {
        state.withLock { s in Self.downReason(s) }
    }

    /// Connection attempts that ended (went up, or failed before going up); > 0 once the peer was tried.
    var attempts: Int { state.withLock { $0.machine.attempts } }

    func send(_ message: Message, timeoutMillis: UInt32) async throws(ConnectionError) -> Message {
        try await usableConnection().get().request(message, timeoutMillis: timeoutMillis)
    }

    /// `send` for a caller that must not suspend: `done` is called exactly once, at once when
    /// the link is down, else on the connection's event loop (`Connection.requestSoon`).
    func sendSoon(_ message: Message, timeoutMillis: UInt32, _ done: @escaping @Sendable (Result<Message, ConnectionError>) -> Void) {
        switch usableConnection() {
        case .success(let connection): connection.requestSoon(message, timeoutMillis: timeoutMillis, done)
        case .failure(let error): done(.failure(error))
        }
    }

    /// The handshaken connection, or why a request cannot be sent (certainly not delivered).
    private func usableConnection() -> Result<Connection, ConnectionError> {
        state.withLock { s in
            if let c = Self.usable(s) { return .success(c) }
            return .failure(.notSent("\(peer) is down: \(Self.downReason(s) ?? "connection closed")"))
        }
    }

    /// Sends `message` one-way over the handshaken connection; dropped when there is none.
    func cast(_ message: Message) {
        state.withLock { Self.usable($0) }?.cast(message)
    }

    /// The handshaken connection, if the link is up.
    var connection: Connection? { state.withLock { Self.usable($0) } }

    func run() async throws {
        var directives = state.withLock { $0.machine.start() }
        while let event = await perform(directives) {
            directives = state.withLock { s in
                switch event {
                case .connected(let c):
                    s.connection = c
                    s.proofWritten = false
                    return s.machine.connected(nonce: ClusterHandshake.makeNonce())
                case .connectFailed(let why): return s.machine.connectFailed(why, at: clock.now())
                case .replied(let reply): return s.machine.handshakeReplied(reply, at: clock.now())
                case .handshakeFailed(let error): return s.machine.handshakeFailed(error, at: clock.now())
                case .closed: return s.machine.closed(at: clock.now())
                case .backoffEnded: return s.machine.backoffEnded(at: clock.now())
                case .cancelled: return s.machine.cancelled()
                }
            }
        }
        // After `stop` (or a list with nothing to wait on, which the machine never returns while
        // live) no connection should remain; drop any that does.
        state.withLock { s in
            defer { s.connection = nil }
            return s.connection
        }?.close()
    }

    /// Performs `directives` in order; returns the event the last one waited for, or nil after
    /// `stop` (or if none waits). Reports `cancelled` instead of whatever a cancelled wait returned.
    private func perform(_ directives: [PeerLinkMachine.Directive]) async -> Event? {
        for d in directives {
            switch d {
            case .connect:
                if Task.isCancelled { return .cancelled }
                do {
                    return .connected(try await Connection.connect(
                        host: address.host, port: address.port, group: group, limits: config.limits,
                        maxPending: config.maxPendingPerConnection, connectTimeout: .milliseconds(config.connectTimeoutMillis),
                        oneWay: oneWay))
                } catch {
                    return Task.isCancelled ? .cancelled : .connectFailed(error.description)
                }
            case .sendHello(let hello):
                guard !Task.isCancelled, let connection = state.withLock({ $0.connection }) else { return .cancelled }
                do {
                    let reply = try await connection.request(.hello(hello), timeoutMillis: UInt32(clamping: config.connectTimeoutMillis))
                    return Task.isCancelled ? .cancelled : .replied(reply)
                } catch {
                    return Task.isCancelled ? .cancelled : .handshakeFailed(error)
                }
            case .sendProof(let proof):
                // Written before the link is used (or closed), so the peer reads it first.
                _ = try? await state.withLock({ $0.connection })?.cast(.helloProof(proof)).get()
                state.withLock { $0.proofWritten = true }
            case .countRejection(let reason):
                metrics?.countHandshakeRejection(reason, inbound: false)
            case .markUp:
                onChange()
                changed.notifyAll()
                guard let connection = state.withLock({ $0.connection }) else { return .closed }
                await withTaskCancellationHandler {
                    try? await connection.channel.closeFuture.get()
                } onCancel: {
                    connection.close()
                }
                return Task.isCancelled ? .cancelled : .closed
            case .close:
                state.withLock { s in
                    defer { s.connection = nil }
                    return s.connection
                }?.close()
                onChange()
                changed.notifyAll()
            case .sleep(let duration):
                do {
                    try await clock.sleep(for: duration)
                } catch {
                    return .cancelled
                }
                return Task.isCancelled ? .cancelled : .backoffEnded
            case .log(let level, let message, let metadata):
                logger.log(level: level, "\(message)", metadata: metadata.mapValues { .string($0) })
            case .stop:
                return nil
            }
        }
        return nil
    }

    /// The connection requests may use: handshaken (the machine is up) and still active.
    private static func usable(_ s: borrowing State) -> Connection? {
        guard s.machine.isUp, s.proofWritten, let c = s.connection, c.isActive else { return nil }
        return c
    }

    /// The machine's down reason, or "connection closed" when it still believes the link up but
    /// the connection is no longer active (its `closed` event is on its way).
    private static func downReason(_ s: borrowing State) -> String? {
        if let reason = s.machine.downReason { return reason }
        return usable(s) == nil ? "connection closed" : nil
    }
}

extension PeerLink {
    /// Drops the current connection (the link reconnects unless cancelled).
    func closeConnection() {
        state.withLock { $0.connection }?.close()
    }
}
