public import CairnNode
public import CairnCore
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif
public import CairnStorage

/// Real `CairnNode`s for a simulation: named n1...nN, on `network` and `clock`, with no sockets,
/// no data directory and no watchdog; bound and started (cluster view, vnodes), not yet running.
public enum SimulatedNodes {
    public static func make(count: Int, clock: ManualClock, network: InMemoryNetwork, ringSize: Int = 16, nVal: Int = 3,
                            requestTimeoutMillis: UInt32 = 1000,
                            backend: (Int) -> (any PartitionStore)? = { _ in nil }) async throws -> [CairnNode] {
        let names = try (1...max(count, 1)).map { try NodeName("n\($0)") }
        let members = names.enumerated().map { MemberAddress(name: $1, address: HostPort(host: "sim", port: 7400 + $0)) }
        var nodes: [CairnNode] = []
        for (i, m) in members.enumerated() {
            var c = NodeConfig(name: m.name)
            c.listen = m.address
            c.http = nil
            c.dataDirectory = nil
            c.ringSize = ringSize
            c.nVal = nVal
            c.requestTimeoutMillis = requestTimeoutMillis
            let node = CairnNode(config: c, backend: backend(i), logger: Logger(label: "sim", factory: { _ in SwiftLogNoOpLogHandler() }),
                                 watchdogInterval: .some(nil), clock: clock, network: network)
            try await node.bind()
            try node.start(members: members)
            nodes.append(node)
        }
        return nodes
    }
}

/// A cluster of real `CairnNode`s for a simulation, each on its own fault-injecting in-memory
/// disk running the real storage engine (sync mode `always`), that can be crashed (a power cut:
/// unsynced bytes are lost, torn as the seed decides), wiped (a new empty disk under the same
/// name), restarted, and given a skewed wall clock. Every node's work, its engine's background
/// work and its run task are jobs of the simulation's executor.
///
/// Isolation: call from the simulation's tasks only (its state is behind a lock, but the order
/// of operations is what makes a run reproducible). Index `i` is node `n(i+1)`.
public final class SimulatedCluster: Sendable {
    private struct Slot {
        let name: NodeName
        let address: HostPort
        /// nil: a bootstrap member (`cluster.members`); else the seeds it joins through.
        let seeds: [HostPort]?
        var disk = FaultyFileSystem()
        var node: CairnNode?
        var run: Task<Void, Never>?
        /// Set when the current run ends, whether the node was stopped or exited on its own.
        var ended = RunEnded()
        /// Hints dropped by this slot's earlier runs (`hintsDropped`).
        var droppedBefore = 0
        let skew = WallOffset()
        var incarnation = 0
        /// Left or removed for good: never started again.
        var gone = false
    }

    /// The bootstrap members (`cluster.members` of n1...nN); nodes added later join through seeds.
    public let members: [MemberAddress]
    public let clock: ManualClock
    public let network: InMemoryNetwork
    /// The simulation's executor (tasks a caller starts inside the simulation prefer it).
    public let executor: SimulationExecutor
    private let epochs: EpochSource
    private let settings: Settings
    private let slots: Mutex<[Slot]>

    /// How the nodes are configured.
    public struct Settings: Sendable {
        public var ringSize = 32
        public var nVal = 3
        public var requestTimeoutMillis: UInt32 = 300
        /// The nodes' `storage.sync` (the scenario keeps `always`: acknowledged means synced).
        public var syncMode: SyncMode = .always
        /// Every node's `handoff.transfer_timeout` (the bound the scenario holds transfers to).
        public var transferTimeout: Duration = .seconds(60)
        /// Tombstones are collected this soon and swept this often, and partitions exchanged
        /// this often: short, so exchanges and collection happen while the faults run.
        public var tombstoneGrace: Duration = .seconds(2)
        public var tombstoneSweepInterval: Duration = .seconds(1)
        public var exchangeInterval: Duration = .seconds(2)
        /// Every node's `hints.max_age` (nil: the default, 3 h).
        public var hintMaxAge: Duration?
        /// Wraps node `i`'s backend once it is open (the self-test's lossy node).
        public var decorate: (@Sendable (Int, any PartitionStore) -> any PartitionStore)?
        public init() {}
    }

