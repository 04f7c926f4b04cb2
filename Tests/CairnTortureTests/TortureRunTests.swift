import Testing
import Foundation
import CairnProcess
#if canImport(Glibc)
import Glibc
#endif

/// `cairn-torture` end to end, as a process: the quick mode must find nothing wrong with the real
/// node, and must find the losses of a node built to lose writes (`cairnd-lossy`) — a harness
/// that cannot detect a loss is worthless.
@Suite(.serialized, .timeLimit(.minutes(6)))
struct TortureRunTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static func binary(_ name: String) throws -> String {
        let dir = ProcessInfo.processInfo.environment["CAIRN_BIN_DIR"]
            ?? [".build/debug", ".build/x86_64-unknown-linux-gnu/debug"].map { root.appendingPathComponent($0).path }
                .first { FileManager.default.isExecutableFile(atPath: $0 + "/cairn-torture") } ?? ""
        let path = dir + "/" + name
        guard FileManager.default.isExecutableFile(atPath: path) else {
            throw CocoaError(.fileNoSuchFile, userInfo: [NSFilePathErrorKey: path + " (run `swift build --build-tests`)"])
        }
        return path
    }

    struct Run {
        let status: Int32
        let output: String
        var summary: [String: Int] {
            let last = output.split(separator: "\n").last.map(String.init) ?? ""
            var out: [String: Int] = [:]
            for pair in last.split(separator: " ") {
                let kv = pair.split(separator: "=")
                if kv.count == 2, let n = Int(kv[1]) { out[String(kv[0])] = n }
            }
            return out
        }
    }

    /// Runs the harness to completion on a dispatch thread: a minute-long wait must not hold one
    /// of Swift's cooperative threads (there are two here) away from every other test.
    static func torture(_ args: [String]) async throws -> Run {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<Run, any Error>) in
            DispatchQueue.global().async { c.resume(with: Result { try runBlocking(args) }) }
        }
    }

    static func runBlocking(_ args: [String]) throws -> Run {
        let p = ChildProcess()
        p.executableURL = URL(fileURLWithPath: try binary("cairn-torture"))
        p.arguments = args + (getuid() == 0 ? [] : ["--no-namespaces"])
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return Run(status: p.terminationStatus, output: String(decoding: data, as: UTF8.self))
    }

    @Test func theQuickModeFindsNoLostAcknowledgedWrite() async throws {
        let run = try await Self.torture(["--quick"])
        let s = run.summary
        #expect(run.status == 0, "\(run.output.suffix(3000))")
        #expect(s["lost"] == 0 && s["phantom"] == 0 && s["failed_but_present"] == 0)
        #expect((s["acknowledged"] ?? 0) > 1000, "too little was acknowledged to mean anything: \(s)")
        #expect(run.output.contains("nemesis: kill -9") || run.output.contains("nemesis: SIGSTOP") || run.output.contains("nemesis: isolate")
            || run.output.contains("nemesis: split"), "the schedule injected faults")
    }

    @Test func theSelfTestCatchesANodeThatLosesWrites() async throws {
        let run = try await Self.torture(["--quick", "--duration", "20s", "--cairnd", try Self.binary("cairnd-lossy")])
        #expect(run.status == 1, "\(run.output.suffix(2000))")
        #expect((run.summary["lost"] ?? 0) > 0, "the checker must see the dropped writes: \(run.summary)")
        #expect(run.output.contains("LOST torture-set-"))
    }

    @Test func loopbackModePartitionsThroughTheTransport() async throws {
        let run = try await Self.torture(["--quick", "--duration", "20s", "--seed", "7", "--no-namespaces"])
        #expect(run.status == 0, "\(run.output.suffix(3000))")
        #expect(run.summary["lost"] == 0 && run.summary["phantom"] == 0)
        #expect(run.output.contains("loopback, transport partitions"))
    }

    /// The disk nemeses alone: a node's disk is wiped (then `cairn repair`), a node's table is
    /// corrupted (it must find and refill it by itself); nothing acknowledged may be lost.
    @Test func theDiskNemesesLoseNothing() async throws {
        let run = try await Self.torture(["--quick", "--duration", "40s", "--seed", "7", "--faults", "wipe-disk,corrupt-table"])
        let s = run.summary
        #expect(run.status == 0, "\(run.output.suffix(4000))")
        #expect(s["lost"] == 0 && s["phantom"] == 0 && s["failed_but_present"] == 0, "\(s)")
        #expect(run.output.contains("nemesis: wipe n") && run.output.contains("nemesis: corrupt a table of n"), "\(run.output.suffix(3000))")
        #expect(run.output.contains("refilled"), "\(run.output.suffix(3000))")
    }

    /// The membership nemesis on top of the quick mode's faults: n4 joins through the `cairn` CLI,
    /// then a member leaves (its cairnd must exit 0); nothing acknowledged may be lost.
    @Test func theMembershipNemesisJoinsAndLeavesWithoutLosingWrites() async throws {
        let run = try await Self.torture(["--quick", "--duration", "75s", "--faults", "default,membership", "--joins", "1", "--leaves", "1"])
        let s = run.summary
        #expect(run.status == 0, "\(run.output.suffix(4000))")
        #expect(s["lost"] == 0 && s["phantom"] == 0 && s["failed_but_present"] == 0, "\(s)")
        #expect(s["joins"] == 1 && s["leaves"] == 1 && s["removes"] == 0, "\(s)\n\(run.output.suffix(3000))")
        #expect((s["acknowledged"] ?? 0) > 500, "too little was acknowledged to mean anything: \(s)")
        #expect(run.output.contains("nemesis: join n4: done (confirmed") && run.output.contains("MEMBERSHIP PROBLEM") == false)
    }
}
