import ArgumentParser
import CairnCore
import CairnLoad
import Dispatch
import Foundation
import NIOCore
import NIOPosix

/// Flags shared by `load` and `run`.
struct Common: ParsableArguments {
    @Option(help: "cairn://host:port[,host:port...], redis://host:port, or etcd://host:port[,host:port...]")
    var target: String
    @Option(help: "Number of records (keys k000000000000 ...).") var records: UInt64 = 100_000
    @Option(help: "Value size in bytes, or MIN-MAX.") var valueSize: String = "100"
    @Option(help: "Workers (connections); in open loop, the bound on requests in flight.") var concurrency: Int = 16
    @Option(help: "Seed for every random choice (runs are reproducible).") var seed: UInt64 = 1
    @Option(help: "Write the report as JSON to this file.") var json: String?
    @Option(help: "Request timeout in milliseconds.") var timeout: UInt32 = 5000
    @Option(help: "Cairn: replicas that must acknowledge a write (number, quorum, all).") var w: String?
    @Option(help: "Cairn: of the W acknowledgements, how many must come from primaries.") var pw: String?
    @Option(help: "Event-loop threads of the generator (default 1, or $CAIRN_LOAD_THREADS).") var threads: Int?
    @Option(help: "Cairn: connections to each node (default: one per 16 workers per node, 1-8).") var connections: Int?

    func validate() throws {
        guard records >= 1 else { throw ArgumentParser.ValidationError("--records must be at least 1") }
        guard (1...10_000).contains(concurrency) else { throw ArgumentParser.ValidationError("--concurrency must be 1...10000") }
        if let c = connections, !(1...64).contains(c) { throw ArgumentParser.ValidationError("--connections must be 1...64") }
    }

    func valueRange() throws -> ClosedRange<Int> {
        let parts = valueSize.split(separator: "-").map { Int($0) }
        switch parts.count {
        case 1: if let n = parts[0], n >= 0, n <= 64 << 20 { return n...n }
        case 2: if let a = parts[0], let b = parts[1], a >= 0, a <= b, b <= 64 << 20 { return a...b }
        default: break
        }
        throw ArgumentParser.ValidationError("--value-size '\(valueSize)' is not BYTES or MIN-MAX")
    }
}

func parseDuration(_ s: String) throws -> Duration {
    let units: [(String, Double)] = [("ms", 0.001), ("s", 1), ("m", 60)]
    let maxMillis = 30.0 * 24 * 3600 * 1000   // a run is bounded: at most 30 days
    for (u, scale) in units where s.hasSuffix(u) {
        if let n = Double(s.dropLast(u.count)), n > 0, n * scale * 1000 <= maxMillis { return .milliseconds(Int64(n * scale * 1000)) }
    }
    if let n = Double(s), n > 0, n * 1000 <= maxMillis { return .milliseconds(Int64(n * 1000)) }
    throw ArgumentParser.ValidationError("'\(s)' is not a duration (e.g. 30s, 2m, 500ms)")
}

func quorum(_ s: String?) throws -> Quorum? {
    guard let s else { return nil }
    do { return try Quorum(parsing: s) } catch { throw ArgumentParser.ValidationError(error.reason) }
}

/// Runs one phase: connect, run with a progress line a second, print and write the report.
/// SIGINT ends the run early with a report. Exits 1 when verification found problems.
func execute(_ config: RunConfig, json: String?) async throws {
    let target: any LoadTarget
    do {
        target = try await makeTarget(config.target, consistency: config.consistency, concurrency: config.concurrency, timeoutMillis: config.timeoutMillis,
                                    connectionsPerNode: config.connectionsPerNode)
    } catch {
        throw ArgumentParser.ValidationError("cannot use \(config.target): \(error.message)")
    }
    let runner = Runner(config: config, target: target) { line in
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }
    signal(SIGINT, SIG_IGN)
    let interrupt = DispatchSource.makeSignalSource(signal: SIGINT, queue: .global())
    interrupt.setEventHandler { runner.requestStop() }
    interrupt.resume()
    defer { interrupt.cancel() }
    let report: RunReport
    do {
        report = try await runner.run()
    } catch {
        throw ArgumentParser.ValidationError("cannot start workers: \(error.message)")
    }
    await target.close()
    print(report.text)
    if let json {
        try report.json.write(toFile: json, atomically: true, encoding: .utf8)
    }
    if report.failed { throw ExitCode(1) }
}

