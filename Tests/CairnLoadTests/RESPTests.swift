import Testing
import Foundation
@testable import CairnLoad
import CairnProcess
#if canImport(Glibc)
import Glibc
#endif

private func decodeAll(_ bytes: [UInt8]) throws -> [RESPValue] {
    try bytes.withUnsafeBytes { raw in
        var offset = 0
        var out: [RESPValue] = []
        while let v = try RESP.decode(raw, &offset) { out.append(v) }
        return out
    }
}

@Suite struct RESPCodecTests {
    @Test func encodesCommandsAsArraysOfBulkStrings() {
        #expect(RESP.command([Array("GET".utf8), Array("k".utf8)]) == Array("*2\r\n$3\r\nGET\r\n$1\r\nk\r\n".utf8))
    }

    @Test func decodesEveryReplyTypeAndWaitsForCompleteOnes() throws {
        let stream = Array("+OK\r\n-ERR bad\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*2\r\n$1\r\nx\r\n:1\r\n".utf8)
        #expect(try decodeAll(stream) == [.simple("OK"), .error("ERR bad"), .integer(42), .bulk(Array("abc".utf8)), .bulk(nil),
                                          .array([.bulk(Array("x".utf8)), .integer(1)])])
        // Every prefix decodes to the complete replies it holds and nothing more.
        for n in 0..<stream.count { _ = try decodeAll(Array(stream.prefix(n))) }
        #expect(try decodeAll(Array("$3\r\nab".utf8)).isEmpty)
        #expect(throws: RESP.DecodeError.self) { try decodeAll(Array("?huh\r\n".utf8)) }
        #expect(throws: RESP.DecodeError.self) { try decodeAll(Array("$99999999999\r\n".utf8)) }
    }
}

/// Against a real redis-server (Tests/run-all.sh installs it) on 127.0.0.81:6379.
@Suite(.serialized, .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/redis-server"), "needs redis-server"))
struct RedisTargetTests {
    /// A redis-server on 127.0.0.81:`port`, no persistence.
    private func startRedis(port: Int) throws -> ChildProcess {
        let p = ChildProcess()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/redis-server")
        p.arguments = ["--bind", "127.0.0.81", "--port", "\(port)", "--save", "", "--appendonly", "no"]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        return p
    }

    /// SIGKILL: a child spawned from a test thread can inherit a mask that blocks SIGTERM.
    private func stop(_ p: ChildProcess) {
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
    }

    @Test func setGetAndMissAgainstRedis() async throws {
        let p = try startRedis(port: 6379)
        defer { stop(p) }
        let target = try RedisTarget(endpoints: ["127.0.0.81:6379"])
        var session: (any TargetSession)?
        for _ in 0..<100 where session == nil {
            session = try? await target.session(index: 0)
            if session == nil { try await Task.sleep(for: .milliseconds(50)) }
        }
        let s = try #require(session)
        let value = ValueFormat.make(key: recordKey(1), seq: 9, size: 200)
        try await s.write(recordKey(1), value)
        #expect(try await s.read(recordKey(1)).values == [value])
        #expect(try await s.read(recordKey(2)).values.isEmpty)
        // A value with CRLFs and NULs survives the bulk-string framing.
        let tricky: [UInt8] = [13, 10, 0, 36, 13, 10]
        try await s.write(recordKey(3), tricky)
        #expect(try await s.read(recordKey(3)).values == [tricky])
        try await s.delete(recordKey(3))
        #expect(try await s.read(recordKey(3)).values.isEmpty)
        await s.close()
    }

    /// The open loop over driven sessions (the pacer thread hands each request to its
    /// connection's event loop): every request runs and is verified, and none starts before its
    /// slot in the timetable, so the run lasts at least (operations - 1) / rate.
    @Test func openLoopKeepsItsTimetableAgainstRedis() async throws {
        let p = try startRedis(port: 6380)
        defer { stop(p) }
        let url = "redis://127.0.0.81:6380"
        var ready = false
        for _ in 0..<100 where !ready {
            if let t = try? RedisTarget(endpoints: ["127.0.0.81:6380"]), let s = try? await t.session(index: 0) {
                await s.close()
                ready = true
            } else {
                try await Task.sleep(for: .milliseconds(50))
            }
        }
        #expect(ready)
        let load = RunConfig(phase: .load, target: url, records: 200, concurrency: 4, verify: true)
        let loaded = try await Runner(config: load, target: try await makeTarget(url, consistency: .init(), concurrency: 4, timeoutMillis: 5000)) { _ in }.run()
        #expect(loaded.totalOperations == 200)
        let run = RunConfig(phase: .run, target: url, records: 200, operations: 400, rate: 2000, concurrency: 4, verify: true, seed: 3)
        let target = try await makeTarget(url, consistency: .init(), concurrency: 4, timeoutMillis: 5000)
        let report = try await Runner(config: run, target: target) { _ in }.run()
        #expect(report.totalOperations == 400 && report.totalErrors == 0, "\(report.errors)")
        #expect((report.verification?.readsChecked ?? 0) > 100)
        #expect(!report.failed, "\(report.firstFailures)")
        #expect(report.elapsed >= .milliseconds(199))
    }
}
