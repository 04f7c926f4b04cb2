import Testing
import CairnTestSupport
import Foundation
import CairnClient
import CairnCore
import CairnProcess
#if canImport(Glibc)
import Glibc
#endif

/// Membership changes under load and through a crash, with real `cairnd` processes and the
/// `cairn` CLI; part of `MembershipProcessTests` (serialized: they share its addresses).
extension MembershipProcessTests {
    /// 3 nodes grow to 5 and shrink to 3 (n2, an address the load uses, and n5 leave) while
    /// `cairn-load run --verify` reads and writes: no acknowledged write is lost, nothing read is
    /// corrupt, ownership is balanced at 5 and at 3, and the leavers' `cairnd` exit 0.
    @Test func threeGrowToFiveAndShrinkToThreeUnderAVerifiedLoad() async throws {
        let d = try MembershipNodes()
        try d.startCluster()
        try await d.waitAllAlive([1, 2, 3])
        let target = "cairn://" + (1...3).map(d.address).joined(separator: ",")
        let loaded = try await runProcess(try Repo.binary("cairn-load"), ["load", "--target", target, "--records", "500",
                                                                   "--concurrency", "4", "--value-size", "200"])
        #expect(loaded.status == 0, "\(loaded.stdout)\(loaded.stderr)")

        // Open loop at 150 ops/s: every key is read and written many times during the changes.
        let report = d.dir.appendingPathComponent("load.json")
        let load = ChildProcess()
        load.executableURL = URL(fileURLWithPath: try Repo.binary("cairn-load"))
        load.arguments = ["run", "--target", target, "--records", "500", "--workload", "a", "--rate", "150", "--duration", "90s",
                          "--concurrency", "8", "--value-size", "200", "--verify", "--json", report.path]
        load.standardOutput = FileHandle.nullDevice
        load.standardError = FileHandle.nullDevice
        try load.run()
        defer { if load.isRunning { load.terminate() } }

        for i in [4, 5] {
            try d.startJoiner(i, seeds: [1, 2, 3])
            try await d.waitAnswering(i)
            let join = try await d.cairn(i, ["cluster", "join", d.address(1)])
            #expect(join.status == 0, "\(join.stderr)")
        }
        let plan = try #require(jsonObject(try await d.cairn(1, ["cluster", "plan", "--json"]).stdout))
        #expect(plan.strings("changes") == ["join n4", "join n5"], "\(plan)")
        #expect(try await d.cairn(2, ["cluster", "commit"]).status == 0)
        let grown = try await settled(d, on: 1, members: ["n1", "n2", "n3", "n4", "n5"])
        let ownedAtFive = grown.members.compactMap { $0.int("owned") }
        #expect(ownedAtFive.reduce(0, +) == Self.q && (ownedAtFive.max() ?? 0) - (ownedAtFive.min() ?? 0) <= 1, "\(Self.summary(grown))")

        #expect(try await d.cairn(3, ["cluster", "leave", "n2"]).status == 0)
        #expect(try await d.cairn(3, ["cluster", "leave", "n5"]).status == 0)
        #expect(try await d.cairn(4, ["cluster", "commit"]).status == 0)
        for i in [2, 5] {
            let p = try #require(d.processes[i])
            try await eventually("n\(i) hands off and exits; its transfers: \((try? await d.cairn(i, ["transfers", "--json"]).stdout) ?? "?")\n\(d.logTail(i))",
                                 within: 180) { !p.isRunning }
            #expect(p.terminationReason == .exit && p.terminationStatus == 0, "n\(i) exits 0:\n\(d.logTail(i, lines: 5))")
        }
        let shrunk = try await settled(d, on: 1, members: ["n1", "n3", "n4"])
        let ownedAtThree = shrunk.members.compactMap { $0.int("owned") }
        #expect(ownedAtThree.reduce(0, +) == Self.q && (ownedAtThree.max() ?? 0) - (ownedAtThree.min() ?? 0) <= 1, "\(Self.summary(shrunk))")

        try await eventually("the load finishes", within: 150) { !load.isRunning }
        let result = try #require(jsonObject((try? String(contentsOf: report, encoding: .utf8)) ?? ""), "cairn-load wrote its report")
        let verification = result["verification"] as? [String: Any] ?? [:]
        #expect(verification.int("lost") == 0 && verification.int("corrupt") == 0 && verification.int("wrong_key") == 0, "\(verification)")
        #expect((verification.int("reads_checked") ?? 0) > 2000, "\(verification)")
        #expect(load.terminationStatus == 0)

        let statuses = await d.stopAll()
        #expect(statuses[1] == 0 && statuses[3] == 0 && statuses[4] == 0, "graceful exits: \(statuses)")
    }

