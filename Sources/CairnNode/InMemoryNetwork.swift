public import CairnCore
public import CairnWire

/// A network without sockets for nodes in one process: internode requests travel as values, on
/// the nodes' clock, with delay, loss, duplication and partitions decided by one seeded
/// generator (reordering follows from independent delays). The seam the simulator runs the real
/// node code over; `transport(for:)` gives each node its `Transport`.
///
/// Semantics, chosen to match what a node sees over TCP:
/// - a request to a node that is not attached (crashed, not started) or refused (`refuse`)
///   fails at once as not sent (a refused connection), and `downReasons` reports it;
/// - a cut link (`cut(from:to:)`, one way) and a lost message are silent: the caller waits until
///   its deadline (`timedOut`, outcome unknown), as across a partition;
/// - each direction of a request is delayed by a duration drawn from `faults.delay`; a
///   duplicated request reaches the receiver twice and only its first reply counts;
/// - a one-way message (`cast`) meets the same faults as a request (refused, cut, lost, delayed,
///   duplicated, held while paused); it is dispatched with a responder that drops the answer;
/// - a stream is a TCP connection of its own: its messages are never lost, duplicated or
///   reordered. Each is delayed by a draw from `faults.delay` but never overtakes the one before;
///   a cut link, or a paused end, holds them (the stream stalls: the sender blocks at its window)
///   until `heal`/`resume`. Opening to a node that is detached or refused (either end) fails at
///   once (`notSent`); detaching or refusing either end fails its open streams at once (`lost`
///   at the sender, `cancelled` at the receiver's sink). An open that gets no answer in time
///   (held by a cut) fails `timedOut` and is cancelled.
///
/// Thread-safe. Fault decisions are drawn in the order `send`, `cast` and stream messages are
/// posted.
public final class InMemoryNetwork: Sendable {
    public struct Faults: Sendable, Hashable {
        /// Probability that a request, or its reply, is lost (each drawn separately).
        public var loss: Double = 0
        /// Probability that a request is delivered twice.
        public var duplication: Double = 0
        /// The one-way delay of every message, drawn uniformly from this range.
        public var delay: ClosedRange<Duration> = .zero ... .zero
        public init() {}
    }

    private struct State {
        var nodes: [NodeName: any RequestDispatcher] = [:]
        /// Every node ever attached: the members a transport knows, running or not.
        var known: Set<NodeName> = []
        /// The address each node was attached under (a join names its seed by address).
        var addresses: [HostPort: NodeName] = [:]
        var cut: Set<Link> = []
        /// Nodes whose connections are refused both ways (a firewall that rejects: peers see
        /// them down at once), though they keep running.
        var refusing: Set<NodeName> = []
        /// Paused nodes (a stopped process: SIGSTOP), with the deliveries held for them.
        var paused: Set<NodeName> = []
        var faults: Faults
        var rng: SplitMix64
        var delivered = 0
        var dropped = 0
        var nextStreamID: UInt64 = 0
        var streams: [UInt64: MemoryStream] = [:]
        /// Bumped by every change of cuts, refusals, pauses and attachments (and closed lanes).

        mutating func drawDelay() -> Duration {
            let r = faults.delay
            let span = r.upperBound - r.lowerBound
            return span <= .zero ? r.lowerBound : r.lowerBound + span * rng.nextDouble()
        }
    }

    fileprivate struct Link: Hashable {
        let from: NodeName
        let to: NodeName
    }

    public let clock: any NodeClock
    /// The executor the network's own tasks (delays, deliveries) prefer: a simulation's, so they
    /// run in its seeded order; nil: the default pool.
    fileprivate let executor: (any TaskExecutor)?
    private let state: Locked<State>
    /// Notified on every change of cuts, refusals, pauses or attachments (what held messages and
    /// stalled streams wait on).
    private let flow = Condition()

    public init(clock: any NodeClock, seed: UInt64, faults: Faults = Faults(), executor: (any TaskExecutor)? = nil) {
        self.clock = clock
        self.executor = executor
        state = Locked(State(faults: faults, rng: SplitMix64(seed: seed)))
    }

    // MARK: Topology and faults

    /// Makes `node` reachable: requests to it go to `dispatcher` (its router).
    public func attach(_ node: NodeName, _ dispatcher: any RequestDispatcher, address: HostPort? = nil) {
        state.withLock { s in
            s.nodes[node] = dispatcher
            s.known.insert(node)
            if let address { s.addresses[address] = node }
        }
        changed()
    }

