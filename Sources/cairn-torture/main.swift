// cairn-torture: a Jepsen-style fault harness that counts lost acknowledged writes.
// README.md, "Torture testing"; ARCHITECTURE.md.

import CairnTorture
import Foundation
#if canImport(Glibc)
import Glibc
#endif

let usage = """
usage: cairn-torture [--quick] [--nodes N] [--duration 120s] [--seed N] [--clients N] [--keys N]
                     [--faults LIST] [--joins N] [--leaves N] [--removes N]
                     [--no-namespaces] [--cairnd PATH] [--cairn PATH] [--dir DIR]
  --quick          3 nodes, 60 s, seed from the fixed list 1, 7, 42 (default 1): the CI mode
  long mode:       --nodes 5 --duration 10m (a random seed unless --seed)
  --faults LIST    comma-separated fault kinds: \(FaultKind.allCases.map(\.rawValue).joined(separator: ", "));
                   "default" for all but membership (the default), "none" for none
  --joins N, --leaves N, --removes N
                   membership changes the `membership` kind makes (default 2, 2 and 0); at least
                   3 members remain at all times; joiners are named after the first nodes
  --no-namespaces  loopback only (no root): partitions through the nodes' fault-injecting transport
  --cairn PATH     the cairn CLI that makes membership changes and checks refills (default: next to cairn-torture)
exit status: 0 no defect found; 1 lost, phantom or failed-but-present elements, an unreadable key, a primary gap,
             or a membership change that did not complete; 2 harness error
"""

func fail(_ message: String) -> Never {
    FileHandle.standardError.write(Data("cairn-torture: \(message)\n\(usage)\n".utf8))
    exit(2)
}

func need<T>(_ v: T?, _ message: String) -> T {
    guard let v else { fail(message) }
    return v
}

func millis(_ s: String) -> Int? {
    if s.hasSuffix("ms"), let n = Int(s.dropLast(2)) { return n }
    if s.hasSuffix("s"), let n = Int(s.dropLast()) { return n * 1000 }
    if s.hasSuffix("m"), let n = Int(s.dropLast()) { return n * 60_000 }
    return Int(s).map { $0 * 1000 }
}

/// `--faults`: names of `FaultKind`, "default" or "none".
func faultKinds(_ list: String) -> [FaultKind] {
    var out: [FaultKind] = []
    for name in list.split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces) }) where !name.isEmpty && name != "none" {
        if name == "default" { out += FaultKind.standard; continue }
        guard let k = FaultKind(rawValue: name) else {
            fail("unknown fault '\(name)'; available: \(FaultKind.allCases.map(\.rawValue).joined(separator: ", ")), default, none")
        }
        out.append(k)
    }
    return FaultKind.allCases.filter(out.contains)
}

var config = TortureConfig()
var membershipCounts: (joins: Int?, leaves: Int?, removes: Int?) = (nil, nil, nil)
var seedGiven = false
var quick = false
var args = Array(CommandLine.arguments.dropFirst())
while !args.isEmpty {
    let a = args.removeFirst()
    func value() -> String {
        guard !args.isEmpty else { fail("\(a) needs a value") }
        return args.removeFirst()
    }
    switch a {
    case "--quick": quick = true
    case "--nodes": config.nodes = need(Int(value()), "--nodes needs a number")
    case "--duration": config.durationMillis = need(millis(value()), "--duration needs e.g. 120s or 10m")
    case "--seed":
        config.seed = need(UInt64(value()), "--seed needs a number")
        seedGiven = true
    case "--clients": config.clients = need(Int(value()), "--clients needs a number")
    case "--keys": config.keys = need(Int(value()), "--keys needs a number")
    case "--faults": config.kinds = faultKinds(value())
    case "--joins": membershipCounts.joins = need(Int(value()), "--joins needs a number")
    case "--leaves": membershipCounts.leaves = need(Int(value()), "--leaves needs a number")
    case "--removes": membershipCounts.removes = need(Int(value()), "--removes needs a number")
    case "--no-namespaces": config.namespaces = false
    case "--cairnd": config.cairnd = value()
    case "--cairn": config.cairn = value()
    case "--dir": config.workDir = value()
    case "-h", "--help":
        print(usage)
        exit(0)
    default: fail("unknown argument \(a)")
    }
}
if quick {
    config.nodes = 3
    if !args.contains("--duration") && config.durationMillis == TortureConfig().durationMillis { config.durationMillis = 60_000 }
    if !seedGiven { config.seed = 1 }
    guard [1, 7, 42].contains(config.seed) else { fail("--quick uses the fixed seeds 1, 7 and 42") }
} else if !seedGiven {
    config.seed = UInt64.random(in: 1...999_999)
}
guard (1...9).contains(config.nodes) else { fail("--nodes must be 1...9") }
guard config.durationMillis >= 10_000 else { fail("--duration must be at least 10s") }
guard config.clients >= 1, config.keys >= 1 else { fail("--clients and --keys must be positive") }
if config.membershipEnabled {
    config.membership = MembershipPlan(joins: membershipCounts.joins ?? 2, leaves: membershipCounts.leaves ?? 2,
                                       removes: membershipCounts.removes ?? 0)
    let m = config.membership
    guard m.joins >= 0, m.leaves >= 0, m.removes >= 0, m.joins <= 6 else { fail("--joins must be 0...6; --leaves and --removes not negative") }
    guard config.nodes >= 3 else { fail("the membership nemesis needs at least 3 nodes") }
    guard config.nodes + m.joins - m.leaves - m.removes >= 3 else {
        fail("--nodes \(config.nodes) with \(m.joins) joins, \(m.leaves) leaves and \(m.removes) removes leaves fewer than 3 members")
    }
} else if membershipCounts.joins != nil || membershipCounts.leaves != nil || membershipCounts.removes != nil {
    fail("--joins, --leaves and --removes need the membership fault (--faults default,membership)")
}
if config.namespaces && getuid() != 0 { fail("network namespaces need root; run as root or pass --no-namespaces") }
if config.cairnd.isEmpty {
    config.cairnd = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("cairnd").path
}
guard FileManager.default.isExecutableFile(atPath: config.cairnd) else { fail("no cairnd at \(config.cairnd) (--cairnd PATH)") }
// The membership and disk nemeses drive the cluster through the CLI.
if config.membershipEnabled || config.kinds.contains(.wipeDisk) || config.kinds.contains(.corruptTable) {
    if config.cairn.isEmpty {
        config.cairn = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("cairn").path
    }
    guard FileManager.default.isExecutableFile(atPath: config.cairn) else { fail("no cairn at \(config.cairn) (--cairn PATH)") }
}
if config.workDir.isEmpty { config.workDir = "/tmp/cairn-torture-\(getpid())" }

let torture = Torture(config)
guard let result = await torture.run() else {
    print("acknowledged=0 lost=0 unknown_present=0 unknown_absent=0 failed_but_present=0 phantom=0"
          + (config.membershipEnabled ? " joins=0 leaves=0 removes=0" : ""))
    exit(2)
}
if result.passed { try? FileManager.default.removeItem(atPath: config.workDir) }
exit(result.passed ? 0 : 1)
