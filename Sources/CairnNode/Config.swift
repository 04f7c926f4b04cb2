public import CairnCore
public import CairnStorage
public import CairnWire
public import CairnRing
public import CairnMembership

/// A cluster member as configured: its name and client/internode address.
public struct MemberAddress: Hashable, Sendable {
    public var name: NodeName
    public var address: HostPort
    public init(name: NodeName, address: HostPort) {
        self.name = name
        self.address = address
    }
}

/// Everything a node is configured with. Every field maps to one key of `cairn.conf`
/// (Docs/configuration.md lists them with defaults); `NodeConfig.parse` reads that file.
public struct NodeConfig: Sendable {
    // node.*
    public var name: NodeName
    public var listen = HostPort(host: "127.0.0.1", port: 7401)
    /// `nil` disables the HTTP listener (`node.http = off`).
    public var http: HostPort? = HostPort(host: "127.0.0.1", port: 8401)
    /// Created and locked (`LOCK`, flock) at start so two nodes never share it; the storage
    /// engine keeps its files in `storage/` under it. `nil` (tests only) skips it and keeps data
    /// in memory.
    public var dataDirectory: String? = "./data"
    /// `node.event_loops`: the threads that run the node's sockets, its request handling and the
    /// coordinators. nil: one per core, shared by every node of the process (NIO's singleton
    /// group). Set: a group of this many threads of the node's own, stopped when `run` returns.
    public var eventLoops: Int?
    // storage.*
    public enum StorageKind: String, Sendable { case disk, memory }
    /// `disk` (default): the CairnStorage engine under the data directory; `memory`: nothing
    /// survives a restart (tests, throwaway clusters).
    public var storageKind = StorageKind.disk
    /// The engine's options: sync mode (`storage.sync`, default `always`), write buffer, block
    /// cache, compaction budget, level-0 bounds, and `storage.salvage` (`cairnd --salvage`: open
    /// even if a log is corrupt before its tail, dropping the corrupt records).
    public var storage = DatabaseOptions()
    /// `storage.background_nice`: the nice value (0…19) of the engine's worker threads (flush,
    /// compaction, bulk scans), so requests get the CPU first while a flush or merge runs.
    public var storageBackgroundNice: Int32 = 10
    /// `storage.request_threads`: the store threads the vnodes run on (partition p on thread
    /// p mod count). nil: one per core, at most four. 0: none; the vnodes run on the node's
    /// event loops (`EventLoopStorageEnvironment`).
    public var storageRequestThreads: Int?
    // cluster.*
    public var clusterName = "cairn"
    public var ringSize = Ring.defaultPartitionCount
    public var nVal = 3
    /// Bootstraps a cluster of several members at once (version 1 of the ring state, the first
    /// member claimant): every one of them must list the same members in the same order. Used
    /// only when the node has no ring state on disk. Empty: see `seeds`.
    public var members: [MemberAddress] = []
    /// Nodes a new node may join through (`cairn cluster join` without an address). A node with
    /// neither members nor seeds, and no ring state on disk, forms a new cluster alone.
    public var seeds: [HostPort] = []
    // membership.*
    /// SWIM's tuning (`membership.probe_interval`, `probe_timeout`, `indirect_probes`,
    /// `suspicion_multiplier`, `suspicion_max_multiplier`).
    public var membership = SWIMSettings()
    /// `cluster.sloppy_quorum`: a primary that is down is replaced by the next live node on the
    /// ring (its fallback) for reads and writes; W and R count fallbacks, PW and PR do not.
    /// A request's `sloppy` option overrides it.
    public var sloppyQuorum = true
    // handoff.*
    public var handoff = HandoffSettings()
    // hints.*
    public var hints = HintSettings()
    // aae.*
    public var antiEntropy = AntiEntropySettings()
    /// The storage scrub (`storage.scrub_*`).
    public var scrub = ScrubSettings()
    // read_repair.*
    /// Asynchronous read repairs in flight on this node at most (`read_repair.max_inflight`);
    /// past it a read skips its repair (counted as `skipped_overload`).
    public var readRepairMaxInflight = 256
    /// `cluster.secret_file`: the file holding the cluster secret the handshake proves; read by
    /// `loadClusterSecret()`, not when the key is set. nil: no secret (anyone can join).
    public var secretFile: String?
    /// The secret `loadClusterSecret()` read from `secretFile` (tests may set it directly). A node
    /// refuses to start while `secretFile` is set and this is nil.
    public var clusterSecret: ClusterSecret?
    // request.*
    public var requestTimeoutMillis: UInt32 = 2000
    public var defaultR: Quorum = .quorum
    public var defaultW: Quorum = .quorum
    public var defaultPR: Quorum = .count(0)
    public var defaultPW: Quorum = .count(0)
    public var maxInflightRequests = 10_000
    // limits.*
    public var limits = Limits()
    // transport.*
    public var maxPendingPerConnection = 4096
    public var connectTimeoutMillis: Int64 = 1000
    public var reconnectMinMillis: Int64 = 100
    public var reconnectMaxMillis: Int64 = 2000
    /// Unacknowledged bytes one outbound stream may have in flight (`transport.stream_window_bytes`).
    public var streamWindowBytes = 4 << 20
    /// Streams open at once to one peer, and from one peer (`transport.max_streams_per_peer`).
    public var maxStreamsPerPeer = 4
    // supervisor.*
    public var restartPolicy = RestartPolicy()
    // shutdown.*
    public var drainTimeoutMillis: Int64 = 10_000

