import Testing
import CairnNode
import CairnCore
import CairnWire
import CairnRing
import NIOCore
import CairnTestSupport


private final class GatedSink: StreamSink {
    let gate = Gate()
    /// Index (first 4 bytes) and size of each chunk received.
    let received = Locked<[(index: UInt32, size: Int)]>([])
    let finished = Locked(false)

    var count: Int { received.value.count }

    func receive(_ chunk: [UInt8]) async throws {
        await gate.pass()
        let index = chunk.prefix(4).reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        received.withLock { $0.append((index, chunk.count)) }
    }
    func finish() async throws { finished.withLock { $0 = true } }
    func cancelled(_ reason: String) async {}
}

/// One-way messages and streams between real nodes on loopback.
@Suite(.timeLimit(.minutes(2))) struct StreamClusterTests {
    private func frame(_ message: Message, id: UInt64) -> [UInt8] { WireCodec.encodeFrame(Envelope(requestID: id, message: message)) }

    /// Request id 0 is one-way: the node dispatches or drops such frames but never answers them,
    /// not even with an error; the frames it could not take count as protocol errors.
    @Test func aOneWayFrameIsNeverAnswered() async throws {
        let cluster = try await TestCluster.start(count: 2, nVal: 2)
        let s = try await RawSocket.connect(cluster.members[0].address)
        defer { s.close() }
        let me = ClusterHandshake(cluster: cluster.name, me: try NodeName("n2"), secret: .empty)
        let hello = me.hello(nonce: ClusterHandshake.makeNonce())
        try await s.send(frame(.hello(hello), id: 1))
        try await cluster.waitUntil("the hello is answered") { !s.frames.isEmpty }
        guard case .helloAck(let ack) = s.frames.first?.message else { Issue.record("hello refused: \(s.frames)"); return }
        let proof = try me.proof(for: ack, to: hello, dialled: cluster.members[0].name, at: "n1").get()
        var malformedPing: [UInt8] = [0, 0, 0, 11, 1, MessageType.ping.rawValue] + [UInt8](repeating: 0, count: 8)
        malformedPing.append(0xFF)   // a trailing byte: malformed, with request id 0
        try await s.send(frame(.helloProof(proof), id: 0)   // one-way: never answered
            + frame(.ping, id: 0)                        // answered on the event loop otherwise
            + frame(.members, id: 0)                     // dispatched to a worker; its answer is dropped
            + malformedPing                              // a decode error on a one-way frame
            + frame(.pong, id: 0)                        // a reply type sent one-way
            + frame(.replicaGet(ReplicaGet(partition: PartitionID(0), key: [1])), id: 0))
        try await s.send(frame(.ping, id: 9) + frame(.members, id: 10))
        try await cluster.waitUntil("the two requests are answered") { s.frames.contains { $0.requestID == 10 } }
        #expect(s.frames.map(\.requestID) == [1, 9, 10])
        #expect(s.frames.map(\.message.type) == [.helloAck, .pong, .membersReply])
        #expect(cluster.nodes[0].metrics.exposition().contains("cairn_protocol_errors_total 2"))
        await cluster.stop()
    }

    /// A node's cast reaches its peer over the control link: a reply type sent one-way is
    /// dropped and counted there, and nothing comes back.
    @Test func aCastReachesThePeer() async throws {
        let cluster = try await TestCluster.start(count: 2, nVal: 2)
        cluster.nodes[0].cast(to: cluster.members[1].name, .pong)
        try await cluster.waitUntil("n2 counted the one-way pong") {
            cluster.nodes[1].metrics.exposition().contains("cairn_protocol_errors_total 1")
        }
        #expect(cluster.nodes[0].metrics.exposition().contains("cairn_protocol_errors_total 0"))
        await cluster.stop()
    }

    /// 8 MiB in 256 KiB chunks on the data link while the receiver holds the window full: a
    /// replica read on the control link still completes, the stream then completes in order, and
    /// the data link is a TCP connection of its own.
    @Test func aLargeStreamRunsOnItsOwnConnectionWhileReplicaTrafficIsAnswered() async throws {
        let cluster = try await TestCluster.start(count: 2, nVal: 2)
        let (n2, sink) = (cluster.members[1].name, GatedSink())
        let remote = Locked<String?>(nil)
        cluster.nodes[1].acceptStreams(of: .handoff) { request in
            remote.withLock { $0 = request.remote }
            return .success(sink)
        }
        let client = try await cluster.client([0])
        _ = try await client.put([1, 2, 3], value: [42], options: RequestOptions(w: .count(2)))

        let stream = try await cluster.nodes[0].openStream(to: n2, kind: .handoff, header: [0, 0, 0, 5])
        let chunkBytes = 256 << 10, chunks = 32
        let sender = Task {
            for i in 0..<chunks {
                let index = UInt32(i)
                var chunk = [UInt8((index >> 24) & 0xFF), UInt8((index >> 16) & 0xFF), UInt8((index >> 8) & 0xFF), UInt8(index & 0xFF)]
                chunk += [UInt8](repeating: UInt8(i & 0xFF), count: chunkBytes - 4)
                try await stream.send(chunk)
            }
            try await stream.finish()
        }
        sink.gate.release(4)
        let outbox = try #require(stream as? StreamOutbox)
        try await cluster.waitUntil("the receiver took 4 chunks and the sender filled its window") {
            sink.count == 4 && outbox.unacknowledgedBytes >= 4 << 20 - chunkBytes
        }
        // The data link is full; replica traffic on the control link is answered.
        let got = try await client.get([1, 2, 3], options: RequestOptions(r: .count(2)))
        #expect(got.values == [[42]])
        #expect(sink.count == 4, "the stream is still held at the receiver")

        let links = cluster.nodes[0].peerConnections(to: n2)
        let control = try #require(links.control?.channel.localAddress)
        let data = try #require(links.data?.channel.localAddress)
        #expect(control != data, "streams run on a TCP connection of their own")
        #expect(remote.value == "\(data.ipAddress ?? ""):\(data.port ?? 0)", "the stream arrived on the data connection")

        sink.gate.release(chunks)
        try await sender.value
        #expect(sink.received.value.map(\.index) == (0..<chunks).map(UInt32.init))
        #expect(sink.received.value.allSatisfy { $0.size == chunkBytes })
        #expect(sink.finished.value && stream.acknowledgedChunks == UInt64(chunks))
        client.close()
        await cluster.stop()
    }
}
