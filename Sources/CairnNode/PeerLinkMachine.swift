import CairnCore
import CairnWire
import Logging

/// The protocol of one peer link, as a pure state machine: connect, handshake, up, closed, back off,
/// reconnect — until cancelled. `PeerLink` is its shell: it feeds events in and performs the
/// returned directives in order (sockets, sleeps, logging), nothing else.
///
/// Isolation: a value with no I/O and no clock; time comes in with the events that need it. Not
/// thread-safe by itself: the shell keeps it behind its lock and feeds one event at a time.
///
/// What a caller may rely on:
/// - Events that do not apply to the current state (a late reply, anything after `stopped`) change
///   nothing and return no directives.
/// - A directive list holds at most one directive to wait on (`connect`, `sendHello`, `markUp`,
///   `sleep`) or `stop`, and that one comes last; an empty list asks for nothing.
/// - The link goes up only after the peer's `hello-ack` passed `ClusterHandshake.proof` (protocol
///   version, cluster, the node dialled, its proof of the cluster secret); the proof goes out
///   (`sendProof`) before `markUp`. A refused ack is logged, counted (`countRejection`) and, when
///   its secret proof failed, answered with the refusal proof before the connection is closed.
/// - Backoff: the first retry waits `minBackoff`; each further failure doubles the wait, up to
///   `maxBackoff`; a link that was up starts again from `minBackoff` when it closes.
/// - `attempts` counts connection attempts that ended: went up, or failed before going up.
struct PeerLinkMachine: Sendable {
    enum State: Hashable, Sendable {
        /// Made, `start` not yet called.
        case idle
        /// A connect is in flight.
        case connecting
        /// Connected; our `hello` is out, its reply pending.
        case handshaking
        /// Handshaken: requests may go out on the connection.
        case up
        /// Waiting to reconnect until this instant.
        case backingOff(until: ContinuousClock.Instant)
        /// Cancelled; nothing more happens.
        case stopped
    }

    enum Directive: Hashable, Sendable {
        /// Open a connection to the peer; report `connected` or `connectFailed`.
        case connect
        /// Send this `hello` on the new connection; report `handshakeReplied` or `handshakeFailed`.
        case sendHello(Hello)
        /// Send this `hello-proof` one-way on the connection (nothing answers it).
        case sendProof(HelloProof)
        /// The link is up (`downReason` is already nil): notify, then watch the connection and
        /// report `closed` when it closes.
        case markUp
        /// Close the connection, if the shell has one, and notify: the link is down for `reason`
        /// (which `downReason` already reports).
        case close(reason: String)
        /// Sleep this long, then report `backoffEnded`.
        case sleep(Duration)
        case log(Logger.Level, String, metadata: [String: String])
        /// Count a handshake this node refused as the dialer (`cairn_handshake_rejections_total`).
        case countRejection(HandshakeRefusal.Reason)
        /// Return from `run()`: the link is stopped for good.
        case stop
    }

    let peer: NodeName
    let address: HostPort
    let handshake: ClusterHandshake
    let minBackoff: Duration
    let maxBackoff: Duration

    private(set) var state: State = .idle
    /// The wait before the next retry.
    private(set) var nextBackoff: Duration
    /// Connection attempts that ended: went up, or failed before going up.
    private(set) var attempts = 0
    /// Why the link is not up; kept while a new attempt is under way.
    private var reason = "not yet connected"
    /// The hello of the current attempt, which the peer's ack must answer.
    private var sentHello: Hello?

    /// `minBackoff` should be positive and at most `maxBackoff` (`NodeConfig.validate` checks
    /// both); a smaller `maxBackoff` is raised to `minBackoff`.
    init(peer: NodeName, address: HostPort, handshake: ClusterHandshake, minBackoff: Duration, maxBackoff: Duration) {
        self.peer = peer
        self.address = address
        self.handshake = handshake
        self.minBackoff = minBackoff
        self.maxBackoff = max(maxBackoff, minBackoff)
        self.nextBackoff = minBackoff
    }

    var isUp: Bool { state == .up }

    /// nil while up; else why not ("not yet connected", the last failure, or "stopped").
    var downReason: String? {
        switch state {
        case .up: nil
        case .stopped: "stopped"
        case .idle, .connecting, .handshaking, .backingOff: reason
        }
    }

    // MARK: Events

    mutating func start() -> [Directive] {
        guard state == .idle else { return [] }
        state = .connecting
        return [.connect]
    }

