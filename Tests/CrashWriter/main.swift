// cairn-crash-writer DIR START — test support for the storage crash loop (CairnStorageTests).
// Opens DIR with tiny memtables (so flushes and compactions run all the time), then four tasks
// put keys START, START+1, … under `always`, printing "ack N" for each acknowledged key, until
// the parent kills the process. Values are a function of N (`CrashWriterValue`), so the parent can
// check each one exactly.

import CairnStorage
import Foundation

#if canImport(Glibc)
import Glibc
#endif

func value(_ n: Int) -> [UInt8] {
    Array("value-\(n)-".utf8) + [UInt8](repeating: UInt8(truncatingIfNeeded: n % 251), count: (n &* 7) % 300)
}

let args = CommandLine.arguments
guard args.count == 3, let start = Int(args[2]) else {
    FileHandle.standardError.write(Data("usage: cairn-crash-writer DIR START\n".utf8))
    exit(2)
}
var options = DatabaseOptions()
options.syncMode = .always
options.writeBufferBytes = 64 << 10
options.blockSize = 1024
options.compaction.level0Trigger = 2
options.compaction.levelBaseBytes = 128 << 10
options.compaction.targetFileBytes = 32 << 10
options.compactionBytesPerSecond = 0
do {
    let db = try Database.open(fs: PosixFileSystem(), directory: args[1], options: options)
    let ready = Array("ready\n".utf8)
    _ = ready.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
    try await withThrowingTaskGroup(of: Void.self) { group in
        for lane in 0..<4 {
            group.addTask {
                var n = start + lane
                while true {
                    let key = Array(String(format: "k%012d", n).utf8)
                    try await db.put(key, value(n))
                    let line = Array("ack \(n)\n".utf8)
                    _ = line.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
                    n += 4
                }
            }
        }
        try await group.waitForAll()
    }
} catch {
    FileHandle.standardError.write(Data("cairn-crash-writer: \(error)\n".utf8))
    exit(1)
}
