import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import CairnClient
import CairnCore
import CairnWire
import NIOCore
import NIOPosix
import Synchronization
import CairnTestSupport

/// An address whose connections are refused (see `deadPort`).
func deadAddress() async throws -> String { "127.0.0.1:\(deadPort)" }

/// A loopback port that refuses connections for as long as the test process runs: a socket is
/// bound to it and never listens, so connecting gets ECONNREFUSED, and no other test (running in
/// parallel) can bind it meanwhile — a port closed after picking could be taken again.
private let deadPort: Int = {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = 0
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &addr) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
    }
    // Port 1 (tcpmux) is not served on these machines: a fallback that still refuses.
    return bound ? Int(UInt16(bigEndian: addr.sin_port)) : 1
}()

private let ok = Message.writeReply(WriteReply(context: CausalContext(VersionVector([(ActorID(node: "n1", epoch: 1), 1)])), writtenTimestampMillis: 1, concurrent: []))

@Suite struct ClientTests {
    @Test func refusalsMoveOnToTheNextSeed() async throws {
        let busy = ScriptedServer(.refuse(.overloaded)), good = ScriptedServer(.answer(ok))
        let a = try await busy.start(), b = try await good.start()
        let client = try await CairnClient.connect(seeds: [a, b])
        for _ in 0..<4 {
            let ctx = try await client.put([1], value: [2])
            #expect(ctx.context.vector[ActorID(node: "n1", epoch: 1)] == 1)
            #expect(ctx.siblings == [Sibling(value: [2], timestampMillis: 1)])
        }
        #expect(good.received.load(ordering: .relaxed) == 4)
        client.close(); await busy.stop(); await good.stop()
    }

    @Test func everyNodeRefusingIsOverloaded() async throws {
        let s1 = ScriptedServer(.refuse(.shuttingDown)), s2 = ScriptedServer(.refuse(.notReady))
        let client = try await CairnClient.connect(seeds: [try await s1.start(), try await s2.start()])
        let error = await catching { () async throws(CairnError) in try await client.put([1], value: [1]) }
        guard case .overloaded? = error else { Issue.record("got \(String(describing: error))"); return }
        #expect(error?.certainlyNotApplied == true)
        client.close(); await s1.stop(); await s2.stop()
    }

    @Test func aDeadSeedIsSkippedButNoSeedAtAllIsAnError() async throws {
        let good = ScriptedServer(.answer(ok))
        let dead = try await deadAddress()
        let client = try await CairnClient.connect(seeds: [dead, try await good.start()])
        try await client.put([1], value: [1])
        client.close()
        let none = await catching { () async throws(CairnError) in try await CairnClient.connect(seeds: [dead]) }
        guard case .noNodeReachable? = none else { Issue.record("got \(String(describing: none))"); return }
        await good.stop()
    }

    /// A write that got no answer may have landed: it is reported as a timeout, and the client
    /// does not silently send it to another node.
    @Test func aWriteWithAnUnknownOutcomeIsNotRetriedElsewhere() async throws {
        let silent = ScriptedServer(.silent), good = ScriptedServer(.answer(ok))
        var config = CairnClient.Configuration()
        config.replyMarginMillis = 100
        let client = try await CairnClient.connect(seeds: [try await silent.start(), try await good.start()], configuration: config)
        // Seeds rotate: the first call goes to the silent node first, the second to the good one.
        let first = await catching { () async throws(CairnError) in try await client.put([1], value: [1], options: RequestOptions(timeoutMillis: 200)) }
        guard case .timeout? = first else { Issue.record("expected a timeout, got \(String(describing: first))"); return }
        #expect(good.received.load(ordering: .relaxed) == 0)   // not retried on the good node
        try await client.put([1], value: [1], options: RequestOptions(timeoutMillis: 10_000))
        #expect(good.received.load(ordering: .relaxed) == 1)
        client.close(); await silent.stop(); await good.stop()
    }

