import CairnAntiEntropy
import CairnCore
import CairnRing
import CairnWire
import Logging

/// What a request works with, from `CairnNode.start` on: the cluster view current when the
/// request began (one request sees one view), the transport and the coordinators' context.
struct Activation: Sendable {
    let view: ClusterView
    let transport: any Transport
    let coordinatorContext: CoordinatorContext
}

/// What the node's background services (hints, anti-entropy) share: who they are, how they
/// reach peers, the store and the ring, and where they report. Thread-safe; the closures read
/// the node's current state each call.
struct NodeServices: Sendable {
    let me: NodeName
    let limits: Limits
    let transport: any Transport
    let clock: any NodeClock
    let metrics: NodeMetrics
    let logger: Logger
    let requestTimeoutMillis: UInt32
    let storage: @Sendable () -> (any PartitionStore)?
    let ring: @Sendable () -> RingState?
    /// Whether the failure detector holds `node` alive and the transport reaches it.
    let reachable: @Sendable (NodeName) -> Bool
}

/// The parts of the node that exist only after `CairnNode.start`.
struct Wiring: Sendable {
    let views: ClusterViews
    let transport: any Transport
    let coordinatorContext: CoordinatorContext
}

/// State and request handling shared by the node's shells. Thread-safe.
final class NodeCore: Sendable {
    let config: NodeConfig
    let metrics: NodeMetrics
    let logger: Logger
    let vnodes = VnodeTable()
    let requests: RequestService
    /// The node's lifecycle and its service-manager notifications, in one machine.
    let lifecycle: ServiceNotifier
    private let wiring = Locked<Wiring?>(nil)

    /// The storage backend and the actor identity that goes with it; set once, when the backend
    /// is open (at init for a given or in-memory backend, in `bind()` for the disk engine).
    struct Storage: Sendable {
        let backend: any PartitionStore
        let actor: ActorID
    }
    private let storage = Locked<Storage?>(nil)

    /// Present only under `cairnd --test-fault-injection`.
    let faults: TransportFaults?
    /// The node's time (deadlines, backoffs, waits, write timestamps). Request latency metrics
    /// stay on the machine's clock: they observe, they decide nothing.
    let clock: any NodeClock

    /// Draws actor epochs (seeded in simulations).
    let epochs: EpochSource
    /// Where the node's unstructured tasks run (nil: the global pool). Unstructured tasks do not
    /// inherit a task executor preference, so a simulated node names its lane here: its pulls,
    /// handoff shells and their timers then run in the simulation's seeded order, and stop while
    /// the node is paused.
    let taskExecutor: (any TaskExecutor)?

    /// The handler of each stream kind this node accepts (`CairnNode.acceptStreams`).
    let streamAcceptors = Locked<[StreamKind: StreamAcceptor]>([:])
    /// Streams open from each peer now (bounded by `transport.max_streams_per_peer`).
    let inboundStreams = Locked<[NodeName: Int]>([:])

    /// The failure detector's view of the members (request routing reads it).
    let liveness = Liveness()
    private let agent = Locked<MembershipAgent?>(nil)
    /// Failure detection, ring gossip and the claimant's duties; set by `CairnNode.start`.
    var membership: MembershipAgent? {
        get { agent.value }
        set { agent.withLock { $0 = newValue } }
    }
    private let handoffBox = Locked<HandoffManager?>(nil)
    /// This node's side of the plan's transfers; set by `CairnNode.start`.
    var handoff: HandoffManager? {
        get { handoffBox.value }
        set { handoffBox.withLock { $0 = newValue } }
    }
    /// The client/internode address this node advertises: its `cluster.members` entry, else what
    /// `bind()` bound (a kernel-chosen port resolved), else `node.listen`.
    let boundClient = Locked<HostPort?>(nil)
    var advertised: HostPort {
        if config.members.contains(where: { $0.name == config.name }) { return config.advertised }
        return boundClient.value ?? config.advertised
    }
    /// How this node reaches a node by address (set by `CairnNode`).
    let dialer = Locked<Dialer?>(nil)