    public init(count: Int, clock: ManualClock, network: InMemoryNetwork, executor: SimulationExecutor, seed: UInt64,
                settings: Settings = Settings()) throws {
        let names = try (1...max(count, 1)).map { try NodeName("n\($0)") }
        members = names.enumerated().map { MemberAddress(name: $1, address: HostPort(host: "sim", port: 7400 + $0)) }
        self.clock = clock
        self.network = network
        self.executor = executor
        self.settings = settings
        epochs = EpochSource(seed: seed ^ 0xe90c)
        slots = Mutex(members.map { Slot(name: $0.name, address: $0.address, seeds: nil) })
    }

    /// Every node this cluster has had, by index (`n(i+1)`), those gone included.
    public var names: [NodeName] { slots.withLock { $0.map(\.name) } }

    /// Nodes this cluster has had (indices run 0..<count; gone ones included).
    public var count: Int { slots.withLock { $0.count } }

    public func address(_ i: Int) -> HostPort { slots.withLock { $0[i].address } }

    /// Adds a node that knows only `seeds` (`cluster.seeds`; no `cluster.members`): it starts
    /// with no ring state and waits for `cluster join`. Returns its index; start it with `start`.
    public func add(seeds: [HostPort]) throws -> Int {
        try slots.withLock { s in
            let name = try NodeName("n\(s.count + 1)")
            s.append(Slot(name: name, address: HostPort(host: "sim", port: 7400 + s.count), seeds: seeds))
            return s.count - 1
        }
    }

    /// Marks `n(i+1)` gone for good (it left, or was removed): it is never started again.
    public func retire(_ i: Int) { slots.withLock { $0[i].gone = true } }

    /// Whether `n(i+1)` left or was removed for good, or exited on its own (a leaver, once its
    /// data is handed off).
    public func isGone(_ i: Int) -> Bool { slots.withLock { $0[i].gone } || hasExited(i) }

    /// Whether `n(i+1)`'s run ended on its own (not by `crash`, `stopped` or `shutdown`).
    public func hasExited(_ i: Int) -> Bool {
        let (run, ended) = slots.withLock { ($0[i].run, $0[i].ended) }
        return run != nil && ended.value
    }

    /// Nodes not gone, by index (clients and the nemesis pick among them).
    public var present: [Int] { (0..<count).filter { !isGone($0) } }

    /// The node now running (or last run) as `n(i+1)`.
    public func node(_ i: Int) -> CairnNode? { slots.withLock { $0[i].node } }

    /// Whether `n(i+1)` is running (started and not crashed).
    public func isUp(_ i: Int) -> Bool {
        let (run, ended) = slots.withLock { ($0[i].run, $0[i].ended) }
        return run != nil && !ended.value
    }

    /// `n(i+1)`'s lane of the simulation: its tasks, actors and disk work run there.
    private func lane(_ i: Int) -> Int { i + 1 }

    /// Stops `n(i+1)` as SIGSTOP does: none of its code runs (requests, timers, disk work) until
    /// `resume(i)`; messages still reach its sockets' buffers (the network delivers them into its
    /// queues) and are handled on resume.
    public func pause(_ i: Int) { executor.pause(lane(i)) }

    public func resume(_ i: Int) { executor.resume(lane(i)) }

    public func isPaused(_ i: Int) -> Bool { executor.isPaused(lane(i)) }

