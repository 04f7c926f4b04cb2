import Testing
import CairnSim
import CairnNode
import CairnCore
import CairnWire
import CairnRing
import Logging

private let key = "user:42"
private let cart = #"{"cart":["apple"]}"#

/// A scenario's outcome, and a fingerprint of how the run got there (virtual time, messages
/// delivered and lost) that the same seed must reproduce.
private struct Run<Outcome: Sendable & Equatable>: Sendable, Equatable {
    var outcome: Outcome
    var fingerprint: String
}

/// Runs `body` in virtual time on `count` real nodes (the real storage engine over in-memory
/// disks), a seeded executor and a seeded network whose every message is delayed 0.1-2 ms, so
/// the seed fixes the interleaving and the run. Starts the nodes in `running` (default: all)
/// first and shuts them down after. The body returns what it saw; assertions are the caller's.
private func simulation<T: Sendable & Equatable>(seed: UInt64 = 1, count: Int = 3, nVal: Int = 3, running: [Int]? = nil,
                                                 _ body: @escaping @Sendable (SimulatedCluster) async throws -> T) async throws -> Run<T> {
    try await offPool { () throws -> Run<T> in
        var faults = InMemoryNetwork.Faults()
        faults.delay = .microseconds(100) ... .milliseconds(2)
        var settings = SimulatedCluster.Settings()
        settings.nVal = nVal
        return try SimulatedCluster.simulation(count: count, seed: seed, settings: settings, faults: faults, running: running) { cluster in
            let outcome = try await body(cluster)
            let counts = cluster.network.counts
            return Run(outcome: outcome, fingerprint: "elapsed=\(cluster.clock.elapsed) delivered=\(counts.delivered) dropped=\(counts.dropped)")
        }
    }
}

private func node(_ cluster: SimulatedCluster, _ i: Int) throws -> CairnNode {
    guard let n = cluster.node(i) else { throw SimTestError("n\(i + 1) never started") }
    return n
}

private func put(_ node: CairnNode, _ key: String, _ value: String, context: CausalContext = .empty, w: Quorum? = nil) async -> Message {
    await node.answer(.put(PutRequest(key: Array(key.utf8), value: Array(value.utf8), context: context, options: RequestOptions(w: w))))
}

private func delete(_ node: CairnNode, _ key: String, context: CausalContext) async -> Message {
    await node.answer(.delete(DeleteRequest(key: Array(key.utf8), context: context)))
}

private func get(_ node: CairnNode, _ key: String, r: Quorum? = nil) async -> Message {
    await node.answer(.get(GetRequest(key: Array(key.utf8), options: RequestOptions(r: r))))
}

/// The write's acknowledgement; any other reply fails the scenario, naming `what`.
private func written(_ reply: Message, _ what: String) throws -> WriteReply {
    guard case .writeReply(let w) = reply else { throw SimTestError("\(what): \(reply)") }
    return w
}

/// The read's reply (found or not); any other reply fails the scenario, naming `what`.
private func read(_ reply: Message, _ what: String) throws -> GetReply {
    guard case .getReply(let g) = reply else { throw SimTestError("\(what): \(reply)") }
    return g
}

private func errorReply(_ reply: Message) -> ErrorReply? {
    if case .error(let e) = reply { return e }
    return nil
}

/// Every sibling as text, tombstones included (shown as "(tombstone)").
private func text(_ siblings: [Sibling]) -> [String] {
    siblings.map { $0.isTombstone ? "(tombstone)" : String(decoding: $0.value, as: UTF8.self) }
}

/// The live values, as `CairnClient.get` returns them.
private func values(_ g: GetReply) -> [String] { text(g.siblings.filter { !$0.isTombstone }) }

/// The value of an unlabelled metric line `name value` in a Prometheus exposition (0 if absent).
private func metricValue(_ exposition: String, _ name: String) -> Double {
    for line in exposition.split(separator: "\n") where line.hasPrefix(name + " ") {
        return Double(line.dropFirst(name.count + 1)) ?? 0
    }
    return 0
}

