public import CairnNode
import Foundation
import Logging
import ServiceLifecycle
import UnixSignals

/// What `cairnd` runs once its command line is parsed: load and check the configuration, start
/// the node under a `ServiceGroup`, and turn SIGTERM/SIGINT into a graceful shutdown (a second
/// one cancels). Shared by `cairnd` and test-only daemons (`cairnd-lossy`).
public enum CairnDaemon {
    public struct Options: Sendable {
        public var configPath: String
        public var overrides: [String] = []
        public var logLevel = "info"
        public var checkConfig = false
        /// Enables `GET /test/faults` (transport fault injection). For test harnesses only.
        public var testFaultInjection = false
        /// `--salvage`: sets `storage.salvage = true` after the file and every `--set` (open even
        /// if a log is corrupt before its tail; what is dropped is logged at warning level).
        public var salvage = false
        public init(configPath: String) { self.configPath = configPath }
    }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    /// Runs the node until shutdown. `decorateBackend` is for test binaries only.
    public static func run(_ o: Options, decorateBackend: (@Sendable (any PartitionStore) -> any PartitionStore)? = nil) async throws {
        guard let level = Logger.Level(rawValue: o.logLevel) else { throw Failure(description: "unknown log level '\(o.logLevel)'") }
        let nodeConfig = try loadConfig(o)
        if o.checkConfig {
            print("configuration OK: node \(nodeConfig.name), cluster \(nodeConfig.clusterName), \(nodeConfig.members.count) members, " +
                  "ring_size \(nodeConfig.ringSize), n_val \(nodeConfig.nVal), listen \(nodeConfig.listen)" +
                  (nodeConfig.storage.salvage ? ", storage.salvage on" : "") +
                  (nodeConfig.secretFile.map { ", cluster secret from \($0)" } ?? ", no cluster secret"))
            return
        }
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let logger = Logger(label: "cairnd")
        if o.testFaultInjection { logger.warning("transport fault injection is enabled (--test-fault-injection): for test harnesses only") }
        let node = CairnNode(config: nodeConfig, logger: logger, transportFaults: o.testFaultInjection ? TransportFaults() : nil,
                             decorateBackend: decorateBackend)
        // The node returning on its own (it left the cluster, its data handed off) ends the group
        // successfully: cairnd exits 0, so systemd does not restart a node that left.
        var groupConfig = ServiceGroupConfiguration(services: [.init(service: node, successTerminationBehavior: .gracefullyShutdownGroup)],
                                                    logger: logger)
        // Past the drain bound plus a margin, the graceful shutdown escalates to cancellation.
        groupConfig.maximumGracefulShutdownDuration = .milliseconds(nodeConfig.drainTimeoutMillis + 5000)
        let group = ServiceGroup(configuration: groupConfig)
        // The first SIGTERM/SIGINT starts a graceful shutdown; a second one cancels at once.
        // (ServiceGroup ignores repeats of a graceful signal, so cairnd counts them itself.)
        let running = Task { try await group.run() }
        let signals = Task {
            var seen = 0
            for await signal in await UnixSignalsSequence(trapping: .sigterm, .sigint) {
                seen += 1
                if seen == 1 {
                    logger.notice("signal received; shutting down gracefully (send again to stop at once)", metadata: ["signal": "\(signal)"])
                    await group.triggerGracefulShutdown()
                } else {
                    logger.warning("second signal; cancelling", metadata: ["signal": "\(signal)"])
                    running.cancel()
                    return
                }
            }
        }
        defer { signals.cancel() }
        try await running.value
    }

    static func loadConfig(_ o: Options) throws -> NodeConfig {
        let text: String
        do {
            text = try String(contentsOfFile: o.configPath, encoding: .utf8)
        } catch {
            throw Failure(description: "cannot read \(o.configPath): \(error.localizedDescription)")
        }
        var parsed: NodeConfig
        do {
            parsed = try NodeConfig.parse(text)
        } catch {
            throw Failure(description: "\(o.configPath): \(error)")
        }
        for override in o.overrides {
            guard let eq = override.firstIndex(of: "=") else { throw Failure(description: "--set \(override): expected key=value") }
            do {
                try parsed.set(String(override[..<eq]), String(override[override.index(after: eq)...]))
            } catch {
                throw Failure(description: "--set \(override): \(error)")
            }
        }
        if o.salvage { parsed.storage.salvage = true }
        do {
            try parsed.validate()
            try parsed.loadClusterSecret()
        } catch {
            throw Failure(description: "\(o.configPath): \(error)")
        }
        return parsed
    }
}
