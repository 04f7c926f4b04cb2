import Testing
import CairnTestSupport
import Foundation
import CairnClient
import CairnCore
#if canImport(Glibc)
import Glibc
#endif

/// The membership verbs as an operator uses them: real `cairnd` processes on loopback and the
/// `cairn` CLI (`cluster status | join | leave | remove | plan | commit | clear`, `transfers`,
/// `preflist`), checked through their exit codes, messages and JSON answers
/// (Docs/wire-protocol.md §10).
@Suite(.serialized, .timeLimit(.minutes(8)))
struct MembershipProcessTests {
    static let q = MembershipNodes.ringSize

    @Test func statusShowsThreeValidAliveMembersOwningTheRing() async throws {
        let d = try MembershipNodes()
        try d.startCluster()
        try await d.waitAllAlive([1, 2, 3])

        for i in 1...3 {
            let s = try #require(try await d.status(i))
            #expect(s.string("cluster") == "proctest-membership")
            #expect((s.int("ring_version") ?? 0) >= 1)
            #expect(s.int("ring_size") == Self.q)
            #expect(s.int("n_val") == 3)
            #expect(s.int("pending_transfers") == 0)
            #expect(s["joined"] as? Bool == true)
            #expect(s.strings("staged") == [])
            #expect(s.string("claimant") == "n1", "the first of cluster.members is the claimant")
            let members = s.members
            #expect(members.map { $0.string("name") } == ["n1", "n2", "n3"], "join order")
            #expect(members.allSatisfy { $0.string("status") == "valid" && $0.string("liveness") == "alive" })
            #expect(members.compactMap { $0.int("owned") }.reduce(0, +) == Self.q, "every partition has one owner")
            #expect(members.allSatisfy { $0.int("replicated") == Self.q }, "n_val 3 of 3 members: each replicates everything")
            #expect(members.map { $0.string("address") } == [d.address(1), d.address(2), d.address(3)])
            #expect(members.filter { $0["this"] as? Bool == true }.map { $0.string("name") } == ["n\(i)"])
            #expect(members.filter { $0["claimant"] as? Bool == true }.map { $0.string("name") } == ["n1"])
        }

        let text = try await d.cairn(2, ["cluster", "status"])
        #expect(text.status == 0, "\(text.stderr)")
        let lines = text.stdout.split(separator: "\n").map(String.init)
        #expect(lines.first?.hasPrefix("cluster proctest-membership  ring version ") == true, "\(text.stdout)")
        #expect(lines.first?.contains("claimant n1") == true)
        #expect(lines.first?.contains("pending transfers 0") == true)
        let header = lines.dropFirst().first?.split(separator: " ").map(String.init)
        #expect(header == ["NAME", "ADDRESS", "STATUS", "LIVENESS", "OWNED", "REPLICATED"], "\(text.stdout)")
        let rows = lines.dropFirst(2).map { $0.split(separator: " ").map(String.init) }
        #expect(rows.map { $0.first ?? "" } == ["n1*", "n2", "n3"], "the claimant is starred")
        #expect(rows.allSatisfy { $0.count == 6 && $0[2] == "valid" && $0[3] == "alive" }, "\(text.stdout)")

        let statuses = await d.stopAll()
        #expect(statuses.values.allSatisfy { $0 == 0 }, "graceful exits: \(statuses)")
    }

