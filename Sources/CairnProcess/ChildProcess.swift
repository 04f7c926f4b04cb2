public import Foundation
import Synchronization
import CStorageSupport
#if canImport(Glibc)
import Glibc
#endif

/// A child process, started with `posix_spawn` (`cairn_spawn`): the subset of Foundation's
/// `Process` the harnesses use, under the same names, without its /proc/self/fd listing (an
/// intermittent out-of-bounds read in swift-corelibs-foundation, swiftlang/swift-corelibs-foundation
/// #5472, that crashed the test process when it held many descriptors).
///
/// Set the properties, then `run()` once. `standardInput` / `standardOutput` / `standardError`
/// take a `Pipe` (the parent's copy of the child's end is closed after the start), a
/// `FileHandle`, or nil (the caller's own). Thread-safe after `run()`: any thread may ask
/// `isRunning`, wait or signal; the child is reaped once, by whichever asks first after it ended.
public final class ChildProcess: @unchecked Sendable {
    public enum TerminationReason: Sendable { case exit, uncaughtSignal }

    public struct SpawnError: Error, CustomStringConvertible {
        public let description: String
    }

    public var executableURL: URL?
    public var arguments: [String] = []
    /// nil: the caller's environment.
    public var environment: [String: String]?
    public var standardInput: Any?
    public var standardOutput: Any?
    public var standardError: Any?

    private struct Exit { let status: Int32; let reason: TerminationReason }
    private let state = Mutex<(pid: Int32, exit: Exit?)>((0, nil))

    public init() {}

    public var processIdentifier: Int32 { state.withLock { $0.pid } }

    /// Starts the child (once per instance); throws if it could not be started (the executable
    /// missing, say).
    public func run() throws {
        guard processIdentifier == 0 else { throw SpawnError(description: "already started (pid \(processIdentifier))") }
        guard let path = executableURL?.path else { throw SpawnError(description: "no executable set") }
        let inFD = Self.descriptor(standardInput, reading: true)
        let outFD = Self.descriptor(standardOutput, reading: false)
        let errFD = Self.descriptor(standardError, reading: false)
        var argv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { strdup($0) } + [nil]
        var envp: [UnsafeMutablePointer<CChar>?] = (environment ?? [:]).map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for p in argv + envp { free(p) } }
        var pid: Int32 = 0
        let r = environment == nil ? cairn_spawn(path, &argv, environ, inFD, outFD, errFD, &pid)
                                   : cairn_spawn(path, &argv, &envp, inFD, outFD, errFD, &pid)
        guard r == 0 else { throw SpawnError(description: "cannot start \(path): \(String(cString: strerror(r)))") }
        state.withLock { $0.pid = pid }
        // The child holds its ends now; the parent's copies would keep a reader from seeing EOF.
        for (io, reading) in [(standardInput, true), (standardOutput, false), (standardError, false)] {
            if let pipe = io as? Pipe { try? (reading ? pipe.fileHandleForReading : pipe.fileHandleForWriting).close() }
        }
    }

    /// Whether the child has not ended yet (false before `run`).
    public var isRunning: Bool {
        guard processIdentifier > 0 else { return false }
        return reap() == nil
    }

    /// Blocks until the child has ended.
    public func waitUntilExit() {
        guard processIdentifier > 0 else { return }
        var pause: UInt32 = 1_000
        while reap() == nil {
            usleep(pause)
            pause = min(pause * 2, 50_000)
        }
    }

    /// The exit code, or the signal that ended it (as Foundation's `Process`); 0 while running,
    /// -1 if another waiter in this process reaped it first.
    public var terminationStatus: Int32 { state.withLock { $0.exit?.status ?? 0 } }
    public var terminationReason: TerminationReason { state.withLock { $0.exit?.reason ?? .exit } }

    /// Sends SIGTERM.
    public func terminate() {
        let pid = processIdentifier
        if pid > 0, isRunning { kill(pid, SIGTERM) }
    }

    /// The exit, reaping the child if it has ended; nil while it runs.
    private func reap() -> Exit? {
        state.withLock { s in
            if let e = s.exit { return e }
            var status: Int32 = 0
            let r = waitpid(s.pid, &status, WNOHANG)
            if r == -1, errno == ECHILD {
                // Reaped by someone else (a waitpid(-1) elsewhere in the process): it has ended,
                // how is unknown. Reported as exit status -1 rather than waited for forever.
                let e = Exit(status: -1, reason: .exit)
                s.exit = e
                return e
            }
            guard r == s.pid else { return nil }   // 0: still running; -1 EINTR: ask again
            // WIFEXITED / WEXITSTATUS / WTERMSIG, spelled out (macros Swift does not import).
            let signal = status & 0x7f
            let e = signal == 0 ? Exit(status: (status >> 8) & 0xff, reason: .exit) : Exit(status: signal, reason: .uncaughtSignal)
            s.exit = e
            return e
        }
    }

    private static func descriptor(_ io: Any?, reading: Bool) -> Int32 {
        switch io {
        case let pipe as Pipe: return (reading ? pipe.fileHandleForReading : pipe.fileHandleForWriting).fileDescriptor
        case let handle as FileHandle: return handle.fileDescriptor
        default: return -1
        }
    }
}