    /// With several connections per node, requests are spread over all of them however the
    /// callers' tasks interleave (a batch of concurrent callers once all took the same one).
    @Test func requestsSpreadOverEveryConnectionOfANode() async throws {
        let server = ScriptedServer(.answer(ok))
        var config = CairnClient.Configuration()
        config.connectionsPerNode = 4
        let client = try await CairnClient.connect(seeds: [try await server.start()], configuration: config)
        try await withThrowingDiscardingTaskGroup { group in
            for _ in 0..<64 { group.addTask { for _ in 0..<16 { try await client.put([1], value: [2]) } } }
        }
        let counts = server.receivedPerConnection.withLock { Array($0.values) }
        // 1,024 puts: at most 64 of them on the first connection while the pool fills, the rest
        // a quarter on each (the connect's ping is answered by the connection handler, uncounted).
        #expect(counts.count == 4, "\(counts)")
        #expect(counts.reduce(0, +) == 64 * 16)
        #expect(counts.allSatisfy { $0 >= 200 }, "\(counts)")
        client.close(); await server.stop()
    }

    /// A fresh client under a burst of concurrent requests opens each of its connections once:
    /// requests needing one that is still connecting wait for that connect (or use another open
    /// connection of the node) instead of opening their own.
    @Test func aBurstOfRequestsOpensEachConnectionOnce() async throws {
        let servers = [ScriptedServer(.answer(ok)), ScriptedServer(.answer(ok)), ScriptedServer(.answer(ok))]
        var seeds: [String] = []
        for s in servers { seeds.append(try await s.start()) }
        var config = CairnClient.Configuration()
        config.connectionsPerNode = 3
        let client = try await CairnClient.connect(seeds: seeds, configuration: config)
        #expect(servers.map { $0.accepted.load(ordering: .relaxed) } == [1, 0, 0], "connect opens one connection to the first seed")
        let done = await withTaskGroup(of: Bool.self) { group in
            // Half through the completion-handler form (no task per request), half async.
            for _ in 0..<150 {
                group.addTask {
                    let r = await withCheckedContinuation { c in client.put([1], value: [2]) { c.resume(returning: $0) } }
                    if case .success = r { return true }
                    return false
                }
                group.addTask { (try? await client.put([1], value: [2])) != nil }
            }
            return await group.reduce(0) { $0 + ($1 ? 1 : 0) }
        }
        #expect(done == 300)
        // Every slot open (connects still under way are waited for), then one request on each:
        // requests 300-308 cover every (seed, slot) pair, so each connection was accepted.
        #expect(await client.openAllConnections() == 9)
        for _ in 0..<9 { _ = try await client.put([1], value: [2]) }
        #expect(servers.map { $0.accepted.load(ordering: .relaxed) } == [3, 3, 3])
        #expect(servers.map { $0.received.load(ordering: .relaxed) }.reduce(0, +) == 309)
        client.close()
        // Closed: calls fail without connecting again.
        await #expect(throws: CairnError.self) { try await client.put([1], value: [2]) }
        let failed = await withCheckedContinuation { c in client.put([1], value: [2]) { c.resume(returning: $0) } }
        guard case .failure(.noNodeReachable) = failed else { Issue.record("after close: \(failed)"); return }
        #expect(await client.openAllConnections() == 0)
        #expect(servers.map { $0.accepted.load(ordering: .relaxed) } == [3, 3, 3])
        for s in servers { await s.stop() }
    }

    /// `openAllConnections` opens every slot of every live seed before any request; a dead seed
    /// counts as not open, and requests still work.
    @Test func allConnectionsCanBeOpenedUpFront() async throws {
        let a = ScriptedServer(.answer(ok)), b = ScriptedServer(.answer(ok))
        var config = CairnClient.Configuration()
        config.connectionsPerNode = 2
        let client = try await CairnClient.connect(seeds: [try await a.start(), try await deadAddress(), try await b.start()],
                                                   configuration: config)
        #expect(await client.openAllConnections() == 4)
        #expect(await client.openAllConnections() == 4, "open ones are kept; the dead seed fails again")
        // Requests 0-5 reach every slot of both live seeds (the dead seed's go on to the next),
        // so every connection the client opened was accepted by now.
        for _ in 0..<6 { _ = try await client.put([1], value: [2]) }
        #expect([a.accepted.load(ordering: .relaxed), b.accepted.load(ordering: .relaxed)] == [2, 2])
        #expect(a.received.load(ordering: .relaxed) + b.received.load(ordering: .relaxed) == 6)
        client.close(); await a.stop(); await b.stop()
    }