/// The key's primaries in preference-list order, as the nodes of `cluster` place it.
private func primaries(_ key: String, in cluster: SimulatedCluster, nVal: Int) throws -> [NodeName] {
    let ring = try Ring(partitionCount: SimulatedCluster.Settings().ringSize, members: cluster.names)
    return ring.preferenceList(for: ring.partition(forKey: Array(key.utf8)), n: min(nVal, cluster.count))
}

private struct SiblingsOutcome: Sendable, Equatable {
    var both: Set<String>
    var one: [String]
}

/// Two writes with the same read context become siblings; a write with the context of a read
/// that showed both resolves them.
private func siblingsRun(seed: UInt64) async throws -> Run<SiblingsOutcome> {
    try await simulation(seed: seed) { c in
        let (a, b) = (try node(c, 0), try node(c, 2))
        _ = try written(await put(a, key, "v0"), "first write")
        let first = try read(await get(a, key), "first read")
        _ = try written(await put(a, key, "A", context: first.context), "write A")
        _ = try written(await put(b, key, "B", context: first.context), "write B")
        let both = try read(await get(b, key, r: .all), "read of the siblings")
        _ = try written(await put(a, key, "AB", context: both.context), "resolving write")
        let one = try read(await get(b, key, r: .all), "read after resolving")
        return SiblingsOutcome(both: Set(values(both)), one: values(one))
    }
}

/// The protocol on the simulator: real nodes, wire messages through `CairnNode.answer`, one fixed
/// seed per test (same seed, same run). What needs the real transport (sockets, backpressure,
/// hostile bytes, HTTP, data-directory locks, handshakes, client seed failover, and what the wire
/// decoder refuses: `answer` and the in-memory network pass messages as values) stays in
/// `InProcessClusterTests`.
@Suite(.timeLimit(.minutes(2)))
struct ProtocolSimulationTests {
    @Test func sameContextGivesSiblingsAndTheMergedContextResolvesThem() async throws {
        let run = try await siblingsRun(seed: 1)
        #expect(run.outcome == SiblingsOutcome(both: ["A", "B"], one: ["AB"]))
    }

    /// The outcome does not depend on the interleaving: every seed gives the same one, though
    /// the runs differ; and a seed replays its run exactly.
    @Test func siblingsComeOutTheSameForEverySeed() async throws {
        var runs: [UInt64: Run<SiblingsOutcome>] = [:]
        for seed in UInt64(1)...8 { runs[seed] = try await siblingsRun(seed: seed) }
        for seed in runs.keys.sorted() {
            #expect(runs[seed]?.outcome == SiblingsOutcome(both: ["A", "B"], one: ["AB"]), "seed \(seed)")
        }
        #expect(Set(runs.values.map(\.fingerprint)).count > 1, "every seed ran the same: \(runs.values.map(\.fingerprint))")
        #expect(try await siblingsRun(seed: 5) == runs[5])
    }

    /// Issue 10 item 1, as reproduced with the CLI: a blind write's reply context covered a
    /// concurrent value it did not show, so writing again with it silently dropped that value.
    @Test func aWriteReplyShowsEveryValueItsContextCovers() async throws {
        struct Outcome: Sendable, Equatable {
            var concurrent: [String]
            var againConcurrent: [String]
            var oneConcurrent: [String]
            var final: Set<String>
        }
        let run = try await simulation { c in
            let (x, y) = (try node(c, 0), try node(c, 1))
            _ = try written(await put(x, key, "A", w: .all), "write A")
            // The reply's siblings are the written value ("B") and these.
            let t = try written(await put(y, key, "B", w: .all), "blind write B")
            // Y was shown A with the context; a write with it supersedes both, by Y's choice.
            let again = try written(await put(y, key, "B2", context: t.context, w: .all), "write B2")
            // Writes with the context of a reply that showed only B2 keep each other: C and D stay.
            let one = try written(await put(x, key, "C", context: again.context, w: .all), "write C")
            _ = try written(await put(y, key, "D", context: again.context, w: .all), "write D")
            let final = try read(await get(x, key, r: .all), "final read")
            return Outcome(concurrent: text(t.concurrent), againConcurrent: text(again.concurrent),
                           oneConcurrent: text(one.concurrent), final: Set(values(final)))
        }
        #expect(run.outcome == Outcome(concurrent: ["A"], againConcurrent: [], oneConcurrent: [], final: ["C", "D"]))
    }

