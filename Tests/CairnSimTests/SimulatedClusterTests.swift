import Testing
import CairnSim
import CairnNode
import CairnCore
import CairnWire
import CairnStorage
import Synchronization

/// What one node kept across a crash: the value read back and its actor epochs before and after.
private struct Survival: Sendable, Equatable {
    var value: String?
    var epochKept: Bool
}

private func put(_ node: CairnNode, _ key: String, _ value: String, context: CausalContext = .empty,
                 w: Quorum? = nil) async -> Message {
    var options = RequestOptions()
    options.w = w
    return await node.answer(.put(PutRequest(key: Array(key.utf8), value: Array(value.utf8), context: context, options: options)))
}

private func get(_ node: CairnNode, _ key: String, r: Quorum? = nil) async -> GetReply? {
    var options = RequestOptions()
    options.r = r
    if case .getReply(let g) = await node.answer(.get(GetRequest(key: Array(key.utf8), options: options))) { return g }
    return nil
}

/// One node on its simulated disk: write a key, `between` (crash, wipe, wait ...), start it
/// again and read the key back.
private func survival(seed: UInt64 = 1, sync: SyncMode,
                      between: @escaping @Sendable (SimulatedCluster) async throws -> Void) throws -> Survival {
    var settings = SimulatedCluster.Settings()
    settings.syncMode = sync
    return try SimulatedCluster.simulation(count: 1, seed: seed, settings: settings) { cluster in
        guard let first = cluster.node(0), case .writeReply = await put(first, "k", "v") else { throw SimTestError("the write failed") }
        let before = first.actorID?.epoch
        try await between(cluster)
        if !cluster.isUp(0) { try await cluster.start(0) }
        guard let second = cluster.node(0), let read = await get(second, "k") else { throw SimTestError("the read failed") }
        return Survival(value: read.siblings.first.map { String(decoding: $0.value, as: UTF8.self) }, epochKept: before == second.actorID?.epoch)
    }
}

struct SimTestError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// The simulator's node faults do what a real machine's would: a power cut keeps exactly what
/// was synced, a wiped disk keeps nothing, and the kv679 rule picks the epoch.
@Suite struct SimulatedClusterTests {
    /// Under `always` the acknowledged write survives the cut; the node still takes a fresh epoch
    /// (a coordinator replicates while its own log syncs, so a dot may have been out before it
    /// was durable here).
    @Test func aPowerCutKeepsEveryWriteSyncedUnderAlways() async throws {
        let s = try await offPool { try survival(sync: .always) { c in
            var rng = SplitMix64(seed: 1)
            await c.crash(0, tearing: true, rng: &rng)
        } }
        #expect(s == Survival(value: "v", epochKept: false))
    }

    /// Under `none` nothing is synced: the acknowledged write is gone after the cut, and the
    /// node takes a fresh epoch (it may have shown the lost dot).
    @Test func aPowerCutLosesWhatWasNeverSyncedAndRenewsTheEpoch() async throws {
        let s = try await offPool { try survival(sync: .none) { c in
            var rng = SplitMix64(seed: 1)
            await c.crash(0, tearing: false, rng: &rng)
        } }
        #expect(s == Survival(value: nil, epochKept: false))
    }

    /// Under `interval` the engine's timer (on the simulation's clock) syncs the log: a write
    /// older than the interval survives; the crashed run still renews the epoch.
    @Test func theIntervalTimerSyncsOnVirtualTime() async throws {
        let s = try await offPool { try survival(sync: .interval(milliseconds: 50)) { c in
            try await c.clock.sleep(for: .milliseconds(120))
            var rng = SplitMix64(seed: 1)
            await c.crash(0, tearing: false, rng: &rng)
        } }
        #expect(s == Survival(value: "v", epochKept: false))
    }

    @Test func aWipedDiskComesBackEmptyUnderANewEpoch() async throws {
        let s = try await offPool { try survival(sync: .always) { c in
            var rng = SplitMix64(seed: 1)
            await c.crash(0, tearing: false, rng: &rng)
            c.wipe(0)
        } }
        #expect(s == Survival(value: nil, epochKept: false))
    }

    /// A graceful restart keeps data and epoch.
    @Test func aGracefulRestartKeepsDataAndEpoch() async throws {
        let s = try await offPool { try survival(sync: .none) { c in
            c.node(0)?.shutdown()
            await c.stopped(0)
        } }
        #expect(s == Survival(value: "v", epochKept: true))
    }

