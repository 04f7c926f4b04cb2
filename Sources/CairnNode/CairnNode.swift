public import CairnCore
public import CairnStorage
public import Logging
public import NIOCore
import NIOPosix
import NIOHTTP1
public import CairnWire
import CairnRing
public import ServiceLifecycle

/// A Cairn node: the listeners, the vnodes, the peer links, the request group and the
/// supervisor that keeps them running. Run it as a `Service` (in a `ServiceGroup`), or drive it
/// by hand in tests: `bind()` → `start(members:)` → `run()`.
///
/// Supervision tree (the node supervisor escalates at its first child failure; the others
/// restart their children within `supervisor.*`):
/// ```
/// ServiceGroup ─ CairnNode.run
///                 ├─ Supervisor "node" ─┬─ Supervisor "vnodes" ─ Vnode × (partition, role) the view assigns
///                 │                     ├─ VnodeManager (follows the cluster views)
///                 │                     ├─ Supervisor "peers" ─ PeerLink × peers (socket transport only)
///                 │                     └─ SocketTransport (follows the cluster views; adds/removes links)
///                 └─ RequestService ─ one task per request (WriteCoordinator / ReadCoordinator actors)
/// ```
/// Thread-safe.
public final class CairnNode: Service, Sendable {
    public struct BoundAddresses: Sendable {
        public var client: HostPort
        public var http: HostPort?
    }

    enum LifecycleEvent: Sendable {
        case shutdown(graceful: Bool)
        /// `crash()`: stop at once and leave storage as a killed process would.
        case crashed
        case escalated(any Error)
    }

    private struct Runtime {
        var server: (any Channel)?
        var http: (any Channel)?
        var bound: BoundAddresses?
        var started = false
        var dataDirectory: DataDirectory?
    }

    public let config: NodeConfig
    let core: NodeCore
    /// The node's lifecycle (`core.lifecycle`): state and service-manager notifications.
    var notifier: ServiceNotifier { core.lifecycle }
    private let watchdogInterval: Duration?
    private let decorateBackend: (@Sendable (any PartitionStore) -> any PartitionStore)?
    private let group: any EventLoopGroup
    /// The group made for `node.event_loops` (nil when the caller gave one or the node uses the
    /// shared singleton): shut down when `run` returns.
    private let ownedGroup: MultiThreadedEventLoopGroup?
    var eventLoopGroup: any EventLoopGroup { group }
    private let runtime = Locked(Runtime())
    private let connections = ConnectionRegistry()
    /// Where requests enter the node (sockets or the in-memory network).
    private let router: Router
    /// When set, the node talks to its peers over this network instead of sockets and binds no
    /// listener (the simulator and deterministic tests).
    private let network: InMemoryNetwork?
    private let supervisor: Supervisor
    /// The disk seam for the storage engine (nil: the machine's, under a locked data directory).
    private let fileSystem: (any FileSystem)?
    let storageEnvironment: any StorageEnvironment
    private let events: AsyncStream<LifecycleEvent>
    private let eventSink: AsyncStream<LifecycleEvent>.Continuation

