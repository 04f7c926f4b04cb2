import Testing
import CairnTestSupport
import Foundation
import CairnClient
import CairnCore
import CairnProcess
#if canImport(Glibc)
import Glibc
#endif

/// Three `cairnd` processes and the `cairn` CLI, as a user runs them. Nodes listen on
/// 127.0.0.21–23 (all of 127/8 is loopback on Linux), so fixed ports never collide with a local
/// cluster on 127.0.0.1 or with other tests.
@Suite(.serialized, .timeLimit(.minutes(3)))
struct ProcessClusterTests {
    static func binary(_ name: String) throws -> String { try Repo.binary(name) }

    typealias ProcessTestError = Repo.MissingBinary

    /// Runs the CLI to completion (it has its own timeouts) and captures its output.
    /// A generous `--timeout` unless the test sets one: no assertion here is about speed.
    static func cairn(_ args: [String], stdin: String? = nil) async throws -> ProcessResult {
        try await runProcess(try binary("cairn"), args.contains("--timeout") ? args : args + ["--timeout", "10000"], stdin: stdin)
    }

    final class Daemons {
        var processes: [ChildProcess] = []
        let dir: URL
        init() throws {
            dir = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-proc-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        }

        func address(_ i: Int) -> String { "127.0.0.\(21 + i):7401" }

        func start() throws {
            for i in 0..<3 { processes.append(try launch(i)) }
        }

        /// Starts node `i` (again: same configuration, same data directory).
        func restart(_ i: Int) throws { processes[i] = try launch(i) }

        private func launch(_ i: Int) throws -> ChildProcess {
            let members = (0..<3).map { "n\($0 + 1)@\(address($0))" }.joined(separator: ",")
            let conf = dir.appendingPathComponent("n\(i + 1).conf")
            try """
            node.name = n\(i + 1)
            node.listen = \(address(i))
            node.http = 127.0.0.\(21 + i):8401
            node.data_dir = \(dir.path)/n\(i + 1)
            cluster.name = proctest
            cluster.ring_size = 64
            cluster.members = \(members)
            transport.reconnect_min = 20ms
            transport.reconnect_max = 200ms
            """.write(to: conf, atomically: true, encoding: .utf8)
            let p = ChildProcess()
            p.executableURL = URL(fileURLWithPath: try ProcessClusterTests.binary("cairnd"))
            p.arguments = ["--config", conf.path, "--log-level", "warning"]
            p.standardOutput = FileHandle.nullDevice
            // Each node's log (warnings and up) goes to <dir>/nN.log, kept with CAIRN_KEEP_TEST_DATA=1.
            let log = dir.appendingPathComponent("n\(i + 1).log")
            if !FileManager.default.fileExists(atPath: log.path) { _ = FileManager.default.createFile(atPath: log.path, contents: nil) }
            let handle = try FileHandle(forWritingTo: log)
            try handle.seekToEnd()
            p.standardError = handle
            try p.run()
            return p
        }

        /// Waits (bounded) until every node reports all three members up or itself.
        func waitHealthy() async throws {
            for i in 0..<3 {
                var ok = false
                for _ in 0..<300 {
                    let r = try await ProcessClusterTests.cairn(["members", "--node", address(i), "--json"])
                    if r.status == 0, r.stdout.components(separatedBy: "\"down\"").count == 1 { ok = true; break }
                    try? await Task.sleep(for: .milliseconds(50))
                }
                if !ok { throw ProcessTestError(description: "n\(i + 1) did not see every peer up within 15 s") }
            }
        }

        func signal(_ i: Int, _ sig: Int32) { kill(processes[i].processIdentifier, sig) }

        /// SIGTERM to every node, then each one's exit status (SIGKILL after 10 s).
        @discardableResult
        func stopAll() async -> [Int32] {
            for p in processes where p.isRunning { kill(p.processIdentifier, SIGCONT); kill(p.processIdentifier, SIGTERM) }
            var statuses: [Int32] = []
            for p in processes {
                var waited = 0
                while p.isRunning && waited < 200 {
                    try? await Task.sleep(for: .milliseconds(50))
                    waited += 1
                }
                statuses.append(Self.reap(p))
            }
            processes = []
            removeData()
            return statuses
        }

        private static func reap(_ p: ChildProcess) -> Int32 {
            if p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
            return p.terminationReason == .exit ? p.terminationStatus : -p.terminationStatus
        }

