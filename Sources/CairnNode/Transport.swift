import CairnCore
import CairnWire

/// How a node exchanges internode messages with its peers, and what it knows of their
/// reachability. The seam between the node's shells (coordinators, forwarding, readiness,
/// gossip, handoff) and the network: `SocketTransport` runs it over NIO; `InMemoryNetwork`
/// stands in for it. Three ways to talk: request/reply (`send`), one-way messages (`cast`), and
/// streams (`openStream`) on a data channel of their own, so bulk transfer never queues ahead
/// of requests.
///
/// Contract: `send` fails with a `ConnectionError` whose `certainlyNotDelivered` is true only
/// when the peer cannot have received the request; a peer reported down by `downReasons` is
/// not sent requests by coordinators (they count it as not sent). Thread-safe.
protocol Transport: Sendable {
    /// Sends one request to `node` and returns its reply, waiting at most `timeoutMillis`.
    /// Cancelling the caller ends the wait (`ConnectionError.abandoned`).
    func send(to node: NodeName, _ message: Message, timeoutMillis: UInt32) async throws(ConnectionError) -> Message
    /// `send` for a caller that must not suspend: `done` is called exactly once, with the reply or
    /// the failure, on whatever thread ended the request (at once when it cannot be sent). False,
    /// `done` never called: this transport serves only `send` (it runs on a task executor of its
    /// own, or injects faults that wait), and the caller uses `send`.
    func sendSoon(to node: NodeName, _ message: Message, timeoutMillis: UInt32,
                  _ done: @escaping @Sendable (Result<Message, ConnectionError>) -> Void) -> Bool
    /// Sends one message to `node` one-way: the receiver dispatches it as a request whose answer
    /// is dropped, and nothing comes back. Fire and forget: no delivery is reported; a message to
    /// an unreachable peer is dropped at once. It takes the same path (and faults) as a request.
    func cast(to node: NodeName, _ message: Message)
    /// Opens a stream of `kind` to `node` on the data channel (`header` goes to the receiver's
    /// handler), waiting at most `timeoutMillis` for the open to be accepted. Fails at once when
    /// the peer is unknown, refuses connections, or already has `transport.max_streams_per_peer`
    /// streams from this node. Semantics of the stream: `OutboundStream`, `StreamSink`.
    func openStream(to node: NodeName, kind: StreamKind, header: [UInt8], timeoutMillis: UInt32) async throws(StreamError) -> any OutboundStream
    /// Why each of `nodes` is unreachable now; a node absent from the result is reachable.
    /// Nodes the transport does not know count as unreachable.
    func downReasons(_ nodes: [NodeName]) -> [NodeName: String]
    /// Whether `downReasons([node])` is empty.
    func reaches(_ node: NodeName) -> Bool
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

/// One answer of `Transport.sendToAll`, with the position of its node.
struct IndexedAnswer: Sendable {
    let index: Int
    let result: Result<Message, ConnectionError>
}

extension Transport {
    /// Sends `message` to every node in `nodes` at once and returns each outcome, in `nodes`'
    /// order, once all have answered or failed (each within `timeoutMillis`).
    func sendToAll(_ nodes: [NodeName], _ message: Message, timeoutMillis: UInt32) async -> [Result<Message, ConnectionError>] {
        // Each child returns its index beside a Result made by `outcome` (a function, not a
        // typed-throws do/catch in the child closure: Swift 6.3's release build trapped on the
        // index returned that way, in a tuple with the caught error).
        let answers = await withTaskGroup(of: IndexedAnswer.self) { group in
            for (i, node) in nodes.enumerated() {
                group.addTask { IndexedAnswer(index: i, result: await self.outcome(of: node, message, timeoutMillis: timeoutMillis)) }
            }
            var out: [IndexedAnswer] = []
            for await a in group { out.append(a) }
            return out
        }
        return answers.sorted { $0.index < $1.index }.map(\.result)
    }

    private func outcome(of node: NodeName, _ message: Message, timeoutMillis: UInt32) async -> Result<Message, ConnectionError> {
        do throws(ConnectionError) {
            return .success(try await send(to: node, message, timeoutMillis: timeoutMillis))
        } catch {
            return .failure(error)
        }
    }

    func reaches(_ node: NodeName) -> Bool { downReasons([node]).isEmpty }

    /// For transports that serve only `send`.
    func sendSoon(to node: NodeName, _ message: Message, timeoutMillis: UInt32,
                  _ done: @escaping @Sendable (Result<Message, ConnectionError>) -> Void) -> Bool { false }

