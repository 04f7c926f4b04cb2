import NIOCore
import CairnCore
import CairnWire
import Logging

/// This node's connection to one peer: connects, handshakes (`hello` with the cluster name and
/// ring fingerprint), and reconnects with backoff when the connection drops.
///
/// Isolation: a class whose state sits behind a lock, so the coordinator path reads "is it up?"
/// and sends without hopping to an actor. `run()` is supervised; it returns only when cancelled.
/// A request goes out only over a connection that completed the handshake; otherwise `send`
/// throws `ConnectionError.notSent` (certainly not delivered).
final class PeerLink: SupervisedChild {
    struct State {
        var connection: Connection?
        var downReason = "not yet connected"
        var attempts = 0
    }

    let peer: NodeName
    let address: HostPort
    let childName: String
    private let state = Locked(State())
    private let hello: Hello
    private let config: NodeConfig
    private let group: any EventLoopGroup
    private let logger: Logger
    private let onChange: @Sendable () -> Void
    private let clock: any NodeClock

    init(peer: NodeName, address: HostPort, hello: Hello, config: NodeConfig, group: any EventLoopGroup,
         logger: Logger, clock: any NodeClock, onChange: @escaping @Sendable () -> Void) {
        self.peer = peer
        self.clock = clock
        self.address = address
        self.childName = "peer-\(peer)"
        self.hello = hello
        self.config = config
        self.group = group
        self.logger = logger
        self.onChange = onChange
    }

    /// nil while connected and handshaken; else why not.
    var downReason: String? {
        state.withLock { s in
            if let c = s.connection, c.isActive { return nil }
            return s.downReason
        }
    }

    var attempts: Int { state.withLock { $0.attempts } }

    func send(_ message: Message, timeoutMillis: UInt32) async throws(ConnectionError) -> Message {
        let (connection, reason) = state.withLock { s in (s.connection, s.downReason) }
        guard let connection, connection.isActive else { throw .notSent("\(peer) is down: \(reason)") }
        return try await connection.request(message, timeoutMillis: timeoutMillis)
    }

    func run() async throws {
        var backoff = config.reconnectMinMillis
        while !Task.isCancelled {
            let reason = await connectOnce()
            let wasUp = state.withLock { s in
                let was = s.connection != nil
                s.connection = nil
                s.downReason = reason
                s.attempts += 1
                return was
            }
            onChange()
            if wasUp {
                logger.warning("peer link down", metadata: ["peer": "\(peer)", "reason": "\(reason)"])
                backoff = config.reconnectMinMillis
            }
            do {
                try await clock.sleep(for: .milliseconds(backoff))
            } catch {
                break
            }
            backoff = min(backoff * 2, config.reconnectMaxMillis)
        }
        let c = state.withLock { s in
            defer { s.connection = nil; s.downReason = "stopped" }
            return s.connection
        }
        c?.close()
    }

    /// Connects, handshakes, and waits until the connection closes. Returns why it ended.
    private func connectOnce() async -> String {
        let connection: Connection
        do {
            connection = try await Connection.connect(host: address.host, port: address.port, group: group, limits: config.limits,
                                                      maxPending: config.maxPendingPerConnection,
                                                      connectTimeout: .milliseconds(config.connectTimeoutMillis))
        } catch {
            return error.description
        }
        let reply: Message
        do {
            reply = try await connection.request(.hello(hello), timeoutMillis: UInt32(clamping: config.connectTimeoutMillis))
        } catch {
            connection.close()
            return "handshake failed: \(error)"
        }
        switch reply {
        case .helloAck(let ack) where ack.ringFingerprint == hello.ringFingerprint && ack.cluster == hello.cluster && ack.node == peer.value:
            break
        case .helloAck(let ack):
            connection.close()
            logger.error("peer disagrees about the cluster", metadata: ["peer": "\(peer)", "their_node": "\(ack.node)", "their_cluster": "\(ack.cluster)"])
            return "handshake mismatch: peer is \(ack.node) of cluster \(ack.cluster) with another ring"
        case .error(let e):
            connection.close()
            if e.code == .notReady {
                logger.debug("peer not ready yet", metadata: ["peer": "\(peer)"])
            } else {
                logger.error("peer rejected handshake", metadata: ["peer": "\(peer)", "reason": "\(e.message)"])
            }
            return "handshake rejected: \(e.message)"
        default:
            connection.close()
            return "unexpected handshake reply \(reply.type)"
        }
        state.withLock { s in
            s.connection = connection
            s.attempts += 1
        }
        onChange()
        logger.info("peer link up", metadata: ["peer": "\(peer)", "address": "\(address)"])
        await withTaskCancellationHandler {
            try? await connection.channel.closeFuture.get()
        } onCancel: {
            connection.close()
        }
        return "connection closed"
    }
}

extension PeerLink {
    /// Drops the current connection (the link reconnects unless cancelled).
    func closeConnection() {
        state.withLock { $0.connection }?.close()
    }
}
