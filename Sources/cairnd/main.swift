import ArgumentParser
import CairnDaemon

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

    @Flag(help: "Start even if a write-ahead log is corrupt before its tail: skip the corrupt records, keep everything intact, and log what was dropped (same as storage.salvage = true).")
    var salvage = false

    @Flag(help: .hidden)
    var testFaultInjection = false

    func run() async throws {
        var o = CairnDaemon.Options(configPath: config)
        o.overrides = overrides
        o.logLevel = logLevel
        o.checkConfig = checkConfig
        o.testFaultInjection = testFaultInjection
        o.salvage = salvage
        do {
            try await CairnDaemon.run(o)
        } catch let e as CairnDaemon.Failure {
            throw ArgumentParser.ValidationError(e.description)
        }
    }
}