    /// - Parameters:
    ///   - notify: where service-manager notifications go (default: `sd_notify`, a no-op outside systemd).
    ///   - watchdogInterval: run the watchdog loop at this interval (default: what systemd set
    ///     through `WATCHDOG_USEC`; nil disables it).
    ///   - transportFaults: test harnesses only (`cairnd --test-fault-injection`): faults injected
    ///     into outgoing internode messages, set through `GET /test/faults?…` on the HTTP listener.
    ///   - decorateBackend: test binaries only: wraps the storage backend once it is open.
    ///   - clock, network: the node's time and, when given, the in-memory network it talks over
    ///     instead of sockets (tests and the simulator).
    ///   - fileSystem, storageEnvironment: the disk engine's file seam (when given, the data
    ///     directory is a path in it and is not locked) and where its work runs (request
    ///     executors, on which the vnodes run, and background work; default: threads, the
    ///     workers at `storage.background_nice`).
    ///   - epochs: where actor epochs are drawn (seeded in simulations).
    ///   - taskExecutor: where the node's unstructured tasks run (a simulated node's lane; nil:
    ///     the global pool).
    ///   - group: the event loops (nil: `node.event_loops` threads of the node's own when set,
    ///     else NIO's shared singleton group).
    public init(config: NodeConfig, backend: (any PartitionStore)? = nil, logger: Logger? = nil, group: (any EventLoopGroup)? = nil,
                notify: (any NotifySink)? = nil, watchdogInterval: Duration?? = .none, transportFaults: TransportFaults? = nil,
                decorateBackend: (@Sendable (any PartitionStore) -> any PartitionStore)? = nil, clock: any NodeClock = SystemClock(),
                network: InMemoryNetwork? = nil, fileSystem: (any FileSystem)? = nil,
                storageEnvironment: (any StorageEnvironment)? = nil, epochs: EpochSource = EpochSource(),
                taskExecutor: (any TaskExecutor)? = nil) {
        self.network = network
        self.fileSystem = fileSystem
        self.watchdogInterval = watchdogInterval ?? SystemdNotifySink.watchdogInterval()
        var log = logger ?? Logger(label: "cairn.node")
        log[metadataKey: "node"] = "\(config.name)"
        self.config = config
        let memory = config.storageKind == .memory || config.dataDirectory == nil
        let initial: (any PartitionStore)? = backend ?? (memory ? MemoryBackend() : nil)
        self.decorateBackend = decorateBackend
        self.core = NodeCore(config: config, backend: initial.map { decorateBackend?($0) ?? $0 }, logger: log, faults: transportFaults,
                             clock: clock, epochs: epochs, notify: notify ?? SystemdNotifySink(), taskExecutor: taskExecutor)
        if let group {
            self.group = group
            ownedGroup = nil
        } else if let loops = config.eventLoops {
            let own = MultiThreadedEventLoopGroup(numberOfThreads: loops)
            self.group = own
            ownedGroup = own
        } else {
            self.group = MultiThreadedEventLoopGroup.singleton
            ownedGroup = nil
        }
        let threads = ThreadEnvironment(requestThreads: config.storageRequestThreads, backgroundNice: config.storageBackgroundNice)
        if let storageEnvironment {
            self.storageEnvironment = storageEnvironment
        } else if config.storageRequestThreads == 0 {
            self.storageEnvironment = EventLoopStorageEnvironment(base: threads, loops: Array(self.group.makeIterator()))
        } else {
            self.storageEnvironment = threads
        }
        self.router = Router(core: core)
        let (me, limits, eventLoops) = (config.name, config.limits, self.group)
        if let network {
            core.dialer.withLock { $0 = { address, message, timeout throws(ConnectionError) in
                try await network.send(from: me, toAddress: address, message, timeoutMillis: timeout)
            } }
        } else {
            core.dialer.withLock { $0 = { address, message, timeout throws(ConnectionError) in
                let connection = try await Connection.connect(host: address.host, port: address.port, group: eventLoops, limits: limits)
                defer { connection.close() }
                return try await connection.request(message, timeoutMillis: timeout)
            } }
        }
        // The node's own children are supervisors and followers of the cluster view: one of them
        // failing (a child supervisor escalating) takes the node down, for systemd to restart.
        var top = config.restartPolicy
        top.maxRestarts = 0
        self.supervisor = Supervisor(name: "node", policy: top, logger: log, clock: clock)
        (events, eventSink) = AsyncStream.makeStream(of: LifecycleEvent.self)
    }

    public var state: NodeState { core.state }
    public var metrics: NodeMetrics { core.metrics }
    /// This node's identity in version vectors; nil until its storage is open (`bind()`).
    public var actorID: ActorID? { core.opened?.actor }
    /// The storage engine's counters (nil for the in-memory backend or before `bind()`).
    public var storageStatistics: Database.Statistics? { core.backend?.storageStatistics }
    public var boundAddresses: BoundAddresses? { runtime.value.bound }
    /// Peers whose link is connected and handshaken.
    public var connectedPeers: Int { core.current?.transport.upCount ?? 0 }

