import Testing
import CairnTestSupport
import CairnClient
import CairnCore
import Foundation

/// Anti-entropy with real `cairnd` processes and the `cairn` CLI (issue 14): a wiped disk is
/// refilled, a replica that missed writes catches up without hints; part of
/// `MembershipProcessTests` (serialized: they share its addresses).
extension MembershipProcessTests {
    private func client(_ d: MembershipNodes, _ nodes: [Int]) async throws -> CairnClient {
        var c = CairnClient.Configuration()
        c.defaultTimeoutMillis = 5000
        return try await CairnClient.connect(seeds: nodes.map(d.address), configuration: c)
    }

    /// 200 keys written at W=all (20 then deleted at W=all); n3's data directory is wiped and n3
    /// restarted under its name; `cairn repair` on it; then n1 and n2 are stopped, and n3 alone
    /// serves every key's latest state, deleted keys staying deleted.
    @Test func aWipedNodeIsRefilledByRepairAndThenServesAloneWithDeletesKept() async throws {
        let d = try MembershipNodes()
        try d.startCluster(extra: ["aae.exchange_interval = 1h", "hints.enabled = false"])
        try await d.waitAllAlive([1, 2, 3])
        let writer = try await client(d, [1, 2])
        let keys = (0..<200).map { "wiped-\($0)" }
        for k in keys { try await writer.put(Array(k.utf8), value: Array("v-\(k)".utf8), options: RequestOptions(w: .all)) }
        let deleted = Set(keys.prefix(20))
        for k in deleted {
            let got = try await writer.get(Array(k.utf8))
            try await writer.delete(Array(k.utf8), context: got.context, options: RequestOptions(w: .all))
        }
        writer.close()
        await d.stop(3)
        try FileManager.default.removeItem(at: d.dir.appendingPathComponent("n3"))
        try d.restart(3)
        try await d.waitAllAlive([1, 2, 3])
        let repair = try await d.cairn(3, ["repair", "--json"], timeoutMillis: 120_000)
        #expect(repair.ok, "\(repair.stderr)\n\(d.logTail(3))")
        let report = jsonObject(repair.stdout)
        #expect(report?.int("failed") == 0, "\(repair.stdout)")
        #expect(report?.int("refilling") == 0, "\(repair.stdout)")
        #expect(report?.int("partitions") == MembershipNodes.ringSize, "\(repair.stdout)")
        let status = try await d.cairn(3, ["repair", "--status", "--json"])
        #expect(jsonObject(status.stdout)?.int("never_exchanged") == 0, "\(status.stdout)")
        await d.stop(1)
        await d.stop(2)
        let alone = try await client(d, [3])
        var wrong: [String] = []
        for k in keys {
            var values: [[UInt8]] = []
            do {
                values = try await alone.get(Array(k.utf8), options: RequestOptions(r: .count(1), sloppy: false)).values
            } catch {
                guard case .notFound = error else { throw error }
            }
            let expected: [[UInt8]] = deleted.contains(k) ? [] : [Array("v-\(k)".utf8)]
            if values != expected { wrong.append("\(k): \(values.map { String(decoding: $0, as: UTF8.self) })") }
        }
        alone.close()
        #expect(wrong.isEmpty, "n3 alone serves \(wrong.count) of 200 keys wrongly, e.g. \(wrong.prefix(3))")
        await d.stopAll()
    }