    @Test func refusalsNameTheProblemAndStagedChangesCanBePlannedAndCleared() async throws {
        let d = try MembershipNodes()
        try d.startCluster()
        try await d.waitAllAlive([1, 2, 3])
        let before = try #require(try await d.status(1)?.int("ring_version"))

        // Invalid arguments are exit 1 with the reason, as for the data verbs (CLIFailure).
        let stranger = try await d.cairn(2, ["cluster", "leave", "n7"])
        #expect(stranger.status == 1)
        #expect(stranger.stderr.contains("n7 is not a member"), "\(stranger.stderr)")
        let strangerJSON = try await d.cairn(2, ["cluster", "leave", "n7", "--json"])
        #expect(strangerJSON.status == 1)
        let error = jsonObject(strangerJSON.stdout)?["error"] as? [String: Any]
        #expect(error?.string("kind") == "invalid_argument", "\(strangerJSON.stdout)")
        #expect(error?.string("message").contains("n7 is not a member") == true)

        let nothing = try await d.cairn(3, ["cluster", "commit"])
        #expect(nothing.status == 1)
        #expect(nothing.stderr.contains("no changes are staged"), "\(nothing.stderr)")
        let noPlan = try await d.cairn(1, ["cluster", "plan"])
        #expect(noPlan.status == 1)
        #expect(noPlan.stderr.contains("no changes are staged"), "\(noPlan.stderr)")
        let claimantItself = try await d.cairn(2, ["cluster", "remove", "n1"])
        #expect(claimantItself.status == 1)
        #expect(claimantItself.stderr.contains("n1 is the claimant"), "\(claimantItself.stderr)")

        // Staged on a member that is not the claimant (forwarded to it); visible everywhere.
        let leave = try await d.cairn(3, ["cluster", "leave", "n2", "--json"])
        #expect(leave.status == 0, "\(leave.stderr)")
        #expect(jsonObject(leave.stdout)?.strings("staged") == ["leave n2"], "\(leave.stdout)")
        #expect(try await d.status(3)?.strings("staged") == ["leave n2"], "the forwarding node pulled the claimant's state")
        #expect(try await d.status(1)?.strings("staged") == ["leave n2"])
        let again = try await d.cairn(1, ["cluster", "leave", "n2"])
        #expect(again.status == 0, "staging the same change twice is not a conflict: \(again.stderr)")
        #expect(again.stdout.contains("staged: leave n2"), "\(again.stdout)")

        let conflict = try await d.cairn(2, ["cluster", "remove", "n2"])
        #expect(conflict.status == 1)
        #expect(conflict.stderr.contains("staged changes conflict: leave n2 is already staged"), "\(conflict.stderr)")

        // The plan: the change, ownership before and after, transfers; nothing moves yet.
        let plan = try await d.cairn(2, ["cluster", "plan", "--json"])
        #expect(plan.status == 0, "\(plan.stderr)")
        let p = try #require(jsonObject(plan.stdout), "\(plan.stdout)")
        #expect(p.strings("changes") == ["leave n2"])
        let ownership = p.objects("ownership")
        #expect(ownership.map { $0.string("name") } == ["n1", "n2", "n3"])
        #expect(ownership.compactMap { $0.int("before") }.reduce(0, +) == Self.q)
        #expect(ownership.compactMap { $0.int("after") }.reduce(0, +) == Self.q)
        let n2 = ownership.first { $0.string("name") == "n2" }
        #expect((n2?.int("before") ?? 0) > 0)
        #expect(n2?.int("after") == 0, "a leaver owns nothing after the plan")
        // With n_val 3 the two that stay already hold every partition: nothing to copy, and with
        // both alive no partition has fewer live replicas than the 2 a 2-member ring can have.
        #expect(p.int("transfers") == 0, "\(plan.stdout)")
        #expect(p.objects("at_risk").isEmpty && (p["lost"] as? [Any])?.isEmpty == true, "\(plan.stdout)")
        let text = try await d.cairn(1, ["cluster", "plan"])
        #expect(text.status == 0)
        #expect(text.stdout.contains("staged: leave n2"), "\(text.stdout)")
        #expect(text.stdout.contains("MEMBER  OWNED NOW  OWNED AFTER"), "\(text.stdout)")
        #expect(try await d.status(2)?.members.allSatisfy { $0.string("status") == "valid" } == true, "plan changes nothing")

        // clear drops it; commit then has nothing to do.
        let clear = try await d.cairn(3, ["cluster", "clear", "--json"])
        #expect(clear.status == 0, "\(clear.stderr)")
        let cleared = try #require(jsonObject(clear.stdout))
        #expect(cleared.strings("staged") == [])
        #expect((cleared.int("ring_version") ?? 0) > before, "staging and clearing made new versions")
        for i in 1...3 {
            try await eventually("n\(i) shows nothing staged", within: 30) { try await d.status(i)?.strings("staged") == [] }
        }
        let after = try await d.cairn(1, ["cluster", "commit"])
        #expect(after.status == 1)
        #expect(after.stderr.contains("no changes are staged"))
        let s = try #require(try await d.status(1))
        #expect(s.int("pending_transfers") == 0)
        #expect(s.members.map { $0.string("status") } == ["valid", "valid", "valid"])

        let statuses = await d.stopAll()
        #expect(statuses.values.allSatisfy { $0 == 0 }, "graceful exits: \(statuses)")
    }