    /// Opens `n(i+1)`'s storage on its disk (recovering what the disk kept), builds its view and
    /// runs it. Returns once it serves.
    public func start(_ i: Int) async throws {
        let (disk, skew, incarnation, name, address, seeds, ended): (any FileSystem, WallOffset, Int, NodeName, HostPort, [HostPort]?, RunEnded) =
            slots.withLock { s in
                s[i].incarnation += 1
                s[i].ended = RunEnded()
                return (s[i].disk.session(), s[i].skew, s[i].incarnation, s[i].name, s[i].address, s[i].seeds, s[i].ended)
            }
        var c = NodeConfig(name: name)
        c.listen = address
        c.http = nil
        c.dataDirectory = "/\(name)"
        c.seeds = seeds ?? []
        c.handoff.transferTimeout = settings.transferTimeout
        c.ringSize = settings.ringSize
        c.nVal = settings.nVal
        c.requestTimeoutMillis = settings.requestTimeoutMillis
        c.antiEntropy.tombstoneGrace = settings.tombstoneGrace
        c.antiEntropy.tombstoneSweepInterval = settings.tombstoneSweepInterval
        c.antiEntropy.exchangeInterval = settings.exchangeInterval
        if let age = settings.hintMaxAge { c.hints.maxAge = age }
        // Small buffers: flushes and compactions happen within a short run.
        c.storage.writeBufferBytes = 256 << 10
        c.storage.blockCacheBytes = 1 << 20
        c.storage.compactionBytesPerSecond = 0
        c.storage.syncMode = settings.syncMode
        let decorate = settings.decorate.map { d in { @Sendable (b: any PartitionStore) in d(i, b) } }
        // CAIRN_SIM_LOG=1 (or a level: debug, trace): the nodes' logs on standard error (debugging a seed).
        let setting = getenv("CAIRN_SIM_LOG").map { String(cString: $0) }
        let level = setting.flatMap { Logger.Level(rawValue: $0) } ?? .info
        let verbose = setting == "1" || setting.flatMap { Logger.Level(rawValue: $0) } != nil
        let logger = Logger(label: "sim.\(name).\(incarnation)", factory: { label in
            guard verbose else { return SwiftLogNoOpLogHandler() }
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        })
        let node = CairnNode(config: c, logger: logger,
                             watchdogInterval: .some(nil), decorateBackend: decorate,
                             clock: SkewedClock(base: clock, offset: skew), network: network, fileSystem: disk,
                             storageEnvironment: SimulatedStorageEnvironment(executor: executor, clock: clock, lane: lane(i)), epochs: epochs,
                             taskExecutor: executor.lane(lane(i)))
        try await node.bind()
        try node.start(members: seeds == nil ? members : nil)
        let run = Task(executorPreference: executor.lane(lane(i))) {
            do {
                try await node.run()
                ended.set(failed: false)
            } catch {
                ended.set(failed: true)
            }
        }
        slots.withLock { s in
            s[i].droppedBefore += s[i].node?.hintsDropped ?? 0
            s[i].node = node
            s[i].run = run
        }
        // On virtual time, so a node that never serves ends in the simulation's time limit
        // instead of spinning the executor.
        while node.state == .starting, !ended.value { try await clock.sleep(for: .milliseconds(1)) }
        // A leaver restarted on a state that says it is exiting exits at once, gracefully (it
        // may be seen draining on the way out).
        while node.state == .draining || node.state == .stopped, !ended.value { try await clock.sleep(for: .milliseconds(1)) }
        if ended.value, !ended.failed { return }
        guard node.state == .serving else { throw SimulatedClusterError.didNotStart(name) }
    }

    /// Crashes `n(i+1)` as a power cut does: the disk keeps only what was synced (and, with
    /// `tearing`, a prefix of each file's unsynced bytes chosen by `rng`), then the process dies.
    public func crash(_ i: Int, tearing: Bool, rng: inout SplitMix64) async {
        let (disk, node, run) = slots.withLock { s in
            defer { s[i].run = nil }
            return (s[i].disk, s[i].node, s[i].run)
        }
        guard let node, let run else { return }
        disk.crash(tearing: tearing, rng: &rng)
        node.crash()
        // A stopped process dies too: its code runs on, against a dead disk, until it ends.
        resume(i)
        await run.value
    }

    /// Waits until `n(i+1)`'s run ends (after a `shutdown()` of it), and marks it down.
    public func stopped(_ i: Int) async {
        guard let run = slots.withLock({ $0[i].run }) else { return }
        resume(i)
        await run.value
        slots.withLock { $0[i].run = nil }
    }

    /// Replaces `n(i+1)`'s disk with an empty one (crash it first): it restarts under its name
    /// with no data and a fresh actor epoch.
    public func wipe(_ i: Int) {
        slots.withLock { $0[i].disk = FaultyFileSystem() }
    }