    /// Answers one client request in this process, as if it had come on a connection: the way
    /// clients reach a node on an `InMemoryNetwork` (it has no listener). Returns the reply.
    public func answer(_ message: Message) async -> Message {
        let reply = OneShot<Message>()
        router.dispatch(Envelope(requestID: 0, message: message), fromPeer: false,
                        responder: Responder(requestID: 0) { reply.deliver($0) })
        return await reply.wait(onCancel: .error(ErrorReply(code: .timeout, message: "the caller stopped waiting")))
    }

    // MARK: One-way messages and streams (the transport's; gossip, handoff and anti-entropy use them)

    /// Sends `message` to peer `node` one-way over the node's transport: dispatched there as a
    /// request whose answer is dropped; nothing is reported back. Dropped before `start`.
    public func cast(to node: NodeName, _ message: Message) {
        core.current?.transport.cast(to: node, message)
    }

    /// Opens a stream of `kind` to peer `node` (on the data link over sockets); `header` goes to
    /// the receiver's acceptor. The open waits at most `timeoutMillis` (default
    /// `request.timeout`). See `OutboundStream` for what the stream guarantees.
    public func openStream(to node: NodeName, kind: StreamKind, header: [UInt8] = [],
                           timeoutMillis: UInt32? = nil) async throws(StreamError) -> any OutboundStream {
        guard let transport = core.current?.transport else { throw .connection(.notSent("node \(config.name) is not started")) }
        return try await transport.openStream(to: node, kind: kind, header: header, timeoutMillis: timeoutMillis ?? config.requestTimeoutMillis)
    }

    /// Makes this node accept streams of `kind`, handing each to `acceptor` (replacing an earlier
    /// one). Streams are accepted only while the node serves, at most
    /// `transport.max_streams_per_peer` from each peer.
    public func acceptStreams(of kind: StreamKind, _ acceptor: @escaping StreamAcceptor) {
        core.streamAcceptors.withLock { $0[kind] = acceptor }
    }

    /// The control and data connections to peer `node` that are up now (socket transport only;
    /// nil otherwise): to check that streams run on a connection of their own.
    public func peerConnections(to node: NodeName) -> (control: Connection?, data: Connection?) {
        guard let sockets = core.current?.transport as? SocketTransport else { return (nil, nil) }
        return sockets.connections(to: node)
    }

    /// Binds the client/internode listener and the HTTP listener (port 0 picks a free port).
    /// Requests that arrive before `run()` reaches `serving` are refused with `notReady`.
    @discardableResult
    public func bind() async throws -> BoundAddresses {
        if let b = runtime.value.bound { return b }
        if let path = config.secretFile, config.clusterSecret == nil {
            throw ValidationError("cluster.secret_file \(path) is set but not loaded: call NodeConfig.loadClusterSecret() first")
        }
        var locked: DataDirectory?
        if let dir = config.dataDirectory, fileSystem == nil { locked = try DataDirectory(path: dir) }
        do {
            try await openStorage()
            return try await bindListeners(holding: locked)
        } catch {
            if let b = core.backend, runtime.value.bound == nil { try? await b.close() }
            locked?.release()
            throw error
        }
    }