    @Test func aNodeWithOnlySeedsWaitsForJoinThenIsPlannedAndCommitted() async throws {
        let d = try MembershipNodes()
        try d.startCluster()
        try await d.waitAllAlive([1, 2, 3])
        try await Self.startAndJoinN4(d)

        // The plan gives n4 about a quarter of the ring (planned on a member that forwards it).
        let plan = try await d.cairn(2, ["cluster", "plan", "--json"])
        #expect(plan.status == 0, "\(plan.stderr)")
        let p = try #require(jsonObject(plan.stdout), "\(plan.stdout)")
        #expect(p.strings("changes") == ["join n4"])
        let ownership = p.objects("ownership")
        #expect(ownership.map { $0.string("name") } == ["n1", "n2", "n3", "n4"])
        let n4 = try #require(ownership.first { $0.string("name") == "n4" })
        #expect(n4.int("before") == 0)
        #expect(((Self.q / 4 - 1)...(Self.q / 4 + 1)).contains(n4.int("after") ?? -1), "n4 after the plan: \(plan.stdout)")
        #expect(ownership.compactMap { $0.int("after") }.reduce(0, +) == Self.q)
        #expect((p.int("transfers") ?? 0) > 0)
        let pairs = p.objects("transfers_by_pair")
        #expect(!pairs.isEmpty && pairs.allSatisfy { $0.string("pair").hasSuffix("→n4") }, "every transfer goes into n4: \(plan.stdout)")

        // commit (on another member, forwarded) starts the transfers.
        let commit = try await d.cairn(3, ["cluster", "commit", "--json"])
        #expect(commit.status == 0, "\(commit.stderr)")
        let c = try #require(jsonObject(commit.stdout), "\(commit.stdout)")
        #expect((c.int("pending_transfers") ?? 0) > 0, "\(commit.stdout)")
        #expect(c.int("transfers") == p.int("transfers"), "the committed plan is the one shown")
        // Whatever is still pending (handoff may already have finished some) goes into n4.
        let transfers = try await d.cairn(1, ["transfers", "--json"])
        #expect(transfers.status == 0, "\(transfers.stderr)")
        let listed = jsonObject(transfers.stdout)?.objects("transfers") ?? []
        #expect(listed.allSatisfy { $0.string("to") == "n4" && ["n1", "n2", "n3"].contains($0.string("from")) }, "\(transfers.stdout)")
        #expect(listed.allSatisfy { (0..<Self.q).contains($0.int("partition") ?? -1) })
        let s = try #require(try await d.status(1))
        #expect(s.strings("staged") == [], "commit consumed the staged join")
        #expect(["joining", "valid"].contains(s.member("n4")?.string("status")), "\(s)")

        let statuses = await d.stopAll()
        #expect(statuses.values.allSatisfy { $0 == 0 }, "graceful exits: \(statuses)")
    }

