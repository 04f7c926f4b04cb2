import ArgumentParser
import CairnClient
import CairnCore
import Foundation

/// Options of the administration verbs: which node to ask, a timeout, and JSON output.
struct AdminOptions: ParsableArguments {
    @Option(name: .customLong("node"), help: "The node to ask, host:port. Default: $CAIRN_NODES or 127.0.0.1:7401.")
    var nodes: [String] = []

    @Option(help: "Request timeout in milliseconds.")
    var timeout: UInt32?

    @Flag(help: "Print the node's JSON answer instead of text for people.")
    var json = false

    /// Runs `verb` on the node (only the first `--node`: these verbs are about one node's view)
    /// and returns its JSON answer, parsed.
    func run(_ verb: String, _ arguments: [String] = []) async throws -> (text: String, object: [String: Any]) {
        let client = try await connectClient(seeds: Array(seedList(nodes).prefix(1)), timeout: timeout, json: json)
        defer { client.close() }
        let text: String
        do { text = try await client.admin(verb, arguments, timeoutMillis: timeout) } catch { throw CLIFailure(error, json: json) }
        let object = (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] ?? [:]
        return (text, object)
    }
}

struct ClusterCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cluster",
        abstract: "Show and change the cluster's membership: stage joins, leaves and removals, plan, commit.",
        subcommands: [Status.self, Join.self, Leave.self, Remove.self, Plan.self, Commit.self, Clear.self])

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Members with status, liveness and ownership; the ring version; staged changes.")
        @OptionGroup var options: AdminOptions

        func run() async throws {
            let (text, o) = try await options.run("status")
            if options.json { return print(text) }
            let members = o["members"] as? [[String: Any]] ?? []
            print("cluster \(o.string("cluster"))  ring version \(o.int("ring_version"))  claimant \(o.string("claimant"))  "
                + "ring size \(o.int("ring_size"))  n_val \(o.int("n_val"))  pending transfers \(o.int("pending_transfers"))")
            if !(o["joined"] as? Bool ?? false) { print("this node has not joined a cluster") }
            table([["NAME", "ADDRESS", "STATUS", "LIVENESS", "OWNED", "REPLICATED"]] + members.map { m in
                let name = m.string("name") + ((m["claimant"] as? Bool ?? false) ? "*" : "")
                return [name, m.string("address"), m.string("status"), m.string("liveness"), "\(m.int("owned"))", "\(m.int("replicated"))"]
            })
            let staged = o["staged"] as? [String] ?? []
            if !staged.isEmpty { print("staged: " + staged.joined(separator: ", ") + " (cairn cluster plan, then commit)") }
        }
    }

    struct Join: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Run against a new node: ask the cluster (through SEED, default cluster.seeds) to stage its join.")
        @OptionGroup var options: AdminOptions
        @Argument(help: "A member of the cluster to join, host:port.") var seed: [String] = []

        func run() async throws {
            let (text, o) = try await options.run("join", seed)
            if options.json { return print(text) }
            print("\(o.string("status")) cluster \(o.string("cluster")) (ring version \(o.int("ring_version")), claimant \(o.string("claimant"))); "
                + "cairn cluster plan, then cairn cluster commit, to give it partitions")
        }
    }

    struct Leave: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stage a member's leave: its data moves to the others, then it exits.")
        @OptionGroup var options: AdminOptions
        @Argument(help: "The member's name.") var name: String

        func run() async throws { try await staged(options, "leave", name) }
    }

    struct Remove: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stage the removal of a dead member: its replicas are rebuilt from the others.")
        @OptionGroup var options: AdminOptions
        @Argument(help: "The member's name.") var name: String

        func run() async throws { try await staged(options, "remove", name) }
    }

    struct Clear: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Drop the staged changes.")
        @OptionGroup var options: AdminOptions

        func run() async throws { try await staged(options, "clear", nil) }
    }

    struct Plan: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "What committing the staged changes would do: ownership, transfers, replicas at risk.")
        @OptionGroup var options: AdminOptions

        func run() async throws {
            let (text, o) = try await options.run("plan")
            if options.json { return print(text) }
            print("staged: " + (o["changes"] as? [String] ?? []).joined(separator: ", "))
            let rows = (o["ownership"] as? [[String: Any]] ?? []).map { m in [m.string("name"), "\(m.int("before"))", "\(m.int("after"))"] }
            table([["MEMBER", "OWNED NOW", "OWNED AFTER"]] + rows)
            let pairs = (o["transfers_by_pair"] as? [[String: Any]] ?? []).map { "\($0.string("pair")): \($0.int("partitions"))" }
            print("transfers: \(o.int("transfers"))" + (pairs.isEmpty ? "" : " (" + pairs.joined(separator: ", ") + ")"))
            let risk = o["at_risk"] as? [[String: Any]] ?? []
            print(risk.isEmpty ? "replicas at risk: none" : "replicas at risk: \(risk.count) partitions with fewer live replicas than n_val after the plan")
            let lost = o["lost"] as? [Int] ?? []
            if !lost.isEmpty { print("partitions whose every replica is removed (they restart empty): \(lost)") }
        }
    }

    struct Commit: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Make the staged changes the ring's next version; transfers start.")
        @OptionGroup var options: AdminOptions

        func run() async throws {
            let (text, o) = try await options.run("commit")
            if options.json { return print(text) }
            print("committed: ring version \(o.int("ring_version")), \(o.int("pending_transfers")) transfers pending (cairn transfers)")
        }
    }

    static func staged(_ options: AdminOptions, _ verb: String, _ name: String?) async throws {
        let (text, o) = try await options.run(verb, name.map { [$0] } ?? [])
        if options.json { return print(text) }
        let staged = o["staged"] as? [String] ?? []
        print("ring version \(o.int("ring_version")); staged: " + (staged.isEmpty ? "nothing" : staged.joined(separator: ", ")))
    }
}