    /// Opens (recovering) the disk engine under the locked data directory, reporting progress to
    /// the service manager ("recovering storage: N%", with EXTEND_TIMEOUT_USEC).
    private func openStorage() async throws {
        guard core.opened == nil, let dir = config.dataDirectory else {
            // A store given at init (in memory, or a test's): its anti-entropy state.
            if let backend = core.backend {
                try await core.antiEntropyState.load(from: backend, logger: core.logger, nowMillis: core.clock.wallMillis(),
                                                     awayLimitMillis: config.antiEntropy.enabled ? config.hints.maxAge.wholeMilliseconds : 0)
            }
            return
        }
        let notifier = notifier
        let started = ContinuousClock.now
        let backend: DiskBackend
        do {
            backend = try await DiskBackend.open(directory: dir + "/storage", options: config.storage, fs: fileSystem ?? PosixFileSystem(),
                                                 environment: storageEnvironment, epochs: core.epochs) { done, total in
                notifier.report(.recovering(done: done, total: total, at: .now))
            }
        } catch let error as StorageError {
            if case .corruption(let path, let offset, _) = error, path.hasSuffix(".log"), !config.storage.salvage {
                core.logger.error("a write-ahead log is corrupt before its tail; to start anyway, keeping everything intact and dropping the corrupt records, run cairnd --salvage (or set storage.salvage = true)",
                                  metadata: ["file": "\(path)", "offset": "\(offset)", "error": "\(error)"])
            }
            throw error
        }
        core.adopt(decorateBackend?(backend) ?? backend)
        try await core.antiEntropyState.load(from: backend, logger: core.logger, nowMillis: core.clock.wallMillis(),
                                             awayLimitMillis: config.antiEntropy.enabled ? config.hints.maxAge.wholeMilliseconds : 0)
        let stats = backend.database.statistics
        core.logger.info("storage open", metadata: [
            "directory": "\(dir)/storage", "recovered_records": "\(stats.recoveredRecords)",
            "torn_tail_bytes": "\(stats.tornTailBytes)", "took": "\(ContinuousClock.now - started)",
            "sync": "\(config.storage.syncMode)", "epoch": "\(backend.persistentEpoch ?? 0)",
        ])
        if !stats.corruptTables.isEmpty {
            core.logger.warning("storage holds corrupt tables; reads of keys they may hold fail until the keys are rewritten", metadata: [
                "directory": "\(dir)/storage", "corrupt_tables": "\(stats.corruptTables)",
                "quarantined_tables": "\(stats.quarantinedTables)", "last_corruption": "\(stats.lastCorruption ?? "")",
            ])
        }
        if stats.salvagedBytes > 0 || stats.salvagedRegions > 0 {
            core.logger.warning("storage salvage dropped corrupt log records; writes in them are lost on this node", metadata: [
                "directory": "\(dir)/storage", "salvaged_bytes": "\(stats.salvagedBytes)",
                "salvaged_regions": "\(stats.salvagedRegions)", "recovered_records": "\(stats.recoveredRecords)",
            ])
        }
    }