    /// Bit rot: 2,000 keys at W=all; n3 stopped cleanly and two blocks of each of its large
    /// tables flipped; n3 restarted. With no operator action its scrub finds the damage, the
    /// tables are set aside (logs, metrics, `/health`), the partitions they cover refill from
    /// the replicas, and then n3 alone serves every key correctly.
    @Test func aCorruptTableIsSetAsideAndItsKeysRefilledWithoutTheOperator() async throws {
        let d = try MembershipNodes()
        try d.startCluster(extra: ["aae.exchange_interval = 1h", "hints.enabled = false"])
        try await d.waitAllAlive([1, 2, 3])
        let writer = try await client(d, [1, 2])
        let keys = (0..<2000).map { "rot-\($0)" }
        func value(_ k: String) -> [UInt8] { Array("v-\(k)-".utf8) + [UInt8](repeating: 0x61, count: 100) }
        for k in keys { try await writer.put(Array(k.utf8), value: value(k), options: RequestOptions(w: .all)) }
        writer.close()
        await d.stop(3)   // a clean stop flushes the memtable into a table
        let storage = d.dir.appendingPathComponent("n3/storage")
        var flipped = 0
        for t in try FileManager.default.contentsOfDirectory(atPath: storage.path) where t.hasSuffix(".sst") {
            let url = storage.appendingPathComponent(t)
            var bytes = try [UInt8](Data(contentsOf: url))
            guard bytes.count >= 64 << 10 else { continue }
            // Inside data blocks: tables are mostly data, the filter and index at the end.
            for offset in [bytes.count / 3, bytes.count / 2] { bytes[offset] ^= 0x5A }
            try Data(bytes).write(to: url)
            flipped += 1
        }
        try #require(flipped > 0, "no table large enough to damage")
        try d.restart(3)
        try await d.waitAllAlive([1, 2, 3])
        func metric(_ name: String) async throws -> Double {
            let m = try await runProcess("/usr/bin/curl", ["-s", "http://127.0.0.53:8401/metrics"])
            let line = m.stdout.split(separator: "\n").first { $0.hasPrefix(name + " ") }
            return (line?.split(separator: " ").last).flatMap { Double($0) } ?? 0
        }
        try await eventually("n3 finds and sets aside the damaged tables\n\(d.logTail(3))", within: 60) {
            try await metric("cairn_aae_damaged_tables_total") >= Double(flipped)
        }
        #expect(d.log(3).contains("scrub found a damaged table"))
        #expect(d.log(3).contains("damaged table quarantined"))
        let health = try await runProcess("/usr/bin/curl", ["-s", "-w", "\n%{http_code}", "http://127.0.0.53:8401/health"])
        #expect(health.stdout.hasPrefix("serving") && health.stdout.hasSuffix("200"), "\(health.stdout)")
        #expect(health.stdout.contains("corrupt tables"), "/health names the damage: \(health.stdout)")
        try await eventually("n3's damaged partitions refill\n\(d.logTail(3))", within: 120) {
            let status = try await d.cairn(3, ["repair", "--status", "--json"])
            return jsonObject(status.stdout)?.int("refilling") == 0
        }
        #expect(try await metric("cairn_damaged_keys_replaced_total") > 0, "refilled keys replace the damaged copies")
        await d.stop(1)
        await d.stop(2)
        let alone = try await client(d, [3])
        var wrong: [String] = []
        for k in keys {
            do {
                let got = try await alone.get(Array(k.utf8), options: RequestOptions(r: .count(1), sloppy: false))
                if got.values != [value(k)] { wrong.append("\(k): \(got.values.count) values") }
            } catch {
                wrong.append("\(k): \(error)")
            }
        }
        alone.close()
        #expect(wrong.isEmpty, "n3 alone serves \(wrong.count) of \(keys.count) keys wrongly, e.g. \(wrong.prefix(3))")
        #expect(d.processes[3]?.isRunning == true)
        await d.stopAll()
    }

    /// Node `i`'s own primary copy of `key`: its siblings' values ("<deleted>" for a tombstone
    /// sibling); empty when it holds none (never written, or its tombstone collected).
    private func localCopy(_ d: MembershipNodes, _ i: Int, _ key: String) async throws -> [String] {
        let own = try await d.cairn(i, ["get", key, "--local", "--json"])
        let primary = jsonObject(own.stdout)?["primary"] as? [String: Any]
        return (primary?["siblings"] as? [[String: Any]] ?? []).map { ($0["deleted"] as? Bool ?? false) ? "<deleted>" : $0.string("value") }
    }

    private func metric(_ i: Int, _ line: String) async throws -> Double {
        let m = try await runProcess("/usr/bin/curl", ["-s", "http://127.0.0.\(50 + i):8401/metrics"])
        let found = m.stdout.split(separator: "\n").first { $0.hasPrefix(line + " ") }
        return (found?.split(separator: " ").last).flatMap { Double($0) } ?? 0
    }

    static let fastTombstones = ["tombstones.grace = 2s", "tombstones.sweep_interval = 1s", "aae.exchange_interval = 1s", "hints.enabled = false"]

