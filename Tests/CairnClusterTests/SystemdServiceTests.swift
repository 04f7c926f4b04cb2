import Testing
import CairnTestSupport
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A private systemd (Tests/systemd-sandbox.sh) for the duration of one test.
final class SystemdSandbox {
    static var available: Bool {
        getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/lib/systemd/systemd")
            && FileManager.default.isExecutableFile(atPath: "/usr/bin/nsenter")
    }

    let dir: String
    private let script = Repo.root.appendingPathComponent("Tests/systemd-sandbox.sh").path

    init() throws {
        dir = Repo.root.appendingPathComponent(".build/systemd-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        let r = try runProcess("/usr/bin/timeout", ["60", script, "start", dir])
        guard r.ok else { throw SandboxError(description: "sandbox did not boot: \(r.stderr)") }
    }

    /// Runs a command inside the sandbox (its PID and mount namespaces).
    @discardableResult
    func run(_ args: [String]) throws -> ProcessResult {
        try runProcess("/usr/bin/timeout", ["120", script, "run", dir] + args)
    }

    func show(_ unit: String, _ property: String) throws -> String {
        try run(["systemctl", "show", "-p", property, "--value", unit]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func journal(_ unit: String) throws -> String { try run(["journalctl", "-u", unit, "--no-pager", "-o", "cat"]).stdout }

    /// Polls `condition` every 100 ms, at most `seconds` (a throwing check counts as false).
    func waitUntil(_ seconds: Double, _ condition: () throws -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if (try? condition()) == true { return true }
            usleep(100_000)
        }
        return (try? condition()) == true
    }

    func stop() {
        _ = try? runProcess("/usr/bin/timeout", ["60", script, "stop", dir])
        try? FileManager.default.removeItem(atPath: dir)
    }

    struct SandboxError: Error, CustomStringConvertible { let description: String }
}

/// The units as an operator installs them (Deploy/install.sh), under a real systemd: readiness,
/// status, restart after kill -9, watchdog restart of a paused node, graceful stop.
/// Runs as root (CI does); nodes listen on 127.0.0.41:7401-7403.
@Suite(.serialized, .enabled(if: SystemdSandbox.available, "needs root and systemd"), .timeLimit(.minutes(5)))
struct SystemdServiceTests {
    let host = "127.0.0.41"

    /// A generous `--timeout` unless the test sets one: no assertion here is about speed.
    func cairn(_ args: [String]) throws -> ProcessResult {
        try runProcess(try Repo.binary("cairn"), args.contains("--timeout") ? args : args + ["--timeout", "10000"])
    }

    @Test func unitsVerify() throws {
        let dir = Repo.root.appendingPathComponent(".build/verify-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let install = try runProcess(Repo.root.appendingPathComponent("Deploy/install.sh").path, [
            "install", "--bin-dir", try Repo.binDir(), "--prefix", dir + "/prefix", "--confdir", dir + "/etc",
            "--unitdir", dir + "/units", "--no-systemctl",
        ])
        try #require(install.ok, "\(install.stderr)")
        try FileManager.default.createSymbolicLink(atPath: dir + "/units/cairnd@node1.service", withDestinationPath: "cairnd@.service")
        let verify = try runProcess("/usr/bin/systemd-analyze", ["verify", "--man=no", dir + "/units/cairnd@node1.service", dir + "/units/cairn.target"])
        #expect(verify.ok, "\(verify.stderr)")
        #expect(verify.stderr.isEmpty, "systemd-analyze warned: \(verify.stderr)")
    }

    @Test func threeInstancesUnderARealSystemd() throws {
        let sbx = try SystemdSandbox()
        let prefix = sbx.dir + "/prefix", confdir = sbx.dir + "/etc"
        let installer = Repo.root.appendingPathComponent("Deploy/install.sh").path
        defer {
            // Remove everything the test installed, then power the sandbox off — pass or fail.
            _ = try? sbx.run([installer, "uninstall", "--prefix", prefix, "--confdir", confdir, "--unitdir", "/run/systemd/system"])
            sbx.stop()
        }
        let install = try sbx.run([installer, "install", "--bin-dir", try Repo.binDir(), "--prefix", prefix, "--confdir", confdir,
                                   "--unitdir", "/run/systemd/system", "--host", host])
        try #require(install.ok, "install failed: \(install.stderr)")
        // Faster clocks for the test: a 3 s watchdog, and SIGKILL 3 s after the watchdog's SIGABRT.
        try sbx.run(["sh", "-c", "mkdir -p /run/systemd/system/cairnd@.service.d && printf '[Service]\\nWatchdogSec=3s\\nTimeoutAbortSec=3s\\nRestartSec=200ms\\n' > /run/systemd/system/cairnd@.service.d/test.conf && systemctl daemon-reload"])
        let instances = (1...3).map { "cairnd@node\($0)" }
        let address = (1...3).map { "\(host):740\($0)" }
        /// Every node answers and sees every peer up.
        func allUp() -> Bool {
            address.allSatisfy { a in
                guard let r = try? cairn(["--node", a, "members", "--json"]), r.ok else { return false }
                return !r.stdout.contains("\"down\"")
            }
        }

        // 1. Type=notify: `systemctl start` returns once every node sent READY=1.
        let start = try sbx.run(["systemctl", "start", "cairn.target"])
        try #require(start.ok, "start failed: \(start.stderr)")
        for unit in instances {
            #expect(try sbx.show(unit, "ActiveState") == "active")
            #expect(try sbx.show(unit, "SubState") == "running")
            #expect(try sbx.show(unit, "StatusText").hasPrefix("serving; peers up"))
            let status = try sbx.run(["systemctl", "status", "--no-pager", unit]).stdout
            #expect(status.contains("Status: \"serving; peers up"))
        }
        // READY=1 came only once the node was listening: the moment `systemctl start` returned,
        // every node answers (no retry, no wait). (The journal cannot show the order: it does not
        // order a service's stdout against systemd's own messages.)
        for a in address {
            let members = try cairn(["--node", a, "members", "--json"])
            #expect(members.ok, "\(a) not answering right after READY: \(members.stderr)")
        }
        for unit in instances {
            #expect(try sbx.journal(unit).contains("[CairnNode] serving"))
        }

        // 2. A put/get round trip through the CLI against every instance.
        #expect(sbx.waitUntil(15) { allUp() })
        for i in 0..<3 {
            let put = try cairn(["--node", address[i], "put", "key\(i)", "value\(i)", "--w", "all"])
            #expect(put.ok, "\(put.stderr)")
            let get = try cairn(["--node", address[(i + 1) % 3], "get", "key\(i)", "--r", "all"])
            #expect(get.stdout.hasPrefix("value\(i)"), "\(get.stderr)")
        }

        // 3. kill -9 of node3's main pid: systemd restarts it, it rejoins, the data is served.
        let victim = try sbx.show(instances[2], "MainPID")
        try sbx.run(["kill", "-9", victim])
        #expect(sbx.waitUntil(15) {
            let pid = try sbx.show(instances[2], "MainPID")
            return try pid != victim && pid != "0" && (sbx.show(instances[2], "ActiveState")) == "active"
        })
        #expect(try sbx.show(instances[2], "NRestarts") == "1")
        #expect(sbx.waitUntil(15) { allUp() })
        for i in 0..<3 {
            // The restarted node's memory backend lost its copy; R=2 through it is served by its
            // peers (node-local survival across kill -9 arrives with the storage engine).
            let get = try cairn(["--node", address[2], "get", "key\(i)", "--r", "2"])
            #expect(get.stdout.hasPrefix("value\(i)"), "\(get.stderr)")
        }

