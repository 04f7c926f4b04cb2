import Testing
import CairnNode
import CairnClient
import CairnCore
import CairnWire
import Logging
import NIOCore
import NIOPosix
import Synchronization
import Foundation

/// Silent, unless CAIRN_TEST_LOG names a level (debugging a test: the nodes' logs on stderr).
let quietLogger: Logger = {
    guard let level = ProcessInfo.processInfo.environment["CAIRN_TEST_LOG"].flatMap(Logger.Level.init(rawValue:)) else {
        return Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
    }
    var l = Logger(label: "test", factory: { StreamLogHandler.standardError(label: $0) })
    l.logLevel = level
    return l
}()

/// A loopback address of its own for each in-process cluster (all of 127/8 is loopback on
/// Linux), away from 127.0.0.x where the process tests and local clusters listen. A port the
/// kernel hands to this cluster may have been another test's a moment ago; a dialer still
/// retrying that test's address (a stopped peer, a "dead" member, a client) reaches nothing
/// here, so no count or log of this cluster's nodes depends on what ran before it.
enum TestLoopback {
    private static let next = Atomic<UInt32>(0)
    /// 127.(100 + c / 250 % 100).(pid % 256).(c % 250 + 1) for the c-th call in this process.
    static func host() -> String {
        let c = next.add(1, ordering: .relaxed).oldValue
        let pid = UInt32(truncatingIfNeeded: getpid()) % 256
        return "127.\(100 + c / 250 % 100).\(pid).\(c % 250 + 1)"
    }
}

/// Real nodes in this process, on a loopback address of their own (`TestLoopback`) with
/// kernel-chosen ports.
final class TestCluster: Sendable {
    let nodes: [CairnNode]
    let members: [MemberAddress]
    /// `cluster.name`, unique per cluster: a node of another test (one still stopping, whose
    /// ring lists an address the kernel has given to this cluster since) is refused at the
    /// handshake instead of talking to this cluster's nodes.
    let name: String
    private let tasks: [Task<Void, any Error>]

    private init(nodes: [CairnNode], members: [MemberAddress], name: String, tasks: [Task<Void, any Error>]) {
        self.nodes = nodes
        self.name = name
        self.members = members
        self.tasks = tasks
    }

    /// `faults`: by node index, the transport faults that node injects into what it sends.
    static func start(count: Int = 3, nVal: Int = 3, faults: [Int: TransportFaults] = [:],
                      configure: (inout NodeConfig) -> Void = { _ in }) async throws -> TestCluster {
        var nodes: [CairnNode] = []
        var members: [MemberAddress] = []
        var name = "test-\(UInt64.random(in: 0...UInt64.max))"
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-test-\(UInt64.random(in: 0...UInt64.max))").path
        let host = TestLoopback.host()
        for i in 1...count {
            var c = NodeConfig(name: try NodeName("n\(i)"))
            c.listen = HostPort(host: host, port: 0)
            c.http = HostPort(host: host, port: 0)
            c.clusterName = name
            c.ringSize = 64
            c.nVal = nVal
            c.reconnectMinMillis = 20
            c.reconnectMaxMillis = 200
            c.requestTimeoutMillis = 10_000   // generous: no assertion here is about speed
            c.drainTimeoutMillis = 2000
            c.dataDirectory = scratch + "/n\(i)"
            configure(&c)
            name = c.clusterName
            let node = CairnNode(config: c, logger: quietLogger, transportFaults: faults[i - 1])
            let bound = try await node.bind()
            nodes.append(node)
            members.append(MemberAddress(name: c.name, address: bound.client))
        }
        for n in nodes { try n.start(members: members) }
        let tasks = nodes.map { n in Task { try await n.run() } }
        let cluster = TestCluster(nodes: nodes, members: members, name: name, tasks: tasks)
        try await cluster.waitUntil("all nodes serving with every peer connected") {
            nodes.allSatisfy { $0.state == .serving && $0.connectedPeers == count - 1 }
        }
        return cluster
    }

    func address(_ i: Int) -> String { members[i].address.description }

    func client(_ indices: [Int]) async throws -> CairnClient {
        var config = CairnClient.Configuration()
        config.defaultTimeoutMillis = 10_000   // generous: no assertion here is about speed
        return try await CairnClient.connect(seeds: indices.map(address), configuration: config)
    }

    /// Polls `condition` every 5 ms for at most `seconds`; fails the test with `what` if it never holds.
    func waitUntil(_ what: String, seconds: Int = 15, _ condition: () async -> Bool) async throws {
        let deadline = ContinuousClock.now + .seconds(seconds)
        while ContinuousClock.now < deadline {
            if await condition() { return }
            try await Task.sleep(for: .milliseconds(5))
        }
        Issue.record("timed out waiting until \(what)")
        throw HarnessError.timeout(what)
    }

    func crash(_ i: Int) async {
        nodes[i].crash()
        _ = try? await tasks[i].value
    }

    /// Starts node `i` again in this process (after `crash(i)`), on its address and data
    /// directory: a new `CairnNode`, running; the caller shuts it down.
    func startAgain(_ i: Int) async throws -> (node: CairnNode, run: Task<Void, any Error>) {
        var c = nodes[i].config
        c.listen = members[i].address
        let node = CairnNode(config: c, logger: quietLogger)
        try await node.bind()
        try node.start(members: members)
        return (node, Task { try await node.run() })
    }