    /// For transports whose every peer counts as tried from the start: never notified.
    var reachabilityChanged: Condition { Condition() }
}

/// The socket transport: this node's peer links (one supervised `PeerLink` per peer, each a
/// multiplexed NIO connection with handshake and reconnect backoff), by node name. It follows
/// the cluster views: a member a view adds gets a link (a child of `supervisor`), a member it
/// drops loses its links.
///
/// Requests and one-way messages use the control link. Streams use a second link to the peer,
/// the data link: a TCP connection of its own, made on the first `openStream` to that peer
/// (which waits for its first attempt, at most twice `transport.connect_timeout`), then kept and
/// reconnected like the control link. A stream lives on one data connection: when it closes, its
/// streams fail (`lost`); later streams use the reconnected one.
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
    /// Makes a peer's data link, whose one-way messages go to the given handler.
    private let makeDataLink: (@Sendable (MemberAddress, @escaping @Sendable (Message) -> Void) -> PeerLink)?
    /// Data links and their streams, by peer: made on first use.
    private let dataTable = Locked<[NodeName: DataLink]>([:])
    private let addresses = Locked<[NodeName: HostPort]>([:])
    /// Present only under `cairnd --test-fault-injection`.
    let faults: TransportFaults?
    private let clock: any NodeClock
    private let streams: StreamSettings
    private let connectTimeoutMillis: Int64
    private let metrics: NodeMetrics?

    init(views: ClusterViews, supervisor: Supervisor, faults: TransportFaults? = nil, clock: any NodeClock = SystemClock(),
         streams: StreamSettings = StreamSettings(), connectTimeoutMillis: Int64 = 1000, metrics: NodeMetrics? = nil,
         makeDataLink: (@Sendable (MemberAddress, @escaping @Sendable (Message) -> Void) -> PeerLink)? = nil,
         makeLink: @escaping @Sendable (MemberAddress) -> PeerLink) {
        self.views = views
        self.supervisor = supervisor
        self.makeLink = makeLink
        self.makeDataLink = makeDataLink
        self.faults = faults
        self.clock = clock
        self.streams = streams
        self.connectTimeoutMillis = connectTimeoutMillis
        self.metrics = metrics
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
                    if let data = dataTable.withLock({ $0.removeValue(forKey: gone) }) {
                        supervisor.terminate(data.link.childName)
                        data.streams.failAll(.lost("\(gone) left the cluster"))
                    }
                }
                addresses.withLock { a in
                    a = view.addresses
                    a.removeValue(forKey: view.me)
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
        dropDataConnections()
    }

    func reaches(_ node: NodeName) -> Bool {
        linkTable.withLock { $0[node] }.map { $0.downReason == nil } ?? false
    }