    init(config: NodeConfig, backend: (any PartitionStore)?, logger: Logger, faults: TransportFaults? = nil,
         clock: any NodeClock = SystemClock(), epochs: EpochSource = EpochSource(), notify: any NotifySink = SystemdNotifySink(),
         taskExecutor: (any TaskExecutor)? = nil) {
        self.config = config
        self.taskExecutor = taskExecutor
        coordinatesDirectly = taskExecutor == nil && clock is SystemClock
        lifecycle = ServiceNotifier(sink: notify)
        self.epochs = epochs
        self.clock = clock
        self.faults = faults
        self.logger = logger
        metrics = NodeMetrics(maxInflight: config.maxInflightRequests)
        requests = RequestService(limit: config.maxInflightRequests, metrics: metrics)
        if let backend { adopt(backend) }
    }

    /// Installs the opened backend. The actor epoch comes from the backend when it keeps one;
    /// a node whose data does not survive restarts must never reuse its dots: fresh epoch.
    func adopt(_ backend: any PartitionStore) {
        let epoch = backend.persistentEpoch ?? epochs.next()
        storage.withLock { $0 = Storage(backend: backend, actor: ActorID(node: config.name.value, epoch: epoch)) }
    }

    var opened: Storage? { storage.value }
    var backend: (any PartitionStore)? { storage.value?.backend }

    var state: NodeState { lifecycle.state }

    var view: ClusterView? { wiring.value?.views.current }

    func activate(_ w: Wiring) { wiring.withLock { $0 = w } }

    var views: ClusterViews? { wiring.value?.views }

    /// The activation for a request starting now (nil before `start`).
    var current: Activation? {
        wiring.value.map { Activation(view: $0.views.current, transport: $0.transport, coordinatorContext: $0.coordinatorContext) }
    }

    // MARK: Request handling

    func handle(_ message: Message, fromPeer: Bool, responder: Responder) async {
        guard let a = current else {
            return responder.fail(ErrorReply(code: .notReady, message: "node \(config.name) is starting"))
        }
        if message.type.isData, !a.view.isMember {
            return responder.fail(ErrorReply(code: .notReady, message:
                "node \(config.name) is not a member of a cluster yet; stage its join: cairn --node \(config.advertised) cluster join SEED"))
        }
        switch message {
        case .get(let g):
            await coordinateGet(g, a, responder)
        case .put(let p):
            await coordinateWrite(.put, key: p.key, sibling: Sibling(value: p.value, timestampMillis: clock.wallMillis()),
                                  context: p.context, options: p.options, forwarded: p.forwarded, original: message, a, responder)
        case .delete(let d):
            await coordinateWrite(.delete, key: d.key, sibling: .tombstone(timestampMillis: clock.wallMillis()),
                                  context: d.context, options: d.options, forwarded: d.forwarded, original: message, a, responder)
        case .members:
            responder.reply(.membersReply(members(a)))
        case .admin(let request):
            responder.reply(await admin(request, a))
        case .clusterStatePull where fromPeer:
            guard let bytes = membership?.encodedState else {
                return responder.fail(ErrorReply(code: .notReady, message: "node \(config.name) has not joined a cluster"))
            }
            responder.reply(.clusterState(bytes))
        case .replicaGet(let r) where fromPeer && r.fallback:
            guard a.view.partition(forKey: r.key) == r.partition else { return responder.fail(wrongPartition(r.partition)) }
            // A fallback that holds nothing for the partition has no copy: not found.
            guard let vnode = vnodes.fallback(for: r.partition) else { return responder.reply(.replicaGetReply(ReplicaGetReply(object: nil))) }
            do throws(VnodeError) {
                responder.reply(.replicaGetReply(ReplicaGetReply(object: try await vnode.get(r.key))))
            } catch {
                responder.fail(ErrorReply(code: .storage, message: error.description))
            }
        case .replicaPut(let r) where fromPeer && r.fallback:
            guard a.view.partition(forKey: r.key) == r.partition else { return responder.fail(wrongPartition(r.partition)) }
            guard let vnode = await fallbackVnode(r.partition) else {
                return responder.fail(ErrorReply(code: .notReady, message: "node \(config.name) could not start its fallback vnode for partition \(r.partition.index)"))
            }
            do throws(VnodeError) {
                let merged = try await vnode.merge(key: r.key, object: r.object)
                guard await handoff?.forward(partition: r.partition.fallbackSpace, key: r.key, object: merged) != false else {
                    return responder.fail(ErrorReply(code: .notAReplica, message:
                        "node \(config.name) was handing its fallback copy of partition \(r.partition.index) to the primaries during the write"))
                }
                metrics.fallbackWrites.increment()
                responder.reply(replicaPutAck)
            } catch {
                responder.fail(ErrorReply(code: .storage, message: error.description))
            }
        case .antiEntropy(let bytes) where fromPeer:
            await serveAntiEntropy(bytes, responder)
        case .replicaGet(let r) where fromPeer:
            guard a.view.partition(forKey: r.key) == r.partition else { return responder.fail(wrongPartition(r.partition)) }
            guard let vnode = await vnodeCatchingUp(r.partition) else { return await relay(message, partition: r.partition, a, responder) }
            do throws(VnodeError) {
                answerReplicaGet(r.partition, try await vnode.get(r.key), responder)
            } catch {
                responder.fail(ErrorReply(code: .storage, message: error.description))
            }
        case .replicaPut(let r) where fromPeer:
            guard a.view.partition(forKey: r.key) == r.partition else { return responder.fail(wrongPartition(r.partition)) }
            guard let vnode = await vnodeCatchingUp(r.partition) else { return await relay(message, partition: r.partition, a, responder) }
            do throws(VnodeError) {
                await acknowledgeReplicaPut(r, merged: try await vnode.merge(key: r.key, object: r.object), responder)
            } catch {
                responder.fail(ErrorReply(code: .storage, message: error.description))
            }
        default:
            responder.fail(ErrorReply(code: .unknownMessage, message: "\(message.type) is not accepted here"))
        }
    }