    @Test func deleteHidesTheValueAndItsContextSupersedesTheTombstone() async throws {
        struct Outcome: Sendable, Equatable {
            var deletedFound: Bool
            var tombstoneContextEmpty: Bool
            var rewritten: [String]
            var missingFound: Bool
            var missingContextEmpty: Bool
        }
        let run = try await simulation { c in
            let n = try node(c, 0)
            _ = try written(await put(n, key, cart), "write")
            let before = try read(await get(n, key), "read")
            _ = try written(await delete(n, key, context: before.context), "delete")
            let deleted = try read(await get(n, key, r: .all), "read of the deleted key")
            _ = try written(await put(n, key, "again", context: deleted.context), "write over the tombstone")
            let rewritten = try read(await get(n, key, r: .all), "read after rewriting")
            let missing = try read(await get(n, "never-written"), "read of a missing key")
            return Outcome(deletedFound: deleted.found, tombstoneContextEmpty: deleted.context.vector.isEmpty,
                           rewritten: text(rewritten.siblings), missingFound: missing.found,
                           missingContextEmpty: missing.context.vector.isEmpty)
        }
        #expect(run.outcome == Outcome(deletedFound: false, tombstoneContextEmpty: false, rewritten: ["again"],
                                       missingFound: false, missingContextEmpty: true))
    }

    /// Killed: a power cut (`SimulatedCluster.crash`). Peers see it down at once, so W=3 and R=3
    /// are refused before anything is sent, naming the dead node.
    @Test func withOneNodeKilledQuorumsOfTwoWorkAndWAllFailsNamingIt() async throws {
        struct Outcome: Sendable, Equatable {
            var readAfter: [String]
            var firstW3: Message
            var peersUp: Int
            var w3: Message
            var r3: Message
            var dead: String
        }
        let run = try await simulation { c in
            let n = try node(c, 0)
            _ = try written(await put(n, key, cart, w: .all), "W=3 write")
            var rng = SplitMix64(seed: 1)
            await c.crash(2, tearing: false, rng: &rng)
            _ = try written(await put(n, key, "after", w: .count(2)), "W=2 write with n3 down")
            let got = try read(await get(n, key, r: .count(2)), "R=2 read with n3 down")
            let firstW3 = await put(n, key, "w3", w: .all)
            let peersUp = n.connectedPeers
            return Outcome(readAfter: values(got), firstW3: firstW3, peersUp: peersUp,
                           w3: await put(n, key, "w3", w: .all), r3: await get(n, key, r: .all), dead: c.members[2].address.description)
        }
        let o = run.outcome, dead = o.dead
        #expect(o.readAfter.contains("after"))
        if let e = errorReply(o.firstW3), let f = e.quorum, [.unavailable, .notReached].contains(e.code) {
            #expect(f.requirement == "W" && f.required == 3)
            #expect(f.replicas.contains { $0.address == dead && $0.outcome != .acknowledged })
            #expect(e.message.contains(dead))
        } else {
            Issue.record("W=3 with a node down: \(o.firstW3)")
        }
        // Once the node is known down, W=3 is refused before anything is sent.
        #expect(o.peersUp == 1)
        if let e = errorReply(o.w3), e.code == .unavailable {
            #expect(e.message.hasSuffix("nothing was written"))
            #expect(e.message.contains(dead))
        } else {
            Issue.record("expected unavailable, got \(o.w3)")
        }
        if let e = errorReply(o.r3), e.code == .unavailable {
            #expect(e.quorum?.requirement == "R")
        } else {
            Issue.record("expected unavailable, got \(o.r3)")
        }
    }

    /// With N=1, a write sent to a node that does not own the key's partition is forwarded;
    /// 30 keys round-robin over 3 nodes include such writes (exactly those the ring predicts).
    @Test func aNodeThatIsNotAReplicaForwardsWrites() async throws {
        struct Outcome: Sendable, Equatable {
            var wrongReads: [String]
            var forwarded: Double
            var sentToNonReplicas: Int
        }
        let run = try await simulation(nVal: 1) { c in
            let nodes = try (0..<3).map { try node(c, $0) }
            var wrongReads: [String] = []
            var sentToNonReplicas = 0
            for i in 0..<30 {
                let (k, v) = ("k\(i)", "v\(i)")
                let coordinator = nodes[i % 3]
                _ = try written(await put(coordinator, k, v, w: .count(1)), "W=1 write of \(k) to \(coordinator.config.name)")
                if try primaries(k, in: c, nVal: 1) != [coordinator.config.name] { sentToNonReplicas += 1 }
                for n in nodes {
                    let got = values(try read(await get(n, k), "read of \(k) from \(n.config.name)"))
                    if got != [v] { wrongReads.append("\(n.config.name) read \(k) as \(got)") }
                }
            }
            let forwarded = nodes.map { metricValue($0.metrics.exposition(), "cairn_forwarded_requests_total") }.reduce(0, +)
            return Outcome(wrongReads: wrongReads, forwarded: forwarded, sentToNonReplicas: sentToNonReplicas)
        }
        #expect(run.outcome.wrongReads == [])
        #expect(run.outcome.forwarded > 0)
        #expect(run.outcome.forwarded == Double(run.outcome.sentToNonReplicas))
    }

    /// Issue 10: a forwarding node whose first primary refuses (overloaded, starting, draining:
    /// certainly nothing applied) tries the next primary instead of relaying the refusal. Here n1
    /// is starting (bound and attached, never run): it answers every request `notReady`.
    @Test func forwardingMovesPastAPrimaryThatRefuses() async throws {
        struct Outcome: Sendable, Equatable {
            var failed: [String]
            var forwarded: Double
            /// Writes n3 forwarded: to a serving first primary, and past a refusing n1.
            var forwards: Int
            var pastTheRefusal: Int
        }
        let run = try await simulation(nVal: 2, running: [1, 2]) { c in
            var config = NodeConfig(name: c.names[0])
            config.listen = c.members[0].address
            config.http = nil
            config.dataDirectory = nil
            config.ringSize = SimulatedCluster.Settings().ringSize
            config.nVal = 2
            let starting = CairnNode(config: config, logger: Logger(label: "sim", factory: { _ in SwiftLogNoOpLogHandler() }),
                                     watchdogInterval: .some(nil), clock: c.clock, network: c.network)
            try await starting.bind()
            try starting.start(members: c.members)
            guard case .error(let e) = await put(starting, "probe", "x"), e.code.isRefusal else { throw SimTestError("n1 does not refuse") }
            let client = try node(c, 2)
            var failed: [String] = []
            var forwards = 0, pastTheRefusal = 0
            for i in 0..<40 {
                let k = "f\(i)"
                let reply = await put(client, k, "\(i)", w: .count(1))
                if case .writeReply = reply {} else { failed.append("\(k): \(reply)") }
                let p = try primaries(k, in: c, nVal: 2)
                if !p.contains(client.config.name) {
                    forwards += 1
                    if p.first == c.names[0] { pastTheRefusal += 1 }
                }
            }
            let forwarded = metricValue(client.metrics.exposition(), "cairn_forwarded_requests_total")
            return Outcome(failed: failed, forwarded: forwarded, forwards: forwards, pastTheRefusal: pastTheRefusal)
        }
        let o = run.outcome
        #expect(o.failed == [])
        #expect(o.forwarded > 0)
        #expect(o.pastTheRefusal > 0, "no key had n1 as its first primary")
        // One attempt per forwarded write, and one more for each that had to move past n1.
        #expect(o.forwarded == Double(o.forwards + o.pastTheRefusal))
    }

    @Test func invalidQuorumsAreRejectedWithAClearError() async throws {
        let run = try await simulation { c in
            let n = try node(c, 0)
            return await put(n, key, cart, w: .count(4))
        }
        guard let e = errorReply(run.outcome), e.code == .invalidArgument else {
            Issue.record("expected invalid argument, got \(run.outcome)"); return
        }
        #expect(e.message.contains("N=3"))
    }
}