    /// End to end, through the handoff: after the commit, the transfers complete, n4 becomes
    /// valid with its quarter of the ring, and every key written before the join is still there
    /// on all its replicas. Needs the partition-handoff shell (issue 12): without it the
    /// transfers stay pending and this test fails at the wait, saying so.
    @Test func aJoinedNodeTakesItsShareThroughHandoffAndNoKeyIsLost() async throws {
        let d = try MembershipNodes()
        try d.startCluster()
        try await d.waitAllAlive([1, 2, 3])

        var config = CairnClient.Configuration()
        config.defaultTimeoutMillis = 10_000
        let writer = try await CairnClient.connect(seeds: [d.address(1), d.address(2), d.address(3)], configuration: config)
        let keys = (0..<200).map { "before-join-\($0)" }
        for k in keys { try await writer.put(Array(k.utf8), value: Array("value-of-\(k)".utf8), options: RequestOptions(w: .all)) }
        writer.close()

        try await Self.startAndJoinN4(d)
        let commit = try await d.cairn(1, ["cluster", "commit", "--json"])
        #expect(commit.status == 0, "\(commit.stderr)")

        // Bounded: the handoff moves 200 small keys; two minutes is ample on a loaded machine.
        var last: [String: Any]?
        do {
            try await eventually("every transfer completes and n4 is valid; n1 last said: \(last.map(Self.summary) ?? "nothing")", within: 120) {
                last = try await d.status(1)
                guard let s = last, s.int("pending_transfers") == 0 else { return false }
                return s.member("n4")?.string("status") == "valid"
            }
        } catch {
            Issue.record("the partition handoff did not complete (is the handoff shell, issue 12, on this branch?): \(error)")
            _ = await d.stopAll()
            return
        }
        let s = try #require(last)
        #expect(s.members.map { $0.string("status") } == ["valid", "valid", "valid", "valid"])
        #expect(s.members.compactMap { $0.int("owned") }.reduce(0, +) == Self.q)
        let owned = s.member("n4")?.int("owned") ?? -1
        #expect(((Self.q / 4 - 1)...(Self.q / 4 + 1)).contains(owned), "n4 owns \(owned) of \(Self.q)")
        for i in 1...4 {
            try await eventually("n\(i) sees n4 valid with no transfer pending", within: 30) {
                guard let s = try await d.status(i) else { return false }
                return s.int("pending_transfers") == 0 && s.member("n4")?.string("status") == "valid"
            }
        }

        // Every key, at R=all (so n4's copy answers for the keys it now holds), through n4 and n1.
        let reader = try await CairnClient.connect(seeds: [d.address(4), d.address(1)], configuration: config)
        var wrong: [String] = []
        for k in keys {
            do {
                let got = try await reader.get(Array(k.utf8), options: RequestOptions(r: .all))
                if got.values != [Array("value-of-\(k)".utf8)] { wrong.append("\(k): \(got.values.count) values") }
            } catch {
                wrong.append("\(k): \(error)")
            }
        }
        reader.close()
        #expect(wrong.isEmpty, "\(wrong.count) of \(keys.count) keys not read back at R=all: \(wrong.prefix(5))")

        // The new owner is in preference lists (three distinct primaries, nothing pending).
        var onN4: [String] = []
        for k in keys {
            let r = try await d.cairn(4, ["preflist", k, "--json"])
            #expect(r.status == 0, "\(r.stderr)")
            let o = try #require(jsonObject(r.stdout), "\(r.stdout)")
            let primaries = o.objects("primaries").map { $0.string("node") }
            #expect(primaries.count == 3 && Set(primaries).count == 3, "\(k): \(r.stdout)")
            #expect(o.strings("pending") == [], "\(k): \(r.stdout)")
            if primaries.contains("n4") { onN4.append(k) }
        }
        #expect(!onN4.isEmpty, "n4 is a primary of none of \(keys.count) keys")

        // n4 holds its copies itself: with the three others stopped, it alone (R=1) answers every
        // key it is a primary of with the value written before it joined.
        for i in 1...3 { #expect(await d.stop(i) == 0, "n\(i) exits gracefully") }
        let alone = try await CairnClient.connect(seeds: [d.address(4)], configuration: config)
        var missing: [String] = []
        for k in onN4 {
            do {
                let got = try await alone.get(Array(k.utf8), options: RequestOptions(r: .count(1)))
                if got.values != [Array("value-of-\(k)".utf8)] { missing.append("\(k): \(got.values.count) values") }
            } catch {
                missing.append("\(k): \(error)")
            }
        }
        alone.close()
        #expect(missing.isEmpty, "\(missing.count) of the \(onN4.count) keys n4 is a primary of are not on n4: \(missing.prefix(5))")

        let statuses = await d.stopAll()
        #expect(statuses.values.allSatisfy { $0 == 0 }, "graceful exits: \(statuses)")
    }

    /// A leave that needs no transfer (n_val 3 of 3 members: the two that stay hold everything)
    /// completes at commit: the leaver becomes `exiting`, its `cairnd` exits 0 on its own, and
    /// the claimant forgets it once the failure detector holds it dead.
    @Test func aMemberWhoseLeaveNeedsNoTransferExitsAndDropsOut() async throws {
        let d = try MembershipNodes()
        try d.startCluster()
        try await d.waitAllAlive([1, 2, 3])
        let put = try await d.cairn(1, ["put", "kept", "v", "--w", "all"])
        #expect(put.status == 0, "\(put.stderr)")

        #expect(try await d.cairn(2, ["cluster", "leave", "n3"]).status == 0)
        let plan = try #require(jsonObject(try await d.cairn(2, ["cluster", "plan", "--json"]).stdout))
        #expect(plan.int("transfers") == 0, "\(plan)")
        let commit = try await d.cairn(2, ["cluster", "commit", "--json"])
        #expect(commit.status == 0, "\(commit.stderr)")
        #expect(jsonObject(commit.stdout)?.int("pending_transfers") == 0, "\(commit.stdout)")

        let n3 = try #require(d.processes[3])
        try await eventually("n3's cairnd exits after leaving\n\(d.logTail(3))", within: 60) { !n3.isRunning }
        #expect(n3.terminationReason == .exit && n3.terminationStatus == 0,
                "a node that left exits 0, not \(n3.terminationReason == .exit ? "status" : "signal") \(n3.terminationStatus):\n\(d.logTail(3, lines: 5))")

        for i in 1...2 {
            try await eventually("n\(i) no longer lists n3; last: \((try? await d.status(i)).flatMap { $0 }.map(Self.summary) ?? "nothing")", within: 60) {
                guard let s = try await d.status(i) else { return false }
                return s.members.map { $0.string("name") } == ["n1", "n2"]
            }
            let s = try #require(try await d.status(i))
            #expect(s.members.allSatisfy { $0.string("status") == "valid" })
            #expect(s.members.compactMap { $0.int("owned") }.reduce(0, +) == Self.q)
            #expect(s.int("pending_transfers") == 0)
        }
        let get = try await d.cairn(2, ["get", "kept", "--r", "all"])
        #expect(get.status == 0 && get.stdout.hasPrefix("v"), "the two that stay answer for every key: \(get.stderr)")

        let statuses = await d.stopAll()
        #expect(statuses[1] == 0 && statuses[2] == 0, "graceful exits: \(statuses)")
    }