    /// Serves an ordinary replica get or put straight from the event loop, without a task: a get
    /// that memory answers is answered here (`Vnode.getInMemory`); otherwise the
    /// partition's store thread reads or merges and answers (`Vnode.getSoon`, `mergeSoon`), and
    /// a put's acknowledgement leaves from the thread that ended its durability wait. Counted
    /// in flight like any request. False: not an ordinary case (a fallback copy, no vnode here,
    /// another partition, a store that runs no closures, the bound reached); `handle` serves it.
    func serveReplicaDirectly(_ message: Message, responder: Responder) -> Bool {
        let started: Bool
        switch message {
        case .replicaGet(let r) where !r.fallback:
            guard let vnode = directVnode(r.partition, key: r.key), requests.begin() else { return false }
            if case .answered(let object) = vnode.getInMemory(r.key) {
                answerReplicaGet(r.partition, object, responder)
                requests.end()
                metrics.memoryReadsReplica.increment()
                metrics.directReplicaRequests.increment()
                return true
            }
            started = vnode.getSoon(r.key) { [self] result in
                switch result {
                case .success(let object): answerReplicaGet(r.partition, object, responder)
                case .failure(let error): responder.fail(ErrorReply(code: .storage, message: error.description))
                }
                requests.end()
            }
        case .replicaPut(let r) where !r.fallback:
            guard let vnode = directVnode(r.partition, key: r.key), requests.begin() else { return false }
            started = vnode.mergeSoon(key: r.key, object: r.object) { [self] result in
                switch result {
                case .failure(let error):
                    responder.fail(ErrorReply(code: .storage, message: error.description))
                    requests.end()
                case .success where handoff?.forwardsNothing(partition: r.partition) ?? true:
                    responder.reply(replicaPutAck)
                    requests.end()
                case .success(let merged):
                    // The partition is being handed off: forwarding waits on the network.
                    Task(executorPreference: taskExecutor) { [self] in
                        await acknowledgeReplicaPut(r, merged: merged, responder)
                        requests.end()
                    }
                }
            }
        default:
            return false
        }
        if started { metrics.directReplicaRequests.increment() } else { requests.end() }
        return started
    }

    /// A replica put's acknowledgement: whether this node's copies are on stable storage.
    private var replicaPutAck: Message { .replicaPutAck(durable: backend?.acknowledgesDurably ?? false) }

    /// A primary's answer to a replica get: its copy, and whether the partition is refilling or
    /// may be stale here (then the coordinator does not count "not found" as evidence).
    private func answerReplicaGet(_ p: PartitionID, _ object: VersionedObject?, _ responder: Responder) {
        responder.reply(.replicaGetReply(ReplicaGetReply(object: object, refilling: antiEntropyState.isRefilling(p),
                                                         stale: antiEntropyState.isStale(p))))
    }

