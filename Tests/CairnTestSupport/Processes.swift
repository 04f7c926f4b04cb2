public import Foundation
import CairnProcess

/// The outcome of a finished child process.
public struct ProcessResult: Sendable {
    public let status: Int32
    public let stdout: String
    public let stderr: String
    public var ok: Bool { status == 0 }
}

/// Runs `executable` to completion (callers bound it: every command used here has its own
/// timeout) and captures its output. The wait happens on a thread of its own, never on the
/// cooperative pool: on a 2-core machine two tests waiting for child processes would otherwise
/// hold every pool thread, and every other test (virtual-time ones included) would stall behind
/// them.
public func runProcess(_ executable: String, _ args: [String], stdin: String? = nil) async throws -> ProcessResult {
    try await withCheckedThrowingContinuation { (c: CheckedContinuation<ProcessResult, any Error>) in
        let t = Thread { c.resume(with: Result { try runProcessBlocking(executable, args, stdin: stdin) }) }
        t.start()
    }
}

/// `runProcess`, waiting on the calling thread: only for code that is not async (a `deinit`,
/// a cleanup that must finish before returning).
public func runProcessBlocking(_ executable: String, _ args: [String], stdin: String? = nil) throws -> ProcessResult {
    let p = ChildProcess()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = args
    let out = Pipe(), err = Pipe(), input = Pipe()
    p.standardOutput = out
    p.standardError = err
    p.standardInput = input
    try p.run()
    if let stdin { input.fileHandleForWriting.write(Data(stdin.utf8)) }
    try input.fileHandleForWriting.close()
    // Drain stderr on another thread so a chatty child cannot block on a full pipe.
    let errData = LockedData()
    let errThread = Thread { errData.set(err.fileHandleForReading.readDataToEndOfFile()) }
    errThread.start()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    while !errData.isSet { usleep(1000) }
    return ProcessResult(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self),
                         stderr: String(decoding: errData.value, as: UTF8.self))
}

final class LockedData: @unchecked Sendable {
    private let lock = NSLock()
    private var data: Data?
    func set(_ d: Data) { lock.lock(); data = d; lock.unlock() }
    var isSet: Bool { lock.lock(); defer { lock.unlock() }; return data != nil }
    var value: Data { lock.lock(); defer { lock.unlock() }; return data ?? Data() }
}

/// The repository root and the built binaries.
public enum Repo {
    public static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    public struct MissingBinary: Error, CustomStringConvertible {
        public let description: String
        public init(description: String) { self.description = description }
    }

    /// The directory holding the debug `cairnd` and `cairn` (or `$CAIRN_BIN_DIR`).
    public static func binDir() throws -> String {
        if let dir = ProcessInfo.processInfo.environment["CAIRN_BIN_DIR"] { return dir }
        for candidate in [".build/debug", ".build/x86_64-unknown-linux-gnu/debug"] {
            let dir = root.appendingPathComponent(candidate).path
            if FileManager.default.isExecutableFile(atPath: dir + "/cairnd") && FileManager.default.isExecutableFile(atPath: dir + "/cairn") {
                return dir
            }
        }
        throw MissingBinary(description: "cairnd/cairn not built: run `swift build --build-tests` (Tests/run-all.sh does) or set CAIRN_BIN_DIR")
    }

    public static func binary(_ name: String) throws -> String { try binDir() + "/" + name }
}