    /// Skewed wall clocks change write timestamps, never which write wins: a write made with the
    /// context of an earlier one supersedes it though its timestamp is ten minutes older.
    @Test func clockSkewDecidesNothing() async throws {
        let outcome = try await offPool {
            try SimulatedCluster.simulation(count: 3, seed: 5, running: []) { cluster in
                cluster.setSkew(0, millis: 600_000)
                for i in 0..<3 { try await cluster.start(i) }
                guard let n1 = cluster.node(0), let n2 = cluster.node(1), let n3 = cluster.node(2) else { throw SimTestError("no nodes") }
                guard case .writeReply = await put(n1, "k", "first", w: .all) else { throw SimTestError("first write failed") }
                guard let read = await get(n2, "k", r: .all) else { throw SimTestError("read failed") }
                guard case .writeReply = await put(n2, "k", "second", context: read.context, w: .all) else { throw SimTestError("second write failed") }
                guard let final = await get(n3, "k", r: .all) else { throw SimTestError("final read failed") }
                let skewed = read.siblings.first?.timestampMillis ?? 0, plain = final.siblings.first?.timestampMillis ?? 0
                guard skewed > plain + 500_000 else { throw SimTestError("the skew did not show in timestamps: \(skewed) vs \(plain)") }
                return final.siblings.map { String(decoding: $0.value, as: UTF8.self) }
            }
        }
        #expect(outcome == ["second"])
    }
}

/// A partition heals: while n1 is cut off from its peers a write through it at W=all cannot
/// complete; once the network heals, the same write completes and every replica answers.
@Suite struct PartitionHealSimulationTests {
    @Test func aWriteThatAPartitionBlocksCompletesAfterTheHeal() async throws {
        let outcome = try await offPool {
            try SimulatedCluster.simulation(count: 3, seed: 21) { cluster in
                let network = cluster.network
                guard let n1 = cluster.node(0), let n3 = cluster.node(2) else { throw SimTestError("no nodes") }
                for peer in cluster.names.dropFirst() {
                    network.cut(from: cluster.names[0], to: peer)
                    network.cut(from: peer, to: cluster.names[0])
                }
                var seen: [String] = []
                if case .error(let e) = await put(n1, "k", "during", w: .all) { seen.append("during: \(e.code)") } else { seen.append("during: ok") }
                network.heal()
                try await cluster.clock.sleep(for: .seconds(1))
                guard let r = await get(n1, "k", r: .all) else { throw SimTestError("read after heal failed") }
                if case .writeReply = await put(n1, "k", "after", context: r.context, w: .all) { seen.append("after: ok") } else { seen.append("after: failed") }
                guard let final = await get(n3, "k", r: .all) else { throw SimTestError("final read failed") }
                seen.append("final: " + final.siblings.map { String(decoding: $0.value, as: UTF8.self) }.sorted().joined(separator: ","))
                return seen
            }
        }
        #expect(outcome.count == 3)
        #expect(outcome.first?.hasPrefix("during: ") == true && outcome.first != "during: ok", "a cut-off coordinator cannot reach W=all")
        #expect(Array(outcome.dropFirst()) == ["after: ok", "final: after"])
    }
}

/// A paused node (SIGSTOP) runs none of its code: a request it was given waits, unanswered,
/// however much time passes; it cannot acknowledge another coordinator's W=all write; once it
/// continues it handles what it was given.
@Suite struct PauseSimulationTests {
    @Test func aPausedNodeRunsNothingUntilItContinues() async throws {
        let outcome = try await offPool {
            try SimulatedCluster.simulation(count: 3, seed: 8) { cluster in
                let clock = cluster.clock
                guard let n1 = cluster.node(0), let n2 = cluster.node(1) else { throw SimTestError("no nodes") }
                cluster.pause(0)
                let answeredAt = Mutex<Int64?>(nil)
                let held = Task(executorPreference: cluster.executor) { () -> Message in
                    let reply = await put(n1, "a", "held", w: .all)
                    answeredAt.withLock { $0 = clock.elapsed.components.seconds }
                    return reply
                }
                try await clock.sleep(for: .seconds(3))
                var seen = ["after 3 s: \(answeredAt.withLock { $0 } == nil ? "unanswered" : "answered")"]
                if case .error = await put(n2, "b", "v", w: .all) { seen.append("W=all through n2: failed") } else { seen.append("W=all through n2: ok") }
                cluster.resume(0)
                if case .writeReply = await held.value { seen.append("held request: ok") } else { seen.append("held request: failed") }
                seen.append("answered after the pause: \((answeredAt.withLock { $0 } ?? -1) >= 3)")
                return seen
            }
        }
        #expect(outcome == ["after 3 s: unanswered", "W=all through n2: failed", "held request: ok", "answered after the pause: true"])
    }
}