    /// Cassandra's gc_grace sequence: a replica is down past the grace period while a key is
    /// deleted. Its peers keep the tombstone (they cannot exchange with it, and it may hold
    /// data), the returning replica's old value is superseded, and only then is the tombstone
    /// collected everywhere; the key stays deleted.
    @Test func aTombstoneOutlivesAReplicaDownPastTheGraceAndTheKeyStaysDeleted() async throws {
        let d = try MembershipNodes()
        try d.startCluster(extra: Self.fastTombstones)
        try await d.waitAllAlive([1, 2, 3])
        let c = try await client(d, [1])
        try await c.put(Array("gc-key".utf8), value: Array("old".utf8), options: RequestOptions(w: .all))
        await d.stop(3)
        let got = try await c.get(Array("gc-key".utf8))
        try await c.delete(Array("gc-key".utf8), context: got.context, options: RequestOptions(w: .count(2)))
        try await Task.sleep(for: .seconds(6))   // three grace periods, several sweeps and exchanges
        for i in [1, 2] {
            #expect(try await localCopy(d, i, "gc-key") == ["<deleted>"], "n\(i) kept the tombstone while n3 was away")
            #expect(try await metric(i, "cairn_tombstones_collected_total") == 0)
        }
        // Blocked while n3 is away: it never exchanged since the delete (or, once it had, it
        // could not be asked whether it holds hints).
        let blocked = try await metric(1, "cairn_tombstones_blocked{reason=\"not_exchanged\"}")
            + metric(1, "cairn_tombstones_blocked{reason=\"member_unreachable\"}")
        #expect(blocked >= 1, "blocked while n3 is away")
        try d.restart(3)
        try await d.waitAllAlive([1, 2, 3])
        try await eventually("every replica collects the tombstone once n3 is back and exchanged\n\(d.logTail(3))", within: 90) {
            for i in 1...3 where try await !localCopy(d, i, "gc-key").isEmpty { return false }
            return true
        }
        for i in 1...3 { #expect(try await metric(i, "cairn_tombstones_collected_total") >= 1, "n\(i)") }
        // Exchanges go on: the old value never comes back.
        try await Task.sleep(for: .seconds(4))
        for i in 1...3 { #expect(try await localCopy(d, i, "gc-key") == [], "n\(i) holds the key again") }
        do {
            let again = try await c.get(Array("gc-key".utf8), options: RequestOptions(r: .all))
            Issue.record("the deleted key reads \(again.values.map { String(decoding: $0, as: UTF8.self) })")
        } catch {
            guard case .notFound = error else { throw error }
        }
        c.close()
        await d.stopAll()
    }

    /// riak_kv#679's doomstone: a key is deleted and its tombstone collected everywhere; the key
    /// is written again through the same coordinator; then an old copy of the tombstone comes
    /// back (here n3's data directory from before the collection). The new write survives: its
    /// dot starts past the collected history (the counter floor), so the old clock does not
    /// cover it.
    @Test func anOldTombstoneReturningAfterCollectionDoesNotEraseANewerWrite() async throws {
        let d = try MembershipNodes()
        try d.startCluster(extra: Self.fastTombstones)
        try await d.waitAllAlive([1, 2, 3])
        let c = try await client(d, [1])   // n1 coordinates every write: one actor throughout
        let k = Array("doom-key".utf8)
        try await c.put(k, value: Array("v1".utf8), options: RequestOptions(w: .all))
        let got = try await c.get(k, options: RequestOptions(r: .all))
        try await c.delete(k, context: got.context, options: RequestOptions(w: .all))
        await d.stop(3)
        let n3 = d.dir.appendingPathComponent("n3"), saved = d.dir.appendingPathComponent("n3-with-tombstone")
        try FileManager.default.copyItem(at: n3, to: saved)
        try d.restart(3)
        try await d.waitAllAlive([1, 2, 3])
        try await eventually("every replica collects the tombstone\n\(d.logTail(1))", within: 90) {
            for i in 1...3 where try await !localCopy(d, i, "doom-key").isEmpty { return false }
            return true
        }
        try await c.put(k, value: Array("v2".utf8), options: RequestOptions(w: .all))
        await d.stop(3)
        try FileManager.default.removeItem(at: n3)
        try FileManager.default.moveItem(at: saved, to: n3)
        try d.restart(3)
        try await d.waitAllAlive([1, 2, 3])
        // n3 is back with the old tombstone (unless an exchange already replaced it).
        let back = try await localCopy(d, 3, "doom-key")
        #expect(back == ["<deleted>"] || back == ["v2"], "\(back)")
        try await eventually("n3 takes the new write over its old tombstone\n\(d.logTail(3))", within: 60) {
            try await localCopy(d, 3, "doom-key") == ["v2"]
        }
        try await Task.sleep(for: .seconds(3))
        for i in 1...3 { #expect(try await localCopy(d, i, "doom-key") == ["v2"], "n\(i)") }
        #expect(try await c.get(k, options: RequestOptions(r: .all)).values == [Array("v2".utf8)])
        c.close()
        await d.stopAll()
    }

    /// With hints off, a replica that was down while 100 keys were written at W=2 gets them from
    /// the timer's exchanges alone (no read touches them, no `cairn repair`).
    @Test func aReplicaThatMissedWritesCatchesUpFromTimedExchanges() async throws {
        let d = try MembershipNodes()
        try d.startCluster(extra: ["aae.exchange_interval = 2s", "hints.enabled = false"])
        try await d.waitAllAlive([1, 2, 3])
        d.kill9(3)
        let writer = try await client(d, [1, 2])
        let keys = (0..<100).map { "missed-\($0)" }
        for k in keys { try await writer.put(Array(k.utf8), value: Array("v-\(k)".utf8), options: RequestOptions(w: .count(2))) }
        writer.close()
        try d.restart(3)
        try await d.waitAllAlive([1, 2, 3])
        var lacking = keys
        try await eventually("n3 holds every key written while it was down; lacking \(lacking.count), e.g. \(lacking.prefix(3))", within: 60) {
            var still: [String] = []
            for k in lacking {
                let own = try await d.cairn(3, ["get", k, "--local", "--json"])
                let primary = jsonObject(own.stdout)?["primary"] as? [String: Any]
                let values = (primary?["siblings"] as? [[String: Any]] ?? []).map { $0.string("value") }
                if values != ["v-\(k)"] { still.append(k) }
            }
            lacking = still
            return still.isEmpty
        }
        #expect((1...3).contains { d.log($0).contains("anti-entropy repaired keys") }, "no exchange logged a repair")
        let status = try await d.cairn(3, ["repair", "--status", "--json"])
        #expect(jsonObject(status.stdout)?.int("refilling") == 0, "\(status.stdout)")
        await d.stopAll()
    }
}