    /// Flips two bits, at offsets drawn from `rng`, of one of `n(i+1)`'s tables (drawn among
    /// them; stop it first): bit rot in a data block, or in the filter, index or footer, which
    /// damages the whole table. Returns the table's path and size; nil when it has none.
    public func corruptTable(_ i: Int, rng: inout SplitMix64) -> (path: String, bytes: Int)? {
        let (disk, name) = slots.withLock { ($0[i].disk, $0[i].name) }
        let directory = "/\(name)/storage"
        let tables = ((try? disk.list(directory)) ?? []).filter { $0.hasSuffix(".sst") }.map { directory + "/" + $0 }
            .compactMap { path in disk.contents(path).map { (path: path, bytes: $0.count) } }.filter { $0.bytes > 0 }
        guard !tables.isEmpty else { return nil }
        let table = tables[Int(rng.next(below: UInt64(tables.count)))]
        for _ in 0..<2 {
            disk.flipBit(table.path, byte: Int(rng.next(below: UInt64(table.bytes))), bit: Int(rng.next(below: 8)))
        }
        return table
    }

    /// Hints every run of every node has dropped (not kept, expired or unreadable), the runs
    /// that ended included.
    public var hintsDropped: Int {
        slots.withLock { s in s.reduce(0) { $0 + $1.droppedBefore + ($1.node?.hintsDropped ?? 0) } }
    }

    /// Sets `n(i+1)`'s wall-clock offset (at once, and for its later incarnations).
    public func setSkew(_ i: Int, millis: Int64) {
        slots.withLock { $0[i].skew }.set(millis)
    }

    /// Shuts every running node down gracefully and waits for them.
    public func shutdown() async {
        for i in 0..<count { resume(i) }
        let running = slots.withLock { s in s.compactMap { slot in slot.run.map { (slot.node, $0) } } }
        for (node, _) in running { node?.shutdown() }
        for (_, run) in running { await run.value }
        slots.withLock { s in for i in s.indices { s[i].run = nil } }
    }
}

/// Whether a node's run has ended. Thread-safe.
final class RunEnded: Sendable {
    private let flag = Mutex((ended: false, failed: false))
    func set(failed: Bool) { flag.withLock { $0 = (true, failed) } }
    var value: Bool { flag.withLock { $0.ended } }
    /// Whether the run ended by throwing (not a graceful stop or exit).
    var failed: Bool { flag.withLock { $0.failed } }
}

public enum SimulatedClusterError: Error, Sendable, CustomStringConvertible {
    case didNotStart(NodeName)
    public var description: String {
        switch self {
        case .didNotStart(let n): "\(n) stopped before it served"
        }
    }
}

extension SimulatedCluster {
    /// Runs `body` on a fresh simulation of `count` nodes (network faults `faults`, seeded by
    /// `seed`): the nodes in `running` (default: all) are started first, and every node is shut
    /// down after `body`, whether it returned or threw. Blocks the calling thread, the
    /// simulation's only one; throws `body`'s error, or `SimulationStop` if the run got stuck or
    /// passed `limit` of virtual time.
    public static func simulation<T: Sendable>(count: Int, seed: UInt64, settings: Settings = Settings(),
                                               faults: InMemoryNetwork.Faults = InMemoryNetwork.Faults(), running: [Int]? = nil,
                                               limit: Duration = .seconds(60),
                                               _ body: @escaping @Sendable (SimulatedCluster) async throws -> T) throws -> T {
        let clock = ManualClock()
        let executor = SimulationExecutor(seed: seed)
        let network = InMemoryNetwork(clock: clock, seed: seed, faults: faults, executor: executor)
        let cluster = try SimulatedCluster(count: count, clock: clock, network: network, executor: executor, seed: seed, settings: settings)
        return try simulate(on: executor, clock: clock, limit: limit) { () -> Result<T, any Error> in
            do {
                for i in running ?? Array(0..<count) { try await cluster.start(i) }
                let value = try await body(cluster)
                await cluster.shutdown()
                return .success(value)
            } catch {
                await cluster.shutdown()
                return .failure(error)
            }
        }.get()
    }
}
