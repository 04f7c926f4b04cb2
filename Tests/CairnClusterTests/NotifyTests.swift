import Testing
import CairnNode
import CairnCore
import CairnStorage
import Foundation
import NIOCore
import NIOPosix
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Collects notifications in order.
final class RecordingSink: NotifySink {
    let messages = Mutex<[String]>([])
    func send(_ message: String) { messages.withLock { $0.append(message) } }
    var all: [String] { messages.withLock { $0 } }
}

/// A storage backend whose reads can be made to hang (a wedged disk), each for at most 3 s. Like
/// the disk store, it runs point calls on a thread of its own, so a wedge blocks that thread and
/// never a thread of the cooperative pool (where the health check's deadline timer must run).
final class WedgeableBackend: PartitionStore {
    let inner = MemoryBackend()
    let wedged = Atomic<Bool>(false)
    let thread = ThreadExecutor(label: "wedgeable-store")
    var isPersistent: Bool { false }
    func get(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? {
        var waited = 0
        while wedged.load(ordering: .relaxed) && waited < 3000 { usleep(1000); waited += 1 }
        return try inner.get(partition: partition, key: key)
    }
    func getDurable(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? { try get(partition: partition, key: key) }
    var lastApplied: DurabilityToken { inner.lastApplied }
    func apply(partition: PartitionID, key: [UInt8], value: [UInt8]) throws -> DurabilityToken { try inner.apply(partition: partition, key: key, value: value) }
    func apply(partition: PartitionID, batch: [(key: [UInt8], value: [UInt8])]) throws -> DurabilityToken { try inner.apply(partition: partition, batch: batch) }
    func delete(partition: PartitionID, keys: [[UInt8]]) throws -> DurabilityToken { try inner.delete(partition: partition, keys: keys) }
    func executor(for partition: PartitionID) -> (any SerialExecutor)? { thread }
    func waitDurable(_ token: DurabilityToken) async throws {}
    func fold<A: Sendable>(partition: PartitionID, after: [UInt8]?, into initial: A,
                           _ visit: @Sendable (inout A, [UInt8], [UInt8]) throws -> FoldStep) async throws -> PartitionFold<A> {
        try await inner.fold(partition: partition, after: after, into: initial, visit)
    }
    func count(partition: PartitionID) async throws -> Int { try await inner.count(partition: partition) }
    func drop(partition: PartitionID) async throws { try await inner.drop(partition: partition) }
    func close() async throws {}
}

@Suite(.timeLimit(.minutes(2)))
struct NotifyTests {
    private func singleNode(sink: RecordingSink, backend: (any PartitionStore)? = nil, watchdog: Duration?, deadPeer: Bool) async throws -> (CairnNode, Task<Void, any Error>) {
        var c = NodeConfig(name: try NodeName("n1"))
        c.listen = HostPort(host: "127.0.0.1", port: 0)
        c.http = nil
        c.dataDirectory = nil
        c.ringSize = 16
        c.connectTimeoutMillis = 300
        let node = CairnNode(config: c, backend: backend, logger: quietLogger, notify: sink, watchdogInterval: .some(watchdog))
        let bound = try await node.bind()
        var members = [MemberAddress(name: c.name, address: bound.client)]
        if deadPeer {
            let dead = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton).bind(host: "127.0.0.1", port: 0).get()
            let port = dead.localAddress?.port ?? 1
            try await dead.close()
            members.append(MemberAddress(name: try NodeName("n2"), address: HostPort(host: "127.0.0.1", port: port)))
        }
        try node.start(members: members)
        return (node, Task { try await node.run() })
    }

    @Test func readyOnlyAfterListenersAndPeerAttemptsThenStoppingOnShutdown() async throws {
        let sink = RecordingSink()
        let (node, task) = try await singleNode(sink: sink, watchdog: nil, deadPeer: true)
        // Alone it is ready in milliseconds; in the full suite the cooperative pool can be held for
        // half a minute by the tests starting beside it (a fresh-clone run saw 33 s), so the wait
        // is bounded by the suite's time limit rather than by a guess at the machine's load.
        let deadline = ContinuousClock.now + .seconds(90)
        while !sink.all.contains(where: { $0.hasPrefix("READY=1") }) && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        let atReady = sink.all
        let readyIndex = try #require(atReady.firstIndex { $0.hasPrefix("READY=1") })
        #expect(atReady[0].hasPrefix("STATUS=starting: listening on 127.0.0.1:"))
        #expect(readyIndex > 0)
        #expect(atReady[readyIndex] == "READY=1\nSTATUS=serving; peers up 0 of 1")
        #expect(node.state == .serving)
        node.shutdown()
        try await task.value
        let all = sink.all
        #expect(all.filter { $0.hasPrefix("READY=1") }.count == 1)
        let stopping = try #require(all.firstIndex { $0.hasPrefix("STOPPING=1") })
        #expect(stopping > readyIndex)
        #expect(all.last == "STATUS=stopped")
        #expect(!all.contains("WATCHDOG=1"))
    }

    @Test func watchdogPingsWhileHealthyAndWithholdsWhileStorageIsWedged() async throws {
        let sink = RecordingSink()
        let backend = WedgeableBackend()
        // A 4 s watchdog: pings every 2 s, each after a health check that must finish within 1 s —
        // slack for a machine whose two cores are busy with the rest of the suite (a simulation
        // holds one of them for a minute).
        let (node, task) = try await singleNode(sink: sink, backend: backend, watchdog: .seconds(4), deadPeer: false)
        func pings() -> Int { sink.all.count { $0 == "WATCHDOG=1" } }
        let healthyBy = ContinuousClock.now + .seconds(60)
        while pings() < 3 && ContinuousClock.now < healthyBy { try await Task.sleep(for: .milliseconds(10)) }
        #expect(pings() >= 3)
        backend.wedged.store(true, ordering: .relaxed)
        let unhealthyBy = ContinuousClock.now + .seconds(20)
        while !sink.all.contains(where: { $0.contains("unhealthy: health check did not finish") }) && ContinuousClock.now < unhealthyBy {
            try await Task.sleep(for: .milliseconds(10))
        }
        let withheldAt = pings()
        #expect(sink.all.contains { $0.contains("unhealthy: health check did not finish within") })
        // While wedged, no ping goes out for longer than a ping period. (The wedge lasts until
        // released below, at most 3 s.)
        try await Task.sleep(for: .milliseconds(800))
        #expect(pings() == withheldAt)
        backend.wedged.store(false, ordering: .relaxed)
        let recoveredBy = ContinuousClock.now + .seconds(30)
        while pings() == withheldAt && ContinuousClock.now < recoveredBy { try await Task.sleep(for: .milliseconds(10)) }
        #expect(pings() > withheldAt)
        node.shutdown()
        try await task.value
    }
}
