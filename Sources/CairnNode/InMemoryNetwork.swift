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
///   duplicated request reaches the receiver twice and only its first reply counts.
///
/// Thread-safe. Fault decisions are drawn in the order `send` is called.
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
        var cut: Set<Link> = []
        /// Nodes whose connections are refused both ways (a firewall that rejects: peers see
        /// them down at once), though they keep running.
        var refusing: Set<NodeName> = []
        /// Paused nodes (a stopped process: SIGSTOP), with the deliveries held for them.
        var paused: [NodeName: [CheckedContinuation<Void, Never>]] = [:]
        var faults: Faults
        var rng: SplitMix64
        var delivered = 0
        var dropped = 0
    }

    private struct Link: Hashable {
        let from: NodeName
        let to: NodeName
    }

    public let clock: any NodeClock
    /// The executor the network's own tasks (delays, deliveries) prefer: a simulation's, so they
    /// run in its seeded order; nil: the default pool.
    private let executor: (any TaskExecutor)?
    private let state: Locked<State>

    public init(clock: any NodeClock, seed: UInt64, faults: Faults = Faults(), executor: (any TaskExecutor)? = nil) {
        self.clock = clock
        self.executor = executor
        state = Locked(State(faults: faults, rng: SplitMix64(seed: seed)))
    }

    // MARK: Topology and faults

    /// Makes `node` reachable: requests to it go to `dispatcher` (its router).
    public func attach(_ node: NodeName, _ dispatcher: any RequestDispatcher) {
        state.withLock { s in
            s.nodes[node] = dispatcher
            s.known.insert(node)
        }
    }

    /// Makes `node` unreachable, as a crashed process: requests to it are refused. With
    /// `dispatcher`, only if that is what is attached under the name (a stopping process never
    /// detaches the one restarted under its name).
    public func detach(_ node: NodeName, ifAttached dispatcher: (any RequestDispatcher)? = nil) {
        state.withLock { s in
            if let dispatcher, let current = s.nodes[node], (current as AnyObject) !== (dispatcher as AnyObject) { return }
            s.nodes.removeValue(forKey: node)
        }
    }

    /// Cuts the link from `from` to `to` (one way): their messages are lost silently.
    public func cut(from: NodeName, to: NodeName) {
        _ = state.withLock { $0.cut.insert(Link(from: from, to: to)) }
    }

    /// Makes every connection to or from `node` refused until `heal()`: peers see it down and
    /// certainly do not deliver to it; it keeps running (clients in process still reach it).
    public func refuse(_ node: NodeName) {
        _ = state.withLock { $0.refusing.insert(node) }
    }

    /// Pauses `node` as SIGSTOP would: its connections stay up, but nothing reaches it and nothing
    /// leaves it — every message to it, and every reply from it, is held until `resume`, then
    /// delivered (its callers may have timed out by then). Its own timers keep running: the
    /// network stalls, not the node's code.
    public func pause(_ node: NodeName) {
        state.withLock { s in
            if s.paused[node] == nil { s.paused[node] = [] }
        }
    }

    /// Ends `pause(node)`: held messages go on.
    public func resume(_ node: NodeName) {
        let held = state.withLock { $0.paused.removeValue(forKey: node) } ?? []
        for c in held { c.resume() }
    }

    /// Returns once `node` is not paused (at once if it is not).
    public func waitWhilePaused(_ node: NodeName) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now: Bool = state.withLock { s in
                guard s.paused[node] != nil else { return true }
                s.paused[node, default: []].append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    /// Restores every cut link and refused node, and resumes every paused one.
    public func heal() {
        let held: [CheckedContinuation<Void, Never>] = state.withLock { s in
            s.cut.removeAll()
            s.refusing.removeAll()
            defer { s.paused = [:] }
            return s.paused.values.flatMap { $0 }
        }
        for c in held { c.resume() }
    }

    public func setFaults(_ faults: Faults) {
        state.withLock { $0.faults = faults }
    }

    /// Messages delivered and messages lost (cut links and loss) so far.
    public var counts: (delivered: Int, dropped: Int) { state.withLock { ($0.delivered, $0.dropped) } }

    /// `node`'s view of the network.
    func transport(for node: NodeName) -> some Transport { Endpoint(network: self, me: node) }

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
            func delay() -> Duration {
                let r = s.faults.delay
                let span = r.upperBound - r.lowerBound
                return span <= .zero ? r.lowerBound : r.lowerBound + span * s.rng.nextDouble()
            }
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

    func send(to node: NodeName, _ message: Message, timeoutMillis: UInt32) async throws(ConnectionError) -> Message {
        try await network.send(from: me, to: node, message, timeoutMillis: timeoutMillis)
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
