import ArgumentParser
import CairnClient
import CairnCore
import CairnWire
import Foundation

/// Options every data verb shares.
struct ConnectionOptions: ParsableArguments {
    @Option(name: .customLong("node"), help: "A node to talk to, host:port (repeatable or comma-separated). Default: $CAIRN_NODES or 127.0.0.1:7401.")
    var nodes: [String] = []

    @Option(help: "Request timeout in milliseconds.")
    var timeout: UInt32?

    @Option(help: "Replicas that must answer a read: a number, quorum, all.") var r: QuorumOption?
    @Option(help: "Replicas that must acknowledge a write: a number, quorum, all.") var w: QuorumOption?
    @Option(help: "Of the R answers, how many must come from primary owners.") var pr: QuorumOption?
    @Option(help: "Of the W acknowledgements, how many must come from primary owners.") var pw: QuorumOption?

    @Option(help: "Sloppy quorum for this request: true (a fallback takes a down primary's share) or false (primaries only). Default: the node's cluster.sloppy_quorum.")
    var sloppy: Bool?

    @Option(name: .customLong("read-repair"), help: "async (default: the read answers at R, stale replicas are repaired after) or blocking (the read answers once R replicas hold what it returns).")
    var readRepair: ReadRepairOption?

    /// Every data verb takes all of them; a write uses W/PW, a read R/PR and the repair mode.
    var requestOptions: RequestOptions {
        RequestOptions(r: r?.quorum, w: w?.quorum, pr: pr?.quorum, pw: pw?.quorum, timeoutMillis: timeout, sloppy: sloppy,
                       readRepair: readRepair?.mode)
    }

    @Flag(help: "Print one JSON object instead of text for people.")
    var json = false

    var seeds: [String] { seedList(nodes) }

    func connect() async throws -> CairnClient { try await connectClient(seeds: seeds, timeout: timeout, json: json) }
}

/// The seeds `--node` gives (repeatable or comma-separated), else $CAIRN_NODES, else 127.0.0.1:7401.
func seedList(_ nodes: [String]) -> [String] {
    let given = nodes.flatMap { $0.split(separator: ",").map { String($0).trimmingCharacters(in: .whitespaces) } }
    if !given.isEmpty { return given }
    if let env = ProcessInfo.processInfo.environment["CAIRN_NODES"], !env.isEmpty {
        return env.split(separator: ",").map(String.init)
    }
    return ["127.0.0.1:7401"]
}

func connectClient(seeds: [String], timeout: UInt32?, json: Bool) async throws -> CairnClient {
    var config = CairnClient.Configuration()
    if let timeout { config.defaultTimeoutMillis = timeout }
    do {
        return try await CairnClient.connect(seeds: seeds, configuration: config)
    } catch {
        throw CLIFailure(error, json: json)
    }
}

struct ReadRepairOption: ExpressibleByArgument {
    let mode: ReadRepairMode
    init?(argument: String) {
        switch argument {
        case "async": mode = .async
        case "blocking": mode = .blocking
        default: return nil
        }
    }
}

struct QuorumOption: ExpressibleByArgument {
    let quorum: Quorum
    init?(argument: String) {
        guard let q = try? Quorum(parsing: argument) else { return nil }
        quorum = q
    }
}

/// A failure that maps to the documented exit codes: 2 not found, 3 quorum not reached /
/// unavailable / outcome unknown, 1 anything else.
struct CLIFailure: Error {
    let error: CairnError
    let json: Bool
    /// The failed command was a put or delete: any error that does not prove nothing was applied
    /// leaves the outcome unknown (a storage error, an undecodable reply, ...).
    let write: Bool
    init(_ error: CairnError, json: Bool, write: Bool = false) {
        self.error = error
        self.json = json
        self.write = write
    }

    var exitCode: Int32 {
        switch error {
        case .notFound: 2
        case .unavailable, .quorumNotReached, .timeout: 3
        case _ where write && !error.certainlyNotApplied: 3
        default: 1
        }
    }