    /// Acknowledges a replica put merged (durably) into this node's primary copy; while the
    /// partition is handed off, only once the receiver took the write too.
    private func acknowledgeReplicaPut(_ r: ReplicaPut, merged: VersionedObject, _ responder: Responder) async {
        guard await handoff?.forward(partition: r.partition, key: r.key, object: merged) != false else {
            return responder.fail(ErrorReply(code: .notAReplica, message:
                "node \(config.name) handed partition \(r.partition.index) away during the write, and its new replicas did not all take it"))
        }
        responder.reply(replicaPutAck)
    }

    /// The primary vnode a direct replica request uses: present, serving without tasks, and
    /// the key in `partition` under the current view of a member; nil otherwise.
    private func directVnode(_ partition: PartitionID, key: [UInt8]) -> Vnode? {
        guard let vnode = vnodes.vnode(for: partition), vnode.servesWithoutTasks,
              let view, view.isMember, view.partition(forKey: key) == partition else { return nil }
        return vnode
    }

    /// Refill marks and saved trees (loaded when storage opens).
    let antiEntropyState = AntiEntropyState()
    private let antiEntropyBox = Locked<AntiEntropyManager?>(nil)
    /// Trees, exchanges and refills; set by `CairnNode.start`.
    var antiEntropy: AntiEntropyManager? {
        get { antiEntropyBox.value }
        set { antiEntropyBox.withLock { $0 = newValue } }
    }

    /// Answers another replica's anti-entropy question.
    private func serveAntiEntropy(_ bytes: [UInt8], _ responder: Responder) async {
        let request: AntiEntropyRequest
        do { request = try AntiEntropyCodec.decodeRequest(bytes, limits: config.limits) } catch {
            metrics.protocolErrors.increment()
            return responder.fail(ErrorReply(code: .invalidArgument, message: "malformed anti-entropy request: \(error)"))
        }
        guard let manager = antiEntropy else { return responder.fail(ErrorReply(code: .notReady, message: "node \(config.name) is starting")) }
        switch await manager.serve(request) {
        case .success(let reply): responder.reply(.antiEntropyReply(AntiEntropyCodec.encode(reply)))
        case .failure(let e): responder.fail(e)
        }
    }

    private let hintsBox = Locked<HintManager?>(nil)
    /// The hints this node keeps for primaries that missed writes; set by `CairnNode.start`.
    var hints: HintManager? {
        get { hintsBox.value }
        set { hintsBox.withLock { $0 = newValue } }
    }

    private let vnodeManagerBox = Locked<VnodeManager?>(nil)
    /// Starts and retires vnodes; set by `CairnNode.start`.
    var vnodeManager: VnodeManager? {
        get { vnodeManagerBox.value }
        set { vnodeManagerBox.withLock { $0 = newValue } }
    }

    /// This node's fallback vnode of `p`, started if none runs, once it serves (nil if it does
    /// not within a second: the node is stopping, or the vnode keeps failing).
    func fallbackVnode(_ p: PartitionID) async -> Vnode? {
        guard let v = vnodes.fallback(for: p) ?? vnodeManager?.ensureFallback(p) else { return nil }
        let deadline = clock.now() + .seconds(1)
        while !(await v.isServing) {
            guard clock.now() < deadline else { return nil }
            do { try await clock.sleep(for: .milliseconds(2)) } catch { return nil }
        }
        return v
    }

    /// This node's vnode for `p`; when it has none and never handed `p` away, the sender may
    /// hold a newer ring that makes this node a replica (a gossip round ahead of it): catches up
    /// (`catchUp`) until the vnode that ring starts is there.
    private func vnodeCatchingUp(_ p: PartitionID) async -> Vnode? {
        if let v = vnodes.vnode(for: p) { return v }
        guard vnodes.successors(of: p).isEmpty else { return nil }
        return await catchUp { self.vnodes.vnode(for: p) }
    }

    /// Pulls the claimant's ring and polls, at most `catchUpWait`, until `ready` gives a value.
    private func catchUp<T>(_ ready: () -> T?) async -> T? {
        guard let membership else { return nil }
        membership.catchUp()
        let deadline = clock.now() + Self.catchUpWait
        while clock.now() < deadline {
            do { try await clock.sleep(for: .milliseconds(10)) } catch { return nil }
            if let value = ready() { return value }
        }
        return nil
    }

    /// How long a request for a partition this node does not (yet) replicate waits for the ring
    /// that makes it one.
    static let catchUpWait: Duration = .milliseconds(500)

