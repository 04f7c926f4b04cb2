import ArgumentParser
import CairnCore
import CairnNode
import Foundation
import Logging
import ServiceLifecycle
import UnixSignals

/// The Cairn node daemon.
@main
struct Cairnd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cairnd",
        abstract: "Run one Cairn node.",
        discussion: "Reads cairn.conf (Docs/configuration.md). SIGTERM or SIGINT starts a graceful shutdown; a second one cancels.")

    @Option(name: .shortAndLong, help: "Path to cairn.conf.")
    var config: String

    @Option(name: .customLong("set"), help: "Override one setting, key=value (repeatable).")
    var overrides: [String] = []

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    @Flag(help: "Parse and validate the configuration, print it, and exit.")
    var checkConfig = false

    func run() async throws {
        guard let level = Logger.Level(rawValue: logLevel) else { throw ArgumentParser.ValidationError("unknown log level '\(logLevel)'") }
        let nodeConfig = try loadConfig()
        if checkConfig {
            print("configuration OK: node \(nodeConfig.name), cluster \(nodeConfig.clusterName), \(nodeConfig.members.count) members, " +
                  "ring_size \(nodeConfig.ringSize), n_val \(nodeConfig.nVal), listen \(nodeConfig.listen)")
            return
        }
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let logger = Logger(label: "cairnd")
        let node = CairnNode(config: nodeConfig, logger: logger)
        var groupConfig = ServiceGroupConfiguration(services: [.init(service: node)], logger: logger)
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

    private func loadConfig() throws -> NodeConfig {
        let text: String
        do {
            text = try String(contentsOfFile: config, encoding: .utf8)
        } catch {
            throw ArgumentParser.ValidationError("cannot read \(config): \(error.localizedDescription)")
        }
        var parsed: NodeConfig
        do {
            parsed = try NodeConfig.parse(text)
        } catch {
            throw ArgumentParser.ValidationError("\(config): \(error)")
        }
        for o in overrides {
            guard let eq = o.firstIndex(of: "=") else { throw ArgumentParser.ValidationError("--set \(o): expected key=value") }
            do {
                try parsed.set(String(o[..<eq]), String(o[o.index(after: eq)...]))
            } catch {
                throw ArgumentParser.ValidationError("--set \(o): \(error)")
            }
        }
        do { try parsed.validate() } catch { throw ArgumentParser.ValidationError("\(config): \(error)") }
        return parsed
    }
}
