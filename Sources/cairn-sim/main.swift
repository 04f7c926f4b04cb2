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
    @Option(help: "Faults to inject, comma-separated: \(SetAddScenario.Fault.allCases.map(\.rawValue).joined(separator: ", ")); \"none\" for none.")
    var faults: String = SetAddScenario.Fault.allCases.map(\.rawValue).joined(separator: ",")

    func validate() throws {
        guard seeds >= 1 else { throw ValidationError("--seeds must be at least 1") }
        guard (3...64).contains(nodes) else { throw ValidationError("--nodes must be 3...64") }
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

    func run() throws {
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