    /// A replica request for a partition whose vnode this node retired when the ring moved it
    /// away: its sender holds an older ring. Relayed to the nodes that replaced this one
    /// (`VnodeTable.successors`), so a coordinator a gossip round behind still reaches the copy
    /// it counts on. A write is acknowledged only when every successor acknowledged it (the one
    /// ack the coordinator counts stands for at least one durable copy); a read answers with the
    /// first successor's object. With no successor known, `notAReplica` as before.
    private func relay(_ message: Message, partition: PartitionID, _ a: Activation, _ responder: Responder) async {
        let successors = vnodes.successors(of: partition).filter { $0 != config.name }
        guard !successors.isEmpty else { return responder.fail(notAReplica(partition)) }
        metrics.relayedReplicaRequests.increment()
        let (transport, ms) = (a.transport, config.requestTimeoutMillis)
        let answers = await transport.sendToAll(successors, message, timeoutMillis: ms)
        let names = successors.map(\.value).joined(separator: ", ")
        switch message {
        case .replicaGet:
            for case .success(let reply) in answers {
                if case .replicaGetReply = reply { return responder.reply(reply) }
            }
        default:
            if answers.allSatisfy({ if case .success(.replicaPutAck) = $0 { true } else { false } }) {
                let durable = answers.allSatisfy { if case .success(.replicaPutAck(true)) = $0 { true } else { false } }
                return responder.reply(.replicaPutAck(durable: durable))
            }
        }
        let why = answers.compactMap { r -> String? in
            switch r {
            case .failure(let e): e.description
            case .success(.error(let e)): e.message
            case .success: nil
            }
        }.joined(separator: "; ")
        responder.fail(ErrorReply(code: .notAReplica, message:
            "node \(config.name) handed partition \(partition.index) to \(names), which did not all answer: \(why)"))
    }

    private func wrongPartition(_ p: PartitionID) -> ErrorReply {
        ErrorReply(code: .invalidArgument, message: "the key does not belong to partition \(p.index)")
    }

    private func notAReplica(_ p: PartitionID) -> ErrorReply {
        ErrorReply(code: .notAReplica, message: "node \(config.name) does not replicate partition \(p.index); the nodes disagree about the ring")
    }

    private func timeout(_ options: RequestOptions) -> UInt32 {
        min(options.timeoutMillis ?? config.requestTimeoutMillis, Self.maxTimeoutMillis)
    }

    /// Upper bound on any request's timeout (5 minutes).
    static let maxTimeoutMillis: UInt32 = 300_000
    /// How much longer than the request's own timeout a forwarding node or client waits.
    static let forwardMarginMillis: UInt32 = 1000

    private func coordinateGet(_ g: GetRequest, _ a: Activation, _ responder: Responder) async {
        let start = ContinuousClock.now
        let (partition, candidates) = a.view.candidates(forKey: g.key)
        let requirement: QuorumRequirement
        do {
            requirement = try QuorumRequirement(name: "R", quorum: g.options.r ?? config.defaultR,
                                                primary: g.options.pr ?? config.defaultPR, n: candidates.count(where: \.isPrimary))
        } catch {
            metrics.record(.get, .invalid, since: start)
            return responder.fail(ErrorReply(code: .invalidArgument, message: error.reason))
        }
        let coordinator = ReadCoordinator(ctx: a.coordinatorContext, requirement: requirement, partition: partition,
                                          replicas: candidates, key: g.key, timeoutMillis: timeout(g.options),
                                          sloppy: g.options.sloppy ?? config.sloppyQuorum, repair: g.options.readRepair ?? .async)
        await coordinator.run { [self] outcome in answerGet(outcome, since: start, responder) }
    }

    /// Answers a client get with its coordination's outcome.
    private func answerGet(_ outcome: ReadCoordination.ReadOutcome, since start: ContinuousClock.Instant, _ responder: Responder) {
        let limits = config.limits
        switch outcome {
        case .answered(var object):
            // Replicas each keep their object within max_object_bytes, but their merge may
            // not be: bound it so the reply fits in a frame.
            if let dropped = object?.prune(maxSiblings: limits.maxSiblingsOnDecode, maxBytes: limits.maxObjectBytes), dropped > 0 {
                metrics.siblingsPruned.increment(by: dropped)
            }
            let context = CausalContext(object?.context ?? VersionVector())
            if context.encodedCount > limits.maxContextBytes {
                metrics.record(.get, .error, since: start)
                return responder.fail(ErrorReply(code: .internalError, message:
                    "the merged context of the replicas' answers exceeds limits.max_context_bytes; the replicas disagree about too many actors"))
            }
            let siblings = object?.values ?? []
            let found = !(object?.isDeleted ?? true)
            metrics.record(.get, found ? .ok : .notFound, since: start)
            responder.reply(.getReply(GetReply(found: found, siblings: siblings, context: context)))
        case .quorumFailed(let f):
            metrics.record(.get, f.kind == .unavailable ? .unavailable : .notReached, since: start)
            responder.fail(ErrorReply(f))
        }
    }