    var kind: String {
        switch error {
        case .notFound: "not_found"
        case .unavailable: "unavailable"
        case .quorumNotReached: "not_reached"
        case .timeout: "timeout"
        case .invalidArgument: "invalid_argument"
        case .overloaded: "overloaded"
        case .noNodeReachable: "no_node_reachable"
        case .server: "server_error"
        }
    }
}

@main
struct Cairn: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cairn",
        abstract: "Talk to a Cairn cluster.",
        discussion: "Exit codes: 0 success, 2 not found (get), 3 quorum not reached, unavailable, or outcome unknown (any put/delete error that does not prove nothing was written), 1 other errors.",
        subcommands: [Get.self, Put.self, Delete.self, Members.self, ClusterCommand.self, Transfers.self, Preflist.self, Repair.self])

    /// `--node` may come before the verb (`cairn --node X get k`): move such options after it.
    static func reorder(_ args: [String]) -> [String] {
        var leading: [String] = []
        var rest = args
        while let first = rest.first, first.hasPrefix("--") {
            if first.contains("=") || rest.count < 2 {
                leading.append(rest.removeFirst())
            } else if first == "--json" {
                leading.append(rest.removeFirst())
            } else {
                leading.append(rest.removeFirst())
                leading.append(rest.removeFirst())
            }
        }
        guard let verb = rest.first else { return args }
        // `cluster` has verbs of its own: the options go after `cluster VERB`.
        if verb == "cluster", rest.count > 1, !rest[1].hasPrefix("-") {
            return [verb, rest[1]] + leading + rest.dropFirst(2)
        }
        return [verb] + leading + rest.dropFirst()
    }

    static func main() async {
        let args = reorder(Array(CommandLine.arguments.dropFirst()))
        do {
            var command = try parseAsRoot(args)
            if var async = command as? any AsyncParsableCommand {
                try await async.run()
            } else {
                try command.run()
            }
        } catch let failure as CLIFailure {
            let message = failure.error.description.replacingOccurrences(of: "\n", with: " ")
            FileHandle.standardError.write(Data("cairn: \(message)\n".utf8))
            if failure.json, case .notFound = failure.error {} else if failure.json {
                var fields: [(String, JSON)] = [("kind", .string(failure.kind)), ("message", .string(message))]
                switch failure.error {
                case .unavailable(let q), .quorumNotReached(let q):
                    fields.append(("replicas", .array(q.replicas.map(JSON.replicaReport))))
                default: break
                }
                print(JSON.object([("error", JSON.object(fields))]).text)
            }
            Foundation.exit(failure.exitCode)
        } catch {
            exit(withError: error)
        }
    }
}