    private func bindListeners(holding locked: DataDirectory?) async throws -> BoundAddresses {
        if let network {
            // No sockets: peers reach this node through the network, clients through `answer`.
            let bound = BoundAddresses(client: config.listen, http: nil)
            runtime.withLock { r in
                r.bound = bound
                r.dataDirectory = locked
            }
            network.attach(config.name, router, address: config.advertised)
            return bound
        }
        let (router, limits, registry, streams) = (router, config.limits, connections, config.streamSettings)
        let server = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            // Unsent reply bytes above the high mark make the channel unwritable, and
            // ServerConnectionHandler then stops reading it (limits.max_unflushed_reply_bytes).
            .childChannelOption(.writeBufferWaterMark, value: .init(low: limits.maxUnflushedReplyBytes / 2, high: limits.maxUnflushedReplyBytes))
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ConnectionTracker(registry: registry))
                    try channel.pipeline.syncOperations.addHandler(FrameDecoder.handler(limits: limits))
                    try channel.pipeline.syncOperations.addHandler(ServerConnectionHandler(dispatcher: router, limits: limits, streams: streams))
                }
            }
            .bind(host: config.listen.host, port: config.listen.port).get()
        var http: (any Channel)?
        if let h = config.http {
            let core = core
            do {
                http = try await ServerBootstrap(group: group)
                    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                    .childChannelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                            try channel.pipeline.syncOperations.addHandler(ConnectionTracker(registry: registry))
                            try channel.pipeline.syncOperations.addHandler(HTTPHandler(core: core))
                        }
                    }
                    .bind(host: h.host, port: h.port).get()
            } catch {
                try? await server.close()
                throw error
            }
        }
        let bound = BoundAddresses(client: HostPort(host: config.listen.host, port: server.localAddress?.port ?? config.listen.port),
                                   http: http.map { HostPort(host: config.http?.host ?? "", port: $0.localAddress?.port ?? 0) })
        runtime.withLock { r in
            r.server = server
            r.http = http
            r.bound = bound
            r.dataDirectory = locked
        }
        core.boundClient.withLock { $0 = bound.client }
        core.logger.info("listening", metadata: ["client": "\(bound.client)", "http": "\(bound.http?.description ?? "off")"])
        notifier.report(.listening(address: bound.client.description))
        return bound
    }

    /// Starts the node's cluster life from the ring state on disk, else from `members` (default:
    /// `cluster.members`; see `NodeConfig.initialRingState`), and publishes it as the first view:
    /// the vnode manager starts a vnode for every partition this node replicates, the transport
    /// a link to every member, the membership agent its failure detection and gossip.
    public func start(members: [MemberAddress]? = nil) throws {
        guard !runtime.value.started else { return }
        guard let storage = core.opened else { throw ValidationError("storage is not open: call bind() before start()") }
        let store: any RingStateStore
        if let dir = config.dataDirectory, config.storageKind == .disk {
            store = FileRingStateStore(fs: fileSystem ?? PosixFileSystem(), directory: dir)
        } else {
            store = MemoryRingStateStore()
        }
        var initial = try store.load()
        if let s = initial, s.cluster != config.clusterName {
            throw ValidationError("the data directory belongs to cluster '\(s.cluster)', but cluster.name is '\(config.clusterName)'")
        }
        if initial == nil {
            initial = try config.initialRingState(members: members, advertising: core.advertised)
            if let i = initial { try store.save(i) }
        }
        let view = ClusterView(state: initial, me: config.name, clusterName: config.clusterName, version: 1)
        let alreadyStarted = runtime.withLock { r in
            defer { r.started = true }
            return r.started
        }
        guard !alreadyStarted else { return }
        let views = ClusterViews(view)
        let handshake = router.handshake
        let (metrics, notifier) = (core.metrics, notifier)
        let transport: any Transport
        if let network {
            transport = network.transport(for: config.name, streams: config.streamSettings, metrics: metrics)
        } else {
            let links = Supervisor(name: "peers", policy: config.restartPolicy, logger: core.logger, clock: core.clock) { _ in
                metrics.supervisorRestarts.increment()
            }
            if config.clusterSecret?.isEmpty ?? true {
                core.logger.warning("no cluster.secret_file: any process that can reach this node's listener can join the cluster as a peer; set cluster.secret_file (Docs/configuration.md)")
            }
            let (config, group, logger, clock) = (config, group, core.logger, core.clock)
            let transportBox = Locked<SocketTransport?>(nil)
            let sockets = SocketTransport(views: views, supervisor: links, faults: core.faults, clock: core.clock,
                                          streams: config.streamSettings, connectTimeoutMillis: config.connectTimeoutMillis, metrics: metrics,
                                          makeDataLink: { member, oneWay in
                PeerLink(peer: member.name, address: member.address, handshake: handshake, config: config, group: group, logger: logger, clock: clock,
                         role: "data", oneWay: oneWay, metrics: metrics) {}
            }) { member in
                PeerLink(peer: member.name, address: member.address, handshake: handshake, config: config, group: group, logger: logger, clock: clock,
                         metrics: metrics) {
                    guard let t = transportBox.value else { return }
                    t.reachabilityChanged.notifyAll()
                    let up = t.upCount
                    metrics.peersUp.record(up)
                    notifier.report(.peersChanged(up: up, of: t.peerCount))
                }
            }
            transportBox.withLock { $0 = sockets }
            sockets.apply(view)
            supervisor.spawn(links)
            supervisor.spawn(sockets)
            transport = sockets
        }
        let vnodeSupervisor = Supervisor(name: "vnodes", policy: config.restartPolicy, logger: core.logger, clock: core.clock) { _ in
            metrics.supervisorRestarts.increment()
        }
        let (backend, limits, logger, epochs) = (storage.backend, config.limits, core.logger, core.epochs)
        let partitionCount = view.state?.partitionCount ?? 0
        let remembered = config.antiEntropy.rememberedPerVnode
        let (aaeState, treeShape, shape) = (core.antiEntropyState, config.antiEntropy.enabled ? config.antiEntropy.shape : nil,
                                            config.antiEntropy.shape)
        let manager = VnodeManager(table: core.vnodes, supervisor: vnodeSupervisor, views: views, logger: logger, metrics: metrics,
                                   probeFallbacks: { await Self.fallbackCopies(in: backend, partitions: partitionCount, logger: logger) }) { key in
            Vnode(partition: key.partition, role: key.role, backend: backend, limits: limits, metrics: metrics, logger: logger,
                  stampActor: key.role == .fallback ? ActorID(node: storage.actor.node, epoch: epochs.next())
                    : Vnode.savedStampActor(in: backend, partition: key.partition, node: storage.actor.node),
                  treeShape: treeShape, savedTree: key.role == .primary && treeShape != nil
                    ? aaeState.takeSavedTree(key.partition, shape: shape) : nil,
                  freshActor: { ActorID(node: storage.actor.node, epoch: epochs.next()) },
                  mayForgetDamaged: { aaeState.mayForgetDamaged($0) }, rememberedLimit: remembered)
        }
        manager.apply(view)
        // Vnodes started from now on may meet data written since the store opened.
        aaeState.endEmptyStart()
        core.vnodeManager = manager
        let handoffStore: any HandoffStore
        if let dir = config.dataDirectory, config.storageKind == .disk {
            handoffStore = FileHandoffStore(fs: fileSystem ?? PosixFileSystem(), directory: dir + "/handoff")
        } else {
            handoffStore = MemoryHandoffStore()
        }
        let core = core
        let handoffEnv = HandoffManager.Environment(
            me: config.name, settings: config.handoff, transport: transport, store: handoffStore, clock: core.clock,
            pacer: Pacer(bytesPerSecond: config.handoff.bytesPerSecond, clock: core.clock), metrics: metrics, logger: core.logger,
            requestTimeoutMillis: config.requestTimeoutMillis, taskExecutor: core.taskExecutor, storage: { core.backend },
            ring: { core.membership?.ring }, reportComplete: { t in await core.reportTransferComplete(t) },
            vnodeRetired: { p in await core.vnodes.retired(p, clock: core.clock, limit: .seconds(30)) },
            reachable: { nodes in core.liveness.downReasons(nodes).isEmpty && transport.downReasons(nodes).isEmpty },
            retireFallback: { p in await core.vnodeManager?.retireFallback(p) },
            drawID: { core.epochs.next() })
        let handoff = HandoffManager(env: handoffEnv, views: views, vnodes: core.vnodes, limits: config.limits)
        core.handoff = handoff
        acceptStreams(of: .handoff) { handoff.accept($0) }
        let services = NodeServices(
            me: config.name, limits: config.limits, transport: transport, clock: core.clock, metrics: metrics, logger: core.logger,
            requestTimeoutMillis: config.requestTimeoutMillis, storage: { core.backend }, ring: { core.membership?.ring },
            reachable: { n in core.liveness.status(of: n) != .dead && transport.downReasons([n]).isEmpty })
        let hints = HintManager(env: HintManager.Environment(services: services, settings: config.hints))
        core.hints = hints
        let ctx = CoordinatorContext(
            me: config.name, actor: storage.actor, vnodes: core.vnodes, transport: transport, metrics: metrics, logger: core.logger,
            clock: core.clock, liveness: core.liveness,
            afterLocalWrite: { p, key, object in await core.handoff?.forward(partition: p, key: key, object: object) ?? true },
            forwardsNothing: { p in core.handoff?.forwardsNothing(partition: p) ?? true },
            fallbackVnode: { p in await core.fallbackVnode(p) },
            keepHints: { targets, p, key, object in await hints.keep(for: targets, partition: p, key: key, object: object) },
            acknowledgesDurably: storage.backend.acknowledgesDurably, readRepairs: ReadRepairLimiter(limit: config.readRepairMaxInflight),
            isRefilling: { p in aaeState.isRefilling(p) }, isStale: { p in aaeState.isStale(p) })
        let antiEntropy = AntiEntropyManager(env: AntiEntropyManager.Environment(
            services: services, settings: config.antiEntropy, vnodes: core.vnodes, state: aaeState, seed: core.epochs.next(),
            nodeActor: storage.actor, pendingHandoff: {
                let targets = hints.status().filter { $0.hints > 0 }.map(\.target.description)
                return (targets, core.vnodes.fallbackPartitions.map { Int($0.index) })
            }))
        core.antiEntropy = antiEntropy
        var membershipSettings = MembershipAgent.Settings()
        membershipSettings.swim = config.membership
        membershipSettings.requestTimeoutMillis = config.requestTimeoutMillis
        let agent = MembershipAgent(me: config.name, clusterName: config.clusterName, initial: initial, views: views, liveness: core.liveness,
                                    transport: transport, store: store, clock: core.clock, taskExecutor: core.taskExecutor,
                                    seed: core.epochs.next(), settings: membershipSettings,
                                    metrics: metrics, logger: core.logger,
                                    beforeExit: { await handoff.drained() }) { [weak self] in self?.shutdown() }
        core.membership = agent
        core.activate(Wiring(views: views, transport: transport, coordinatorContext: ctx))
        supervisor.spawn(vnodeSupervisor)
        supervisor.spawn(manager)
        supervisor.spawn(agent)
        supervisor.spawn(handoff)
        supervisor.spawn(hints)
        supervisor.spawn(antiEntropy)
        supervisor.spawn(Scrubber(settings: config.scrub, storage: { core.backend }, clock: core.clock, metrics: metrics, logger: core.logger))
        core.logger.info("cluster view built", metadata: [
            "members": "\(initial?.members.count ?? 0)", "ring_size": "\(view.state?.partitionCount ?? 0)", "n_val": "\(view.state?.nVal ?? 0)",
            "vnodes": "\(core.vnodes.count)", "ring_version": "\(view.state?.version ?? 0)",
            "actor": "\(storage.actor)", "view_version": "\(view.version)",
        ])
    }

    /// Partitions among the first `partitions` whose fallback copy holds at least one key (one
    /// seek each). A store that cannot be read is logged and counts as none: its fallback copies
    /// then wait for the next write to start their vnode.
    static func fallbackCopies(in backend: any PartitionStore, partitions: Int, logger: Logger) async -> [PartitionID] {
        var out: [PartitionID] = []
        for i in 0..<UInt32(clamping: partitions) {
            let p = PartitionID(i)
            do {
                if try await backend.holdsAnyKey(partition: p.fallbackSpace) { out.append(p) }
            } catch {
                logger.error("could not look for fallback copies", metadata: ["partition": "\(i)", "error": "\(error)"])
            }
        }
        return out
    }

    /// Serves until a graceful shutdown (SIGTERM via ServiceGroup, or `shutdown()`), then drains
    /// in-flight requests (at most `shutdown.drain_timeout`), closes listeners and storage, and
    /// returns. Throws if the supervisor escalated. The event loops of `node.event_loops` stop
    /// with it.
    public func run() async throws {
        do {
            try await serve()
        } catch {
            try? await ownedGroup?.shutdownGracefully()
            throw error
        }
        try? await ownedGroup?.shutdownGracefully()
    }

    private func serve() async throws {
        try await bind()
        try start()
        let (supervisor, requests, sink) = (supervisor, core.requests, eventSink)
        defer { runtime.value.dataDirectory?.release() }
        try await withGracefulShutdownHandler {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    do { try await supervisor.run() } catch { sink.yield(.escalated(error)) }
                }
                group.addTask { await requests.run() }
                if let interval = watchdogInterval {
                    group.addTask { await self.runWatchdog(interval: interval) }
                }
                await waitForPeerAttempts()
                // Serving means every vnode answers: a request must not meet "vnode starting".
                // A vnode a newer view retires meanwhile (a ring change adopted during startup)
                // never serves: wait only for those still in the table.
                // Vnodes start serving as soon as they run: yield to them first, and only wait on
                // the clock for one that takes longer (restarting after a failure). A caller that
                // spins on `state` would otherwise never let a simulated clock move.
                var rounds = 0
                waiting: for p in core.vnodes.partitions {
                    while let v = core.vnodes.vnode(for: p), !(await v.isServing) {
                        rounds += 1
                        if rounds < 1000 {
                            await Task.yield()
                        } else {
                            do { try await core.clock.sleep(for: .milliseconds(5)) } catch { break waiting }
                        }
                    }
                }
                let peers = core.current?.transport.peerCount ?? 0
                if notifier.report(.serving(peersUp: connectedPeers, peers: peers)) {
                    core.logger.info("serving", metadata: ["peers_up": "\(connectedPeers)", "peers": "\(peers)"])
                }
                var failure: (any Error)?
                var graceful = true
                var crashed = false
                for await event in events {
                    switch event {
                    case .shutdown(let g): graceful = g
                    case .crashed: graceful = false; crashed = true
                    case .escalated(let e): failure = e; graceful = false
                    }
                    break
                }
                await stop(graceful: graceful)
                group.cancelAll()
                try await group.waitForAll()
                if crashed {
                    await core.backend?.abandon()
                } else {
                    await saveTrees()
                    try await core.backend?.close()
                }
                core.logger.info("stopped", metadata: ["graceful": "\(graceful)"])
                if let failure { throw failure }
            }
        } onGracefulShutdown: {
            sink.yield(.shutdown(graceful: true))
        }
    }

    /// Saves every ready anti-entropy tree before a clean close, so the next start need not build
    /// them from storage. A failure is logged: the next start builds them.
    private func saveTrees() async {
        guard let manager = core.antiEntropy, let store = core.backend, store.isPersistent else { return }
        let trees = await manager.readyTrees()
        do {
            try await AntiEntropyState.save(trees, to: store)
        } catch {
            core.logger.warning("could not save anti-entropy trees; the next start builds them from storage", metadata: ["error": "\(error)"])
        }
    }

    /// Begins a graceful shutdown; `run()` returns once it completes.
    public func shutdown() { eventSink.yield(.shutdown(graceful: true)) }

    /// Stops at once, as a crash would look to peers and clients: every connection is closed
    /// without draining, and storage is left unsynced and not marked clean (what a power cut then
    /// keeps is the file system's business). For tests and the simulator.
    public func crash() {
        notifier.report(.stopped)
        let r = runtime.value
        r.server?.close(promise: nil)
        r.http?.close(promise: nil)
        connections.closeAll()
        core.current?.transport.dropConnections()
        network?.detach(config.name, ifAttached: router)
        eventSink.yield(.crashed)
    }

    /// Waits (bounded) until every peer link has made its first connection attempt, so the node
    /// does not report serving while it still believes every peer is down.
    private func waitForPeerAttempts() async {
        guard let t = core.current?.transport else { return }
        let deadline = core.clock.now() + .milliseconds(config.connectTimeoutMillis + 1000)
        _ = await t.reachabilityChanged.wait(until: { t.triedEveryPeer }, deadline: deadline, clock: core.clock)
    }

    private func stop(graceful: Bool) async {
        let r = runtime.value
        if graceful, notifier.report(.draining(inflight: core.requests.inflightCount)) {
            core.logger.info("graceful shutdown: draining", metadata: ["inflight": "\(core.requests.inflightCount)"])
            try? await r.server?.close()
            let requests = core.requests
            let deadline = core.clock.now() + .milliseconds(config.drainTimeoutMillis)
            _ = await requests.drained.wait(until: { requests.inflightCount == 0 }, deadline: deadline, clock: core.clock)
            if core.requests.inflightCount > 0 {
                core.logger.warning("drain timeout; abandoning in-flight requests", metadata: ["inflight": "\(core.requests.inflightCount)"])
            }
        }
        notifier.report(.stopped)
        network?.detach(config.name, ifAttached: router)
        r.server?.close(promise: nil)
        r.http?.close(promise: nil)
        connections.closeAll()
        core.requests.finish()
        supervisor.finish()
    }
}

/// Every accepted connection, so shutdown can close them. Thread-safe.
final class ConnectionRegistry: Sendable {
    private let channels = Locked<[ObjectIdentifier: any Channel]>([:])

    func add(_ c: any Channel) { channels.withLock { $0[ObjectIdentifier(c)] = c } }
    func remove(_ c: any Channel) { channels.withLock { _ = $0.removeValue(forKey: ObjectIdentifier(c)) } }

    func closeAll() {
        let all = channels.withLock { c in
            defer { c = [:] }
            return Array(c.values)
        }
        for c in all { c.close(promise: nil) }
    }
}

/// Registers its channel with a `ConnectionRegistry` while the channel is open.
final class ConnectionTracker: ChannelInboundHandler {
    typealias InboundIn = NIOAny
    private let registry: ConnectionRegistry

    init(registry: ConnectionRegistry) { self.registry = registry }

    func handlerAdded(context: ChannelHandlerContext) { registry.add(context.channel) }

    func channelInactive(context: ChannelHandlerContext) {
        registry.remove(context.channel)
        context.fireChannelInactive()
    }
}