    public init(name: NodeName) { self.name = name }

    /// The address peers and clients use for this node: its `cluster.members` entry, else `listen`.
    public var advertised: HostPort {
        members.first { $0.name == name }?.address ?? listen
    }

    /// The stream limits these keys give (`transport.stream_*`, `limits.max_frame_bytes`).
    public var streamSettings: StreamSettings {
        var s = StreamSettings()
        s.windowBytes = streamWindowBytes
        s.maxStreamsPerPeer = maxStreamsPerPeer
        s.maxFrameBytes = limits.maxFrameBytes
        return s
    }

    /// Reads `cluster.secret_file` into `clusterSecret` (a missing, unreadable, empty, too short
    /// or over-4-KiB file is an error naming the path); with no file configured, does nothing.
    /// `cairnd` calls it once the file and every `--set` are applied.
    public mutating func loadClusterSecret() throws(ValidationError) {
        guard let path = secretFile else { return }
        do {
            clusterSecret = try ClusterSecret.load(path: path)
        } catch {
            throw ValidationError("cluster.secret_file: \(error.reason)")
        }
    }

    /// Checks relations between keys that each parse fine on their own.
    public func validate() throws(ValidationError) {
        guard antiEntropy.maxReplyBytes + (1 << 16) <= limits.maxFrameBytes else {
            throw ValidationError("aae.max_reply_bytes \(antiEntropy.maxReplyBytes) leaves no room in limits.max_frame_bytes \(limits.maxFrameBytes)")
        }
        guard nVal >= 1, nVal <= 16 else { throw ValidationError("cluster.n_val = \(nVal) must be 1...16") }
        guard members.isEmpty || members.contains(where: { $0.name == name }) else {
            throw ValidationError("cluster.members does not list this node (\(name))")
        }
        guard (membership.probeTimeout) < (membership.probeInterval), (membership.probeTimeout) > Duration.zero else {
            throw ValidationError("membership.probe_timeout must be positive and shorter than membership.probe_interval")
        }
        // The maximum multiplies the minimum (β × α × interval), so any β >= 1 is consistent.
        guard membership.suspicionMaxMultiplier >= 1 else {
            throw ValidationError("membership.suspicion_max_multiplier must be at least 1")
        }
        guard Set(members.map(\.name)).count == members.count else { throw ValidationError("cluster.members lists a node twice") }
        guard requestTimeoutMillis >= 1 else { throw ValidationError("request.timeout must be positive") }
        let c = storage.compaction
        guard c.level0Trigger < c.level0Slowdown, c.level0Slowdown < c.level0Stop else {
            throw ValidationError("storage.l0_compaction_trigger < l0_slowdown_trigger < l0_stop_trigger must hold")
        }
        guard maxInflightRequests >= 1 else { throw ValidationError("limits.max_inflight_requests must be positive") }
        let slack = 64 << 10
        guard limits.maxValueBytes + limits.maxKeyBytes + slack <= limits.maxObjectBytes else {
            throw ValidationError("limits.max_object_bytes must be at least max_value_bytes + max_key_bytes + 64KiB")
        }
        guard limits.maxObjectBytes + slack <= limits.maxFrameBytes else {
            throw ValidationError("limits.max_frame_bytes must be at least max_object_bytes + 64KiB")
        }
        guard limits.maxSiblings <= limits.maxSiblingsOnDecode else {
            throw ValidationError("limits.max_siblings must not exceed limits.max_siblings_on_decode")
        }
        guard clusterName.utf8.count <= 255, !clusterName.isEmpty else { throw ValidationError("cluster.name must be 1...255 bytes") }
        for (key, q, pq) in [("r", defaultR, defaultPR), ("w", defaultW, defaultPW)] {
            do {
                _ = try QuorumRequirement(name: key.uppercased(), quorum: q, primary: pq, n: min(nVal, max(members.count, 1)))
            } catch {
                throw ValidationError("request.default_\(key) / default_p\(key): \(error.reason)")
            }
        }
        guard reconnectMinMillis >= 1, reconnectMinMillis <= reconnectMaxMillis else {
            throw ValidationError("transport.reconnect_min must be at least 1ms and at most transport.reconnect_max")
        }
        guard connectTimeoutMillis >= 1 else { throw ValidationError("transport.connect_timeout must be positive") }
        guard restartPolicy.backoffMin > .zero, restartPolicy.backoffMin <= restartPolicy.backoffMax else {
            throw ValidationError("supervisor.backoff_min must be positive and at most supervisor.backoff_max")
        }
        _ = try Ring(partitionCount: ringSize, members: members.map(\.name))
    }

    /// The ring state a node starts from when it has none on disk: `members` bootstrapped;
    /// else, without seeds, this node alone; else nil (it waits for `cluster join`).
    public func initialRingState(members given: [MemberAddress]? = nil, advertising address: HostPort? = nil) throws(ValidationError) -> RingState? {
        let list = given ?? members
        if !list.isEmpty {
            guard list.contains(where: { $0.name == name }) else { throw ValidationError("members do not include this node (\(name))") }
            return try RingState.bootstrap(cluster: clusterName, partitionCount: ringSize, nVal: nVal, members: list.map { ($0.name, $0.address) })
        }
        guard seeds.isEmpty else { return nil }
        return try RingState.bootstrap(cluster: clusterName, partitionCount: ringSize, nVal: nVal, members: [(name, address ?? advertised)])
    }
}