    func stop() async {
        for n in nodes { n.shutdown() }
        for t in tasks { _ = try? await t.value }
    }

    /// The result of `run()` for node `i`, after it ended.
    func runResult(_ i: Int) async -> Result<Void, any Error> { await tasks[i].result }
}

enum HarnessError: Error { case timeout(String) }

/// Completes the internode handshake on `conn` as node `node` (hello, then the proof once the
/// ack verifies), with TestCluster's cluster name and no secret unless given. Returns the
/// acceptor's reply to the hello: `helloAck` when the proof was sent, else what refused it.
func handshake(_ conn: Connection, as node: String, to peer: NodeName, cluster: String = "test",
               secret: ClusterSecret = .empty) async throws -> Message {
    let me = ClusterHandshake(cluster: cluster, me: try NodeName(node), secret: secret)
    let hello = me.hello(nonce: ClusterHandshake.makeNonce())
    let reply = try await conn.request(.hello(hello), timeoutMillis: 10_000)
    guard case .helloAck(let ack) = reply else { return reply }
    try await conn.cast(.helloProof(try me.proof(for: ack, to: hello, dialled: peer, at: conn.remote).get())).get()
    return reply
}

/// A raw TCP connection for sending arbitrary bytes and reading whatever comes back.
final class RawSocket: Sendable {
    final class Collector: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let bytes = Mutex<[UInt8]>([])
        let closed = Atomic<Bool>(false)
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var b = unwrapInboundIn(data)
            let chunk = b.readBytes(length: b.readableBytes) ?? []
            bytes.withLock { $0 += chunk }
        }
        func channelInactive(context: ChannelHandlerContext) {
            closed.store(true, ordering: .relaxed)
            context.fireChannelInactive()
        }
    }

    let channel: any Channel
    let collector: Collector

    private init(channel: any Channel, collector: Collector) {
        self.channel = channel
        self.collector = collector
    }

    /// `reading: false` leaves what the server sends unread (in the kernel) until `startReading()`.
    static func connect(_ address: HostPort, reading: Bool = true) async throws -> RawSocket {
        let collector = Collector()
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelOption(.autoRead, value: reading)
            .channelInitializer { ch in ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(collector) } }
            .connect(host: address.host, port: address.port).get()
        return RawSocket(channel: channel, collector: collector)
    }

    func send(_ bytes: [UInt8]) async throws {
        var buf = channel.allocator.buffer(capacity: bytes.count)
        buf.writeBytes(bytes)
        try await channel.writeAndFlush(buf)
    }

    func startReading() async throws {
        try await channel.setOption(.autoRead, value: true).get()
        channel.read()
    }

    var received: [UInt8] { collector.bytes.withLock { $0 } }

    /// The number of complete frames received so far, and the message type byte of each (cheap:
    /// bodies are not decoded).
    var frameTypes: [UInt8] {
        collector.bytes.withLock { b in
            var types: [UInt8] = []
            var i = 0
            while i + 4 <= b.count {
                let n = Int(b[i]) << 24 | Int(b[i + 1]) << 16 | Int(b[i + 2]) << 8 | Int(b[i + 3])
                guard n >= 10, i + 4 + n <= b.count else { break }
                types.append(b[i + 5])   // body = version:u8 type:u8 request-id:u64be payload
                i += 4 + n
            }
            return types
        }
    }
    var isClosed: Bool { collector.closed.load(ordering: .relaxed) }

    /// Complete reply frames received so far.
    var frames: [Envelope] {
        var out: [Envelope] = []
        var r = ByteReader(received)
        while let n = try? r.readU32(), let body = try? r.readRaw(Int(n)) {
            if let e = try? WireCodec.decodeBody(body, limits: Limits()) { out.append(e) }
        }
        return out
    }

    func close() { channel.close(promise: nil) }
}

extension ByteReader {
    mutating func readRaw(_ n: Int) throws -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(n)
        for _ in 0..<n { out.append(try readU8()) }
        return out
    }
}

/// One HTTP/1.1 GET over a raw socket; returns the status line and the body.
func httpGet(_ address: HostPort, _ path: String, within cluster: TestCluster) async throws -> (status: String, body: String) {
    let s = try await RawSocket.connect(address)
    defer { s.close() }
    try await s.send(Array("GET \(path) HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".utf8))
    try await cluster.waitUntil("HTTP response for \(path)") { s.isClosed }
    let text = String(decoding: s.received, as: UTF8.self)
    let status = text.split(separator: "\r\n", maxSplits: 1).first.map(String.init) ?? ""
    let body = text.components(separatedBy: "\r\n\r\n").dropFirst().joined(separator: "\r\n\r\n")
    return (status, body)
}

/// Runs `body`, which is expected to fail; returns its error (nil, and a recorded issue, if it
/// succeeded).
func failure<T>(_ what: String, _ body: () async throws(CairnError) -> T) async -> CairnError? {
    do {
        _ = try await body()
        Issue.record("expected \(what) to fail, but it succeeded")
        return nil
    } catch {
        return error
    }
}

/// The value of an unlabelled metric line `name value` in a Prometheus exposition (0 if absent).
func metricValue(_ exposition: String, _ name: String) -> Double {
    for line in exposition.split(separator: "\n") where line.hasPrefix(name + " ") {
        return Double(line.dropFirst(name.count + 1)) ?? 0
    }
    return 0
}
