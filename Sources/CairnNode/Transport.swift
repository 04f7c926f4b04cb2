import CairnCore
import CairnWire

/// How a node exchanges internode requests with its peers, and what it knows of their
/// reachability. The seam between the node's shells (coordinators, forwarding, readiness) and
/// the network: `SocketTransport` runs it over NIO; an in-memory network can stand in for it.
///
/// Contract: `send` fails with a `ConnectionError` whose `certainlyNotDelivered` is true only
/// when the peer cannot have received the request; a peer reported down by `downReasons` is
/// not sent requests by coordinators (they count it as not sent). Thread-safe.
protocol Transport: Sendable {
    /// Sends one request to `node` and returns its reply, waiting at most `timeoutMillis`.
    /// Cancelling the caller ends the wait (`ConnectionError.abandoned`).
    func send(to node: NodeName, _ message: Message, timeoutMillis: UInt32) async throws(ConnectionError) -> Message
    /// Why each of `nodes` is unreachable now; a node absent from the result is reachable.
    /// Nodes the transport does not know count as unreachable.
    func downReasons(_ nodes: [NodeName]) -> [NodeName: String]
    /// The peers this transport knows (this node excluded).
    var peerCount: Int { get }
    /// Peers reachable now.
    var upCount: Int { get }
    /// Every peer has been tried at least once since start (reached or not): until then "down"
    /// means "not tried yet", and the node does not report itself serving.
    var triedEveryPeer: Bool { get }
    /// Notified when a peer's reachability changes (a link's attempt ended, it went up or down).
    var reachabilityChanged: Condition { get }
    /// Drops every connection at once, as a crash does.
    func dropConnections()
}

extension Transport {
    /// For transports whose every peer counts as tried from the start: never notified.
    var reachabilityChanged: Condition { Condition() }
}

/// The socket transport: this node's peer links (one supervised `PeerLink` per peer, each a
/// multiplexed NIO connection with handshake and reconnect backoff), by node name. It follows
/// the cluster views: a member a view adds gets a link (a child of `supervisor`), a member it
/// drops loses its link.
///
/// Thread-safe; the links are run by `supervisor`, `run()` (following the views) by the node's.
final class SocketTransport: Transport, SupervisedChild {
    let childName = "peer-manager"
    let reachabilityChanged = Condition()
    private let linkTable = Locked<[NodeName: PeerLink]>([:])
    private let appliedVersion = Locked<UInt64>(0)
    private let views: ClusterViews
    private let supervisor: Supervisor
    private let makeLink: @Sendable (MemberAddress) -> PeerLink
    /// Present only under `cairnd --test-fault-injection`.
    let faults: TransportFaults?
    private let clock: any NodeClock

    init(views: ClusterViews, supervisor: Supervisor, faults: TransportFaults? = nil, clock: any NodeClock = SystemClock(),
         makeLink: @escaping @Sendable (MemberAddress) -> PeerLink) {
        self.views = views
        self.supervisor = supervisor
        self.makeLink = makeLink
        self.faults = faults
        self.clock = clock
    }

    var links: [NodeName: PeerLink] { linkTable.value }

    /// Adds a link for every peer `view` has and this transport has not, and removes the links
    /// of peers it no longer has (no-op for a view not newer than the last one applied).
    func apply(_ view: ClusterView) {
        appliedVersion.withLock { version in
            guard view.version > version else { return }
            version = view.version
            let wanted = Set(view.addresses.keys).subtracting([view.me])
            linkTable.withLock { table in
                for gone in Set(table.keys).subtracting(wanted).sorted() {
                    if let link = table.removeValue(forKey: gone) { supervisor.terminate(link.childName) }
                }
                for peer in wanted.subtracting(table.keys).sorted() {
                    guard let address = view.addresses[peer] else { continue }
                    let link = makeLink(MemberAddress(name: peer, address: address))
                    table[peer] = link
                    supervisor.spawn(link)
                }
            }
        }
    }

    /// Follows the views until cancelled.
    func run() async throws {
        for await view in views.updates() { apply(view) }
    }

    /// Replicas among `nodes` that are down, with why. Unknown nodes count as down.
    func downReasons(_ nodes: [NodeName]) -> [NodeName: String] {
        var out: [NodeName: String] = [:]
        for n in nodes {
            guard let link = links[n] else {
                out[n] = "not a known peer"
                continue
            }
            if let why = link.downReason { out[n] = why }
        }
        return out
    }

    var upCount: Int { links.values.count { $0.downReason == nil } }

    var peerCount: Int { links.count }

    var triedEveryPeer: Bool { links.values.allSatisfy { $0.attempts > 0 } }

    func dropConnections() {
        for l in links.values { l.closeConnection() }
    }

    func send(to node: NodeName, _ message: Message, timeoutMillis: UInt32) async throws(ConnectionError) -> Message {
        guard let link = links[node] else { throw .notSent("\(node) is not a known peer") }
        guard let faults else { return try await link.send(message, timeoutMillis: timeoutMillis) }
        switch faults.decide(to: node) {
        case .block:
            throw .notSent("fault injection: \(node) is cut off")
        case .pass(let delay):
            if delay > 0 { try? await clock.sleep(for: .milliseconds(delay)) }
            return try await link.send(message, timeoutMillis: timeoutMillis)
        case .dropRequest(let delay):
            try? await clock.sleep(for: .milliseconds(Int(timeoutMillis) + delay))
            throw .timedOut(afterMillis: timeoutMillis)
        case .dropReply(let delay):
            if delay > 0 { try? await clock.sleep(for: .milliseconds(delay)) }
            _ = try? await link.send(message, timeoutMillis: timeoutMillis)
            throw .timedOut(afterMillis: timeoutMillis)
        }
    }
}