    /// Makes `node` unreachable, as a crashed process: requests to it are refused. With
    /// `dispatcher`, only if that is what is attached under the name (a stopping process never
    /// detaches the one restarted under its name).
    public func detach(_ node: NodeName, ifAttached dispatcher: (any RequestDispatcher & AnyObject)? = nil) {
        let detached: Bool = state.withLock { s in
            if let dispatcher, let current = s.nodes[node], (current as AnyObject) !== dispatcher { return false }
            return s.nodes.removeValue(forKey: node) != nil
        }
        // A stopping process must not touch the streams of the one restarted under its name.
        guard detached else { return }
        failStreams(touching: node, "\(node) is not running")
        changed()
    }

    /// Cuts the link from `from` to `to` (one way): their messages are lost silently.
    public func cut(from: NodeName, to: NodeName) {
        _ = state.withLock { $0.cut.insert(Link(from: from, to: to)) }
        changed()
    }

    /// Makes every connection to or from `node` refused until `heal()`: peers see it down and
    /// certainly do not deliver to it; it keeps running (clients in process still reach it).
    public func refuse(_ node: NodeName) {
        _ = state.withLock { $0.refusing.insert(node) }
        failStreams(touching: node, "\(node) refuses connections")
        changed()
    }

    /// Stalls `node`'s network path: its connections stay up, but nothing reaches it and nothing
    /// leaves it — every message to it, and every reply from it, is held until `resume`, then
    /// delivered (its callers may have timed out by then). Its own code keeps running; to stop
    /// the node itself as SIGSTOP does, pause its simulation lane (`SimulatedCluster.pause`).
    public func pause(_ node: NodeName) {
        _ = state.withLock { $0.paused.insert(node) }
        changed()
    }

    /// Ends `pause(node)`: held messages go on.
    public func resume(_ node: NodeName) {
        _ = state.withLock { $0.paused.remove(node) }
        changed()
    }

    /// Returns once `node` is not paused (at once if it is not).
    public func waitWhilePaused(_ node: NodeName) async {
        _ = await flow.wait(until: { state.withLock { !$0.paused.contains(node) } })
    }

    /// Restores every cut link and refused node, and resumes every paused one.
    public func heal() {
        state.withLock { s in
            s.cut.removeAll()
            s.refusing.removeAll()
            s.paused.removeAll()
        }
        changed()
    }

    public func setFaults(_ faults: Faults) {
        state.withLock { $0.faults = faults }
    }

    /// Messages delivered and messages lost (cut links and loss) so far.
    public var counts: (delivered: Int, dropped: Int) { state.withLock { ($0.delivered, $0.dropped) } }

    /// Sends `message` from `from` to whichever node was attached under `address`, as `send`.
    func send(from: NodeName, toAddress address: HostPort, _ message: Message, timeoutMillis: UInt32) async throws(ConnectionError) -> Message {
        guard let to = state.withLock({ $0.addresses[address] }) else { throw .notSent("nothing listens on \(address)") }
        return try await send(from: from, to: to, message, timeoutMillis: timeoutMillis)
    }

    /// `node`'s view of the network; its streams follow `streams` and count in `metrics`.
    func transport(for node: NodeName, streams: StreamSettings = StreamSettings(), metrics: NodeMetrics? = nil) -> some Transport {
        Endpoint(network: self, me: node, streams: streams, metrics: metrics)
    }

    /// Streams open now (either end not yet ended).
    public var openStreams: Int { state.withLock { $0.streams.count } }

    // MARK: Delivery

    /// What happens to one request (drawn by `plan`, in call order).
    struct Plan {
        var target: (any RequestDispatcher)?
        var requestLost: Bool
        var replyLost: Bool
        var duplicate: Bool
        var requestDelay: Duration
        var replyDelay: Duration
    }

    func plan(from: NodeName, to: NodeName) -> Plan {
        state.withLock { s in
            let out = !s.cut.contains(Link(from: from, to: to))
            let back = !s.cut.contains(Link(from: to, to: from))
            func chance(_ p: Double) -> Bool { p > 0 && s.rng.nextDouble() < p }
            func delay() -> Duration { s.drawDelay() }
            let reachable = !s.refusing.contains(to) && !s.refusing.contains(from)
            let plan = Plan(target: reachable ? s.nodes[to] : nil, requestLost: !out || chance(s.faults.loss), replyLost: !back || chance(s.faults.loss),
                            duplicate: chance(s.faults.duplication), requestDelay: delay(), replyDelay: delay())
            if plan.target != nil {
                if plan.requestLost { s.dropped += 1 } else { s.delivered += plan.duplicate ? 2 : 1 }
            }
            return plan
        }
    }