        // 4. SIGSTOP of node2: the watchdog fires and systemd restarts it; meanwhile W=2 works.
        let paused = try sbx.show(instances[1], "MainPID")
        let pausedAt = Date()
        try sbx.run(["kill", "-STOP", paused])
        var acknowledged = 0
        for i in 0..<5 {
            let w = try cairn(["--node", address[i % 2 == 0 ? 0 : 2], "put", "during\(i)", "v", "--w", "2"])
            if w.ok { acknowledged += 1 } else { Issue.record("W=2 failed while node2 was paused: \(w.stderr)") }
        }
        #expect(acknowledged == 5)
        let restarted = sbx.waitUntil(30) {
            let pid = try sbx.show(instances[1], "MainPID")
            return try pid != paused && pid != "0" && (sbx.show(instances[1], "ActiveState")) == "active"
        }
        #expect(restarted)
        // WatchdogSec (3 s) + TimeoutAbortSec (3 s) + restart, with a margin.
        #expect(Date().timeIntervalSince(pausedAt) < 15)
        #expect(try sbx.journal(instances[1]).contains("Watchdog timeout"))

        // 5. systemctl stop cairn.target: each node drains, logs it, and exits 0.
        let stop = try sbx.run(["systemctl", "stop", "cairn.target"])
        #expect(stop.ok, "\(stop.stderr)")
        for unit in instances {
            // The journal may lag the unit's exit by a moment on a busy machine: wait for the lines.
            _ = sbx.waitUntil(10) { try sbx.journal(unit).contains("graceful=true") }
            let journal = try sbx.journal(unit)
            #expect(journal.contains("graceful shutdown: draining"))
            #expect(journal.contains("graceful=true") && journal.contains("stopped"))
            #expect(try sbx.show(unit, "ExecMainStatus") == "0")
            #expect(try sbx.show(unit, "ActiveState") == "inactive")
        }
        // ... and a restart serves again.
        let again = try sbx.run(["systemctl", "start", "cairn.target"])
        #expect(again.ok, "\(again.stderr)")
        #expect(sbx.waitUntil(15) { allUp() })
        #expect(try cairn(["--node", address[1], "put", "after-restart", "v", "--w", "all"]).ok)
        #expect(try cairn(["--node", address[2], "get", "after-restart", "--r", "all"]).stdout.hasPrefix("v"))
    }
}
