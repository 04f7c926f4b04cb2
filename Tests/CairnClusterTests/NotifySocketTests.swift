import Testing
import CairnTestSupport
import Foundation
import CairnProcess
#if canImport(Glibc)
import Glibc
#endif

/// An AF_UNIX datagram socket that records what arrives, with the arrival time, on its own thread.
final class NotifySocket: @unchecked Sendable {
    let path: String
    private let fd: Int32
    private let lock = NSLock()
    private var received: [(at: Date, text: String)] = []
    private var running = true
    private var thread: Thread?

    init() throws {
        path = "/tmp/cairn-notify-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket: \(errno)") }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { buf in
            for (i, b) in path.utf8.enumerated() where i < buf.count - 1 { buf[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw Failure(description: "bind \(path): \(errno)") }
        var tv = timeval(tv_sec: 0, tv_usec: 50_000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let t = Thread { [self] in
            var buf = [UInt8](repeating: 0, count: 4096)
            while lock.withLock({ running }) {
                let n = recv(fd, &buf, buf.count, 0)
                if n > 0 {
                    let text = String(decoding: buf[0..<n], as: UTF8.self)
                    lock.withLock { received.append((Date(), text)) }
                }
            }
        }
        thread = t
        t.start()
    }

    var messages: [(at: Date, text: String)] { lock.withLock { received } }

    func close() {
        lock.withLock { running = false }
        usleep(100_000)
        Glibc.close(fd)
        unlink(path)
    }

    struct Failure: Error, CustomStringConvertible { let description: String }
}

/// cairnd as systemd runs it, talking to a real notify socket through libsystemd's sd_notify.
@Suite(.serialized, .timeLimit(.minutes(2)))
struct NotifySocketTests {
    @Test func cairndNotifiesReadyStatusWatchdogAndStopping() async throws {
        let sock = try NotifySocket()
        defer { sock.close() }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-notify-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let conf = dir.appendingPathComponent("n1.conf")
        // One live member and one that never answers: READY must still come (after the attempt).
        try """
        node.name = n1
        node.listen = 127.0.0.31:7401
        node.http = off
        node.data_dir = \(dir.path)/data
        cluster.ring_size = 16
        cluster.n_val = 1
        cluster.members = n1@127.0.0.31:7401, n2@127.0.0.32:7401
        transport.connect_timeout = 300ms
        """.write(to: conf, atomically: true, encoding: .utf8)

        let p = ChildProcess()
        p.executableURL = URL(fileURLWithPath: try Repo.binary("cairnd"))
        p.arguments = ["--config", conf.path, "--log-level", "info"]
        var env = ProcessInfo.processInfo.environment
        env["NOTIFY_SOCKET"] = sock.path
        env["WATCHDOG_USEC"] = "600000"
        p.environment = env
        let log = dir.appendingPathComponent("cairnd.log")
        _ = FileManager.default.createFile(atPath: log.path, contents: nil)
        let logHandle = try FileHandle(forWritingTo: log)
        defer { try? logHandle.close() }
        p.standardOutput = FileHandle.nullDevice
        p.standardError = logHandle
        try p.run()
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }

        func wait(_ seconds: Double, for predicate: ([String]) -> Bool) async -> Bool {
            let deadline = Date().addingTimeInterval(seconds)
            while Date() < deadline {
                if predicate(sock.messages.map(\.text)) { return true }
                try? await Task.sleep(for: .milliseconds(10))
            }
            return false
        }

        // The bound is generous: this test runs beside the whole suite on two cores, and what it
        // checks is the order of the notifications, not how fast a loaded machine starts a process.
        let ready = await wait(60) { $0.contains { $0.hasPrefix("READY=1") } }
        #expect(ready, "no READY=1 within 60 s; cairnd said: \((try? String(contentsOf: log, encoding: .utf8)) ?? "")")
        // At READY the listener is bound: a connection succeeds at once.
        let probe = try await runProcess(try Repo.binary("cairn"), ["--node", "127.0.0.31:7401", "members"])
        #expect(probe.ok, "\(probe.stderr)")
        var texts = sock.messages.map(\.text)
        // Storage recovery comes first (with a start-timeout extension), then the listener.
        #expect(texts.first?.hasPrefix("STATUS=recovering storage: ") == true)
        #expect(texts.first?.contains("\nEXTEND_TIMEOUT_USEC=") == true)
        #expect(texts.dropFirst().first?.hasPrefix("STATUS=starting: listening on 127.0.0.31:7401") == true)
        #expect(texts.contains("READY=1\nSTATUS=serving; peers up 0 of 1"))

        // WATCHDOG=1 at half the 600 ms interval while healthy...
        #expect(await wait(5) { $0.count { $0 == "WATCHDOG=1" } >= 4 })
        // ...and none while the process is stopped.
        kill(p.processIdentifier, SIGSTOP)
        try await Task.sleep(for: .milliseconds(100))
        let before = sock.messages.count { $0.text == "WATCHDOG=1" }
        try await Task.sleep(for: .milliseconds(900))
        #expect(sock.messages.count { $0.text == "WATCHDOG=1" } == before)
        kill(p.processIdentifier, SIGCONT)
        #expect(await wait(5) { $0.count { $0 == "WATCHDOG=1" } > before })

        // SIGTERM: STOPPING=1, then the final status, and exit 0.
        kill(p.processIdentifier, SIGTERM)
        for _ in 0..<300 where p.isRunning { try await Task.sleep(for: .milliseconds(50)) }
        #expect(!p.isRunning, "cairnd exits within 15 s of SIGTERM")
        if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        #expect(p.terminationReason == .exit && p.terminationStatus == 0)
        #expect(await wait(2) { $0.last == "STATUS=stopped" })
        texts = sock.messages.map(\.text)
        let readyAt = texts.firstIndex { $0.hasPrefix("READY=1") }
        let stoppingAt = texts.firstIndex { $0.hasPrefix("STOPPING=1") }
        #expect(readyAt != nil && stoppingAt != nil && (readyAt ?? 0) < (stoppingAt ?? 0))
        #expect(texts.count { $0.hasPrefix("READY=1") } == 1)
    }
}
