// cairn-db-bench: CairnStorage's benchmark driver, speaking db_bench's flags and output format so
// the same command lines run against both engines (Benchmarks/storage/compare-rocksdb.sh).

import CairnCore
import CairnStorage
import Dispatch
import Foundation
import Histogram

struct Flags {
    var benchmarks = ["fillseq", "fillrandom", "overwrite", "readrandom", "readseq", "fillsync"]
    var num = 1_000_000
    var reads = -1
    var keySize = 16
    var valueSize = 100
    var threads = 1
    var sync = false
    var useExistingDB = false
    var db = "/tmp/cairn-db-bench"
    var histogram = false
    var statistics = false
    var seed: UInt64 = 301
    var writeBufferBytes = 64 << 20
    var cacheBytes = 64 << 20
    var bloomBits = 10
    var compactionBytesPerSecond: UInt64 = 0
    var syncOnWriterThread = false

    static let usage = """
    usage: cairn-db-bench [--benchmarks=fillseq,fillrandom,overwrite,readrandom,readseq,fillsync] [--num=N] [--reads=N]
                          [--key_size=16] [--value_size=100] [--threads=1] [--sync=0|1] [--use_existing_db=0|1]
                          [--db=DIR] [--histogram=0|1] [--statistics=0|1] [--seed=N] [--write_buffer_size=BYTES]
                          [--cache_size=BYTES] [--bloom_bits=10] [--compression_type=none] [--compaction_rate=BYTES/s]
                          [--sync_on_writer_thread=0|1]
    """

    init(_ args: [String]) throws {
        for arg in args {
            guard arg.hasPrefix("--"), let eq = arg.firstIndex(of: "=") else { throw UsageError("expected --flag=value, got \(arg)") }
            let name = String(arg[arg.index(arg.startIndex, offsetBy: 2)..<eq])
            let value = String(arg[arg.index(after: eq)...])
            func int() throws -> Int {
                guard let v = Int(value), v >= 0 else { throw UsageError("--\(name) needs a non-negative integer, got \(value)") }
                return v
            }
            func bool() throws -> Bool { try int() != 0 }
            switch name {
            case "benchmarks": benchmarks = value.split(separator: ",").map(String.init)
            case "num": num = try int()
            case "reads": reads = try int()
            case "key_size": keySize = try int()
            case "value_size": valueSize = try int()
            case "threads": threads = max(1, try int())
            case "sync": sync = try bool()
            case "use_existing_db": useExistingDB = try bool()
            case "db": db = value
            case "histogram": histogram = try bool()
            case "statistics": statistics = try bool()
            case "seed": seed = UInt64(try int())
            case "write_buffer_size": writeBufferBytes = try int()
            case "cache_size": cacheBytes = try int()
            case "bloom_bits": bloomBits = try int()
            case "compaction_rate": compactionBytesPerSecond = UInt64(try int())
            case "sync_on_writer_thread": syncOnWriterThread = try bool()
            case "compression_type":
                guard value == "none" else { throw UsageError("CairnStorage does not compress; only --compression_type=none") }
            default: throw UsageError("unknown flag --\(name)")
            }
        }
        guard keySize >= 8, keySize <= 1024 else { throw UsageError("--key_size must be 8...1024") }
        guard valueSize <= 1 << 20 else { throw UsageError("--value_size must be at most 1 MiB") }
        guard num >= 1 else { throw UsageError("--num must be at least 1") }
    }
}

struct UsageError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// The key for integer `i`: its 8 bytes big-endian, then zero padding (keys sort as the integers).
func makeKey(_ i: Int, size: Int) -> [UInt8] {
    var k = [UInt8](repeating: 0, count: size)
    let v = UInt64(i)
    for b in 0..<8 { k[b] = UInt8(truncatingIfNeeded: v >> UInt64(56 - 8 * b)) }
    return k
}

@inline(__always) func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