    /// `nonce`: fresh random bytes for this attempt's hello (`ClusterHandshake.makeNonce`).
    mutating func connected(nonce: [UInt8]) -> [Directive] {
        guard state == .connecting else { return [] }
        state = .handshaking
        let hello = handshake.hello(nonce: nonce)
        sentHello = hello
        return [.sendHello(hello)]
    }

    /// `reason`: why the connect failed, as the connection reports it.
    mutating func connectFailed(_ reason: String, at now: ContinuousClock.Instant) -> [Directive] {
        guard state == .connecting else { return [] }
        return fail(reason, at: now)
    }

    /// The peer answered our `hello`. Only a `helloAck` that passes `ClusterHandshake.proof`
    /// brings the link up; its ring, N and member list are not compared.
    mutating func handshakeReplied(_ reply: Message, at now: ContinuousClock.Instant) -> [Directive] {
        guard state == .handshaking, let hello = sentHello else { return [] }
        switch reply {
        case .helloAck(let ack):
            switch handshake.proof(for: ack, to: hello, dialled: peer, at: "\(address)") {
            case .success(let proof):
                state = .up
                attempts += 1
                return [.sendProof(proof), .log(.info, "peer link up", metadata: ["peer": "\(peer)", "address": "\(address)"]), .markUp]
            case .failure(let refusal):
                // The acceptor cannot tell a failed ack from a lost connection: say so.
                let tell: [Directive] = refusal.reason == .secret ? [.sendProof(ClusterHandshake.refusal)] : []
                return tell + fail("handshake refused: \(refusal.message)", at: now, logging: [
                    .log(.error, refusal.message, metadata: ["peer": "\(peer)", "address": "\(address)", "reason": refusal.reason.rawValue]),
                    .countRejection(refusal.reason),
                ])
            }
        case .error(let e) where e.code == .notReady:
            return fail("handshake rejected: \(e.message)", at: now, logging: [
                .log(.debug, "peer not ready yet", metadata: ["peer": "\(peer)"]),
            ])
        case .error(let e):
            return fail("handshake rejected: \(e.message)", at: now, logging: [
                .log(.error, "peer rejected handshake", metadata: ["peer": "\(peer)", "reason": e.message]),
            ])
        default:
            return fail("unexpected handshake reply \(reply.type)", at: now)
        }
    }

    /// The `hello` got no reply (lost, timed out, not sent).
    mutating func handshakeFailed(_ error: ConnectionError, at now: ContinuousClock.Instant) -> [Directive] {
        guard state == .handshaking else { return [] }
        return fail("handshake failed: \(error)", at: now)
    }

    /// The connection of an up link closed (either end, or `PeerLink.closeConnection`).
    mutating func closed(at now: ContinuousClock.Instant) -> [Directive] {
        guard state == .up else { return [] }
        nextBackoff = minBackoff
        return fail("connection closed", at: now, logging: [
            .log(.warning, "peer link down", metadata: ["peer": "\(peer)", "reason": "connection closed"]),
        ])
    }

    /// A `sleep` ended. Reconnects once `now` reaches the backoff deadline; earlier, sleeps the rest.
    mutating func backoffEnded(at now: ContinuousClock.Instant) -> [Directive] {
        guard case .backingOff(let until) = state else { return [] }
        if now < until { return [.sleep(now.duration(to: until))] }
        state = .connecting
        return [.connect]
    }

    /// The link's task was cancelled: stops from any state, closing what is open.
    mutating func cancelled() -> [Directive] {
        let was = state
        state = .stopped
        switch was {
        case .stopped: return []
        case .idle, .backingOff: return [.stop]
        case .connecting, .handshaking: return [.close(reason: "stopped"), .stop]
        case .up:
            return [.close(reason: "stopped"),
                    .log(.warning, "peer link down", metadata: ["peer": "\(peer)", "reason": "stopped"]),
                    .stop]
        }
    }

    // MARK: Helpers

    /// Ends the current attempt (or up link) with `reason` and backs off.
    private mutating func fail(_ reason: String, at now: ContinuousClock.Instant, logging: [Directive] = []) -> [Directive] {
        self.reason = reason
        if state != .up { attempts += 1 }
        let delay = nextBackoff
        nextBackoff = min(nextBackoff * 2, maxBackoff)
        state = .backingOff(until: now.advanced(by: delay))
        return [.close(reason: reason)] + logging + [.sleep(delay)]
    }
}
