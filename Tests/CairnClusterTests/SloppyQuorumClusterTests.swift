import Testing
@testable import CairnNode
import CairnClient
import CairnCore
import CairnWire
import Foundation

/// Sloppy quorum, hinted handoff, read repair and the durability receipt with real nodes on
/// loopback in this process (issue 13).
@Suite(.timeLimit(.minutes(4)))
struct SloppyQuorumClusterTests {
    /// Node `node`'s own copy of `key` (its primary vnode), read directly: no coordinator, no
    /// other replica.
    private func localCopy(_ node: CairnNode, _ key: String) async throws -> VersionedObject? {
        let k = Array(key.utf8)
        guard let p = node.core.view?.partition(forKey: k), let v = node.core.vnodes.vnode(for: p) else { return nil }
        return try await v.get(k)
    }

    /// Keys of `keys` whose copy on `node` lacks a live value.
    private func missing(on node: CairnNode, _ keys: [String]) async throws -> [String] {
        var out: [String] = []
        for k in keys where try await localCopy(node, k)?.isDeleted ?? true { out.append(k) }
        return out
    }

    /// The node's `name{label="value"} n` metric (0 if absent).
    private func labelled(_ node: CairnNode, _ line: String) -> Double {
        node.core.metrics.exposition().split(separator: "\n").first { $0.hasPrefix(line + " ") }
            .flatMap { Double($0.split(separator: " ").last ?? "") } ?? 0
    }

    @Test func aReplicaThatWasDownGetsEveryWriteItMissedFromHints() async throws {
        let cluster = try await TestCluster.start()
        let client = try await cluster.client([0, 1])
        await cluster.crash(2)
        let keys = (0..<60).map { "hinted-\($0)" }
        for k in keys {
            let r = try await client.put(Array(k.utf8), value: Array("v-\(k)".utf8), options: RequestOptions(w: .count(2)))
            // Three nodes, N=3: no fallback exists, so the receipt names the two primaries.
            #expect(r.acks.count == 2 && r.acks.allSatisfy { $0.role == .primary && $0.durable })
        }
        let held = cluster.nodes[0].core.hints?.pending(for: try NodeName("n3")) ?? 0
        let held2 = cluster.nodes[1].core.hints?.pending(for: try NodeName("n3")) ?? 0
        #expect(held + held2 == 60, "one hint per write for the primary that missed it")
        let (n3, run3) = try await cluster.startAgain(2)
        let back = ContinuousClock.now
        try await cluster.waitUntil("n1 and n2 hold no hint for n3", seconds: 30) {
            cluster.nodes[0].core.hints?.total == 0 && cluster.nodes[1].core.hints?.total == 0
        }
        let took = ContinuousClock.now - back
        #expect(try await missing(on: n3, keys).isEmpty, "n3 holds every write it missed")
        print("hint replay: 60 writes reached n3 \(took) after it came back")
        // From n3 alone: the other two stopped, R=1.
        await cluster.crash(0)
        await cluster.crash(1)
        let alone = try await CairnClient.connect(seeds: [cluster.address(2)])
        for k in keys {
            let got = try await alone.get(Array(k.utf8), options: RequestOptions(r: .count(1), timeoutMillis: 5000))
            #expect(got.values == [Array("v-\(k)".utf8)])
        }
        alone.close()
        client.close()
        n3.shutdown()
        _ = try? await run3.value
        await cluster.stop()
    }

    @Test func aHintHolderThatCrashesStillDeliversAfterItsRestart() async throws {
        let cluster = try await TestCluster.start()
        let client = try await cluster.client([0])
        await cluster.crash(2)
        let keys = (0..<30).map { "kept-\($0)" }
        for k in keys { try await client.put(Array(k.utf8), value: [1], options: RequestOptions(w: .count(2))) }
        client.close()
        #expect(cluster.nodes[0].core.hints?.pending(for: try NodeName("n3")) == 30, "n1 coordinated every write (it is a primary of all)")
        await cluster.crash(0)
        let (n1, run1) = try await cluster.startAgain(0)
        try await cluster.waitUntil("n1 reloaded its hints") { n1.core.hints?.pending(for: (try? NodeName("n3")) ?? n1.config.name) == 30 }
        let (n3, run3) = try await cluster.startAgain(2)
        try await cluster.waitUntil("n1 replayed its hints to n3", seconds: 30) { n1.core.hints?.total == 0 }
        #expect(try await missing(on: n3, keys).isEmpty)
        #expect(labelled(n1, "cairn_hints_replayed_total") >= 30)
        for (n, r) in [(n1, run1), (n3, run3)] {
            n.shutdown()
            _ = try? await r.value
        }
        await cluster.stop()
    }