struct Transfers: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Handoffs in progress (the plan's, and fallback copies going home) and the hints this node holds.")
    @OptionGroup var options: AdminOptions

    func run() async throws {
        let (text, o) = try await options.run("transfers")
        if options.json { return print(text) }
        let transfers = o["transfers"] as? [[String: Any]] ?? []
        let hints = o["hints"] as? [[String: Any]] ?? []
        if transfers.isEmpty {
            print("no transfers pending (ring version \(o.int("ring_version")))")
        } else {
            table([["PARTITION", "KIND", "FROM", "TO", "STATE", "KEYS", "BYTES", "RATE", "AGE"]] + transfers.map { t in
                [("\(t.int("partition"))"), t.string("kind"), t.string("from"), t.string("to"), t.string("state"), "\(t.int("keys"))",
                 "\(t.int("bytes"))", t["bytes_per_second"] == nil ? "-" : "\(t.int("bytes_per_second"))/s",
                 t["age_s"] == nil ? "-" : "\(t.int("age_s"))s"]
            })
        }
        if hints.isEmpty { return print("no hints held") }
        print("hints held:")
        table([["TARGET", "HINTS", "BYTES", "OLDEST", "STATE", "REPLAYED"]] + hints.map { h in
            [h.string("target"), "\(h.int("hints"))", "\(h.int("bytes"))", h["oldest_age_s"] == nil ? "-" : "\(h.int("oldest_age_s"))s",
             h.string("state"), "\(h.int("replayed"))"]
        })
    }
}