    fileprivate func send(from: NodeName, to: NodeName, _ message: Message, timeoutMillis: UInt32) async throws(ConnectionError) -> Message {
        let p = plan(from: from, to: to)
        guard let target = p.target else { throw .notSent("\(to) refused the connection") }
        let reply = OneShot<Message?>()
        let clock = clock
        let deadline = clock.now().advanced(by: .milliseconds(Int64(timeoutMillis)))
        let executor = executor
        let timer = Task(executorPreference: executor) {
            try? await clock.sleep(until: deadline)
            reply.deliver(nil)
        }
        defer { timer.cancel() }
        if !p.requestLost {
            let (replyLost, replyDelay) = (p.replyLost, p.replyDelay)
            let deliveries = p.duplicate ? 2 : 1
            let courier = Task(executorPreference: executor) {
                do { try await clock.sleep(for: p.requestDelay) } catch { return }
                await self.waitWhilePaused(from)
                await self.waitWhilePaused(to)
                for _ in 0..<deliveries {
                    target.dispatch(Envelope(requestID: 0, message: message), fromPeer: true, responder: Responder(requestID: 0) { answer in
                        guard !replyLost else { return }
                        Task(executorPreference: executor) {
                            await self.waitWhilePaused(to)
                            do { try await clock.sleep(for: replyDelay) } catch { return }
                            reply.deliver(answer)
                        }
                    })
                }
            }
            _ = courier
        }
        guard let answer = await reply.wait(onCancel: nil) else {
            if Task.isCancelled { throw .abandoned }
            throw .timedOut(afterMillis: timeoutMillis)
        }
        return answer
    }

    /// Whether `from` can connect to `node` now.
    fileprivate func isReachable(_ node: NodeName, from: NodeName) -> Bool {
        state.withLock { $0.nodes[node] != nil && !$0.refusing.contains(node) && !$0.refusing.contains(from) }
    }
    /// (peers known, peers running), `node` excluded.
    fileprivate func peers(of node: NodeName) -> (known: Int, running: Int) {
        state.withLock { s in (s.known.count { $0 != node }, s.nodes.keys.count { $0 != node }) }
    }
}

/// One node's `Transport` on an `InMemoryNetwork`.
private struct Endpoint: Transport {
    let network: InMemoryNetwork
    let me: NodeName
    let streams: StreamSettings
    let metrics: NodeMetrics?

    func send(to node: NodeName, _ message: Message, timeoutMillis: UInt32) async throws(ConnectionError) -> Message {
        try await network.send(from: me, to: node, message, timeoutMillis: timeoutMillis)
    }

    func cast(to node: NodeName, _ message: Message) {
        network.cast(from: me, to: node, message)
    }

    func openStream(to node: NodeName, kind: StreamKind, header: [UInt8], timeoutMillis: UInt32) async throws(StreamError) -> any OutboundStream {
        try await network.openStream(from: me, to: node, kind: kind, header: header, settings: streams, metrics: metrics, timeoutMillis: timeoutMillis)
    }

    func downReasons(_ nodes: [NodeName]) -> [NodeName: String] {
        var out: [NodeName: String] = [:]
        for n in nodes where !network.isReachable(n, from: me) { out[n] = "\(n) refuses connections" }
        return out
    }

    var peerCount: Int { network.peers(of: me).known }
    var upCount: Int { network.peers(of: me).running }
    var triedEveryPeer: Bool { true }
    func dropConnections() {}
}

// MARK: One-way messages and streams

extension InMemoryNetwork {
    fileprivate func cast(from: NodeName, to: NodeName, _ message: Message) {
        let p = plan(from: from, to: to)
        guard let target = p.target, !p.requestLost else { return }
        let (clock, deliveries) = (clock, p.duplicate ? 2 : 1)
        Task(executorPreference: executor) {
            do { try await clock.sleep(for: p.requestDelay) } catch { return }
            await self.waitWhilePaused(from)
            await self.waitWhilePaused(to)
            for _ in 0..<deliveries {
                target.dispatch(Envelope(requestID: 0, message: message), fromPeer: true, responder: .discarding)
            }
        }
    }