    /// Consecutive requests cover every (seed, connection) pair before repeating one.
    @Test func requestNumbersCoverEverySeedAndConnection() {
        for (seeds, perNode) in [(3, 3), (3, 4), (2, 2), (1, 4), (5, 1)] {
            var seen = Set<[Int]>()
            for first in 0..<(seeds * perNode) {
                let a = CairnClient.Attempting(message: .ping, waitMillis: 1, first: first, seedCount: seeds)
                seen.insert([a.seed(0), a.pick % perNode])
            }
            #expect(seen.count == seeds * perNode, "\(seeds) seeds × \(perNode) connections: \(seen.count) pairs")
        }
    }

    /// The completion-handler forms: the same outcomes as the async calls, failover included.
    @Test func completionHandlersGiveTheAsyncOutcomes() async throws {
        let busy = ScriptedServer(.refuse(.overloaded)), good = ScriptedServer(.answer(ok))
        var config = CairnClient.Configuration()
        config.connectionsPerNode = 2   // the first calls open the second connections from a task
        let client = try await CairnClient.connect(seeds: [try await busy.start(), try await good.start()], configuration: config)
        for _ in 0..<4 {
            let written = await withCheckedContinuation { c in client.put([1], value: [2]) { c.resume(returning: $0) } }
            #expect(try written.get().siblings == [Sibling(value: [2], timestampMillis: 1)])
        }
        #expect(good.received.load(ordering: .relaxed) == 4, "refusals moved on to the good seed")
        let deleted = await withCheckedContinuation { c in client.delete([1]) { c.resume(returning: $0) } }
        #expect(try deleted.get().siblings == [.tombstone(timestampMillis: 1)])
        let wrongReply = await withCheckedContinuation { c in client.get([1]) { c.resume(returning: $0) } }
        guard case .failure(.server) = wrongReply else { Issue.record("a write reply to a get: \(wrongReply)"); return }
        let invalid = await withCheckedContinuation { c in client.get([]) { c.resume(returning: $0) } }
        guard case .failure(.invalidArgument) = invalid else { Issue.record("empty key: \(invalid)"); return }
        client.close(); await busy.stop(); await good.stop()
    }

    /// A completion-handler get that finds nothing reports `notFound` with the context; one whose
    /// first node is silent is retried on the next (reads are idempotent), and a write is not.
    @Test func completionHandlersFailOverLikeTheAsyncCalls() async throws {
        let missing = Message.getReply(GetReply(found: false, siblings: [], context: CausalContext(VersionVector([(ActorID(node: "n1", epoch: 1), 3)]))))
        let silent = ScriptedServer(.silent), good = ScriptedServer(.answer(missing))
        var config = CairnClient.Configuration()
        config.replyMarginMillis = 100
        let client = try await CairnClient.connect(seeds: [try await silent.start(), try await good.start()], configuration: config)
        // Seeds rotate: the first get and the put start at the silent node, the get between them
        // at the good one.
        let read = await withCheckedContinuation { c in client.get([1], options: RequestOptions(timeoutMillis: 100)) { c.resume(returning: $0) } }
        guard case .failure(.notFound(let ctx)) = read else { Issue.record("got \(read)"); return }
        #expect(ctx.vector[ActorID(node: "n1", epoch: 1)] == 3)
        #expect(good.received.load(ordering: .relaxed) == 1)
        _ = await withCheckedContinuation { c in client.get([1], options: RequestOptions(timeoutMillis: 100)) { c.resume(returning: $0) } }
        let write = await withCheckedContinuation { c in client.put([1], value: [1], options: RequestOptions(timeoutMillis: 100)) { c.resume(returning: $0) } }
        guard case .failure(.timeout) = write else { Issue.record("expected a timeout, got \(write)"); return }
        #expect(good.received.load(ordering: .relaxed) == 2, "the write was not sent to the good node")
        client.close(); await silent.stop(); await good.stop()
    }

    @Test func readsAreRetriedOnAnotherNodeAfterATimeout() async throws {
        let reply = Message.getReply(GetReply(found: true, siblings: [Sibling(value: [7], timestampMillis: 1)], context: .empty))
        let silent = ScriptedServer(.silent), good = ScriptedServer(.answer(reply))
        var config = CairnClient.Configuration()
        config.replyMarginMillis = 1000   // the silent node costs 1.1 s; the good one answers within it
        let client = try await CairnClient.connect(seeds: [try await silent.start(), try await good.start()], configuration: config)
        for _ in 0..<2 {
            #expect(try await client.get([1], options: RequestOptions(timeoutMillis: 100)).values == [[7]])
        }
        client.close(); await silent.stop(); await good.stop()
    }