    private func coordinateWrite(_ op: OperationKind, key: [UInt8], sibling: Sibling, context: CausalContext, options: RequestOptions,
                                 forwarded: Bool, original: Message, _ a: Activation, _ responder: Responder,
                                 caughtUp: Bool = false) async {
        let start = ContinuousClock.now
        let (partition, candidates) = a.view.candidates(forKey: key)
        let replicas = candidates.primaries
        let fallbacks = candidates.filter { !$0.isPrimary }
        let requirement: QuorumRequirement
        do {
            requirement = try QuorumRequirement(name: "W", quorum: options.w ?? config.defaultW,
                                                primary: options.pw ?? config.defaultPW, n: replicas.count)
        } catch {
            metrics.record(op, .invalid, since: start)
            return responder.fail(ErrorReply(code: .invalidArgument, message: error.reason))
        }
        let ms = timeout(options)
        let sloppy = options.sloppy ?? config.sloppyQuorum
        let inView = replicas.contains(where: \.isLocal)
        // Coordinated by a primary: this one, else the first reachable one. Under sloppy quorum,
        // a fallback coordinates when no primary can: this node, if it is a fallback of the key
        // and sees every primary down (or was forwarded the write), else the first reachable
        // fallback.
        // (Liveness is looked up only for a node that could stand in: not on a primary's path.)
        let localFallback = sloppy && !inView && fallbacks.contains(where: \.isLocal)
        let coordinateAsFallback = localFallback
            && (forwarded || a.coordinatorContext.unreachable(replicas.map(\.node)).count == replicas.count)
        guard coordinateAsFallback || (inView && vnodes.vnode(for: partition) != nil) else {
            if !inView && !forwarded {
                let others = sloppy ? fallbacks.filter { !$0.isLocal } : []
                return await forward(op, original, replicas: replicas + others, requirement: requirement, timeoutMillis: ms, a, responder, start: start)
            }
            // A ring older than this node's vnodes placed the write here (the forwarding node's,
            // or this request's view, from just before a flip): this node handed the partition
            // away, and the replicas that took its place coordinate it.
            let successors = vnodes.successors(of: partition).filter { $0 != config.name }
            guard !successors.isEmpty else {
                // Or the forwarding node is a gossip round ahead: once this node holds the ring
                // (and the vnode) that makes it a replica, coordinate with that view.
                if forwarded, !caughtUp, let fresh = await catchUp({ () -> Activation? in
                    guard let c = self.current, c.view.placement(forKey: key).1.contains(where: \.isLocal),
                          self.vnodes.vnode(for: partition) != nil else { return nil }
                    return c
                }) {
                    return await coordinateWrite(op, key: key, sibling: sibling, context: context, options: options, forwarded: forwarded,
                                                 original: original, fresh, responder, caughtUp: true)
                }
                metrics.record(op, .error, since: start)
                return responder.fail(notAReplica(partition))
            }
            let targets = successors.map { ReplicaTarget(node: $0, address: a.view.address($0), isPrimary: true, isLocal: false) }
            return await forward(op, original, replicas: targets, requirement: requirement, timeoutMillis: ms, a, responder, start: start)
        }
        // A primary coordinating offers the fallbacks for primaries that are down; a fallback
        // coordinating is one of them.
        let coordinator = WriteCoordinator(ctx: a.coordinatorContext, operation: op, requirement: requirement, partition: partition,
                                           replicas: coordinateAsFallback ? candidates : replicas + fallbacks.filter { !$0.isLocal },
                                           key: key, sibling: sibling, context: context.vector, timeoutMillis: ms, sloppy: sloppy)
        await coordinator.run { [self] outcome, written in answerWrite(op, outcome, written, since: start, responder) }
    }

