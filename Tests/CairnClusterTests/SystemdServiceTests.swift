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

    init() async throws {
        dir = Repo.root.appendingPathComponent(".build/systemd-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        // The script tries three boots of up to 40 s each (plus what it reports of a failed one).
        let r = try await runProcess("/usr/bin/timeout", ["200", script, "start", dir])
        guard r.ok else { throw SandboxError(description: "sandbox did not boot: \(r.stderr)") }
        // A boot that needed another try says what the failed one was doing.
        if !r.stderr.isEmpty { print(r.stderr) }
    }

    /// Runs a command inside the sandbox (its PID and mount namespaces).
    @discardableResult
    func run(_ args: [String]) async throws -> ProcessResult {
        try await runProcess("/usr/bin/timeout", ["120", script, "run", dir] + args)
    }

    func show(_ unit: String, _ property: String) async throws -> String {
        try await run(["systemctl", "show", "-p", property, "--value", unit]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func journal(_ unit: String) async throws -> String { try await run(["journalctl", "-u", unit, "--no-pager", "-o", "cat"]).stdout }

    /// Polls `condition` every 100 ms, at most `seconds` (a throwing check counts as false).
    func waitUntil(_ seconds: Double, _ condition: () async throws -> Bool) async -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if (try? await condition()) == true { return true }
            try? await Task.sleep(for: .milliseconds(100))
        }
        return (try? await condition()) == true
    }

    func stop() async {
        _ = try? await runProcess("/usr/bin/timeout", ["60", script, "stop", dir])
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
    func cairn(_ args: [String]) async throws -> ProcessResult {
        try await runProcess(try Repo.binary("cairn"), args.contains("--timeout") ? args : args + ["--timeout", "10000"])
    }

    @Test func unitsVerify() async throws {
        let dir = Repo.root.appendingPathComponent(".build/verify-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let install = try await runProcess(Repo.root.appendingPathComponent("Deploy/install.sh").path, [
            "install", "--bin-dir", try Repo.binDir(), "--prefix", dir + "/prefix", "--confdir", dir + "/etc",
            "--unitdir", dir + "/units", "--no-systemctl",
        ])
        try #require(install.ok, "\(install.stderr)")
        try FileManager.default.createSymbolicLink(atPath: dir + "/units/cairnd@node1.service", withDestinationPath: "cairnd@.service")
        let verify = try await runProcess("/usr/bin/systemd-analyze", ["verify", "--man=no", dir + "/units/cairnd@node1.service", dir + "/units/cairn.target"])
        #expect(verify.ok, "\(verify.stderr)")
        #expect(verify.stderr.isEmpty, "systemd-analyze warned: \(verify.stderr)")
    }

    @Test func threeInstancesUnderARealSystemd() async throws {
        let sbx = try await SystemdSandbox()
        let prefix = sbx.dir + "/prefix", confdir = sbx.dir + "/etc"
        let installer = Repo.root.appendingPathComponent("Deploy/install.sh").path
        var failure: (any Error)?
        do { try await threeInstances(sbx, prefix: prefix, confdir: confdir, installer: installer) } catch { failure = error }
        // Remove everything the test installed, then power the sandbox off — pass or fail.
        _ = try? await sbx.run([installer, "uninstall", "--prefix", prefix, "--confdir", confdir, "--unitdir", "/run/systemd/system"])
        await sbx.stop()
        if let failure { throw failure }
    }

    private func threeInstances(_ sbx: SystemdSandbox, prefix: String, confdir: String, installer: String) async throws {
        let install = try await sbx.run([installer, "install", "--bin-dir", try Repo.binDir(), "--prefix", prefix, "--confdir", confdir,
                                   "--unitdir", "/run/systemd/system", "--host", host])
        try #require(install.ok, "install failed: \(install.stderr)")
        // Faster clocks for the test: a 3 s watchdog, and SIGKILL 3 s after the watchdog's SIGABRT.
        try await sbx.run(["sh", "-c", "mkdir -p /run/systemd/system/cairnd@.service.d && printf '[Service]\\nWatchdogSec=3s\\nTimeoutAbortSec=3s\\nRestartSec=200ms\\n' > /run/systemd/system/cairnd@.service.d/test.conf && systemctl daemon-reload"])
        let instances = (1...3).map { "cairnd@node\($0)" }
        let address = (1...3).map { "\(host):740\($0)" }
        /// Every node answers and sees every peer up.
        func allUp() async -> Bool {
            for a in address {
                guard let r = try? await cairn(["--node", a, "members", "--json"]), r.ok, !r.stdout.contains("\"down\"") else { return false }
            }
            return true
        }

        // 1. Type=notify: `systemctl start` returns once every node sent READY=1.
        let start = try await sbx.run(["systemctl", "start", "cairn.target"])
        try #require(start.ok, "start failed: \(start.stderr)")
        for unit in instances {
            await #expect(try sbx.show(unit, "ActiveState") == "active")
            await #expect(try sbx.show(unit, "SubState") == "running")
            await #expect(try sbx.show(unit, "StatusText").hasPrefix("serving; peers up"))
            let status = try await sbx.run(["systemctl", "status", "--no-pager", unit]).stdout
            #expect(status.contains("Status: \"serving; peers up"))
        }
        // READY=1 came only once the node was listening: the moment `systemctl start` returned,
        // every node answers (no retry, no wait). (The journal cannot show the order: it does not
        // order a service's stdout against systemd's own messages.)
        for a in address {
            let members = try await cairn(["--node", a, "members", "--json"])
            #expect(members.ok, "\(a) not answering right after READY: \(members.stderr)")
        }
        for unit in instances {
            await #expect(try sbx.journal(unit).contains("[CairnNode] serving"))
        }

        // 2. A put/get round trip through the CLI against every instance.
        #expect(await sbx.waitUntil(15) { await allUp() })
        for i in 0..<3 {
            let put = try await cairn(["--node", address[i], "put", "key\(i)", "value\(i)", "--w", "all"])
            #expect(put.ok, "\(put.stderr)")
            let get = try await cairn(["--node", address[(i + 1) % 3], "get", "key\(i)", "--r", "all"])
            #expect(get.stdout.hasPrefix("value\(i)"), "\(get.stderr)")
        }

        // 3. kill -9 of node3's main pid: systemd restarts it, it rejoins, the data is served.
        let victim = try await sbx.show(instances[2], "MainPID")
        try await sbx.run(["kill", "-9", victim])
        #expect(await sbx.waitUntil(15) {
            let pid = try await sbx.show(instances[2], "MainPID")
            let state = try await sbx.show(instances[2], "ActiveState")
            return pid != victim && pid != "0" && state == "active"
        })
        await #expect(try sbx.show(instances[2], "NRestarts") == "1")
        #expect(await sbx.waitUntil(15) { await allUp() })
        for i in 0..<3 {
            // The restarted node's memory backend lost its copy; R=2 through it is served by its
            // peers (node-local survival across kill -9 arrives with the storage engine).
            let get = try await cairn(["--node", address[2], "get", "key\(i)", "--r", "2"])
            #expect(get.stdout.hasPrefix("value\(i)"), "\(get.stderr)")
        }

        // 4. SIGSTOP of node2: the watchdog fires and systemd restarts it; meanwhile W=2 works.
        let paused = try await sbx.show(instances[1], "MainPID")
        let pausedAt = Date()
        try await sbx.run(["kill", "-STOP", paused])
        var acknowledged = 0
        for i in 0..<5 {
            let w = try await cairn(["--node", address[i % 2 == 0 ? 0 : 2], "put", "during\(i)", "v", "--w", "2"])
            if w.ok { acknowledged += 1 } else { Issue.record("W=2 failed while node2 was paused: \(w.stderr)") }
        }
        #expect(acknowledged == 5)
        let restarted = await sbx.waitUntil(30) {
            let pid = try await sbx.show(instances[1], "MainPID")
            let state = try await sbx.show(instances[1], "ActiveState")
            return pid != paused && pid != "0" && state == "active"
        }
        #expect(restarted)
        // WatchdogSec (3 s) + TimeoutAbortSec (3 s) + restart, with a margin.
        #expect(Date().timeIntervalSince(pausedAt) < 15)
        await #expect(try sbx.journal(instances[1]).contains("Watchdog timeout"))

        // 5. systemctl stop cairn.target: each node drains, logs it, and exits 0.
        let stop = try await sbx.run(["systemctl", "stop", "cairn.target"])
        #expect(stop.ok, "\(stop.stderr)")
        for unit in instances {
            // The journal may lag the unit's exit by a moment on a busy machine: wait for the lines.
            _ = await sbx.waitUntil(10) { try await sbx.journal(unit).contains("graceful=true") }
            let journal = try await sbx.journal(unit)
            #expect(journal.contains("graceful shutdown: draining"))
            #expect(journal.contains("graceful=true") && journal.contains("stopped"))
            await #expect(try sbx.show(unit, "ExecMainStatus") == "0")
            await #expect(try sbx.show(unit, "ActiveState") == "inactive")
        }
        // ... and a restart serves again.
        let again = try await sbx.run(["systemctl", "start", "cairn.target"])
        #expect(again.ok, "\(again.stderr)")
        #expect(await sbx.waitUntil(15) { await allUp() })
        await #expect(try cairn(["--node", address[1], "put", "after-restart", "v", "--w", "all"]).ok)
        await #expect(try cairn(["--node", address[2], "get", "after-restart", "--r", "all"]).stdout.hasPrefix("v"))
    }
}