    fileprivate func openStream(from: NodeName, to: NodeName, kind: StreamKind, header: [UInt8], settings: StreamSettings,
                                metrics: NodeMetrics?, timeoutMillis: UInt32) async throws(StreamError) -> any OutboundStream {
        enum Opening { case refused, tooMany, opened(MemoryStream, any RequestDispatcher) }
        let opening: Opening = state.withLock { s in
            guard let target = s.nodes[to], !s.refusing.contains(to), !s.refusing.contains(from) else { return .refused }
            guard s.streams.values.count(where: { $0.from == from && $0.to == to }) < settings.maxStreamsPerPeer else { return .tooMany }
            s.nextStreamID += 1
            let stream = MemoryStream(network: self, id: s.nextStreamID, from: from, to: to, settings: settings, metrics: metrics)
            s.streams[stream.id] = stream
            return .opened(stream, target)
        }
        let stream: MemoryStream, target: any RequestDispatcher
        switch opening {
        case .refused: throw .connection(.notSent("\(to) refused the connection"))
        case .tooMany:
            metrics?.streamsRefused.increment()
            throw .tooManyStreams(limit: settings.maxStreamsPerPeer)
        case .opened(let s, let t): (stream, target) = (s, t)
        }
        metrics?.streamsOut.opened()
        let (id, executor, queueLimit) = (stream.id, executor, settings.receiverQueueLimit)
        let request = InboundStreamRequest(from: from, kind: kind, header: header, remote: nil)
        stream.forward.post {
            switch target.acceptStream(request) {
            case .success(let sink):
                let backward = stream.backward
                let inbox = StreamInbox(sink: sink, queueLimit: queueLimit, executor: executor, signal: { signal in
                    backward.post { self.toSender(id, signal) }
                }, onTerminal: {
                    self.ended(id, sender: false)
                })
                if !stream.adopt(inbox) { inbox.linkFailed("the stream failed before it was accepted") }
                backward.post { stream.accepted.deliver(.success(())) }
            case .failure(let e):
                self.ended(id, sender: false)
                stream.backward.post { stream.accepted.deliver(.failure(.refused(e))) }
            }
        }
        let clock = clock
        let deadline = clock.now().advanced(by: .milliseconds(Int64(timeoutMillis)))
        let timer = Task(executorPreference: executor) {
            try? await clock.sleep(until: deadline)
            stream.accepted.deliver(nil)
        }
        defer { timer.cancel() }
        switch await stream.accepted.wait(onCancel: nil) {
        case .success?:
            return stream.outbox
        case .failure(let e)?:
            stream.outbox.failed(e)
            throw e
        case nil:
            let error: ConnectionError = Task.isCancelled ? .abandoned : .timedOut(afterMillis: timeoutMillis)
            stream.outbox.cancel("the open failed: \(error)")
            throw .connection(error)
        }
    }

    /// A message from the sender reached the receiving end.
    fileprivate func toReceiver(_ id: UInt64, _ outgoing: StreamOutbox.Outgoing) {
        guard let inbox = state.withLock({ $0.streams[id] })?.currentInbox else { return }
        switch outgoing {
        case .chunk(let bytes): inbox.deliver(.chunk(bytes))
        case .end(let n): inbox.deliver(.end(chunkCount: n))
        case .cancel(let reason): inbox.deliver(.cancel(reason))
        }
    }

    /// A signal from the receiver reached the sending end.
    fileprivate func toSender(_ id: UInt64, _ signal: StreamInbox.Signal) {
        guard let outbox = state.withLock({ $0.streams[id] })?.outbox else { return }
        switch signal {
        case .ack(let n, let final): outbox.acknowledged(n, final: final)
        case .abort(let reason): outbox.aborted(reason)
        }
    }

    /// One end of stream `id` ended; once both have, the stream is forgotten and its lanes close.
    fileprivate func ended(_ id: UInt64, sender: Bool) {
        let finished: MemoryStream? = state.withLock { s in
            guard let stream = s.streams[id], stream.markEnded(sender: sender) else { return nil }
            s.streams.removeValue(forKey: id)
            return stream
        }
        finished?.close()
    }

    /// Fails every stream with `node` at either end, at once (a refused or dead connection).
    fileprivate func failStreams(touching node: NodeName, _ reason: String) {
        let doomed: [MemoryStream] = state.withLock { s in
            let hit = s.streams.values.filter { $0.from == node || $0.to == node }
            for d in hit { s.streams.removeValue(forKey: d.id) }
            return hit.sorted { $0.id < $1.id }
        }
        for d in doomed {
            d.accepted.deliver(.failure(.lost(reason)))
            d.outbox.failed(.lost(reason))
            d.fail(reason)
            d.close()
        }
    }

