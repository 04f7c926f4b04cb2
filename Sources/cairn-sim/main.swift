// cairn-sim: real Cairn nodes in one process on a seeded executor, an in-memory network and
// virtual time, running the set-add workload under network faults; the same seed gives the same
// run. See ARCHITECTURE.md, "Determinism (CairnSim)".
import ArgumentParser
import CairnSim
import Foundation

@main
struct CairnSimCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cairn-sim",
        abstract: "Run Cairn nodes on a simulated network and clock; check that no acknowledged write is lost.",
        discussion: "The last line is always: seeds=N failed=F simulated_s=S wall_s=W. Exit 0 when every seed passed, 1 otherwise.")

    @Option(help: "Run seeds 1 through N.") var seeds: Int = 1
    @Option(help: "Run this one seed (instead of --seeds).") var seed: UInt64?
    @Flag(help: "Print the full event trace of each seed.") var trace = false
    @Flag(help: "Print a fingerprint of each seed's trace.") var traceHash = false
    @Flag(help: "Make one node acknowledge writes it drops: every seed must fail.") var selfTest = false
    @Option(help: "Nodes in the cluster (N = 3).") var nodes: Int = 5
    @Option(help: "Concurrent clients.") var clients: Int = 8
    @Option(help: "Virtual time the clients run, e.g. 30s or 500ms.") var duration: String = "30s"
    @Option(help: "Faults to inject, comma-separated: \(SetAddScenario.Fault.allCases.map(\.rawValue).joined(separator: ", ")); \"none\" for none. The default is every fault.")
    var faults: String = SetAddScenario.Fault.allCases.filter { SetAddScenario.Fault.standard.contains($0) }.map(\.rawValue).joined(separator: ",")
    @Flag(help: "Measure failure detection instead (SWIM machines on a simulated network): crash detection, a 3 s pause, 5% loss, a new member's spread; exit 1 if a goal fails.")
    var detection = false
    @Option(help: "With --detection: cluster sizes, comma-separated.") var members: String = "5,16,64"
    @Option(help: "With --detection: crash and join trials per seed.") var trials: Int = 10
    @Option(help: "With --detection: member-days of 5%-loss exposure per seed.") var lossMemberDays: Double = 1
    @Option(help: "With --detection: try another membership.probe_interval (ms) instead of the default.") var probeIntervalMs: Int?
    @Option(help: "With --detection: try another membership.probe_timeout (ms).") var probeTimeoutMs: Int?
    @Option(help: "With --detection: try another membership.suspicion_multiplier.") var suspicionMultiplier: Int?
    @Option(help: "With --detection: try another membership.suspicion_max_multiplier.") var suspicionMaxMultiplier: Int?

    func validate() throws {
        guard seeds >= 1 else { throw ValidationError("--seeds must be at least 1") }
        guard (3...64).contains(nodes) else { throw ValidationError("--nodes must be 3...64") }
        guard (1...1000).contains(trials) else { throw ValidationError("--trials must be 1...1000") }
        guard lossMemberDays > 0, lossMemberDays <= 1000 else { throw ValidationError("--loss-member-days must be in (0, 1000]") }
        if detection { _ = try parsedMembers() }
        guard (1...1000).contains(clients) else { throw ValidationError("--clients must be 1...1000") }
        _ = try parsedDuration()
        _ = try parsedFaults()
    }

    func parsedDuration() throws -> Duration {
        let text = duration.trimmingCharacters(in: .whitespaces)
        let (digits, unit): (Substring, Duration) = text.hasSuffix("ms") ? (text.dropLast(2), .milliseconds(1))
            : text.hasSuffix("s") ? (text.dropLast(1), .seconds(1)) : (Substring(text), .seconds(1))
        guard let n = Int(digits), n > 0, n <= 86_400_000 else { throw ValidationError("--duration '\(duration)' is not like 30s or 500ms") }
        return unit * n
    }

    func parsedFaults() throws -> Set<SetAddScenario.Fault> {
        var out = Set<SetAddScenario.Fault>()
        for name in faults.split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces) }) where !name.isEmpty && name != "none" {
            guard let f = SetAddScenario.Fault(rawValue: name) else {
                let known = SetAddScenario.Fault.allCases.map(\.rawValue).joined(separator: ", ")
                throw ValidationError("unknown fault '\(name)'; available: \(known), or none")
            }
            out.insert(f)
        }
        return out
    }

    func parsedMembers() throws -> [Int] {
        let sizes = members.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !sizes.isEmpty, sizes.allSatisfy({ (3...256).contains($0) }) else { throw ValidationError("--members '\(members)' must list sizes 3...256") }
        return sizes
    }

    func runDetection() throws {
        let sizes = try parsedMembers()
        let started = Date()
        var settings = DetectionExperiment(members: 3).settings
        if let v = probeIntervalMs { settings.probeInterval = .milliseconds(v) }
        if let v = probeTimeoutMs { settings.probeTimeout = .milliseconds(v) }
        if let v = suspicionMultiplier { settings.suspicionMultiplier = v }
        if let v = suspicionMaxMultiplier { settings.suspicionMaxMultiplier = v }
        print("failure detection: the SWIM state machine (CairnMembership.SWIMInstance, as every node's membership agent runs it),")
        print("one instance per member on a seeded simulated network (0.5-5 ms latency) and virtual time; seeds 1...\(seeds), \(trials) crash and join trials per seed")
        print(String(format: "settings: probe_interval=%@ probe_timeout=%@ indirect_probes=%d suspicion_multiplier=%d suspicion_max_multiplier=%d",
                     "\(settings.probeInterval)", "\(settings.probeTimeout)", settings.indirectProbes, settings.suspicionMultiplier, settings.suspicionMaxMultiplier))
        print("goals: crash detected p50 <= 5 s, p99 <= 10 s; no dead during a 3 s pause; < 1 false dead per member-day at 5% loss; a new member reaches all within 3*ceil(log2(n+1)) rounds")
        let header = ["members", "crashes", "crash_p50_s", "crash_p99_s", "undetected", "pause3s_dead", "loss5_false_dead", "member_days",
                      "false_dead_per_member_day", "join_rounds_p50", "join_rounds_max", "log2_n", "rounds_bound", "ok"]
        print(header.joined(separator: " | "))
        var failed: [String] = []
        for n in sizes {
            var experiment = DetectionExperiment(members: n)
            experiment.settings = settings
            experiment.trials = trials
            experiment.lossMemberDays = lossMemberDays
            let f = try experiment.run(seeds: 1...UInt64(seeds))
            let problems = f.failures(experiment.settings)
            failed += problems.map { "\(n) members: \($0)" }
            print([String(n), String(f.crashDetection.count), String(format: "%.2f", f.crashP50), String(format: "%.2f", f.crashP99),
                   String(f.undetected), String(f.pauseDeads), String(f.lossDeads), String(format: "%.1f", f.memberDays),
                   String(format: "%.3f", f.falseDeadPerMemberDay), String(format: "%.1f", f.roundsP50), String(format: "%.1f", f.roundsMax),
                   String(format: "%.2f", f.log2n), String(format: "%.0f", f.roundsBound(experiment.settings)), problems.isEmpty ? "yes" : "NO"]
                .joined(separator: " | "))
        }
        for f in failed { print("FAILED: \(f)") }
        print(String(format: "sizes=%d failed=%d wall_s=%.1f", sizes.count, failed.count, Date().timeIntervalSince(started)))
        if !failed.isEmpty { throw ExitCode(1) }
    }

    func run() throws {
        if detection { return try runDetection() }
        var scenario = SetAddScenario()
        scenario.nodes = nodes
        scenario.clients = clients
        scenario.duration = try parsedDuration()
        scenario.faults = try parsedFaults()
        scenario.selfTest = selfTest
        let list: [UInt64] = seed.map { [$0] } ?? (1...UInt64(seeds)).map { $0 }
        let started = Date()
        var failed = 0
        var simulated = Duration.zero
        for s in list {
            let report = scenario.run(seed: s)
            simulated += report.simulated
            if trace { for line in report.trace { print("seed \(s) \(line)") } }
            if traceHash { print("seed \(s) trace_hash=\(report.traceHash)") }
            if let first = report.violations.first {
                failed += 1
                print("seed \(s): FAILED: \(first) (\(report.violations.count) violations; \(report.acknowledged) acknowledged, \(report.unknown) unknown, \(report.refused) not applied)")
                print("  reproduce: \(reproduce(s))")
                if trace { for v in report.violations.dropFirst() { print("  also: \(v)") } }
            }
        }
        let wall = Date().timeIntervalSince(started)
        let sim = Double(simulated.components.seconds) + Double(simulated.components.attoseconds) / 1e18
        print(String(format: "seeds=%d failed=%d simulated_s=%.1f wall_s=%.1f", list.count, failed, sim, wall))
        if failed > 0 { throw ExitCode(1) }
    }

    func reproduce(_ s: UInt64) -> String {
        "cairn-sim --seed \(s) --nodes \(nodes) --clients \(clients) --duration \(duration) --faults \(faults)\(selfTest ? " --self-test" : "") --trace"
    }
}