    @Test func preflistNamesAPartitionAndThreeDistinctPrimaries() async throws {
        let d = try MembershipNodes()
        try d.startCluster()
        try await d.waitAllAlive([1, 2, 3])
        var partitions: Set<Int> = []
        for i in 1...3 {
            let r = try await d.cairn(i, ["preflist", "user:42", "--json"])
            #expect(r.status == 0, "\(r.stderr)")
            let o = try #require(jsonObject(r.stdout), "\(r.stdout)")
            #expect(o.string("key") == "user:42")
            let partition = try #require(o.int("partition"))
            #expect((0..<Self.q).contains(partition))
            partitions.insert(partition)
            #expect((o.int("ring_version") ?? 0) >= 1)
            let primaries = o.objects("primaries")
            #expect(primaries.count == 3)
            #expect(Set(primaries.map { $0.string("node") }) == ["n1", "n2", "n3"], "distinct primaries: \(r.stdout)")
            for m in primaries {
                let n = Int(m.string("node").dropFirst()) ?? 0
                #expect(m.string("address") == d.address(n))
                #expect(m.string("liveness") == "alive")
            }
            #expect(o.strings("pending") == [])
        }
        #expect(partitions.count == 1, "every node maps the key to the same partition: \(partitions)")

        // Different keys spread over partitions; the text form names the partition.
        var spread = Set<Int>()
        for k in 0..<16 {
            let r = try await d.cairn(1, ["preflist", "key-\(k)", "--json"])
            spread.insert(jsonObject(r.stdout)?.int("partition") ?? -1)
        }
        #expect(spread.count > 1 && spread.allSatisfy { (0..<Self.q).contains($0) }, "\(spread)")
        let text = try await d.cairn(2, ["preflist", "user:42"])
        #expect(text.status == 0)
        #expect(text.stdout.hasPrefix("partition \(partitions.first ?? -1)  ring version "), "\(text.stdout)")
        #expect(text.stdout.contains("REPLICA  ADDRESS"), "\(text.stdout)")

        let statuses = await d.stopAll()
        #expect(statuses.values.allSatisfy { $0 == 0 }, "graceful exits: \(statuses)")
    }