        /// A test that failed before `stopAll`: kill what is left.
        deinit {
            for p in processes { _ = Self.reap(p) }
            removeData()
        }

        /// CAIRN_KEEP_TEST_DATA=1 keeps the data, configs and logs for a post-mortem.
        private func removeData() {
            if ProcessInfo.processInfo.environment["CAIRN_KEEP_TEST_DATA"] == nil { try? FileManager.default.removeItem(at: dir) }
        }
    }

    @Test func threeDaemonsServeTheCLIAndSurviveAKilledNode() async throws {
        let d = try Daemons()
        try d.start()
        try await d.waitHealthy()

        // put on one node, get from another, as text and as JSON.
        let put = try await Self.cairn(["--node", d.address(0), "put", "user:42", #"{"cart":["apple"]}"#])
        #expect(put.status == 0, "\(put.stderr)")
        let get = try await Self.cairn(["--node", d.address(1), "get", "user:42", "--r", "2"])
        #expect(get.status == 0)
        #expect(get.stdout.hasPrefix(#"{"cart":["apple"]}"#))
        let json = try await Self.cairn(["--node", d.address(2), "get", "user:42", "--json"])
        let object = try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any]
        #expect(object?["found"] as? Bool == true)
        let siblings = object?["siblings"] as? [[String: Any]]
        #expect(siblings?.first?["value"] as? String == #"{"cart":["apple"]}"#)
        #expect(siblings?.first?["deleted"] as? Bool == false)
        let context = try #require(object?["context"] as? String)

        // A value from stdin that is not UTF-8 comes back as base64.
        let binary = try await Self.cairn(["--node", d.address(0), "put", "bin", "-"], stdin: "\u{FF}")
        #expect(binary.status == 0)
        let binGet = try await Self.cairn(["--node", d.address(1), "get", "bin", "--json"])
        #expect(binGet.stdout.contains(#""value":"ÿ""#) || binGet.stdout.contains("value_base64"))

        // delete with the context → get exits 2.
        let del = try await Self.cairn(["--node", d.address(1), "delete", "user:42", "--context", context, "--json"])
        #expect(del.status == 0 && del.stdout.contains("\"context\""))
        let gone = try await Self.cairn(["--node", d.address(2), "get", "user:42"])
        #expect(gone.status == 2)
        #expect(gone.stderr.contains("not found"))

        // SIGKILL one node: W=2 / R=2 still succeed, W=3 fails with exit 3 naming the node.
        d.signal(2, SIGKILL)
        d.processes[2].waitUntilExit()
        let w2 = try await Self.cairn(["--node", d.address(0), "put", "k", "v", "--w", "2"])
        #expect(w2.status == 0, "\(w2.stderr)")
        let r2 = try await Self.cairn(["--node", d.address(1), "get", "k", "--r", "2"])
        #expect(r2.status == 0 && r2.stdout.hasPrefix("v"))
        let w3 = try await Self.cairn(["--node", d.address(0), "put", "k", "v3", "--w", "3", "--timeout", "1000"])
        #expect(w3.status == 3)
        #expect(w3.stderr.contains("W=3"))
        #expect(w3.stderr.contains(d.address(2)))

        let statuses = await d.stopAll()
        #expect(statuses[0] == 0 && statuses[1] == 0, "graceful exits: \(statuses)")
    }

    /// Node-local durability: every write acknowledged by all three replicas (W=3, `always`)
    /// survives `kill -9` of the whole cluster; a node restarted alone serves each key from its
    /// own disk (R=1, no other replica up).
    @Test func killingEveryNodeLosesNoAcknowledgedWrite() async throws {
        let d = try Daemons()
        try d.start()
        try await d.waitHealthy()
        var config = CairnClient.Configuration()
        config.defaultTimeoutMillis = 10_000
        let client = try await CairnClient.connect(seeds: [d.address(0), d.address(1)], configuration: config)
        let keys = (0..<200).map { Array("durable-\($0)".utf8) }
        for k in keys { try await client.put(k, value: k + Array("-value".utf8), options: RequestOptions(w: .count(3))) }
        client.close()
        for i in 0..<3 { d.signal(i, SIGKILL) }
        for p in d.processes { p.waitUntilExit() }

        try d.restart(0)
        // Until n1 serves (bounded): connected, and a read answered (found or not).
        var reader: CairnClient?
        for _ in 0..<300 where reader == nil {
            if let c = try? await CairnClient.connect(seeds: [d.address(0)], configuration: config) {
                do {
                    _ = try await c.get(keys[0], options: RequestOptions(r: .count(1)))
                    reader = c
                } catch .notFound {
                    reader = c
                } catch {
                    c.close()
                }
            }
            if reader == nil { try await Task.sleep(for: .milliseconds(50)) }
        }
        let alone = try #require(reader, "n1 did not serve within 15 s of its restart")
        for k in keys {
            let got = try? await alone.get(k, options: RequestOptions(r: .count(1)))
            #expect(got?.values == [k + Array("-value".utf8)], "\(String(decoding: k, as: UTF8.self)) after kill -9")
        }
        alone.close()
        try d.restart(1)
        try d.restart(2)
        try await d.waitHealthy()
        let statuses = await d.stopAll()
        #expect(statuses == [0, 0, 0], "graceful exits: \(statuses)")
    }

    @Test func aPausedReplicaMakesWAllNotReachedWithAnUnknownOutcome() async throws {
        let d = try Daemons()
        try d.start()
        try await d.waitHealthy()
        d.signal(1, SIGSTOP)
        let w3 = try await Self.cairn(["--node", d.address(0), "put", "p", "v", "--w", "all", "--timeout", "3000"])
        #expect(w3.status == 3)
        #expect(w3.stderr.contains("W=3 not reached: 2 of 3 replicas acknowledged"))
        #expect(w3.stderr.contains("\(d.address(1)) timed out after 3000 ms"))
        #expect(w3.stderr.contains("may have been applied"))
        let w2 = try await Self.cairn(["--node", d.address(0), "put", "p", "v2", "--w", "2"])
        #expect(w2.status == 0)
        d.signal(1, SIGCONT)
        // The paused node got both writes once resumed: R=all sees them.
        var seen = ""
        for _ in 0..<100 {
            let r = try await Self.cairn(["--node", d.address(1), "get", "p", "--r", "all"])
            seen = r.stdout
            if r.status == 0 && r.stdout.contains("v2") { break }
            try? await Task.sleep(for: .milliseconds(50))
        }
        #expect(seen.contains("v2"))
        let statuses = await d.stopAll()
        #expect(statuses == [0, 0, 0], "graceful exits: \(statuses)")
    }

    /// SIGTERM drains in-flight requests (bounded by shutdown.drain_timeout, 10 s here); a second
    /// SIGTERM stops waiting and ends the process at once.
    @Test func aSecondSigtermCutsTheDrainShort() async throws {
        let d = try Daemons()
        try d.start()
        try await d.waitHealthy()
        d.signal(1, SIGSTOP)   // a replica that never answers keeps a W=all write in flight on n1
        let hung = ChildProcess()
        hung.executableURL = URL(fileURLWithPath: try Self.binary("cairn"))
        hung.arguments = ["--node", d.address(0), "put", "held", "v", "--w", "all", "--timeout", "30000"]
        hung.standardOutput = FileHandle.nullDevice
        hung.standardError = FileHandle.nullDevice
        try hung.run()
        defer { if hung.isRunning { kill(hung.processIdentifier, SIGKILL) } }
        try? await Task.sleep(for: .milliseconds(500))
        let node = d.processes[0]
        kill(node.processIdentifier, SIGTERM)
        try? await Task.sleep(for: .milliseconds(700))
        #expect(node.isRunning, "the first SIGTERM must wait for the in-flight write (drain)")
        let second = Date()
        kill(node.processIdentifier, SIGTERM)
        var waited = 0
        while node.isRunning && waited < 100 { try? await Task.sleep(for: .milliseconds(50)); waited += 1 }
        #expect(!node.isRunning, "the second SIGTERM must end the process")
        #expect(Date().timeIntervalSince(second) < 4, "well before the 10 s drain bound")
        #expect(node.terminationReason == .exit, "it exits; it is not killed by a signal")
        hung.waitUntilExit()
        #expect(hung.terminationStatus == 3, "the in-flight write's outcome is reported as unknown")
        d.signal(1, SIGCONT)
        await d.stopAll()
    }

    /// Issue 10 item 1, the reproduction as written: a blind put's reply shows the concurrent
    /// value its context covers, so the writer is never handed a context that silently
    /// supersedes a value it did not see.
    @Test func aPutReplyShowsTheConcurrentValueItsContextCovers() async throws {
        let d = try Daemons()
        try d.start()
        try await d.waitHealthy()
        await #expect(try Self.cairn(["--node", d.address(0), "put", "k", "A", "--w", "all"]).status == 0)
        let reply = try await Self.cairn(["--node", d.address(1), "put", "k", "B", "--w", "all", "--json"])
        #expect(reply.status == 0, "\(reply.stderr)")
        let object = try JSONSerialization.jsonObject(with: Data(reply.stdout.utf8)) as? [String: Any]
        let shown = (object?["siblings"] as? [[String: Any]])?.compactMap { $0["value"] as? String }
        #expect(shown == ["B", "A"], "the reply shows A with the context that covers it")
        let context = try #require(object?["context"] as? String)
        let plain = try await Self.cairn(["--node", d.address(1), "put", "k", "B2", "--context", context, "--w", "all"])
        #expect(plain.status == 0)
        // Y chose to supersede A, having been shown it; a blind write by Y would have kept it.
        let get = try await Self.cairn(["--node", d.address(0), "get", "k", "--r", "all", "--json"])
        #expect(get.stdout.contains(#""value":"B2""#))
        let text = try await Self.cairn(["--node", d.address(2), "put", "k", "C", "--w", "all"])
        #expect(text.stdout.contains("1 concurrent sibling kept"), "\(text.stdout)")
        #expect(text.stdout.contains("B2"))
        await d.stopAll()
    }

    /// Issue 10 item 5, as reproduced: 2,000 keys at W=all, n1 stopped, bytes flipped in the first
    /// and a middle block of its tables, n1 started. It must start, stay up and answer every key
    /// (its own copy of a key in a bad block fails as a replica; the others answer), and say so
    /// in /health and /metrics.
    @Test func aCorruptTableDoesNotTakeTheNodeDown() async throws {
        let d = try Daemons()
        try d.start()
        try await d.waitHealthy()
        var config = CairnClient.Configuration()
        config.defaultTimeoutMillis = 10_000
        let client = try await CairnClient.connect(seeds: [d.address(1), d.address(2)], configuration: config)
        let keys = (0..<2000).map { Array("rot-\($0)".utf8) }
        for k in keys { try await client.put(k, value: k + Array("-value".utf8), options: RequestOptions(w: .all)) }
        client.close()
        d.signal(0, SIGTERM)   // a clean stop flushes the memtable into a table
        d.processes[0].waitUntilExit()
        let storage = d.dir.appendingPathComponent("n1/storage")
        let tables = try FileManager.default.contentsOfDirectory(atPath: storage.path).filter { $0.hasSuffix(".sst") }
        try #require(!tables.isEmpty, "no table after a clean stop")
        for t in tables {
            let url = storage.appendingPathComponent(t)
            var bytes = try [UInt8](Data(contentsOf: url))
            for offset in [100, bytes.count / 2] where offset < bytes.count { bytes[offset] ^= 0xFF }
            try Data(bytes).write(to: url)
        }
        try d.restart(0)
        try await d.waitHealthy()
        let reader = try await CairnClient.connect(seeds: [d.address(0)], configuration: config)
        var wrong = 0
        for k in keys {
            let got = try? await reader.get(k)
            if got?.values != [k + Array("-value".utf8)] { wrong += 1 }
        }
        reader.close()
        #expect(wrong == 0, "\(wrong) of \(keys.count) keys not answered correctly through n1")
        #expect(d.processes[0].isRunning, "n1 must keep serving")
        let metrics = try await runProcess("/usr/bin/curl", ["-s", "http://127.0.0.21:8401/metrics"])
        let corruptReads = metrics.stdout.split(separator: "\n").first { $0.hasPrefix("cairn_storage_corrupt_reads_total ") }
        #expect((corruptReads?.split(separator: " ").last).flatMap { Double($0) } ?? 0 > 0, "no corrupt read counted")
        let health = try await runProcess("/usr/bin/curl", ["-s", "-w", "\n%{http_code}", "http://127.0.0.21:8401/health"])
        #expect(health.stdout.hasPrefix("serving"))
        #expect(health.stdout.hasSuffix("200"))
        #expect(health.stdout.contains("corrupt"), "/health names the damage: \(health.stdout)")
        let statuses = await d.stopAll()
        #expect(statuses == [0, 0, 0], "graceful exits: \(statuses)")
    }
}