    /// Answers a client put or delete with its coordination's outcome.
    private func answerWrite(_ op: OperationKind, _ outcome: WriteCoordination.WriteOutcome, _ written: WriteCoordinator.Written,
                             since start: ContinuousClock.Instant, _ responder: Responder) {
        let me = config.name
        switch outcome {
        case .acknowledged:
            // The reply shows the writer every value its new context covers (never a context
            // alone: it would let the writer supersede siblings it was never shown).
            guard let writer = written.writer, let ack = written.object?.acknowledgement(of: writer) else {
                metrics.record(op, .error, since: start)
                return responder.fail(ErrorReply(code: .internalError, message:
                    "coordinator \(me) acknowledged the \(op) but its stored object lacks the written value; outcome unknown"))
            }
            metrics.record(op, .ok, since: start)
            responder.reply(.writeReply(WriteReply(ack, acks: written.receipt)))
        case .quorumFailed(let f):
            metrics.record(op, f.kind == .unavailable ? .unavailable : .notReached, since: start)
            responder.fail(ErrorReply(f))
        case .coordinatorFailed(let why):
            metrics.record(op, .error, since: start)
            responder.fail(ErrorReply(code: .storage, message:
                "coordinator \(me) failed while applying the \(op): \(why); it was not replicated and its local outcome is unknown"))
        case .coordinatorTimedOut(let ms):
            metrics.record(op, .timeout, since: start)
            responder.fail(ErrorReply(code: .timeout, message:
                "coordinator \(me) did not finish applying the \(op) within \(ms) ms; it was not replicated and may still be applied locally"))
        case .rejected(let why):
            metrics.record(op, .invalid, since: start)
            responder.fail(ErrorReply(code: .invalidArgument, message: "\(op) rejected: \(why); nothing was written"))
        }
    }

    // MARK: Without a task

    /// Whether client requests may take the direct path (`coordinateDirectly`): real time and
    /// no task executor of the node's own (a simulated node keeps its seeded order). Fixed at init.
    let coordinatesDirectly: Bool

    /// Coordinates a client get, put or delete from callbacks, without a task or an actor
    /// (`DirectRead`, `DirectWrite`), when it starts on the common path: this node a primary of
    /// the key with a vnode whose store runs closures, every other primary reachable, the
    /// requirement valid, room in flight. Counted in flight like any request. False (nothing
    /// done): `handle` serves it, as before — forwarding, fallbacks, hints kept up front,
    /// invalid requests and the overload answer all stay there.
    func coordinateDirectly(_ message: Message, responder: Responder) -> Bool {
        guard coordinatesDirectly else { return false }
        switch message {
        case .get(let g):
            return readDirectly(g, responder)
        case .put(let p):
            return writeDirectly(.put, key: p.key, sibling: Sibling(value: p.value, timestampMillis: clock.wallMillis()),
                                 context: p.context, options: p.options, responder)
        case .delete(let d):
            return writeDirectly(.delete, key: d.key, sibling: .tombstone(timestampMillis: clock.wallMillis()),
                                 context: d.context, options: d.options, responder)
        default:
            return false
        }
    }

    /// The activation, local primary vnode and primaries of a direct request for `key`; nil
    /// when it does not start on the common path.
    private func directStart(_ key: [UInt8]) -> (Activation, PartitionID, Vnode, [ReplicaTarget])? {
        guard let a = current, a.view.isMember else { return nil }
        let placement = a.view.replicas(forKey: key)
        guard placement.primaries.contains(where: \.isLocal), let vnode = vnodes.vnode(for: placement.partition), vnode.servesWithoutTasks,
              a.coordinatorContext.reachesAll(placement.primaries) else { return nil }
        return (a, placement.partition, vnode, placement.primaries)
    }

    private func readDirectly(_ g: GetRequest, _ responder: Responder) -> Bool {
        let start = ContinuousClock.now
        guard let (a, partition, vnode, primaries) = directStart(g.key),
              let requirement = try? QuorumRequirement(name: "R", quorum: g.options.r ?? config.defaultR,
                                                       primary: g.options.pr ?? config.defaultPR, n: primaries.count),
              requests.begin() else { return false }
        metrics.directCoordinations.increment()
        DirectRead(ctx: a.coordinatorContext, vnode: vnode, requirement: requirement, partition: partition, replicas: primaries,
                   key: g.key, timeoutMillis: timeout(g.options), sloppy: g.options.sloppy ?? config.sloppyQuorum,
                   repair: g.options.readRepair ?? .async,
                   respond: { [self] outcome in answerGet(outcome, since: start, responder) },
                   ended: { [requests] in requests.end() }).start()
        return true
    }

