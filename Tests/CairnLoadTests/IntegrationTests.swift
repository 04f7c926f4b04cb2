import Testing
import Foundation
import CairnNode
import CairnCore
import Logging
@testable import CairnLoad

/// `load` then `run --verify` against three real nodes in this process: no errors, nothing lost.
@Suite(.timeLimit(.minutes(2)))
struct LoadIntegrationTests {
    func cluster() async throws -> ([CairnNode], [Task<Void, any Error>], String) {
        var nodes: [CairnNode] = []
        var members: [MemberAddress] = []
        for i in 1...3 {
            var c = NodeConfig(name: try NodeName("n\(i)"))
            c.listen = HostPort(host: "127.0.0.1", port: 0)
            c.http = nil
            c.dataDirectory = nil
            c.ringSize = 64
            c.requestTimeoutMillis = 10_000
            let node = CairnNode(config: c, logger: Logger(label: "t", factory: { _ in SwiftLogNoOpLogHandler() }))
            members.append(MemberAddress(name: c.name, address: try await node.bind().client))
            nodes.append(node)
        }
        for n in nodes { try n.start(members: members) }
        let tasks = nodes.map { n in Task { try await n.run() } }
        for _ in 0..<2000 where !nodes.allSatisfy({ $0.state == .serving && $0.connectedPeers == 2 }) {
            try await Task.sleep(for: .milliseconds(5))
        }
        return (nodes, tasks, "cairn://" + members.map(\.address.description).joined(separator: ","))
    }

    @Test(arguments: ["a", "d", "f", "read=0.5,update=0.3,delete=0.2"])
    func loadThenVerifiedRunFindsNothingWrong(workload: String) async throws {
        let (nodes, tasks, url) = try await cluster()
        defer { for n in nodes { n.shutdown() } }
        let consistency = ConsistencyOptions(r: .quorum, w: .quorum)
        let load = RunConfig(phase: .load, target: url, records: 300, concurrency: 8, valueSize: 64...256, verify: true,
                             consistency: consistency, timeoutMillis: 10_000)
        let loadTarget = try await makeTarget(url, consistency: consistency, concurrency: 8, timeoutMillis: 10_000)
        let loaded = try await Runner(config: load, target: loadTarget) { _ in }.run()
        #expect(loaded.totalOperations == 300 && loaded.totalErrors == 0)
        await loadTarget.close()

        let run = RunConfig(phase: .run, target: url, records: 300, operations: 1500, concurrency: 8, valueSize: 64...256,
                            workload: try Workload.named(workload) ?? Workload.custom(workload), verify: true, seed: 42,
                            consistency: consistency, timeoutMillis: 10_000)
        let runTarget = try await makeTarget(url, consistency: consistency, concurrency: 8, timeoutMillis: 10_000)
        let report = try await Runner(config: run, target: runTarget) { _ in }.run()
        await runTarget.close()
        #expect(report.totalErrors == 0, "\(report.errors)")
        let verification = try #require(report.verification)
        #expect(verification.readsChecked > 500)
        #expect(verification.errors == 0, "\(report.firstFailures)")
        #expect(!report.failed)
        _ = tasks
    }

    /// The open loop, driven (workload a: the pacer hands each request to the client's completion
    /// handlers) and over async sessions (a mix with deletes: a task per request): every request
    /// runs and is verified, none before its slot in the timetable.
    @Test(arguments: ["a", "read=0.5,update=0.3,delete=0.2"])
    func openLoopRunsEveryScheduledRequest(workload: String) async throws {
        let (nodes, tasks, url) = try await cluster()
        defer { for n in nodes { n.shutdown() } }
        let consistency = ConsistencyOptions(r: .quorum, w: .quorum)
        let load = RunConfig(phase: .load, target: url, records: 100, concurrency: 4, verify: true, consistency: consistency)
        let loadTarget = try await makeTarget(url, consistency: consistency, concurrency: 4, timeoutMillis: 10_000)
        #expect(try await Runner(config: load, target: loadTarget) { _ in }.run().totalOperations == 100)
        await loadTarget.close()
        let run = RunConfig(phase: .run, target: url, records: 100, operations: 300, rate: 1000, concurrency: 8,
                            workload: try Workload.named(workload) ?? Workload.custom(workload), verify: true,
                            seed: 5, consistency: consistency, timeoutMillis: 10_000)
        let target = try await makeTarget(url, consistency: consistency, concurrency: 8, timeoutMillis: 10_000)
        let report = try await Runner(config: run, target: target) { _ in }.run()
        await target.close()
        #expect(report.totalOperations == 300 && report.totalErrors == 0, "\(report.errors)")
        #expect((report.verification?.readsChecked ?? 0) > 50)
        #expect(!report.failed, "\(report.firstFailures)")
        #expect(report.elapsed >= .milliseconds(299))
        _ = tasks
    }
}