/// The entry point installs NIO's event loops as Swift concurrency's global executor before any
/// async code runs: requests then complete on the thread that read their reply instead of hopping
/// to a separate thread pool (that hop costs more than the rest of the generator's per-request
/// work, and the generator must never be the bottleneck).
@main
enum Entry {
    static func main() {
        // Event-loop threads, read before any NIO use: `--threads N`, else $CAIRN_LOAD_THREADS, else 1
        // (one core for the generator leaves the rest to the system under test).
        let args = CommandLine.arguments
        let flag = args.firstIndex(of: "--threads").flatMap { args.index(after: $0) < args.endIndex ? Int(args[args.index(after: $0)]) : nil }
        let threads = flag ?? ProcessInfo.processInfo.environment["CAIRN_LOAD_THREADS"].flatMap(Int.init) ?? 1
        NIOSingletons.groupLoopCountSuggestion = min(max(threads, 1), 64)
        if !NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor() {
            FileHandle.standardError.write(Data("cairn-load: could not install NIO as the global executor; running on the default one\n".utf8))
        }
        // ArgumentParser's async main runs on the main actor: keep the main queue serving.
        Task {
            await CairnLoadCommand.main()
            exit(0)
        }
        dispatchMain()
    }
}

struct CairnLoadCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cairn-load",
        abstract: "YCSB-style traffic generator for Cairn, Redis and etcd.",
        subcommands: [Load.self, Run.self])
}

struct Load: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Insert the records (YCSB's load phase).")
    @OptionGroup var common: Common

    func run() async throws {
        var config = RunConfig(phase: .load, target: common.target, records: common.records, concurrency: common.concurrency,
                               valueSize: try common.valueRange(), verify: true, seed: common.seed,
                               consistency: ConsistencyOptions(w: try quorum(common.w), pw: try quorum(common.pw)), timeoutMillis: common.timeout)
        config.connectionsPerNode = common.connections
        try await execute(config, json: common.json)
    }
}

struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run a workload against loaded records.")
    @OptionGroup var common: Common
    @Option(help: "a, b, c, d, f, write-only, or custom (with --mix or --mix-file).") var workload: String = "a"
    @Option(help: "Custom mix: read=0.7,update=0.2,insert=0.05,rmw=0.05") var mix: String?
    @Option(help: "Custom mix from a file (same syntax, one per line, # comments).") var mixFile: String?
    @Option(help: "Stop after this many operations.") var operations: UInt64?
    @Option(help: "Stop after this long (e.g. 30s, 2m).") var duration: String?
    @Option(help: "Run this long first without counting it (latency and throughput), then --duration (e.g. 2s).") var warmup: String?
    @Option(help: "Open loop at this many operations per second (latency corrected for coordinated omission).") var rate: Double?
    @Option(help: "Open loop: keep the timetable on the event loop (loop, default) or on a thread of its own (thread).") var pacer: String = "loop"
    @Option(help: "uniform, zipfian, latest, hotspot (default: the workload's).") var distribution: String?
    @Option(help: "Cairn: replicas that must answer a read.") var r: String?
    @Option(help: "Cairn: of the R answers, how many must come from primaries.") var pr: String?
    @Flag(help: "Self-checking values; count corrupt values and lost acknowledged writes; exit 1 if any.") var verify = false

    func run() async throws {
        var wl: Workload
        if let mixFile {
            do { wl = try Workload.custom(try String(contentsOfFile: mixFile, encoding: .utf8)) } catch {
                throw ArgumentParser.ValidationError("--mix-file \(mixFile): \(error)")
            }
        } else if let mix {
            do { wl = try Workload.custom(mix) } catch { throw ArgumentParser.ValidationError("--mix: \(error)") }
        } else if let named = Workload.named(workload) {
            wl = named
        } else {
            throw ArgumentParser.ValidationError("unknown workload '\(workload)' (a, b, c, d, f, write-only, or --mix)")
        }
        var dist: KeyDistribution?
        if let distribution {
            guard let d = KeyDistribution(rawValue: distribution) else { throw ArgumentParser.ValidationError("unknown distribution '\(distribution)'") }
            dist = d
            wl.distribution = d
        }
        guard operations != nil || duration != nil else { throw ArgumentParser.ValidationError("give --operations or --duration (every run is bounded)") }
        if let rate, !(rate > 0) { throw ArgumentParser.ValidationError("--rate must be positive") }
        guard let pacing = RunConfig.Pacer(rawValue: pacer) else { throw ArgumentParser.ValidationError("--pacer must be loop or thread") }
        let range = try common.valueRange()
        if verify && range.lowerBound < 32 { throw ArgumentParser.ValidationError("--verify needs values of at least 32 bytes") }
        var config = RunConfig(phase: .run, target: common.target, records: common.records, operations: operations,
                               duration: try duration.map(parseDuration), rate: rate, concurrency: common.concurrency,
                               valueSize: range, workload: wl, distribution: dist, verify: verify, seed: common.seed,
                               consistency: ConsistencyOptions(r: try quorum(r), w: try quorum(common.w), pr: try quorum(pr), pw: try quorum(common.pw)),
                               timeoutMillis: common.timeout)
        config.connectionsPerNode = common.connections
        config.pacer = pacing
        if let warmup {
            guard duration != nil else { throw ArgumentParser.ValidationError("--warmup needs --duration") }
            config.warmup = try parseDuration(warmup)
        }
        try await execute(config, json: common.json)
    }
}