struct Repair: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run anti-entropy exchanges now for every partition the node holds (or one), and report what they repaired.",
        discussion: "Waits until every exchange ended (default timeout 1 hour). --status shows each partition's last exchange instead.")
    @OptionGroup var options: AdminOptions
    @Option(help: "Only this partition (its index).") var partition: UInt32?
    @Flag(help: "Show the last exchange of every partition the node holds, and its age.") var status = false

    func run() async throws {
        if status { return try await showStatus() }
        var o = options
        if o.timeout == nil { o.timeout = 3_600_000 }
        let (text, r) = try await o.run("repair", partition.map { ["\($0)"] } ?? [])
        if options.json { return print(text) }
        print("node \(r.string("node")): \(r.int("partitions")) partitions compared in \(r.int("exchanges")) exchanges "
            + "(\(r.int("failed")) failed), \(r.int("took_ms")) ms")
        print("keys repaired: \(r.int("keys_to_local")) on this node, \(r.int("keys_to_remote")) on its peers; "
            + "bytes sent \(r.int("bytes_sent")), received \(r.int("bytes_received"))")
        let details = (r["details"] as? [[String: Any]] ?? []).filter { $0.string("outcome") != "in_sync" }
        if !details.isEmpty {
            table([["PARTITION", "PEER", "OUTCOME", "TO_LOCAL", "TO_REMOTE", "BYTES", "MS", "ERROR"]] + details.map { d in
                ["\(d.int("partition"))", d.string("peer"), d.string("outcome"), "\(d.int("keys_to_local"))", "\(d.int("keys_to_remote"))",
                 "\(d.int("bytes_sent") + d.int("bytes_received"))", "\(d.int("took_ms"))", d.string("error")]
            })
        }
        for s in r["skipped"] as? [[String: Any]] ?? [] { print("partition \(s.int("partition")) skipped: \(s.string("reason"))") }
        if r.int("refilling") > 0 { print("\(r.int("refilling")) partitions still refilling") }
        if r.int("failed") > 0 { throw ExitCode(3) }
    }

    private func showStatus() async throws {
        let (text, r) = try await options.run("repair-status")
        if options.json { return print(text) }
        let rows = r["partitions"] as? [[String: Any]] ?? []
        print("node \(r.string("node")): \(rows.count) partitions, \(r.int("never_exchanged")) never exchanged, "
            + "oldest exchange \(r["oldest_age_s"] is NSNumber ? "\(r.int("oldest_age_s"))s ago" : "-"), \(r.int("refilling")) refilling")
        table([["PARTITION", "PEER", "OUTCOME", "AGE", "TO_LOCAL", "TO_REMOTE", "REFILLING"]] + rows.map { p in
            [(p["partition"] as? NSNumber)?.stringValue ?? "", p["peer"] == nil ? "-" : p.string("peer"), p["outcome"] == nil ? "never" : p.string("outcome"),
             p["age_s"] == nil ? "-" : "\(p.int("age_s"))s", "\(p.int("keys_to_local"))", "\(p.int("keys_to_remote"))",
             (p["refilling"] as? Bool ?? false) ? "yes" : "no"]
        })
    }
}

struct Preflist: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "A key's partition and the replicas that hold it now.")
    @OptionGroup var options: AdminOptions
    @Argument(help: "The key (UTF-8).") var key: String

    func run() async throws {
        let (text, o) = try await options.run("preflist", [key])
        if options.json { return print(text) }
        print("partition \(o.int("partition"))  ring version \(o.int("ring_version"))")
        let primaries = o["primaries"] as? [[String: Any]] ?? []
        table([["REPLICA", "ADDRESS", "LIVENESS"]] + primaries.map { [$0.string("node"), $0.string("address"), $0.string("liveness")] })
        let pending = o["pending"] as? [String] ?? []
        if !pending.isEmpty { print("handoff in progress: " + pending.joined(separator: ", ")) }
    }
}

/// Prints rows as aligned columns (the first row is the header).
func table(_ rows: [[String]]) {
    guard let columns = rows.first?.count else { return }
    let widths = (0..<columns).map { c in rows.map { $0.indices.contains(c) ? $0[c].count : 0 }.max() ?? 0 }
    for row in rows {
        print(row.enumerated().map { $1.padding(toLength: widths[$0] + 2, withPad: " ", startingAt: 0) }.joined()
            .trimmingCharacters(in: .whitespaces))
    }
}

extension Dictionary where Key == String, Value == Any {
    func string(_ key: String) -> String { self[key] as? String ?? "" }
    func int(_ key: String) -> Int { (self[key] as? NSNumber)?.intValue ?? 0 }
}
