import CairnAntiEntropy
public import CairnCore
import CairnStorage

/// Parses `cairn.conf`: one `key = value` per line, `#` starts a comment, dotted keys
/// (riak.conf style). Unknown keys are errors (a typo must not silently fall back to a default).
extension NodeConfig {
    public struct ParseError: Error, Sendable, CustomStringConvertible {
        public var line: Int
        public var message: String
        public var description: String { "cairn.conf line \(line): \(message)" }
    }

    public static func parse(_ text: String) throws(ParseError) -> NodeConfig {
        var pairs: [(line: Int, key: String, value: String)] = []
        // "\r\n" is one Character in Swift, and a newline: CRLF files parse like LF files.
        for (i, raw) in text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline).enumerated() {
            let line = raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            let trimmed = line.trimmingSpaces
            if trimmed.isEmpty { continue }
            guard let eq = trimmed.firstIndex(of: "=") else { throw ParseError(line: i + 1, message: "expected 'key = value'") }
            pairs.append((i + 1, String(trimmed[..<eq].trimmingSpaces), String(trimmed[trimmed.index(after: eq)...].trimmingSpaces)))
        }
        guard let nameLine = pairs.last(where: { $0.key == "node.name" }) else {
            throw ParseError(line: 0, message: "node.name is required")
        }
        var config: NodeConfig
        do { config = NodeConfig(name: try NodeName(nameLine.value)) } catch { throw ParseError(line: nameLine.line, message: error.reason) }
        for (line, key, value) in pairs {
            do {
                try config.set(key, value)
            } catch {
                throw ParseError(line: line, message: "\(key): \(error.reason)")
            }
        }
        do { try config.validate() } catch { throw ParseError(line: 0, message: error.reason) }
        return config
    }

    /// Sets one key. Keys and meanings: Docs/configuration.md.
    public mutating func set(_ key: String, _ value: String) throws(ValidationError) {
        switch key {
        case "node.name": name = try NodeName(value)
        case "node.listen": listen = try HostPort(parsing: value)
        case "node.http": http = value == "off" ? nil : try HostPort(parsing: value)
        case "node.event_loops": eventLoops = try Self.int(value, 1...256)
        case "node.data_dir":
            guard !value.isEmpty else { throw ValidationError("node.data_dir must not be empty") }
            dataDirectory = value
        case "cluster.name": clusterName = value
        case "cluster.ring_size": ringSize = try Self.int(value, 1...(1 << 20))
        case "cluster.n_val": nVal = try Self.int(value, 1...16)
        case "cluster.members":
            members = try value.split(separator: ",").map { entry throws(ValidationError) in
                let parts = entry.trimmingSpaces.split(separator: "@", maxSplits: 1)
                guard parts.count == 2 else { throw ValidationError("member '\(entry)' is not name@host:port") }
                return MemberAddress(name: try NodeName(String(parts[0])), address: try HostPort(parsing: String(parts[1])))
            }
        case "cluster.seeds":
            seeds = try value.split(separator: ",").map { entry throws(ValidationError) in try HostPort(parsing: String(entry)) }
        case "cluster.sloppy_quorum": sloppyQuorum = try Self.bool(value)
        case "read_repair.max_inflight": readRepairMaxInflight = try Self.int(value, 0...1_000_000)
        case "aae.enabled": antiEntropy.enabled = try Self.bool(value)
        case "aae.tree_depth": antiEntropy.shape = try TreeShape(depth: try Self.int(value, TreeShape.depths))
        case "aae.exchange_interval": antiEntropy.exchangeInterval = .milliseconds(max(1, try Self.millis(value)))
        case "aae.max_concurrent_exchanges": antiEntropy.maxConcurrentExchanges = try Self.int(value, 1...64)
        case "aae.max_segments_per_exchange": antiEntropy.exchange.maxSegmentsPerExchange = try Self.int(value, 1...(1 << 20))
        case "aae.keys_per_page": antiEntropy.exchange.keysPerPage = try Self.int(value, 1...(1 << 16))
        case "aae.max_parents_per_query": antiEntropy.exchange.maxParentsPerQuery = try Self.int(value, 1...(1 << 14))
        case "aae.repair_batch_keys": antiEntropy.repairBatchKeys = try Self.int(value, 1...(1 << 16))
        case "aae.exchange_bytes_per_second": antiEntropy.exchangeBytesPerSecond = try Self.bytes(value, (64 << 10)...(1 << 40))
        case "aae.max_reply_bytes": antiEntropy.maxReplyBytes = try Self.bytes(value, (4 << 10)...(1 << 30))
        case "aae.rebuild_interval": antiEntropy.rebuildInterval = .milliseconds(max(1, try Self.millis(value)))
        case "aae.max_concurrent_builds": antiEntropy.maxConcurrentBuilds = try Self.int(value, 1...64)
        case "tombstones.grace": antiEntropy.tombstoneGrace = .milliseconds(try Self.millis(value))
        case "tombstones.sweep_interval": antiEntropy.tombstoneSweepInterval = .milliseconds(try Self.millis(value))
        case "tombstones.remembered_per_vnode": antiEntropy.rememberedPerVnode = try Self.int(value, 0...(1 << 24))
        case "aae.build_bytes_per_second": antiEntropy.buildBytesPerSecond = try Self.bytes(value, (64 << 10)...(1 << 40))
        case "hints.enabled": hints.enabled = try Self.bool(value)
        case "hints.max_bytes_per_target": hints.maxBytesPerTarget = try Self.bytes(value, (64 << 10)...(1 << 40))
        case "hints.max_bytes": hints.maxBytes = try Self.bytes(value, (64 << 10)...(1 << 40))
        case "hints.max_age": hints.maxAge = .milliseconds(try Self.millis(value))
        case "hints.replay_bytes_per_second": hints.replayBytesPerSecond = try Self.bytes(value, (4 << 10)...(1 << 40))
        case "hints.replay_keys_per_second": hints.replayKeysPerSecond = try Self.int(value, 1...1_000_000)
        case "handoff.max_concurrent": handoff.maxConcurrent = try Self.int(value, 1...64)
        case "handoff.bytes_per_second": handoff.bytesPerSecond = try Self.bytes(value, (64 << 10)...(1 << 40))
        case "handoff.batch_bytes": handoff.transfer.batchMaxBytes = try Self.bytes(value, (4 << 10)...(64 << 20))
        case "handoff.batch_timeout": handoff.transfer.batchTimeout = .milliseconds(try Self.millis(value))
        case "handoff.transfer_timeout": handoff.transferTimeout = .milliseconds(try Self.millis(value))
        case "membership.probe_interval": membership.probeInterval = .milliseconds(try Self.millis(value))
        case "membership.probe_timeout": membership.probeTimeout = .milliseconds(try Self.millis(value))
        case "membership.indirect_probes": membership.indirectProbes = try Self.int(value, 0...16)
        case "membership.suspicion_multiplier": membership.suspicionMultiplier = try Self.int(value, 1...100)
        case "membership.suspicion_max_multiplier": membership.suspicionMaxMultiplier = try Self.int(value, 1...100)
        case "cluster.secret_file":
            guard !value.isEmpty else { throw ValidationError("cluster.secret_file must not be empty") }
            secretFile = value
            clusterSecret = nil
        case "request.timeout": requestTimeoutMillis = UInt32(clamping: try Self.millis(value))
        case "request.default_r": defaultR = try Quorum(parsing: value)
        case "request.default_w": defaultW = try Quorum(parsing: value)
        case "request.default_pr": defaultPR = try Quorum(parsing: value)
        case "request.default_pw": defaultPW = try Quorum(parsing: value)
        case "limits.max_inflight_requests": maxInflightRequests = try Self.int(value, 1...1_000_000)
        case "limits.max_frame_bytes": limits.maxFrameBytes = try Self.bytes(value, 1024...(1 << 30))
        case "limits.max_key_bytes": limits.maxKeyBytes = try Self.bytes(value, 1...(64 << 10))
        case "limits.max_value_bytes": limits.maxValueBytes = try Self.bytes(value, 1...(512 << 20))
        case "limits.max_siblings": limits.maxSiblings = try Self.int(value, 1...4096)
        case "limits.max_context_bytes": limits.maxContextBytes = try Self.bytes(value, 64...(16 << 20))
        case "limits.max_object_bytes": limits.maxObjectBytes = try Self.bytes(value, 1024...(1 << 30))
        case "limits.max_siblings_on_decode": limits.maxSiblingsOnDecode = try Self.int(value, 1...1_000_000)
        case "limits.max_actors_per_object": limits.maxActorsPerObject = try Self.int(value, 1...65_536)
        case "limits.max_unflushed_reply_bytes": limits.maxUnflushedReplyBytes = try Self.bytes(value, 1024...(1 << 30))
        case "limits.max_requests_per_connection": limits.maxRequestsPerConnection = try Self.int(value, 1...1_000_000)
        case "transport.max_pending_per_connection": maxPendingPerConnection = try Self.int(value, 1...1_000_000)
        case "transport.connect_timeout": connectTimeoutMillis = try Self.millis(value)
        case "transport.reconnect_min": reconnectMinMillis = try Self.millis(value)
        case "transport.reconnect_max": reconnectMaxMillis = try Self.millis(value)
        case "transport.stream_window_bytes": streamWindowBytes = try Self.bytes(value, (64 << 10)...(1 << 30))
        case "transport.max_streams_per_peer": maxStreamsPerPeer = try Self.int(value, 1...1024)
        case "supervisor.max_restarts": restartPolicy.maxRestarts = try Self.int(value, 0...10_000)
        case "supervisor.restart_window": restartPolicy.window = .milliseconds(try Self.millis(value))
        case "supervisor.backoff_min": restartPolicy.backoffMin = .milliseconds(try Self.millis(value))
        case "supervisor.backoff_max": restartPolicy.backoffMax = .milliseconds(try Self.millis(value))
        case "shutdown.drain_timeout": drainTimeoutMillis = try Self.millis(value)
        case "storage.backend":
            guard let k = StorageKind(rawValue: value) else { throw ValidationError("'\(value)' is not disk or memory") }
            storageKind = k
        case "storage.sync":
            switch value {
            case "always": storage.syncMode = .always
            case "none": storage.syncMode = SyncMode.none
            default:
                guard value.hasPrefix("interval:") else { throw ValidationError("'\(value)' is not always, none or interval:<duration>") }
                let ms = try Self.millis(String(value.dropFirst("interval:".count)))
                guard ms >= 1 else { throw ValidationError("the sync interval must be at least 1ms") }
                storage.syncMode = .interval(milliseconds: Int(ms))
            }
        case "storage.write_buffer_bytes": storage.writeBufferBytes = try Self.bytes(value, (1 << 20)...(16 << 30))
        case "storage.block_cache_bytes": storage.blockCacheBytes = try Self.bytes(value, 0...(1 << 40))
        case "storage.log_preallocate_bytes": storage.logPreallocateBytes = try Self.bytes(value, 0...(1 << 30))
        case "storage.log_buffer_bytes": storage.logBufferBytes = try Self.bytes(value, 0...(64 << 20))
        case "storage.request_threads": storageRequestThreads = try Self.int(value, 0...64)
        case "storage.background_nice": storageBackgroundNice = Int32(try Self.int(value, 0...19))
        case "storage.bytes_per_sync": storage.bytesPerSync = try Self.bytes(value, 0...(1 << 30))
        case "storage.scrub_interval": scrub.interval = .milliseconds(try Self.millis(value))
        case "storage.scrub_bytes_per_second": scrub.bytesPerSecond = try Self.bytes(value, (64 << 10)...(1 << 40))
        case "storage.compaction_bytes_per_second": storage.compactionBytesPerSecond = UInt64(try Self.bytes(value, 0...(1 << 40)))
        case "storage.l0_compaction_trigger": storage.compaction.level0Trigger = try Self.int(value, 1...1000)
        case "storage.l0_slowdown_trigger": storage.compaction.level0Slowdown = try Self.int(value, 1...1000)
        case "storage.l0_stop_trigger": storage.compaction.level0Stop = try Self.int(value, 1...1000)
        case "storage.salvage":
            switch value {
            case "true": storage.salvage = true
            case "false": storage.salvage = false
            default: throw ValidationError("'\(value)' is not true or false")
            }
        default: throw ValidationError("unknown key")
        }
    }

    static func bool(_ v: String) throws(ValidationError) -> Bool {
        switch v {
        case "true": true
        case "false": false
        default: throw ValidationError("'\(v)' is not true or false")
        }
    }

    static func int(_ v: String, _ range: ClosedRange<Int>) throws(ValidationError) -> Int {
        guard let n = Int(v.replacingUnderscores), range.contains(n) else {
            throw ValidationError("'\(v)' is not an integer in \(range.lowerBound)...\(range.upperBound)")
        }
        return n
    }

    /// `250ms`, `2s`, `1m`, `3h`, or a bare number of milliseconds.
    static func millis(_ v: String) throws(ValidationError) -> Int64 {
        let units: [(String, Int64)] = [("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000)]
        for (suffix, scale) in units where v.hasSuffix(suffix) {
            let digits = v.dropLast(suffix.count).trimmingSpaces
            if let n = Int64(String(digits).replacingUnderscores), n >= 0, n <= Int64(Int32.max) { return n * scale }
        }
        if let n = Int64(v.replacingUnderscores), n >= 0, n <= Int64(Int32.max) { return n }
        throw ValidationError("'\(v)' is not a duration (e.g. 250ms, 2s, 1m)")
    }

    /// `4096`, `64KiB`, `16MiB`, `1GiB`.
    static func bytes(_ v: String, _ range: ClosedRange<Int>) throws(ValidationError) -> Int {
        let units: [(String, Int)] = [("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("B", 1)]
        var n: Int?
        for (suffix, scale) in units where v.hasSuffix(suffix) {
            if let x = Int(String(v.dropLast(suffix.count).trimmingSpaces).replacingUnderscores) {
                n = x.multipliedReportingOverflow(by: scale).overflow ? nil : x * scale
            }
            break
        }
        if n == nil { n = Int(v.replacingUnderscores) }
        guard let value = n, range.contains(value) else {
            throw ValidationError("'\(v)' is not a size in \(range.lowerBound)...\(range.upperBound) bytes (e.g. 4096, 64KiB, 16MiB)")
        }
        return value
    }
}

extension String {
    var replacingUnderscores: String { String(filter { $0 != "_" }) }
}
