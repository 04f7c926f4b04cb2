import Testing
import Foundation
import Synchronization
@testable import CairnStorage
import CairnProcess
#if canImport(Glibc)
import Glibc
#endif

/// The real crash loop: a child process (`cairn-crash-writer`) writes under `always` on the real
/// disk, with flushes and compactions running, and reports each acknowledged key; it is killed
/// with SIGKILL at a random moment; the parent reopens the database and checks that every
/// acknowledged key holds its exact value and that every key present is one the child wrote.
///
/// `CAIRN_CRASH_KILLS` sets the number of kills (default 100; e.g. 1000 outside CI).
@Suite(.serialized, .timeLimit(.minutes(10)))
struct CrashLoopTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static func writer() throws -> String {
        if let dir = ProcessInfo.processInfo.environment["CAIRN_BIN_DIR"] { return dir + "/cairn-crash-writer" }
        for candidate in [".build/debug", ".build/x86_64-unknown-linux-gnu/debug"] {
            let path = root.appendingPathComponent(candidate + "/cairn-crash-writer").path
            if FileManager.default.isExecutableFile(atPath: path) { return path }
        }
        throw StorageError.notFound(path: "cairn-crash-writer (run `swift build --build-tests`, or set CAIRN_BIN_DIR)")
    }

    /// The child's value for key number `n` (the same function as in Tests/CrashWriter/main.swift).
    static func value(_ n: Int) -> [UInt8] {
        Array("value-\(n)-".utf8) + [UInt8](repeating: UInt8(truncatingIfNeeded: n % 251), count: (n &* 7) % 300)
    }

    /// Collects the child's "ack N" lines (read on a thread of its own until EOF: no dispatch
    /// source on the pipe, whose descriptor number another test may reuse once it is closed).
    final class Acks: Sendable {
        private let state = Mutex<(buffer: [UInt8], acked: [Int], ready: Bool)>(([], [], false))
        private let ended = Atomic<Bool>(false)

        /// Reads `handle` to its end on a new thread, feeding every chunk.
        func read(_ handle: FileHandle) {
            let t = Thread {
                while true {
                    let d = handle.availableData
                    if d.isEmpty { break }
                    self.feed(d)
                }
                self.ended.store(true, ordering: .releasing)
            }
            t.start()
        }

        /// Returns once the reader saw the end of the pipe.
        func untilEnded() async throws {
            while !ended.load(ordering: .acquiring) { try await Task.sleep(for: .milliseconds(1)) }
        }

        func feed(_ d: Data) {
            state.withLock { s in
                s.buffer += d
                while let nl = s.buffer.firstIndex(of: 10) {
                    let line = String(decoding: s.buffer[..<nl], as: UTF8.self)
                    s.buffer.removeSubrange(...nl)
                    if line == "ready" { s.ready = true } else if line.hasPrefix("ack "), let n = Int(line.dropFirst(4)) { s.acked.append(n) }
                }
            }
        }
        var count: Int { state.withLock { $0.acked.count } }
        var acked: [Int] { state.withLock { $0.acked } }
    }

    @Test func sigkillNeverLosesAnAcknowledgedWrite() async throws {
        let kills = Int(ProcessInfo.processInfo.environment["CAIRN_CRASH_KILLS"] ?? "") ?? 100
        let binary = try Self.writer()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-crashloop-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var rng = Seeded(state: UInt64(kills) &* 31)
        var everAcked: [Int] = []
        var totalAcked = 0
        for round in 0..<kills {
            let start = round * 10_000_000
            let p = ChildProcess()
            p.executableURL = URL(fileURLWithPath: binary)
            p.arguments = [dir, String(start)]
            let pipe = Pipe()
            p.standardOutput = pipe
            p.standardError = FileHandle.nullDevice
            let acks = Acks()
            try p.run()
            acks.read(pipe.fileHandleForReading)
            // Kill at a random moment once it is writing: 0–40 ms after its first acknowledgement.
            let deadline = Date().addingTimeInterval(10)
            while acks.count == 0 && p.isRunning && Date() < deadline { try await Task.sleep(for: .milliseconds(1)) }
            try await Task.sleep(for: .milliseconds(Int.random(in: 0...40, using: &rng)))
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            // Whatever the pipe still holds was acknowledged before the kill.
            try await acks.untilEnded()
            #expect(p.terminationReason == .uncaughtSignal, "round \(round): the writer exited by itself (\(p.terminationStatus))")
            let acked = acks.acked
            totalAcked += acked.count
            // Check this round's acknowledged keys and a sample of every earlier round's.
            let db = try Database.open(fs: PosixFileSystem(), directory: dir)
            for n in acked + everAcked.suffix(50) {
                let got = try db.get(Array(String(format: "k%012d", n).utf8))
                let exact = got == Self.value(n)
                #expect(exact, "round \(round): acknowledged key \(n) \(got == nil ? "lost" : "has a wrong value")")
            }
            if round % 10 == 9 || round == kills - 1 {
                // Nothing invented: every key present is one a child wrote, with its exact value.
                for (k, v) in try db.iterator() {
                    let n = Int(String(decoding: k.dropFirst(), as: UTF8.self)) ?? -1
                    let written = n >= 0 && v == Self.value(n)
                    #expect(written, "a key or value no writer produced: \(String(decoding: k, as: UTF8.self))")
                }
            }
            try await db.close()
            everAcked += acked.shuffled(using: &rng).prefix(20)
        }
        #expect(totalAcked > kills, "the writer acknowledged too little to mean anything (\(totalAcked))")
        print("crash loop: \(kills) SIGKILLs, \(totalAcked) acknowledged writes, none lost")
    }
}