    func sendSoon(to node: NodeName, _ message: Message, timeoutMillis: UInt32,
                  _ done: @escaping @Sendable (Result<Message, ConnectionError>) -> Void) -> Bool {
        // Injected faults delay and drop by sleeping: those requests take `send`.
        guard faults == nil else { return false }
        guard let link = linkTable.withLock({ $0[node] }) else {
            done(.failure(.notSent("\(node) is not a known peer")))
            return true
        }
        link.sendSoon(message, timeoutMillis: timeoutMillis, done)
        return true
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


extension SocketTransport {
    /// One-way over the control link; under test fault injection, blocked and dropped messages
    /// vanish and delayed ones wait on a task of their own.
    func cast(to node: NodeName, _ message: Message) {
        guard let link = links[node] else { return }
        guard let faults else { return link.cast(message) }
        switch faults.decide(to: node) {
        case .block, .dropRequest: return
        case .pass(let delay), .dropReply(let delay):
            guard delay > 0 else { return link.cast(message) }
            let clock = clock
            Task {
                try? await clock.sleep(for: .milliseconds(delay))
                link.cast(message)
            }
        }
    }

    func openStream(to node: NodeName, kind: StreamKind, header: [UInt8], timeoutMillis: UInt32) async throws(StreamError) -> any OutboundStream {
        guard links[node] != nil else { throw .connection(.notSent("\(node) is not a known peer")) }
        guard let data = dataLink(for: node) else { throw .connection(.notSent("this transport has no data links")) }
        if let faults, faults.rules.blocked.contains(node) { throw .connection(.notSent("fault injection: \(node) is cut off")) }
        let link = data.link
        if link.attempts == 0 {
            let deadline = clock.now() + .milliseconds(2 * connectTimeoutMillis)
            _ = await link.changed.wait(until: { link.attempts > 0 }, deadline: deadline, clock: clock)
        }
        guard let connection = link.connection else {
            throw .connection(.notSent("data link to \(node) is down: \(link.downReason ?? "connection closed")"))
        }
        let (table, metrics) = (data.streams, metrics)
        guard let id = table.reserve(limit: streams.maxStreamsPerPeer) else {
            metrics?.streamsRefused.increment()
            throw .tooManyStreams(limit: streams.maxStreamsPerPeer)
        }
        metrics?.streamsOut.opened()
        let outbox = StreamOutbox(id: id, settings: streams, transmit: { outbox, outgoing in
            let message: Message = switch outgoing {
            case .chunk(let bytes): .streamChunk(StreamChunk(streamID: id, data: bytes))
            case .end(let n): .streamEnd(StreamEnd(streamID: id, chunkCount: n))
            case .cancel(let reason): .streamCancel(StreamCancel(streamID: id, reason: reason))
            }
            connection.cast(message).whenFailure { error in
                outbox.failed(.lost("data connection to \(node): \(Connection.describe(error))"))
            }
        }, onWindowWait: {
            metrics?.streamWindowWaits.increment()
        }, onTerminal: {
            table.remove(id)
            metrics?.streamsOut.closed()
        })
        table.register(id, outbox)
        // Weak: the hook lives as long as the connection, the stream usually far shorter.
        connection.channel.closeFuture.whenComplete { [weak outbox] _ in outbox?.failed(.lost("data connection to \(node) closed")) }
        let reply: Message
        do throws(ConnectionError) {
            reply = try await connection.request(.streamOpen(StreamOpen(streamID: id, kind: kind, header: header)), timeoutMillis: timeoutMillis)
        } catch {
            // The receiver may have accepted it: tell it the stream is over.
            outbox.cancel("the open failed: \(error)")
            throw .connection(error)
        }
        switch reply {
        case .streamAccept:
            return outbox
        case .error(let e):
            outbox.failed(.refused(e))
            throw .refused(e)
        default:
            let e = ConnectionError.protocolViolation("\(reply.type) in reply to stream-open")
            outbox.cancel("\(e)")
            throw .connection(e)
        }
    }

    /// `node`'s data link, made (and spawned) on first use; nil for a node that is not a peer.
    private func dataLink(for node: NodeName) -> DataLink? {
        guard let address = addresses.withLock({ $0[node] }), let makeDataLink else { return nil }
        let (data, created) = dataTable.withLock { t -> (DataLink, Bool) in
            if let d = t[node] { return (d, false) }
            let table = StreamTable()
            let d = DataLink(link: makeDataLink(MemberAddress(name: node, address: address), { table.deliver($0) }), streams: table)
            t[node] = d
            return (d, true)
        }
        if created { supervisor.spawn(data.link) }
        return data
    }

    /// The control and data connections to `node` (nil where a link has none up), for tests and
    /// diagnostics.
    func connections(to node: NodeName) -> (control: Connection?, data: Connection?) {
        (links[node]?.connection, dataTable.withLock { $0[node] }?.link.connection)
    }

    /// Drops the data connections too (`dropConnections` covers the control links).
    func dropDataConnections() {
        for d in dataTable.withLock({ Array($0.values) }) { d.link.closeConnection() }
    }
}

/// A peer's data link and the streams open on it.
private final class DataLink: Sendable {
    let link: PeerLink
    let streams: StreamTable
    init(link: PeerLink, streams: StreamTable) {
        self.link = link
        self.streams = streams
    }
}

/// The outbound streams to one peer, by stream id: routes the peer's acknowledgements and
/// aborts to them and bounds how many are open (`transport.max_streams_per_peer`). Stream ids
/// grow for the life of the transport, so they are unique on every data connection.
/// Thread-safe.
final class StreamTable: Sendable {
    private struct State {
        var next: UInt64 = 0
        var reserved = 0
        var open: [UInt64: StreamOutbox] = [:]
    }
    private let state = Locked(State())

    /// A fresh stream id, if fewer than `limit` streams are open.
    func reserve(limit: Int) -> UInt64? {
        state.withLock { s in
            guard s.reserved < limit else { return nil }
            s.reserved += 1
            s.next += 1
            return s.next
        }
    }

    func register(_ id: UInt64, _ outbox: StreamOutbox) { state.withLock { $0.open[id] = outbox } }

    /// Releases a reserved id (the stream ended).
    func remove(_ id: UInt64) {
        state.withLock { s in
            s.open.removeValue(forKey: id)
            s.reserved -= 1
        }
    }

    /// A one-way message from the peer: an acknowledgement or abort of one of these streams.
    /// Anything else (or a stream no longer open) is dropped.
    func deliver(_ message: Message) {
        switch message {
        case .streamAck(let a): state.withLock { $0.open[a.streamID] }?.acknowledged(a.acknowledged, final: a.final)
        case .streamAbort(let c): state.withLock { $0.open[c.streamID] }?.aborted(c.reason)
        default: break
        }
    }

    func failAll(_ error: StreamError) {
        for o in state.withLock({ Array($0.open.values) }) { o.failed(error) }
    }
}