    /// Wakes everything waiting for a change of cuts, refusals, pauses or attachments.
    fileprivate func changed() { flow.notifyAll() }

    /// Returns once the link from `from` to `to` is neither cut nor paused at either end, or
    /// `stop()` holds (checked after every change).
    fileprivate func waitUntilFlowing(from: NodeName, to: NodeName, unless stop: @Sendable () -> Bool) async {
        _ = await flow.wait(until: {
            stop() || state.withLock { s in !s.paused.contains(from) && !s.paused.contains(to) && !s.cut.contains(Link(from: from, to: to)) }
        })
    }

    fileprivate func nextDelay() -> Duration { state.withLock { $0.drawDelay() } }
}

/// One direction of an in-memory stream: messages delivered in order, each after its drawn
/// delay but never before the one ahead of it, held while the link is cut or an end paused.
/// One task per lane (on the network's executor) until `close`; a closed lane drops what it holds.
private final class Lane: Sendable {
    private typealias Item = (at: ContinuousClock.Instant, action: @Sendable () -> Void)
    private let network: InMemoryNetwork
    private let items: AsyncStream<Item>.Continuation
    private let last = Locked<ContinuousClock.Instant?>(nil)
    private let closed = Locked(false)

    init(network: InMemoryNetwork, from: NodeName, to: NodeName) {
        self.network = network
        let (stream, continuation) = AsyncStream.makeStream(of: Item.self)
        items = continuation
        let closed = closed
        let clock = network.clock
        Task(executorPreference: network.executor) {
            for await item in stream {
                do { try await clock.sleep(until: item.at) } catch { return }
                await network.waitUntilFlowing(from: from, to: to) { closed.value }
                if closed.value { return }
                item.action()
            }
        }
    }

    func post(_ action: @escaping @Sendable () -> Void) {
        let delay = network.nextDelay()
        let now = network.clock.now()
        let at = last.withLock { last in
            let at = max(last ?? now, now.advanced(by: delay))
            last = at
            return at
        }
        items.yield((at, action))
    }

    func close() {
        closed.withLock { $0 = true }
        items.finish()
        network.changed()
    }
}

/// One in-memory stream: its two lanes, the sender's outbox, the receiver's inbox once accepted,
/// and which ends have ended. Thread-safe.
private final class MemoryStream: Sendable {
    let id: UInt64
    let from: NodeName
    let to: NodeName
    let forward: Lane
    let backward: Lane
    let outbox: StreamOutbox
    /// The open's outcome: accepted, refused, failed; nil when the opener's deadline passed.
    let accepted = OneShot<Result<Void, StreamError>?>()
    private let state = Locked<(inbox: StreamInbox?, failed: String?, sender: Bool, receiver: Bool)>((nil, nil, false, false))

    init(network: InMemoryNetwork, id: UInt64, from: NodeName, to: NodeName, settings: StreamSettings, metrics: NodeMetrics?) {
        self.id = id
        self.from = from
        self.to = to
        let forward = Lane(network: network, from: from, to: to)
        self.forward = forward
        backward = Lane(network: network, from: to, to: from)
        outbox = StreamOutbox(id: id, settings: settings, transmit: { [weak network] _, outgoing in
            let target = network
            forward.post { target?.toReceiver(id, outgoing) }
        }, onWindowWait: {
            metrics?.streamWindowWaits.increment()
        }, onTerminal: { [weak network] in
            metrics?.streamsOut.closed()
            network?.ended(id, sender: true)
        })
    }

    var currentInbox: StreamInbox? { state.withLock { $0.inbox } }

    /// Keeps the receiver's inbox; false if the stream already failed.
    func adopt(_ inbox: StreamInbox) -> Bool {
        state.withLock { s in
            guard s.failed == nil else { return false }
            s.inbox = inbox
            return true
        }
    }

    /// Records that one end ended; true when both have.
    func markEnded(sender: Bool) -> Bool {
        state.withLock { s in
            if sender { s.sender = true } else { s.receiver = true }
            return s.sender && s.receiver
        }
    }

    /// The link failed: the receiver's sink is cancelled.
    func fail(_ reason: String) {
        let inbox: StreamInbox? = state.withLock { s in
            s.failed = reason
            return s.inbox
        }
        inbox?.linkFailed(reason)
    }

    func close() {
        forward.close()
        backward.close()
    }
}
