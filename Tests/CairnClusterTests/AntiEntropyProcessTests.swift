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
