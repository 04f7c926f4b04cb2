// cairnd-lossy: a deliberately broken node for cairn-torture's self-test. It is cairnd with a
// storage backend that acknowledges every tenth write without storing it. It exists only as this
// test-support binary: no configuration of the real cairnd can do this.
//
//   cairnd-lossy --config FILE [--log-level LEVEL] [--test-fault-injection]

import CairnCore
import CairnDaemon
import CairnNode
import Foundation
import CairnSim

var args = Array(CommandLine.arguments.dropFirst())
var options = CairnDaemon.Options(configPath: "")
while !args.isEmpty {
    let a = args.removeFirst()
    switch a {
    case "--config", "-c": options.configPath = args.isEmpty ? "" : args.removeFirst()
    case "--log-level": options.logLevel = args.isEmpty ? "info" : args.removeFirst()
    case "--test-fault-injection": options.testFaultInjection = true
    default:
        FileHandle.standardError.write(Data("cairnd-lossy: unknown argument \(a)\n".utf8))
        exit(2)
    }
}
do {
    try await CairnDaemon.run(options) { AcknowledgesAndDrops($0) }
} catch {
    FileHandle.standardError.write(Data("cairnd-lossy: \(error)\n".utf8))
    exit(1)
}
