public import CairnNode
import CairnCore
import Logging

/// Real `CairnNode`s for a simulation: named n1...nN, on `network` and `clock`, with no sockets,
/// no data directory and no watchdog; bound and started (cluster view, vnodes), not yet running.
public enum SimulatedNodes {
    public static func make(count: Int, clock: ManualClock, network: InMemoryNetwork, ringSize: Int = 16, nVal: Int = 3,
                            requestTimeoutMillis: UInt32 = 1000,
                            backend: (Int) -> (any StorageBackend)? = { _ in nil }) async throws -> [CairnNode] {
        let names = try (1...max(count, 1)).map { try NodeName("n\($0)") }
        let members = names.enumerated().map { MemberAddress(name: $1, address: HostPort(host: "sim", port: 7400 + $0)) }
        var nodes: [CairnNode] = []
        for (i, m) in members.enumerated() {
            var c = NodeConfig(name: m.name)
            c.listen = m.address
            c.http = nil
            c.dataDirectory = nil
            c.ringSize = ringSize
            c.nVal = nVal
            c.requestTimeoutMillis = requestTimeoutMillis
            let node = CairnNode(config: c, backend: backend(i), logger: Logger(label: "sim", factory: { _ in SwiftLogNoOpLogHandler() }),
                                 watchdogInterval: .some(nil), clock: clock, network: network)
            try await node.bind()
            try node.start(members: members)
            nodes.append(node)
        }
        return nodes
    }
}
