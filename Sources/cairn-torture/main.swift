// cairn-torture: a Jepsen-style fault harness that counts lost acknowledged writes.
// README.md, "Torture testing"; ARCHITECTURE.md.

import CairnTorture
import Foundation
#if canImport(Glibc)
import Glibc
#endif

let usage = """
usage: cairn-torture [--quick] [--nodes N] [--duration 120s] [--seed N] [--clients N] [--keys N]
                     [--no-namespaces] [--cairnd PATH] [--dir DIR]
  --quick          3 nodes, 60 s, seed from the fixed list 1, 7, 42 (default 1): the CI mode
  long mode:       --nodes 5 --duration 10m (a random seed unless --seed)
  --no-namespaces  loopback only (no root): partitions through the nodes' fault-injecting transport
exit status: 0 no defect found; 1 lost, phantom or failed-but-present elements, or an unreadable key;
             2 harness error
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

var config = TortureConfig()
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
    case "--no-namespaces": config.namespaces = false
    case "--cairnd": config.cairnd = value()
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
if config.namespaces && getuid() != 0 { fail("network namespaces need root; run as root or pass --no-namespaces") }
if config.cairnd.isEmpty {
    config.cairnd = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("cairnd").path
}
guard FileManager.default.isExecutableFile(atPath: config.cairnd) else { fail("no cairnd at \(config.cairnd) (--cairnd PATH)") }
if config.workDir.isEmpty { config.workDir = "/tmp/cairn-torture-\(getpid())" }

let torture = Torture(config)
guard let result = await torture.run() else {
    print("acknowledged=0 lost=0 unknown_present=0 unknown_absent=0 failed_but_present=0 phantom=0")
    exit(2)
}
if result.passed { try? FileManager.default.removeItem(atPath: config.workDir) }
exit(result.passed ? 0 : 1)