    /// One line of a `cluster status` answer, for failure messages.
    static func summary(_ s: [String: Any]) -> String {
        "ring version \(s.int("ring_version") ?? -1), \(s.int("pending_transfers") ?? -1) of \(s.int("transfers") ?? -1) transfers pending, "
            + s.members.map { "\($0.string("name")) \($0.string("status"))/\($0.string("liveness")) owning \($0.int("owned") ?? -1)" }
            .joined(separator: ", ")
    }

    /// Starts n4 with only `cluster.seeds`, checks that it refuses keys until it joins, joins it
    /// through n1, and waits until every member lists it `joining` with its join staged.
    static func startAndJoinN4(_ d: MembershipNodes) async throws {
        try d.startJoiner(4, seeds: [1, 2, 3])
        try await d.waitAnswering(4)

        let alone = try #require(try await d.status(4))
        #expect(alone["joined"] as? Bool == false, "\(alone)")
        #expect(alone.members.isEmpty)
        let get = try await d.cairn(4, ["get", "k"])
        #expect(get.status == 1, "refused, not 'not found': \(get.stdout) \(get.stderr)")
        #expect(get.stderr.contains("not a member of a cluster yet"), "\(get.stderr)")
        let put = try await d.cairn(4, ["put", "k", "v"])
        #expect(put.status == 1, "a refused write certainly applied nothing: \(put.stderr)")
        #expect(put.stderr.contains("not a member of a cluster yet"), "\(put.stderr)")
        let plan = try await d.cairn(4, ["cluster", "plan"])
        #expect(plan.status == 1)
        #expect(plan.stderr.contains("not a member of a cluster yet"), "\(plan.stderr)")
        // Not ready for traffic: /health says why, with a 503.
        let health = try await runProcess("/usr/bin/curl", ["-s", "-w", "\n%{http_code}", "http://127.0.0.54:8401/health"])
        #expect(health.stdout.hasPrefix("serving\nmembership: not a member of a cluster") && health.stdout.hasSuffix("\n503"), "\(health.stdout)")

        let join = try await d.cairn(4, ["cluster", "join", d.address(1)])
        #expect(join.status == 0, "\(join.stderr)")
        #expect(join.stdout.contains("joining cluster proctest-membership"), "\(join.stdout)")
        let joined = try #require(try await d.status(4))
        #expect(joined["joined"] as? Bool == true, "\(joined)")
        let ready = try await runProcess("/usr/bin/curl", ["-s", "-w", "\n%{http_code}", "http://127.0.0.54:8401/health"])
        #expect(ready.stdout == "serving\n\n200", "a joining member is ready: \(ready.stdout)")
        #expect(joined.member("n4")?.string("status") == "joining")
        #expect(joined.member("n4")?["this"] as? Bool == true)
        #expect(joined.member("n4")?.string("address") == d.address(4))
        #expect(joined.member("n4")?.int("owned") == 0, "a joining member owns nothing before the commit")
        #expect(joined.strings("staged") == ["join n4"])
        for i in 1...3 {
            try await eventually("n\(i) lists n4 joining with its join staged; last: \(String(describing: try? await d.status(i)))", within: 30) {
                guard let s = try await d.status(i) else { return false }
                return s.member("n4")?.string("status") == "joining" && s.strings("staged") == ["join n4"]
            }
        }
        // Joining again is harmless: it answers with the node's standing.
        let again = try await d.cairn(4, ["cluster", "join", d.address(2), "--json"])
        #expect(again.status == 0, "\(again.stderr)")
        #expect(jsonObject(again.stdout)?.string("status") == "joining", "\(again.stdout)")
    }
}
