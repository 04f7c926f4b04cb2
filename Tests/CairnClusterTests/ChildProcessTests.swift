import Testing
import Foundation
import CairnProcess
#if canImport(Glibc)
import Glibc
#endif

/// `ChildProcess`, the harnesses' replacement for Foundation's `Process`.
@Suite struct ChildProcessTests {
    @Test func outputExitStatusAndEnvironment() throws {
        let p = ChildProcess()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", "read line; echo \"$line $GREETING\"; echo oops >&2; exit 3"]
        p.environment = ["GREETING": "world"]
        let input = Pipe(), out = Pipe(), err = Pipe()
        p.standardInput = input
        p.standardOutput = out
        p.standardError = err
        try p.run()
        #expect(p.processIdentifier > 0)
        input.fileHandleForWriting.write(Data("hello\n".utf8))
        try input.fileHandleForWriting.close()
        // EOF arrives only because run() closed the parent's copies of the child's ends.
        let stdout = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        #expect(stdout == "hello world\n")
        #expect(stderr == "oops\n")
        #expect(!p.isRunning)
        #expect(p.terminationReason == .exit)
        #expect(p.terminationStatus == 3)
    }

    @Test func aSignalEndsItAndIsReported() throws {
        let p = ChildProcess()
        p.executableURL = URL(fileURLWithPath: "/bin/sleep")
        p.arguments = ["30"]
        try p.run()
        #expect(p.isRunning)
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        #expect(!p.isRunning)
        #expect(p.terminationReason == .uncaughtSignal)
        #expect(p.terminationStatus == SIGKILL)
        // One child per instance: a second start is refused, not a second child.
        #expect(throws: ChildProcess.SpawnError.self) { try p.run() }
    }

    /// With two thousand descriptors open in the parent (where Foundation's `Process` listed
    /// /proc/self/fd and could read past a directory entry), each child starts with only its
    /// three standard ones.
    @Test func childrenInheritOnlyTheirStandardDescriptors() throws {
        var opened: [Int32] = []
        defer { for fd in opened { close(fd) } }
        for _ in 0..<2_000 {
            let fd = open("/dev/null", O_RDONLY)   // not close-on-exec: only the spawn's own closing keeps it out
            if fd >= 0 { opened.append(fd) }
        }
        #expect(opened.count == 2_000)
        for _ in 0..<20 {
            let p = ChildProcess()
            p.executableURL = URL(fileURLWithPath: "/bin/sh")
            p.arguments = ["-c", "ls /proc/self/fd | wc -l"]
            let out = Pipe()
            p.standardOutput = out
            try p.run()
            let listed = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            p.waitUntilExit()
            // 0, 1, 2 and the descriptor `ls` reads the directory with.
            #expect(Int(listed.trimmingCharacters(in: .whitespacesAndNewlines)) == 4, "child saw \(listed) descriptors")
            #expect(p.terminationStatus == 0)
        }
    }

    /// A child someone else reaped (a stray waitpid) ends the wait instead of hanging it.
    @Test(.timeLimit(.minutes(1))) func aChildReapedElsewhereStillEndsTheWait() throws {
        let p = ChildProcess()
        p.executableURL = URL(fileURLWithPath: "/bin/true")
        try p.run()
        var status: Int32 = 0
        #expect(waitpid(p.processIdentifier, &status, 0) == p.processIdentifier)
        p.waitUntilExit()
        #expect(!p.isRunning)
        #expect(p.terminationStatus == -1)
    }

    @Test func aMissingExecutableIsAnError() {
        let p = ChildProcess()
        p.executableURL = URL(fileURLWithPath: "/nonexistent/cairn-binary")
        #expect(throws: ChildProcess.SpawnError.self) { try p.run() }
        #expect(!p.isRunning)
    }
}
