// cairnd-lossy: a deliberately broken node for cairn-torture's self-test. It is cairnd with a
// storage backend that acknowledges every tenth write without storing it. It exists only as this
// test-support binary: no configuration of the real cairnd can do this.
//
//   cairnd-lossy --config FILE [--log-level LEVEL] [--test-fault-injection]

import CairnCore
import CairnDaemon
import CairnNode
import Foundation
import Synchronization

final class DropEveryTenthWrite: StorageBackend {
    let inner: any StorageBackend
    let writes = Mutex(0)
    init(_ inner: any StorageBackend) { self.inner = inner }

    func get(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? { try inner.get(partition: partition, key: key) }
    func getDurable(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? { try inner.getDurable(partition: partition, key: key) }
    var lastApplied: DurabilityToken { inner.lastApplied }
    func apply(partition: PartitionID, key: [UInt8], value: [UInt8]) throws -> DurabilityToken {
        let n = writes.withLock { w in
            w += 1
            return w
        }
        if n % 10 == 0 { return DurabilityToken(sequence: 0) }   // acknowledged, never stored
        return try inner.apply(partition: partition, key: key, value: value)
    }
    func waitDurable(_ token: DurabilityToken) async throws { try await inner.waitDurable(token) }
    func count(partition: PartitionID) throws -> Int { try inner.count(partition: partition) }
    func close() async throws { try await inner.close() }
    var isPersistent: Bool { inner.isPersistent }
    var persistentEpoch: UInt64? { inner.persistentEpoch }
}

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
    try await CairnDaemon.run(options) { DropEveryTenthWrite($0) }
} catch {
    FileHandle.standardError.write(Data("cairnd-lossy: \(error)\n".utf8))
    exit(1)
}