    @Test func oversizedKeysAndValuesFailBeforeSending() async throws {
        let server = ScriptedServer(.answer(ok))
        let client = try await CairnClient.connect(seeds: [try await server.start()])
        let big = await catching { () async throws(CairnError) in try await client.put([1], value: Array(repeating: 0, count: Limits().maxValueBytes + 1)) }
        guard case .invalidArgument? = big else { Issue.record("got \(String(describing: big))"); return }
        let empty = await catching { () async throws(CairnError) in try await client.get([]) }
        guard case .invalidArgument? = empty else { Issue.record("got \(String(describing: empty))"); return }
        #expect(server.received.load(ordering: .relaxed) == 0)
        client.close(); await server.stop()
    }

    @Test func errorRepliesMapToTypedErrors() {
        let f = QuorumFailure(kind: .notReached, operation: .put, requirement: "W", required: 3, achieved: 2, candidates: 3, replicas: [])
        #expect(CairnError(ErrorReply(f)) == .quorumNotReached(f))
        var u = f
        u.kind = .unavailable
        #expect(CairnError(ErrorReply(u)) == .unavailable(u))
        #expect(CairnError(ErrorReply(code: .timeout, message: "t")) == .timeout("t"))
        #expect(CairnError(ErrorReply(code: .invalidArgument, message: "i")) == .invalidArgument("i"))
        #expect(CairnError(ErrorReply(code: .storage, message: "s")) == .server(code: ErrorCode.storage.rawValue, message: "s"))
        #expect(CairnError.quorumNotReached(f).certainlyNotApplied == false)
        #expect(CairnError.unavailable(u).certainlyNotApplied == true)
    }

    @Test func seedsParse() {
        #expect(CairnClient.parseSeed("127.0.0.1:7401")?.port == 7401)
        #expect(CairnClient.parseSeed("[::1]:7401")?.host == "::1")
        #expect(CairnClient.parseSeed("host") == nil)
        #expect(CairnClient.parseSeed(":7401") == nil)
        #expect(CairnClient.parseSeed("h:0") == nil)
    }
}

func catching<T>(_ body: () async throws(CairnError) -> T) async -> CairnError? {
    do {
        _ = try await body()
        return nil
    } catch {
        return error
    }
}

/// Issue 10: a request whose caller is cancelled (a coordinator past its deadline) stops waiting
/// at once and frees its pending slot, instead of holding it until its own timeout.
@Suite(.timeLimit(.minutes(3))) struct ConnectionCancellationTests {
    @Test func cancellingTheCallerReleasesTheRequestAndItsSlot() async throws {
        let server = ScriptedServer(.silent)
        let address = try HostPort(parsing: try await server.start())
        let connection = try await Connection.connect(host: address.host, port: Int(address.port), group: MultiThreadedEventLoopGroup.singleton,
                                                      limits: Limits(), maxPending: 1)
        let waiting = Task { () async throws(ConnectionError) -> Message in try await connection.request(.get(GetRequest(key: [1])), timeoutMillis: 60_000) }
        for _ in 0..<10_000 where server.received.load(ordering: .relaxed) == 0 { try await Task.sleep(for: .milliseconds(1)) }
        #expect(server.received.load(ordering: .relaxed) == 1)
        // The only slot is taken: a second request is refused, certainly not sent.
        await #expect(throws: ConnectionError.tooManyPending(1)) { try await connection.request(.get(GetRequest(key: [1])), timeoutMillis: 60_000) }
        waiting.cancel()
        // Ends now, not after 60 s (the suite's time limit would catch that), as abandoned.
        await #expect(throws: ConnectionError.abandoned) { try await waiting.value }
        let second = Task { () async throws(ConnectionError) -> Message in try await connection.request(.get(GetRequest(key: [1])), timeoutMillis: 60_000) }
        for _ in 0..<10_000 where server.received.load(ordering: .relaxed) < 2 { try await Task.sleep(for: .milliseconds(1)) }
        #expect(server.received.load(ordering: .relaxed) == 2, "the slot was freed: the next request went out")
        second.cancel()
        _ = await second.result
        connection.close()
        await server.stop()
    }
}