    private func writeDirectly(_ op: OperationKind, key: [UInt8], sibling: Sibling, context: CausalContext, options: RequestOptions,
                               _ responder: Responder) -> Bool {
        let start = ContinuousClock.now
        guard let (a, partition, vnode, primaries) = directStart(key),
              let requirement = try? QuorumRequirement(name: "W", quorum: options.w ?? config.defaultW,
                                                       primary: options.pw ?? config.defaultPW, n: primaries.count),
              requests.begin() else { return false }
        metrics.directCoordinations.increment()
        DirectWrite(ctx: a.coordinatorContext, vnode: vnode, operation: op, requirement: requirement, partition: partition,
                    replicas: primaries, key: key, sibling: sibling, context: context.vector, timeoutMillis: timeout(options),
                    sloppy: options.sloppy ?? config.sloppyQuorum,
                    respond: { [self] outcome, written in answerWrite(op, outcome, written, since: start, responder) },
                    ended: { [requests] in requests.end() }).start()
        return true
    }

    /// Sends a write to the first reachable primary, which coordinates it; relays its answer.
    /// `Failover` decides when to move on (only when the write certainly was not applied); when
    /// every primary is out, the answer is `unavailable` (nothing was applied anywhere).
    private func forward(_ op: OperationKind, _ original: Message, replicas: [ReplicaTarget], requirement: QuorumRequirement,
                         timeoutMillis: UInt32, _ a: Activation, _ responder: Responder, start: ContinuousClock.Instant) async {
        let message: Message
        switch original {
        case .put(var p): p.forwarded = true; message = .put(p)
        case .delete(var d): d.forwarded = true; message = .delete(d)
        default: return responder.fail(ErrorReply(code: .internalError, message: "cannot forward \(original.type)"))
        }
        var failover = Failover(candidates: replicas.count, idempotent: false)
        var directive = failover.directive
        while true {
            switch directive {
            case .tryCandidate(let k):
                metrics.forwarded.increment()
                do throws(ConnectionError) {
                    directive = failover.received(try await a.transport.send(to: replicas[k].node, message,
                                                                             timeoutMillis: timeoutMillis + Self.forwardMarginMillis))
                } catch {
                    directive = failover.failed(error)
                }
            case .deliver(let reply):
                switch reply {
                case .writeReply: metrics.record(op, .ok, since: start)
                case .error(let e) where e.code == .unavailable: metrics.record(op, .unavailable, since: start)
                case .error(let e) where e.code == .notReached: metrics.record(op, .notReached, since: start)
                default: metrics.record(op, .error, since: start)
                }
                return responder.reply(reply)
            case .giveUp(let g):
                let r = replicas[g.candidate]
                metrics.record(op, .timeout, since: start)
                return responder.fail(ErrorReply(code: .timeout, message:
                    "\(op) forwarded to replica \(r.node) (\(r.address)): \(g.error); the write may have been applied"))
            case .exhausted(let summary):
                // Every primary refused or was not reached: nothing was applied anywhere.
                let reports = summary.attempts.map { t in
                    let r = replicas[t.candidate]
                    let outcome: ReplicaOutcome = switch t.outcome {
                    case .refused(let e): .notSent("refused: \(e.message)")
                    case .notDelivered(let error): .notSent(error.description)
                    // Only for idempotent requests; a forwarded write is not one.
                    case .maybeDelivered(let error): .connectionLost(error.description)
                    }
                    return ReplicaReport(node: r.node.value, address: r.address, role: r.role, outcome: outcome)
                }
                metrics.record(op, .unavailable, since: start)
                return responder.fail(ErrorReply(QuorumFailure(kind: .unavailable, operation: op, requirement: requirement.name,
                                                               required: requirement.required, achieved: 0, candidates: replicas.count,
                                                               replicas: reports)))
            }
        }
    }

    private func members(_ a: Activation) -> [MemberInfo] {
        guard let ring = a.view.state else { return [] }
        return ring.members.map { m in
            let state: MemberInfo.State = m.name == config.name ? .this : (a.transport.downReasons([m.name]).isEmpty ? .up : .down)
            return MemberInfo(name: m.name.value, address: a.view.address(m.name), ownedPartitions: ring.owned(by: m.name),
                              replicatedPartitions: ring.vnodePartitions(of: m.name).count, state: state)
        }
    }
}