struct Get: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Read a key: every sibling and the causal context.")
    @OptionGroup var connection: ConnectionOptions
    @Argument(help: "The key (UTF-8).") var key: String
    @Flag(help: "Show only the node's own copies (its primary copy and any fallback copy): no quorum, no other replica. Exit 2 when its primary copy holds no live value.")
    var local = false

    func run() async throws {
        if local {
            // One node's copies: only the first --node, never another one in its place.
            let client = try await connectClient(seeds: Array(connection.seeds.prefix(1)), timeout: connection.timeout, json: connection.json)
            defer { client.close() }
            return try await runLocal(client)
        }
        let client = try await connection.connect()
        defer { client.close() }
        let options = connection.requestOptions
        do {
            let result = try await client.get(Array(key.utf8), options: options)
            if connection.json {
                print(JSON.object([("found", .bool(true)), ("siblings", .array(result.siblings.map(JSON.sibling))),
                                   ("context", .string(result.context.token))]).text)
            } else {
                if result.siblings.count == 1, let s = result.siblings.first {
                    print(Self.show(s))
                } else {
                    print("\(result.siblings.count) siblings:")
                    for (i, s) in result.siblings.enumerated() { print("  [\(i + 1)] \(Self.show(s))") }
                }
                print("context: \(result.context.token)")
            }
        } catch {
            if case .notFound(let ctx) = error {
                if connection.json {
                    print(JSON.object([("found", .bool(false)), ("siblings", .array([])), ("context", .string(ctx.token))]).text)
                } else if !ctx.vector.isEmpty {
                    print("context: \(ctx.token)")
                }
            }
            throw CLIFailure(error, json: connection.json)
        }
    }

    /// `--local`: the node's `local-get` answer (its primary and fallback copies).
    private func runLocal(_ client: CairnClient) async throws {
        let text: String
        do { text = try await client.admin("local-get", [key]) } catch { throw CLIFailure(error, json: connection.json) }
        let o = (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] ?? [:]
        let primary = o["primary"] as? [String: Any]
        if connection.json {
            print(text)
        } else {
            let node = o["node"] as? String ?? "?"
            for (name, copy) in [("primary", primary), ("fallback", o["fallback"] as? [String: Any])] {
                guard let copy else {
                    print("\(name) copy on \(node): none" + (name == "primary" && o["replica"] as? Bool == false ? " (not a replica of the key)" : ""))
                    continue
                }
                let siblings = (copy["siblings"] as? [[String: Any]] ?? []).map { s in
                    (s["deleted"] as? Bool ?? false) ? "(deleted)" : (s["value"] as? String ?? ("base64:" + (s["value_base64"] as? String ?? "")))
                }
                print("\(name) copy on \(node): " + (siblings.isEmpty ? "not found" : siblings.joined(separator: " | ")))
            }
        }
        if primary?["found"] as? Bool != true { Foundation.exit(2) }
    }

    static func show(_ s: Sibling) -> String {
        if s.isTombstone { return "(deleted)" }
        if let text = String(validating: s.value, as: UTF8.self) { return text }
        return "base64:" + Base64URL.encodeStandard(s.value)
    }
}

struct Put: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Write a value; pass --context from an earlier read to supersede what it saw.")
    @OptionGroup var connection: ConnectionOptions
    @Argument(help: "The key (UTF-8).") var key: String
    @Argument(help: "The value, or - to read it from stdin.") var value: String
    @Option(help: "The context token from an earlier get.") var context: String?

    func run() async throws {
        let bytes: [UInt8] = value == "-" ? Array(FileHandle.standardInput.readDataToEndOfFile()) : Array(value.utf8)
        let ctx = try parseContext(context, json: connection.json)
        let client = try await connection.connect()
        defer { client.close() }
        do {
            let result = try await client.put(Array(key.utf8), value: bytes, context: ctx, options: connection.requestOptions)
            printWrite(result, json: connection.json, verb: "stored")
        } catch {
            throw CLIFailure(error, json: connection.json, write: true)
        }
    }
}

struct Delete: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Delete a key (writes a tombstone superseding what --context saw).")
    @OptionGroup var connection: ConnectionOptions
    @Argument(help: "The key (UTF-8).") var key: String
    @Option(help: "The context token from an earlier get.") var context: String?

    func run() async throws {
        let ctx = try parseContext(context, json: connection.json)
        let client = try await connection.connect()
        defer { client.close() }
        do {
            let result = try await client.delete(Array(key.utf8), context: ctx, options: connection.requestOptions)
            printWrite(result, json: connection.json, verb: "deleted")
        } catch {
            throw CLIFailure(error, json: connection.json, write: true)
        }
    }
}