    /// A sender killed with SIGKILL in the middle of a transfer (handoff paced to 64 KiB/s so it
    /// is caught in the act) resumes from its checkpoint when restarted, the transfer completes,
    /// and the new node holds every key.
    @Test func aSenderKilledMidTransferResumesAfterRestart() async throws {
        let d = try MembershipNodes()
        let paced = ["handoff.bytes_per_second = 64KiB", "handoff.batch_bytes = 8KiB"]
        try d.startCluster(extra: paced)
        try await d.waitAllAlive([1, 2, 3])
        var config = CairnClient.Configuration()
        config.defaultTimeoutMillis = 10_000
        let writer = try await CairnClient.connect(seeds: [d.address(1), d.address(2), d.address(3)], configuration: config)
        let keys = (0..<1500).map { "crash-\($0)" }
        let value = { (k: String) in Array((k + ":" + String(repeating: "x", count: 1000)).utf8) }
        for k in keys { try await writer.put(Array(k.utf8), value: value(k), options: RequestOptions(w: .all)) }
        writer.close()

        try d.startJoiner(4, seeds: [1, 2, 3], extra: paced)
        try await d.waitAnswering(4)
        #expect(try await d.cairn(4, ["cluster", "join", d.address(1)]).status == 0)
        #expect(try await d.cairn(1, ["cluster", "commit"]).status == 0)

        // A sender with a transfer under way (some batches acknowledged).
        var victim = 0
        try await eventually("some node is in the middle of a transfer", within: 60) {
            for i in 1...3 {
                guard let t = jsonObject(try await d.cairn(i, ["transfers", "--json"], timeoutMillis: 2000).stdout) else { continue }
                if t.objects("transfers").contains(where: { $0.string("from") == "n\(i)" && ($0.int("keys") ?? 0) > 0 }) {
                    victim = i
                    return true
                }
            }
            return false
        }
        d.kill9(victim)
        try d.restart(victim)
        try await d.waitAnswering(victim)
        let finished = try await settled(d, on: 4, members: ["n1", "n2", "n3", "n4"], within: 240)
        #expect(finished.member("n4")?.string("status") == "valid")
        #expect(d.log(victim).contains("resumed=true"), "the restarted sender resumed a transfer from its checkpoint:\n\(d.logTail(victim))")

        let reader = try await CairnClient.connect(seeds: [d.address(4), d.address(1)], configuration: config)
        var wrong: [String] = []
        for k in keys {
            do {
                let got = try await reader.get(Array(k.utf8), options: RequestOptions(r: .all))
                if got.values != [value(k)] { wrong.append("\(k): \(got.values.count) values") }
            } catch {
                wrong.append("\(k): \(error)")
            }
        }
        reader.close()
        #expect(wrong.isEmpty, "\(wrong.count) of \(keys.count) keys not read back at R=all: \(wrong.prefix(5))")
        _ = await d.stopAll()
    }

    /// A member stopped (SIGSTOP) for 3 s and continued is at most suspected, never held dead,
    /// by the others (the failure detector's suspicion outlasts a pause that short), and it
    /// holds none of them dead either once it runs again.
    @Test func aThreeSecondPauseIsNotADeath() async throws {
        let d = try MembershipNodes()
        try d.startCluster()
        try await d.waitAllAlive([1, 2, 3])
        d.signal(3, SIGSTOP)
        try await Task.sleep(for: .seconds(3))
        d.signal(3, SIGCONT)
        try await d.waitAllAlive([1, 2, 3])
        // Give a late verdict time to show (a suspicion started in the pause ends by now).
        try await Task.sleep(for: .seconds(10))
        for i in 1...3 {
            let dead = d.log(i).split(separator: "\n").filter { $0.contains("member dead") }
            #expect(dead.isEmpty, "n\(i) held a member dead after a 3 s pause: \(dead.prefix(3))")
        }
        try await d.waitAllAlive([1, 2, 3])
        _ = await d.stopAll()
    }

    /// Waits (bounded) until node `i` lists exactly `members`, all valid, with no transfer pending,
    /// and every one of them agrees; returns node `i`'s status.
    private func settled(_ d: MembershipNodes, on i: Int, members: [String], within seconds: Double = 180) async throws -> [String: Any] {
        var last: [String: Any]?
        try await eventually("the cluster settles on \(members); n\(i) last said: \(last.map(Self.summary) ?? "nothing")", within: seconds) {
            last = try await d.status(i)
            guard let s = last else { return false }
            return s.int("pending_transfers") == 0 && s.members.map { $0.string("name") } == members
                && s.members.allSatisfy { $0.string("status") == "valid" }
        }
        for m in members {
            let j = Int(m.dropFirst()) ?? 0
            try await eventually("\(m) agrees", within: 60) {
                guard let s = try await d.status(j) else { return false }
                return s.int("pending_transfers") == 0 && s.members.map { $0.string("name") } == members
            }
        }
        return try #require(last)
    }
}