    @Test func twoPrimariesDownWritesGoToFallbacksAndReachThePrimariesWhenTheyReturn() async throws {
        let cluster = try await TestCluster.start(count: 5)
        let view = try #require(cluster.nodes[0].core.view)
        let (n4, n5) = (try NodeName("n4"), try NodeName("n5"))
        // Keys whose primaries include both n4 and n5.
        let keys = (0..<2000).map { "sloppy-\($0)" }.filter { k in
            let primaries = view.placement(forKey: Array(k.utf8)).1.map(\.node)
            return primaries.contains(n4) && primaries.contains(n5)
        }.prefix(40).map { $0 }
        try #require(keys.count == 40)
        await cluster.crash(3)
        await cluster.crash(4)
        let client = try await cluster.client([0, 1, 2])
        for k in keys {
            let r = try await client.put(Array(k.utf8), value: Array(k.utf8), options: RequestOptions(w: .count(2)))
            #expect(r.acks.contains { if case .fallback = $0.role { true } else { false } }, "a fallback took a down primary's share")
        }
        // PW=2 cannot be met with two of three primaries down: refused before anything is sent.
        do {
            try await client.put(Array(keys[0].utf8), value: [0], options: RequestOptions(w: .count(2), pw: .count(2)))
            Issue.record("a PW=2 write succeeded with two primaries down")
        } catch {
            guard case .unavailable(let f) = error else { Issue.record("expected unavailable, got \(error)"); return }
            #expect(f.requirement == "PW")
        }
        // The sloppy-off request is refused too (W=2 of primaries only, one is up).
        do {
            try await client.put(Array(keys[0].utf8), value: [0], options: RequestOptions(w: .count(2), sloppy: false))
            Issue.record("a strict W=2 write succeeded with two primaries down")
        } catch {
            #expect(error.certainlyNotApplied)
        }
        let holders = cluster.nodes.prefix(3).filter { !$0.core.vnodes.fallbackPartitions.isEmpty }
        #expect(!holders.isEmpty, "the writes went to fallback vnodes")
        let (b4, r4) = try await cluster.startAgain(3)
        let (b5, r5) = try await cluster.startAgain(4)
        try await cluster.waitUntil("every fallback copy handed to its primaries", seconds: 60) {
            cluster.nodes.prefix(3).allSatisfy { $0.core.vnodes.fallbackPartitions.isEmpty }
        }
        // Each primary alone serves every key.
        for node in [b4, b5] { #expect(try await missing(on: node, keys).isEmpty, "\(node.config.name) holds every key") }
        for i in 0..<3 {
            let node = cluster.nodes[i]
            let mine = keys.filter { k in view.placement(forKey: Array(k.utf8)).1.contains { $0.node == node.config.name } }
            #expect(try await missing(on: node, mine).isEmpty, "\(node.config.name) holds every key it is a primary of")
        }
        client.close()
        for (n, r) in [(b4, r4), (b5, r5)] {
            n.shutdown()
            _ = try? await r.value
        }
        await cluster.stop()
    }

    /// A fallback that coordinates (every primary down) stamps with an actor of its own, fresh
    /// for each fallback vnode: its copy starts empty each time, so stamping with the node's actor
    /// would issue a dot again, and the primaries would discard the second write as seen.
    @Test func aFallbackCoordinatorNeverIssuesADotTwice() async throws {
        let cluster = try await TestCluster.start(count: 5)
        let view = try #require(cluster.nodes[0].core.view)
        let names = try ["n3", "n4", "n5"].map(NodeName.init)
        let key = try #require((0..<5000).map { "fb-\($0)" }.first { k in
            Set(view.placement(forKey: Array(k.utf8)).1.map(\.node)) == Set(names)
        })
        let k = Array(key.utf8)
        let client = try await cluster.client([0])
        var context = CausalContext.empty
        var running: [(CairnNode, Task<Void, any Error>)] = []
        for (episode, value) in ["a", "b"].enumerated() {
            if episode == 0 {
                for i in 2...4 { await cluster.crash(i) }
            } else {
                for (n, r) in running {
                    n.crash()
                    _ = try? await r.value
                }
                running = []
            }
            let w = try await client.put(k, value: Array(value.utf8), context: context, options: RequestOptions(w: .count(2)))
            #expect(w.acks.allSatisfy { if case .fallback = $0.role { true } else { false } }, "only fallbacks took it: \(w.acks)")
            for i in 2...4 { running.append(try await cluster.startAgain(i)) }
            try await cluster.waitUntil("the fallback copies went home", seconds: 60) {
                cluster.nodes.prefix(2).allSatisfy { $0.core.vnodes.fallbackPartitions.isEmpty }
                    && running.allSatisfy { $0.0.state == .serving }
            }
            let got = try await client.get(k, options: RequestOptions(r: .all))
            #expect(got.values == [Array(value.utf8)], "episode \(episode): the primaries hold \(value)")
            context = got.context
        }
        client.close()
        for (n, r) in running {
            n.shutdown()
            _ = try? await r.value
        }
        await cluster.stop()
    }

    @Test func readRepairConvergesAStaleReplicaInOneReadAndLeavesAHealthyOneAlone() async throws {
        // Neither hints nor anti-entropy: only reads repair here.
        let cluster = try await TestCluster.start {
            $0.hints.enabled = false
            $0.antiEntropy.enabled = false
        }
        let client = try await cluster.client([0])
        await cluster.crash(2)
        let keys = (0..<100).map { "repair-\($0)" }
        for k in keys { try await client.put(Array(k.utf8), value: Array(k.utf8), options: RequestOptions(w: .count(2))) }
        let (n3, run3) = try await cluster.startAgain(2)
        try await cluster.waitUntil("n3 serves and n1 holds it reachable and alive again") {
            n3.state == .serving && cluster.nodes[0].core.current?.coordinatorContext.unreachable([n3.config.name]).isEmpty ?? false
        }
        #expect(try await missing(on: n3, keys).count == 100, "no hints: n3 lacks every write")
        for k in keys {
            let got = try await client.get(Array(k.utf8), options: RequestOptions(r: .count(2)))
            #expect(got.values == [Array(k.utf8)])
        }
        try await cluster.waitUntil("n3 repaired by the reads") { (try? await missing(on: n3, keys).isEmpty) ?? false }
        // n3 holds a repair before its acknowledgement (sent once durable) reaches n1.
        let acknowledged = { self.labelled(cluster.nodes[0], "cairn_read_repairs_total{outcome=\"acknowledged\"}") }
        try await cluster.waitUntil("n1 counted every repair acknowledged") { acknowledged() >= 100 }
        let repaired = acknowledged()
        // Healthy now: reading again repairs nothing.
        for k in keys { _ = try await client.get(Array(k.utf8), options: RequestOptions(r: .count(2))) }
        #expect(labelled(cluster.nodes[0], "cairn_read_repairs_total{outcome=\"sent\"}") == repaired)
        client.close()
        n3.shutdown()
        _ = try? await run3.value
        await cluster.stop()
    }

    @Test func aBlockingReadReturnsOnlyWhatRReplicasHold() async throws {
        let cluster = try await TestCluster.start { $0.hints.enabled = false }
        let client = try await cluster.client([0])
        await cluster.crash(2)
        try await client.put(Array("b".utf8), value: [7], options: RequestOptions(w: .count(2)))
        let (n3, run3) = try await cluster.startAgain(2)
        try await cluster.waitUntil("n3 serves and n1 holds it reachable and alive again") {
            n3.state == .serving && cluster.nodes[0].core.current?.coordinatorContext.unreachable([n3.config.name]).isEmpty ?? false
        }
        #expect(try await localCopy(n3, "b") == nil)
        let got = try await client.get(Array("b".utf8), options: RequestOptions(r: .count(3), readRepair: .blocking))
        #expect(got.values == [[7]])
        // Answered only after the repair was acknowledged: n3 holds it now.
        #expect(try await localCopy(n3, "b")?.values.map(\.value) == [[7]])
        client.close()
        n3.shutdown()
        _ = try? await run3.value
        await cluster.stop()
    }
}