struct Members: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List the cluster's nodes with addresses and partition counts.")
    @OptionGroup var connection: ConnectionOptions

    func run() async throws {
        let client = try await connection.connect()
        defer { client.close() }
        let members: [MemberInfo]
        do { members = try await client.members() } catch { throw CLIFailure(error, json: connection.json) }
        if connection.json {
            print(JSON.object([("members", .array(members.map { m in
                JSON.object([("name", .string(m.name)), ("address", .string(m.address)), ("state", .string(Self.state(m.state))),
                             ("owned_partitions", .int(m.ownedPartitions)), ("replicated_partitions", .int(m.replicatedPartitions))])
            }))]).text)
            return
        }
        let rows = [["NAME", "ADDRESS", "STATE", "OWNED", "REPLICATED"]] + members.map {
            [$0.name, $0.address, Self.state($0.state), "\($0.ownedPartitions)", "\($0.replicatedPartitions)"]
        }
        let widths = (0..<5).map { c in rows.map { $0[c].count }.max() ?? 0 }
        for row in rows {
            print(row.enumerated().map { $1.padding(toLength: widths[$0] + 2, withPad: " ", startingAt: 0) }.joined()
                .trimmingCharacters(in: .whitespaces))
        }
    }

    static func state(_ s: MemberInfo.State) -> String {
        switch s {
        case .up: "up"
        case .down: "down"
        case .this: "this"
        }
    }
}

func parseContext(_ token: String?, json: Bool) throws -> CausalContext {
    guard let token, !token.isEmpty else { return .empty }
    do {
        return try CausalContext(token: token)
    } catch {
        throw CLIFailure(.invalidArgument("--context is not a context token from cairn get: \(error.reason)"), json: json)
    }
}

/// Prints a write's result. The context covers every listed sibling: the written value first,
/// then the concurrent values the write did not supersede, which a later write with this
/// context would supersede too (so they are always shown).
func printWrite(_ result: WriteResult, json: Bool, verb: String) {
    if json {
        print(JSON.object([("context", .string(result.context.token)),
                           ("siblings", .array(result.siblings.map(JSON.sibling))),
                           ("acks", .array(result.acks.map(JSON.ack)))]).text)
        return
    }
    print("\(verb); context: \(result.context.token)")
    if !result.acks.isEmpty {
        print("acknowledged by: " + result.acks.map { a in
            "\(a.node) (\(a.role), \(a.durable ? "durable" : "not yet durable"))"
        }.joined(separator: ", "))
    }
    if !result.concurrent.isEmpty {
        let one = result.concurrent.count == 1
        print("\(result.concurrent.count) concurrent sibling\(one ? "" : "s") kept (this context covers \(one ? "it" : "them") too; merge before writing with it):")
        for (i, s) in result.concurrent.enumerated() { print("  [\(i + 1)] \(Get.show(s))") }
    }
}

extension JSON {
    /// `{"node", "role": "primary" | "fallback", "for" (a fallback's primary), "durable"}`.
    static func ack(_ a: ReplicaAck) -> JSON {
        var fields: [(String, JSON)] = [("node", .string(a.node))]
        switch a.role {
        case .primary: fields.append(("role", .string("primary")))
        case .fallback(let p): fields += [("role", .string("fallback")), ("for", .string(p))]
        }
        fields.append(("durable", .bool(a.durable)))
        return .object(fields)
    }

    /// One replica of a failed request: its role, what happened, and (acknowledged) durability.
    static func replicaReport(_ r: ReplicaReport) -> JSON {
        var fields: [(String, JSON)] = [("node", .string(r.node)), ("address", .string(r.address))]
        switch r.role {
        case .primary: fields.append(("role", .string("primary")))
        case .fallback(let p): fields += [("role", .string("fallback")), ("for", .string(p))]
        }
        let outcome: String
        var reason: String?
        switch r.outcome {
        case .acknowledged: outcome = "acknowledged"
        case .notSent(let why): outcome = "not_sent"; reason = why
        case .timedOut(let ms): outcome = "timed_out"; reason = "after \(ms) ms"
        case .connectionLost(let why): outcome = "connection_lost"; reason = why
        case .failed(let why): outcome = "failed"; reason = why
        case .noAnswerYet: outcome = "no_answer_yet"
        }
        fields.append(("outcome", .string(outcome)))
        if let reason { fields.append(("reason", .string(reason))) }
        if r.outcome == .acknowledged { fields.append(("durable", .bool(r.durable))) }
        return .object(fields)
    }

}
