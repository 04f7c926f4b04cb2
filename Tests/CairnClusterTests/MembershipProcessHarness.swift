import Testing
import CairnTestSupport
import Foundation
import CairnProcess
#if canImport(Glibc)
import Glibc
#endif

/// `cairnd` processes for the membership tests, started as an operator would: the first ones
/// with `cluster.members`, later ones with `cluster.seeds` only (they wait for `cairn cluster
/// join`). Node i (1-based) listens on 127.0.0.(50+i):7401, HTTP :8401 — apart from
/// `ProcessClusterTests` (127.0.0.21–23), which may run at the same time, and from a local
/// cluster on 127.0.0.1. Every node shares one cluster secret, as `Deploy/local-cluster.sh` does.
final class MembershipNodes {
    static let ringSize = 64
    let dir: URL
    private(set) var processes: [Int: ChildProcess] = [:]
    private let secretFile: URL

    init() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-membership-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        secretFile = dir.appendingPathComponent("cluster.secret")
        let secret = (0..<32).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
        try secret.write(to: secretFile, atomically: true, encoding: .utf8)
        chmod(secretFile.path, 0o600)
    }

    func address(_ i: Int) -> String { "127.0.0.\(50 + i):7401" }

    /// Starts n1…n`count` with `cluster.members` listing all of them; `extra` lines go into
    /// every node's config.
    func startCluster(_ count: Int = 3, extra: [String] = []) throws {
        let members = (1...count).map { "n\($0)@\(address($0))" }.joined(separator: ",")
        for i in 1...count { try launch(i, "cluster.members = \(members)", extra: extra) }
    }

    /// Starts node `i` with only `cluster.seeds` (the given members): it joins nothing by itself.
    func startJoiner(_ i: Int, seeds: [Int], extra: [String] = []) throws {
        try launch(i, "cluster.seeds = " + seeds.map(address).joined(separator: ","), extra: extra)
    }

    /// Sends `signal` to node `i`'s process.
    func signal(_ i: Int, _ signal: Int32) {
        guard let p = processes[i], p.isRunning else { return }
        kill(p.processIdentifier, signal)
    }

    /// Kills node `i` with SIGKILL (as a crash would) and waits for it to be gone.
    func kill9(_ i: Int) {
        guard let p = processes[i], p.isRunning else { return }
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
    }

    /// Starts node `i` again with the config it had (its data directory as it was left); its
    /// log continues the same file.
    func restart(_ i: Int) throws {
        try spawn(i)
    }

    private func launch(_ i: Int, _ membership: String, extra: [String]) throws {
        let conf = dir.appendingPathComponent("n\(i).conf")
        _ = FileManager.default.createFile(atPath: dir.appendingPathComponent("n\(i).log").path, contents: nil)
        try """
        node.name = n\(i)
        node.listen = \(address(i))
        node.http = 127.0.0.\(50 + i):8401
        node.data_dir = \(dir.path)/n\(i)
        cluster.name = proctest-membership
        cluster.ring_size = \(Self.ringSize)
        cluster.n_val = 3
        \(membership)
        cluster.secret_file = \(secretFile.path)
        transport.reconnect_min = 20ms
        transport.reconnect_max = 200ms
        \(extra.joined(separator: "\n"))
        """.write(to: conf, atomically: true, encoding: .utf8)
        try spawn(i)
    }

    private func spawn(_ i: Int) throws {
        let p = ChildProcess()
        p.executableURL = URL(fileURLWithPath: try Repo.binary("cairnd"))
        // CAIRN_TEST_LOG=<level> (e.g. debug, trace) makes the nodes' logs more verbose.
        let level = ProcessInfo.processInfo.environment["CAIRN_TEST_LOG"] ?? "info"
        p.arguments = ["--config", dir.appendingPathComponent("n\(i).conf").path, "--log-level", level]
        p.standardOutput = FileHandle.nullDevice
        let log = try FileHandle(forWritingTo: dir.appendingPathComponent("n\(i).log"))
        try log.seekToEnd()
        p.standardError = log
        try p.run()
        processes[i] = p
    }

    /// Node `i`'s whole log.
    func log(_ i: Int) -> String {
        (try? String(contentsOf: dir.appendingPathComponent("n\(i).log"), encoding: .utf8)) ?? ""
    }

    /// The last lines of node `i`'s log (for failure messages).
    func logTail(_ i: Int, lines: Int = 15) -> String {
        let text = (try? String(contentsOf: dir.appendingPathComponent("n\(i).log"), encoding: .utf8)) ?? ""
        return text.split(separator: "\n").suffix(lines).joined(separator: "\n")
    }

    /// Runs the CLI against node `i` (`--node` first, as a user types it).
    func cairn(_ i: Int, _ args: [String], timeoutMillis: Int = 10_000) async throws -> ProcessResult {
        try await runProcess(try Repo.binary("cairn"), ["--node", address(i)] + args + ["--timeout", "\(timeoutMillis)"])
    }

    /// `cluster status --json` of node `i`, parsed (nil if the CLI failed).
    func status(_ i: Int) async throws -> [String: Any]? {
        let r = try await cairn(i, ["cluster", "status", "--json"], timeoutMillis: 2000)
        return r.ok ? jsonObject(r.stdout) : nil
    }

    /// Waits (bounded) until node `i` answers `cluster status` (its admin verbs work).
    func waitAnswering(_ i: Int) async throws {
        try await eventually("n\(i) answers cluster status\n\(logTail(i))", within: 30) {
            guard processes[i]?.isRunning == true else { throw MembershipTestError("n\(i) exited:\n\(logTail(i))") }
            return try await status(i) != nil
        }
    }

    /// Waits (bounded) until every node in `nodes` lists exactly `nodes` as members, each alive.
    func waitAllAlive(_ nodes: [Int]) async throws {
        let names = Set(nodes.map { "n\($0)" })
        for i in nodes {
            var last: [String: Any]?
            try await eventually("n\(i) sees \(names.sorted()) alive; last: \(String(describing: last))", within: 30) {
                guard let s = try await status(i) else { return false }
                last = s
                let members = s.members
                return Set(members.map { $0.string("name") }) == names && members.allSatisfy { $0.string("liveness") == "alive" }
            }
        }
    }

    /// Stops node `i` (SIGTERM, SIGKILL after 10 s); returns its exit status (negative: killed by
    /// that signal).
    @discardableResult
    func stop(_ i: Int) async -> Int32 {
        guard let p = processes[i] else { return 0 }
        if p.isRunning { kill(p.processIdentifier, SIGCONT); kill(p.processIdentifier, SIGTERM) }
        var waited = 0
        while p.isRunning && waited < 200 {
            try? await Task.sleep(for: .milliseconds(50))
            waited += 1
        }
        return Self.reap(p)
    }

    /// Kills `p` if it still runs, and returns its exit status (negative: killed by that signal).
    private static func reap(_ p: ChildProcess) -> Int32 {
        if p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
        return p.terminationReason == .exit ? p.terminationStatus : -p.terminationStatus
    }

    @discardableResult
    func stopAll() async -> [Int: Int32] {
        for p in processes.values where p.isRunning { kill(p.processIdentifier, SIGCONT); kill(p.processIdentifier, SIGTERM) }
        var statuses: [Int: Int32] = [:]
        for i in processes.keys { statuses[i] = await stop(i) }
        processes = [:]
        removeData()
        return statuses
    }

    /// CAIRN_KEEP_TEST_DATA=1 keeps the data, configs and logs for a post-mortem.
    private func removeData() {
        if ProcessInfo.processInfo.environment["CAIRN_KEEP_TEST_DATA"] == nil { try? FileManager.default.removeItem(at: dir) }
    }

    /// A test that failed before `stopAll`: kill what is left (no graceful wait here).
    deinit {
        for p in processes.values { _ = Self.reap(p) }
        removeData()
    }
}

struct MembershipTestError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Polls `condition` every 100 ms until it holds; throws (failing the test with `what`, evaluated
/// then) if it does not within `seconds`. Waits between polls without holding a thread.
func eventually(_ what: @autoclosure () async -> String, within seconds: Double, _ condition: () async throws -> Bool) async throws {
    let deadline = Date().addingTimeInterval(seconds)
    while true {
        if try await condition() { return }
        if Date() >= deadline { throw MembershipTestError("timed out after \(Int(seconds)) s waiting until \(await what())") }
        try await Task.sleep(for: .milliseconds(100))
    }
}

func jsonObject(_ text: String) -> [String: Any]? {
    (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any]
}

extension Dictionary where Key == String, Value == Any {
    func string(_ key: String) -> String { self[key] as? String ?? "" }
    func int(_ key: String) -> Int? { (self[key] as? NSNumber)?.intValue }
    func strings(_ key: String) -> [String]? { self[key] as? [String] }
    func objects(_ key: String) -> [[String: Any]] { self[key] as? [[String: Any]] ?? [] }
    var members: [[String: Any]] { objects("members") }
    /// The member entry named `name` in a `cluster status` answer.
    func member(_ name: String) -> [String: Any]? { members.first { $0.string("name") == name } }
}