/// What one thread of one benchmark did.
struct ThreadResult: Sendable {
    var ops = 0
    var found = 0
    var bytes = 0
    var histogram = Histogram<UInt64>(lowestDiscernibleValue: 1, highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
}

func runThread(_ name: String, _ flags: Flags, _ db: Database, thread: Int, value: [UInt8]) async throws -> ThreadResult {
    var r = ThreadResult()
    var rng = SplitMix64(seed: flags.seed &+ UInt64(thread) &* 0x1000_0000_01B3 &+ UInt64(name.utf8.reduce(0) { $0 &* 31 &+ Int($1) }))
    let num = flags.num
    let sync: SyncMode = flags.sync ? .always : SyncMode.none
    switch name {
    case "fillseq", "fillrandom", "overwrite", "fillsync":
        // As RocksDB 7's db_bench does (its --help still says N/1000): fillsync writes N entries.
        let count = num
        let mode: SyncMode = name == "fillsync" ? .always : sync
        for i in 0..<count {
            let k = makeKey(name == "fillseq" ? i : Int(rng.next(below: UInt64(num))), size: flags.keySize)
            let t0 = now()
            try await db.put(k, value, sync: mode)
            r.histogram.record(max(now() - t0, 1))
            r.bytes += k.count + value.count
        }
        r.ops = count
    case "readrandom":
        let count = flags.reads >= 0 ? flags.reads : num
        for _ in 0..<count {
            let k = makeKey(Int(rng.next(below: UInt64(num))), size: flags.keySize)
            let t0 = now()
            let v = try db.get(k)
            r.histogram.record(max(now() - t0, 1))
            if let v {
                r.found += 1
                r.bytes += k.count + v.count
            }
        }
        r.ops = count
    case "readseq":
        let limit = flags.reads >= 0 ? flags.reads : num
        let it = try db.iterator()
        var t0 = now()
        while r.ops < limit, let (k, v) = try it.nextEntry() {
            let t1 = now()
            r.histogram.record(max(t1 - t0, 1))
            t0 = t1
            r.bytes += k.count + v.count
            r.ops += 1
        }
    case "compact":
        // As db_bench's `compact`: flush, then compact until no level needs it.
        try db.compactUntilSettled()
        r.ops = 1
    default:
        throw UsageError("unknown benchmark \(name)")
    }
    return r
}

func percentiles(_ h: Histogram<UInt64>) -> String {
    func us(_ p: Double) -> String { String(format: "%.2f", Double(h.valueAtPercentile(p)) / 1000) }
    return "Percentiles: P50: \(us(50)) P75: \(us(75)) P99: \(us(99)) P99.9: \(us(99.9)) P99.99: \(us(99.99))"
}

func main() async -> Int32 {
    let flags: Flags
    do { flags = try Flags(Array(CommandLine.arguments.dropFirst())) } catch {
        FileHandle.standardError.write(Data("cairn-db-bench: \(error)\n\(Flags.usage)\n".utf8))
        return 2
    }
    var options = DatabaseOptions()
    options.syncMode = flags.sync ? .always : SyncMode.none
    options.writeBufferBytes = flags.writeBufferBytes
    options.blockCacheBytes = flags.cacheBytes
    options.bloomBitsPerKey = flags.bloomBits
    options.compactionBytesPerSecond = flags.compactionBytesPerSecond
    options.syncOnWriterThread = flags.syncOnWriterThread
    print("CairnStorage (cairn-db-bench)")
    print("Keys:       \(flags.keySize) bytes each")
    print("Values:     \(flags.valueSize) bytes each")
    print("Entries:    \(flags.num)")
    print("Compression: NoCompression")
    if !flags.useExistingDB { try? FileManager.default.removeItem(atPath: flags.db) }
    do {
        let db = try Database.open(fs: PosixFileSystem(), directory: flags.db, options: options)
        var rng = SplitMix64(seed: flags.seed)
        let value = (0..<flags.valueSize).map { _ in UInt8(truncatingIfNeeded: rng.next() % 95 + 32) }
        for name in flags.benchmarks where !name.isEmpty {
            let start = now()
            let results = try await withThrowingTaskGroup(of: ThreadResult.self) { group in
                for t in 0..<flags.threads { group.addTask { try await runThread(name, flags, db, thread: t, value: value) } }
                var all: [ThreadResult] = []
                for try await r in group { all.append(r) }
                return all
            }
            let seconds = Double(now() - start) / 1e9
            var total = ThreadResult()
            for r in results {
                total.ops += r.ops
                total.found += r.found
                total.bytes += r.bytes
                total.histogram.add(r.histogram)
            }
            let ops = max(total.ops, 1)
            let micros = seconds * 1e6 * Double(flags.threads) / Double(ops)
            var line = String(format: "%-12@ : %11.3f micros/op %ld ops/sec %.3f seconds %ld operations; %6.1f MB/s",
                              name as NSString, micros, Int(Double(ops) / seconds), seconds, total.ops, Double(total.bytes) / 1_048_576 / seconds)
            if name == "readrandom" { line += " (\(total.found) of \(total.ops) found)" }
            print(line)
            if flags.histogram { print(percentiles(total.histogram)) }
        }
        if flags.statistics { print("STATISTICS:\n\(db.statistics)") }
        try await db.close()
    } catch {
        FileHandle.standardError.write(Data("cairn-db-bench: \(error)\n".utf8))
        return 1
    }
    return 0
}

exit(await main())
