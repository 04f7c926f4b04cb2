import Testing
@testable import CairnNode
import CairnStorage
import CairnClient
import CairnCore
import CairnWire
import CairnRing
import NIOPosix
import Foundation

private let key = Array("user:42".utf8)
private let cart = Array(#"{"cart":["apple"]}"#.utf8)

/// Three real nodes in this process on loopback; each test gets its own cluster. What only the
/// real transport shows; protocol behaviour is tested on the simulator (`ProtocolSimulationTests`).
@Suite(.timeLimit(.minutes(2)))
struct InProcessClusterTests {
    @Test func writeOnOneNodeReadFromAnother() async throws {
        let cluster = try await TestCluster.start()
        let writer = try await cluster.client([0])
        let reader = try await cluster.client([1])
        let written = try await writer.put(key, value: cart, options: RequestOptions(w: .count(2)))
        #expect(!written.context.vector.isEmpty)
        #expect(written.siblings.map(\.value) == [cart])
        let got = try await reader.get(key, options: RequestOptions(r: .count(2)))
        #expect(got.values == [cart])
        #expect(got.context == written.context)
        writer.close(); reader.close()
        await cluster.stop()
    }

    /// Issue 10: a client that pipelines reads of large values and never reads the replies makes
    /// the node stop reading its connection, instead of buffering every reply; once it reads,
    /// every reply arrives.
    @Test func aClientThatDoesNotReadItsRepliesIsNotReadEither() async throws {
        let cluster = try await TestCluster.start(count: 1, nVal: 1) { c in
            c.limits.maxUnflushedReplyBytes = 64 << 10
            c.limits.maxRequestsPerConnection = 8
        }
        let writer = try await cluster.client([0])
        let big = Array(repeating: UInt8(7), count: 256 << 10)
        try await writer.put(key, value: big)
        let socket = try await RawSocket.connect(cluster.members[0].address, reading: false)
        let requests = 400   // 100 MiB of replies if nothing pushed back
        var frames: [UInt8] = []
        for id in 1...requests { frames += WireCodec.encodeFrame(Envelope(requestID: UInt64(id), message: .get(GetRequest(key: key)))) }
        try await socket.send(frames)
        let metrics = { cluster.nodes[0].metrics.exposition() }
        try await cluster.waitUntil("the node paused reading the connection") { metricValue(metrics(), "cairn_connection_read_pauses_total") >= 1 }
        // Let the node do all it will do: until the answered count is stable for 50 polls.
        var answered = -1.0, stable = 0
        while stable < 50 {
            let now = Self.answeredGets(metrics())
            stable = now == answered ? stable + 1 : 0
            answered = now
            try await Task.sleep(for: .milliseconds(10))
        }
        // Only what fits in the socket buffers, the unflushed bound and 8 in flight was answered.
        #expect(answered < Double(requests / 2), "answered \(answered) of \(requests) with no reader")
        try await socket.startReading()
        try await cluster.waitUntil("every reply arrived", seconds: 60) { socket.frameTypes.count == requests }
        #expect(socket.frameTypes.allSatisfy { $0 == MessageType.getReply.rawValue }, "reply types \(Set(socket.frameTypes))")
        socket.close(); writer.close()
        await cluster.stop()
    }

    static func answeredGets(_ exposition: String) -> Double {
        exposition.split(separator: "\n").filter { $0.hasPrefix("cairn_requests_total{") && $0.contains("op=\"get\"") }
            .compactMap { $0.split(separator: " ").last.flatMap { Double($0) } }.reduce(0, +)
    }

    @Test func hostileBytesOnOneConnectionDoNotDisturbOthers() async throws {
        let cluster = try await TestCluster.start()
        let good = try await cluster.client([0])
        let addr = cluster.members[0].address

        // 1. Garbage inside a well-delimited frame: an error reply, and the connection stays usable.
        let garbage = try await RawSocket.connect(addr)
        try await garbage.send([0, 0, 0, 14, WireCodec.protocolVersion, 0x01, 0, 0, 0, 0, 0, 0, 0, 9, 0xFF, 0xFF, 0xFF, 0xFF])
        try await cluster.waitUntil("error reply to garbage") { garbage.frames.count == 1 }
        #expect(garbage.frames.first?.requestID == 9)
        if case .error(let e) = garbage.frames.first?.message { #expect(e.code == .malformed) } else { Issue.record("no error reply") }
        try await garbage.send(WireCodec.encodeFrame(Envelope(requestID: 10, message: .ping)))
        try await cluster.waitUntil("pong after garbage") { garbage.frames.count == 2 }
        #expect(garbage.frames.last?.message == .pong)
        try await good.put(key, value: cart)

        // 2. A 2 GiB length prefix: refused at once, connection closed, nothing allocated.
        let huge = try await RawSocket.connect(addr)
        try await huge.send([0x80, 0, 0, 0] + Array(repeating: 0x41, count: 64))
        try await cluster.waitUntil("huge frame refused and closed") { huge.isClosed }
        if case .error(let e) = huge.frames.first?.message { #expect(e.code == .frameTooLarge) } else { Issue.record("no error reply") }
        #expect(try await good.get(key).values == [cart])

        // 3. A truncated frame followed by a close: nothing is dispatched, the node keeps serving.
        let truncated = try await RawSocket.connect(addr)
        let frame = WireCodec.encodeFrame(Envelope(requestID: 3, message: .put(PutRequest(key: key, value: Array("evil".utf8)))))
        try await truncated.send(Array(frame.dropLast(3)))
        truncated.close()
        // 4. Random bytes on a fresh connection.
        let noise = try await RawSocket.connect(addr)
        var rng: UInt64 = 0x5EED
        try await noise.send((0..<4096).map { _ in
            rng = rng &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return UInt8(truncatingIfNeeded: rng >> 56)
        })
        #expect(try await good.get(key, options: RequestOptions(r: .all)).values == [cart])
        noise.close(); garbage.close(); huge.close()
        let metrics = cluster.nodes[0].metrics.exposition()
        #expect(metrics.contains("cairn_protocol_errors_total"))
        good.close()
        await cluster.stop()
    }

    @Test func healthAndMetricsOverHTTP() async throws {
        let cluster = try await TestCluster.start()
        let c = try await cluster.client([0])
        try await c.put(key, value: cart)
        _ = try await c.get(key)
        let http = try #require(cluster.nodes[0].boundAddresses?.http)
        let health = try await httpGet(http, "/health", within: cluster)
        #expect(health.status.contains("200"))
        #expect(health.body == "serving\n")
        let metrics = try await httpGet(http, "/metrics", within: cluster)
        #expect(metrics.status.contains("200"))
        #expect(metrics.body.contains(#"cairn_requests_total{op="put",outcome="ok"} 1"#))
        #expect(metrics.body.contains(#"cairn_request_duration_seconds_bucket{op="get",le="0.0001"}"#))
        // The storage engine's state, read at scrape time: the put is in the memtable.
        #expect(metrics.body.contains(#"cairn_storage_tables{level="0"} 0"#))
        #expect(!metrics.body.contains("cairn_storage_memtable_bytes 0\n"))
        let again = try await httpGet(http, "/metrics", within: cluster)
        #expect(again.body.components(separatedBy: "# TYPE cairn_storage_memtable_bytes").count == 2, "one series, not one per scrape")
        let missing = try await httpGet(http, "/nope", within: cluster)
        #expect(missing.status.contains("404"))
        c.close()
        await cluster.stop()
    }

    /// A disk store's replicas serve replica gets and puts from the event loop on the store's
    /// thread (no task), with the same answers: every replica holds the write and reads it back.
    /// Reads of durable keys in the memtable are answered on the loop itself, by the replicas and
    /// by the coordinator for its own copy.
    @Test func replicaRequestsAreServedOnTheStoreThread() async throws {
        let cluster = try await TestCluster.start()
        let c = try await cluster.client([0])
        let all = RequestOptions(r: .count(3), w: .count(3))
        for i in 0..<10 { try await c.put(Array("direct\(i)".utf8), value: [UInt8(i)], options: all) }
        for i in 0..<10 { #expect(try await c.get(Array("direct\(i)".utf8), options: all).values == [[UInt8(i)]]) }
        for n in 1...2 {
            // Node 0 coordinated: each other node took 10 replica puts and 10 replica gets.
            let direct = metricValue(cluster.nodes[n].metrics.exposition(), "cairn_replica_requests_served_direct_total")
            #expect(direct == 20, "node \(n) served \(direct) replica requests directly")
            let fromMemory = metricValue(cluster.nodes[n].metrics.exposition(), #"cairn_reads_from_memory_total{role="replica"}"#)
            #expect(fromMemory == 10, "node \(n) answered \(fromMemory) replica gets from memory")
        }
        let own = metricValue(cluster.nodes[0].metrics.exposition(), #"cairn_reads_from_memory_total{role="coordinator"}"#)
        #expect(own == 10, "the coordinator read its own copy from memory \(own) times")
        c.close()
        await cluster.stop()
    }

    /// Client gets, puts and deletes coordinated by a primary with every replica up take the
    /// direct path (callbacks, no task or actor) with the task path's answers: a receipt naming
    /// every durable copy, siblings for concurrent writes, a delete that hides them all.
    @Test func clientRequestsOnTheCommonPathAreCoordinatedWithoutATask() async throws {
        let cluster = try await TestCluster.start()
        let c = try await cluster.client([0])
        let all = RequestOptions(r: .count(3), w: .count(3))
        let k = Array("direct-coordination".utf8)
        let first = try await c.put(k, value: [1], options: all)
        #expect(Set(first.acks.map(\.node)) == ["n1", "n2", "n3"] && first.acks.allSatisfy(\.durable))
        // No context: concurrent with the first, both kept.
        let second = try await c.put(k, value: [2], options: all)
        #expect(Set(second.siblings.map(\.value)) == [[1], [2]])
        let got = try await c.get(k, options: all)
        #expect(Set(got.values) == [[1], [2]])
        _ = try await c.delete(k, context: got.context, options: all)
        let e = await failure("reading the deleted key") { () async throws(CairnError) in try await c.get(k, options: all) }
        guard case .notFound? = e else { Issue.record("expected not found, got \(String(describing: e))"); return }
        let direct = metricValue(cluster.nodes[0].metrics.exposition(), "cairn_requests_coordinated_direct_total")
        #expect(direct == 5, "\(direct) of 5 requests coordinated directly")
        try await cluster.waitUntil("every request ended") { cluster.nodes[0].core.requests.inflightCount == 0 }
        c.close()
        await cluster.stop()
    }

    /// A replica that fails during a direct write (node 1 cut off from node 3 by injected
    /// faults, the link itself up, so the write starts on the direct path) gets a hint; the
    /// write is acknowledged by the other two, and once the cut heals the hint brings node 3
    /// the write.
    @Test func aReplicaFailingDuringADirectWriteGetsAHint() async throws {
        let faults = TransportFaults()
        let cluster = try await TestCluster.start(faults: [0: faults])
        let c = try await cluster.client([0])
        let n3 = try NodeName("n3")
        var cut = TransportFaults.Rules()
        cut.blocked = [n3]
        faults.set(cut)
        let k = Array("direct-hinted".utf8)
        let written = try await c.put(k, value: [9], options: RequestOptions(w: .count(2)))
        #expect(Set(written.acks.map(\.node)) == ["n1", "n2"])
        #expect(metricValue(cluster.nodes[0].metrics.exposition(), "cairn_requests_coordinated_direct_total") == 1)
        let hints = try #require(cluster.nodes[0].core.hints)
        try await cluster.waitUntil("a hint kept for n3") { hints.status().contains { $0.target == n3 && $0.hints == 1 } }
        faults.set(TransportFaults.Rules())
        let partition = try #require(cluster.nodes[2].core.view?.partition(forKey: k))
        try await cluster.waitUntil("the hint brought n3 the write", seconds: 60) {
            guard let vnode = cluster.nodes[2].core.vnodes.vnode(for: partition) else { return false }
            return (try? await vnode.get(k))??.values.map(\.value) == [[9]]
        }
        c.close()
        await cluster.stop()
    }

    /// `node.event_loops` and `storage.request_threads` (nodes sharing a machine, each sized to
    /// its share): each node serves on a group of its own with that many loops, its vnodes on that
    /// many store threads (0: on the loops themselves), and its loops stop when the node does.
    @Test(arguments: [1, 0])
    func aNodeServesOnTheLoopsAndStoreThreadsItIsConfiguredWith(storeThreads: Int) async throws {
        let cluster = try await TestCluster.start { c in
            c.eventLoops = 1
            c.storageRequestThreads = storeThreads
        }
        let c = try await cluster.client([0])
        let all = RequestOptions(r: .count(3), w: .count(3))
        for i in 0..<10 { try await c.put(Array("sized\(i)".utf8), value: [UInt8(i)], options: all) }
        for i in 0..<10 { #expect(try await c.get(Array("sized\(i)".utf8), options: all).values == [[UInt8(i)]]) }
        let shared = ObjectIdentifier(MultiThreadedEventLoopGroup.singleton)
        var loopThreads: [String] = []
        for node in cluster.nodes {
            let group = try #require(node.eventLoopGroup as? MultiThreadedEventLoopGroup)
            #expect(ObjectIdentifier(group) != shared)
            let own = Array(group.makeIterator())
            #expect(own.count == 1)
            for loop in own { loopThreads.append(try await loop.submit { Self.threadName() }.get()) }
            if storeThreads == 0 {
                let onLoops = try #require(node.storageEnvironment as? EventLoopStorageEnvironment)
                #expect(onLoops.loops.map { ObjectIdentifier($0) } == own.map { ObjectIdentifier($0) })
            } else {
                #expect((node.storageEnvironment as? ThreadEnvironment)?.requestThreads == storeThreads)
            }
        }
        // Every replica request and every coordinated request took the path without a task.
        for n in 1...2 { #expect(metricValue(cluster.nodes[n].metrics.exposition(), "cairn_replica_requests_served_direct_total") == 20) }
        #expect(metricValue(cluster.nodes[0].metrics.exposition(), "cairn_requests_coordinated_direct_total") == 20)
        #expect(Set(loopThreads).count == 3)
        c.close()
        await cluster.stop()
        try await cluster.waitUntil("the nodes' loop threads ended") { Set(Self.threadNames()).isDisjoint(with: loopThreads) }
    }

    /// The calling thread's name (Linux: /proc/thread-self/comm).
    private static func threadName() -> String {
        ((try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// The names of this process's threads (Linux: /proc/self/task/*/comm).
    private static func threadNames() -> [String] {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
        return tasks.compactMap { try? String(contentsOfFile: "/proc/self/task/\($0)/comm", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines) }
    }

    @Test func membersListsEveryNodeWithPartitionCounts() async throws {
        let cluster = try await TestCluster.start()
        let c = try await cluster.client([1])
        let members = try await c.members()
        #expect(members.map(\.name) == ["n1", "n2", "n3"])
        #expect(members.map(\.ownedPartitions).reduce(0, +) == 64)
        #expect(members.allSatisfy { $0.replicatedPartitions == 64 })
        #expect(members.map(\.state) == [.up, .this, .up])
        #expect(members.map(\.address) == (0..<3).map(cluster.address))
        c.close()
        await cluster.stop()
    }

    @Test func aDeadSeedDoesNotFailTheClient() async throws {
        let cluster = try await TestCluster.start()
        await cluster.crash(0)
        var config = CairnClient.Configuration()
        config.defaultTimeoutMillis = 10_000   // generous: speed is not what this test asserts
        let c = try await CairnClient.connect(seeds: [cluster.address(0), cluster.address(1)], configuration: config)
        for i in 0..<6 { try await c.put(Array("s\(i)".utf8), value: [1], options: RequestOptions(w: .count(2))) }
        #expect(try await c.get(Array("s5".utf8)).values == [[1]])
        c.close()
        await cluster.stop()
    }

    @Test func gracefulShutdownStopsCleanlyWhileOthersServe() async throws {
        let cluster = try await TestCluster.start()
        let c = try await cluster.client([1])
        try await c.put(key, value: cart)
        cluster.nodes[0].shutdown()
        let result = await cluster.runResult(0)
        if case .failure(let e) = result { Issue.record("run() failed: \(e)") }
        #expect(cluster.nodes[0].state == .stopped)
        #expect(try await c.get(key, options: RequestOptions(r: .count(2))).values == [cart])
        c.close()
        await cluster.stop()
    }

    @Test func twoNodesCannotShareADataDirectory() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-lock-\(UInt64.random(in: 0...UInt64.max))").path
        var c = NodeConfig(name: try NodeName("n1"))
        c.listen = HostPort(host: "127.0.0.1", port: 0)
        c.http = nil
        c.dataDirectory = dir
        let first = CairnNode(config: c, logger: quietLogger)
        _ = try await first.bind()
        let second = CairnNode(config: c, logger: quietLogger)
        await #expect(throws: (any Error).self) { try await second.bind() }
        try? FileManager.default.removeItem(atPath: dir)
    }

    @Test func replicaOperationsCheckThatTheKeyBelongsToThePartition() async throws {
        let cluster = try await TestCluster.start()
        let ring = try Ring(partitionCount: 64, members: cluster.members.map(\.name))
        let conn = try await Connection.connect(host: cluster.members[0].address.host, port: cluster.members[0].address.port, group: MultiThreadedEventLoopGroup.singleton, limits: Limits())
        let ack = try await handshake(conn, as: "n2", to: cluster.members[0].name, cluster: cluster.name)
        guard case .helloAck = ack else { Issue.record("handshake refused: \(ack)"); return }
        var object = VersionedObject()
        try object.update(context: VersionVector(), value: Sibling(value: [1], timestampMillis: 1), actor: ActorID(node: "n2", epoch: 1))
        let right = ring.partition(forKey: key)
        let wrong = PartitionID((right.index + 1) % 64)
        let refused = try await conn.request(.replicaPut(ReplicaPut(partition: wrong, key: key, object: object)), timeoutMillis: 10_000)
        guard case .error(let e) = refused else { Issue.record("misplaced replicaPut accepted"); return }
        #expect(e.code == .invalidArgument)
        let accepted = try await conn.request(.replicaPut(ReplicaPut(partition: right, key: key, object: object)), timeoutMillis: 10_000)
        guard case .replicaPutAck = accepted else { Issue.record("replicaPut refused: \(accepted)"); return }
        // A peer claiming to be the receiving node itself is refused.
        let selfConn = try await Connection.connect(host: cluster.members[0].address.host, port: cluster.members[0].address.port, group: MultiThreadedEventLoopGroup.singleton, limits: Limits())
        let selfHello = try await handshake(selfConn, as: "n1", to: cluster.members[0].name, cluster: cluster.name)
        if case .helloAck = selfHello { Issue.record("a peer impersonating the node itself was accepted") }
        conn.close(); selfConn.close()
        await cluster.stop()
    }

    /// Over sockets: the forged counter is refused where the request is decoded, a path the
    /// simulator (messages passed as values) does not take.
    @Test func aForgedContextCannotMakeAKeyUnwritable() async throws {
        let cluster = try await TestCluster.start()
        let c = try await cluster.client([0])
        try await c.put(key, value: cart)
        // Contexts claiming an actor issued 2^64-1 dots on this key (the wire decoder refuses
        // them) or 2^48 (the decoder's limit: the vnode refuses them, or the actor's next dot would
        // overflow what an object may hold and every replica would read the key as corrupt): this
        // coordinator's own actor, and another node's (stored, it would be replicated to it).
        for (victim, counter) in [(0, UInt64.max), (1, UInt64.max), (0, UInt64(1) << 48), (1, UInt64(1) << 48)] {
            let actor = try #require(cluster.nodes[victim].actorID)
            let forged = CausalContext(VersionVector([(actor, counter)]))
            let e = await failure("a write with a forged context", { () async throws(CairnError) in
                try await c.put(key, value: Array("forged".utf8), context: forged)
            })
            guard case .invalidArgument? = e else { Issue.record("expected invalid argument, got \(String(describing: e))"); return }
        }
        // Writes coordinated by every node still work.
        for i in 0..<3 {
            let other = try await cluster.client([i])
            let r = try await other.get(key, options: RequestOptions(r: .all))
            try await other.put(key, value: Array("n\(i)".utf8), context: r.context)
            other.close()
        }
        let read = try await c.get(key, options: RequestOptions(r: .all))
        try await c.put(key, value: Array("again".utf8), context: read.context)
        #expect(try await c.get(key, options: RequestOptions(r: .all)).values == [Array("again".utf8)])
        c.close()
        await cluster.stop()
    }
}
