import Testing
import CairnCore
import CairnStorage
@testable import CairnNode
import Synchronization

/// The two stores every seam test runs against: the memory store, and the disk store on a
/// fault-injecting in-memory disk (`FaultyFileSystem`) with real request threads.
enum StoreKind: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case memory, disk
    var testDescription: String { rawValue }
}

struct Pair: Hashable, Sendable, CustomStringConvertible {
    let key: [UInt8]
    let value: [UInt8]
    init(_ key: [UInt8], _ value: [UInt8]) {
        self.key = key
        self.value = value
    }
    var description: String { "\(key)=\(value)" }
}

func openStore(_ kind: StoreKind, disk: FaultyFileSystem = FaultyFileSystem(), fs: (any FileSystem)? = nil,
               cacheFlushedBlocks: Bool = true, logBufferBytes: Int = DatabaseOptions().logBufferBytes) async throws -> any PartitionStore {
    switch kind {
    case .memory:
        return MemoryBackend()
    case .disk:
        var options = DatabaseOptions()
        options.syncMode = .always
        options.cacheFlushedBlocks = cacheFlushedBlocks
        options.logBufferBytes = logBufferBytes
        return try await DiskBackend.open(directory: "/db", options: options, fs: fs ?? disk.session())
    }
}

extension PartitionStore {
    /// Writes on the partition's executor (as its vnode would), then waits until durable.
    func put(_ p: PartitionID, _ key: [UInt8], _ value: [UInt8]) async throws {
        try await waitDurable(try await onExecutor(of: p) { try self.apply(partition: p, key: key, value: value) })
    }

    func put(_ p: PartitionID, batch: [Pair]) async throws {
        try await waitDurable(try await onExecutor(of: p) { try self.apply(partition: p, batch: batch.map { ($0.key, $0.value) }) })
    }

    func read(_ p: PartitionID, _ key: [UInt8]) async throws -> [UInt8]? {
        try await onExecutor(of: p) { try self.get(partition: p, key: key) }
    }

    /// Every pair of `p` after `after`, from one fold.
    func pairs(_ p: PartitionID, after: [UInt8]? = nil) async throws -> [Pair] {
        try await fold(partition: p, after: after, into: [Pair]()) { acc, key, value in
            acc.append(Pair(key, value))
            return .continue
        }.accumulator
    }

    func flushIfDisk() throws {
        try (self as? DiskBackend)?.database.flush()
    }
}

func bytewise(_ a: Pair, _ b: Pair) -> Bool { a.key.lexicographicallyPrecedes(b.key) }

@Suite(.timeLimit(.minutes(3))) struct PartitionStoreTests {
    /// Keys at the edges of the byte order: empty, prefixes of each other, 0x7F/0x80, 0xFF runs.
    static let edgeKeys: [[UInt8]] = [[], [0], [0, 0], [1], [1, 2], [0x7F], [0x80], [0xFF], [0xFF, 0xFF]]
    /// Neighbouring partitions, and the last one (its range ends where the key space does).
    static let partitions = [PartitionID(0), PartitionID(1), PartitionID(2), PartitionID(0x0100_0000), PartitionID(0xFFFF_FFFF)]

    @Test(arguments: StoreKind.allCases)
    func aFoldVisitsExactlyItsPartitionInKeyOrder(_ kind: StoreKind) async throws {
        let store = try await openStore(kind)
        var rng = SplitMix64(seed: 7)
        var expected: [PartitionID: [[UInt8]: [UInt8]]] = [:]
        let writes = Self.partitions.flatMap { p in Self.edgeKeys.map { (p, $0) } }.shuffled(using: &rng)
        for (i, (p, key)) in writes.enumerated() {
            if i == writes.count / 2 { try store.flushIfDisk() }   // half in a table, half in the memtable
            let value = key + [UInt8(truncatingIfNeeded: p.index), 1]
            try await store.put(p, key, value)
            expected[p, default: [:]][key] = value
        }
        // Newer versions in the memtable shadow the table's.
        for p in Self.partitions {
            try await store.put(p, [1], [9])
            expected[p, default: [:]][[1]] = [9]
        }
        for p in Self.partitions {
            let want = (expected[p] ?? [:]).map { Pair($0.key, $0.value) }.sorted(by: bytewise)
            #expect(try await store.pairs(p) == want, "partition \(p)")
            #expect(try await store.count(partition: p) == want.count)
        }
        #expect(try await store.pairs(PartitionID(3)).isEmpty)
        try await store.close()
    }

    @Test(arguments: StoreKind.allCases)
    func aFoldStopsEarlyAndResumesAfterAKey(_ kind: StoreKind) async throws {
        let store = try await openStore(kind)
        let p = PartitionID(5)
        let all = (0..<25).map { Pair([UInt8($0 * 3)], [UInt8($0)]) }
        for pair in all.reversed() { try await store.put(p, pair.key, pair.value) }
        try await store.put(PartitionID(6), [1], [1])

        // Chunks of four, each resumed after the last key of the one before.
        var chunks: [[Pair]] = []
        var cursor: [UInt8]?
        while true {
            let fold = try await store.fold(partition: p, after: cursor, into: [Pair]()) { acc, key, value in
                acc.append(Pair(key, value))
                return acc.count == 4 ? .stop : .continue
            }
            chunks.append(fold.accumulator)
            guard let next = fold.resumeAfter else { break }
            #expect(next == fold.accumulator.last?.key, "resume after the last key visited")
            cursor = next
        }
        #expect(chunks.flatMap { $0 } == all)
        #expect(chunks.map(\.count) == [4, 4, 4, 4, 4, 4, 1])

        // After a key the partition does not hold: from the next one up.
        #expect(try await store.pairs(p, after: [4]).first == Pair([6], [2]))
        // After the last key: nothing, and the fold says the partition ended.
        let end = try await store.fold(partition: p, after: [72], into: 0) { n, _, _ in n += 1; return .continue }
        #expect(end.accumulator == 0 && end.resumeAfter == nil)
        // Stopping at once still visits (and hands back) the first key.
        let first = try await store.fold(partition: p, after: nil, into: [Pair]()) { acc, key, value in
            acc.append(Pair(key, value))
            return .stop
        }
        #expect(first.accumulator == [all[0]] && first.resumeAfter == all[0].key)
        try await store.close()
    }

    /// A write landing mid-fold is not seen by it: made from inside `visit` (the one way to place
    /// it deterministically), it overwrites every key and adds one.
    @Test(arguments: StoreKind.allCases)
    func aFoldReadsOneSnapshotWhileWritesLand(_ kind: StoreKind) async throws {
        let store = try await openStore(kind)
        let p = PartitionID(9)
        try await store.put(p, batch: (0..<20).map { Pair([UInt8($0)], [1]) })
        try store.flushIfDisk()
        let seen = try await store.fold(partition: p, after: nil, into: [Pair]()) { acc, key, value in
            if acc.isEmpty {
                _ = try store.apply(partition: p, batch: (0..<20).map { ([UInt8($0)], [2]) } + [([200], [2])])
            }
            acc.append(Pair(key, value))
            return .continue
        }.accumulator
        #expect(seen == (0..<20).map { Pair([UInt8($0)], [1]) })
        try await store.waitDurable(store.lastApplied)
        #expect(try await store.pairs(p) == (0..<20).map { Pair([UInt8($0)], [2]) } + [Pair([200], [2])])
        try await store.close()
    }

    /// Folds racing a writer that rewrites every key of the partition in one batch per round:
    /// each fold sees one round, whole (snapshot + batch atomicity).
    @Test(arguments: StoreKind.allCases)
    func concurrentFoldsSeeWholeBatches(_ kind: StoreKind) async throws {
        let store = try await openStore(kind)
        let p = PartitionID(4)
        let keys = (0..<20).map { [UInt8($0), 0xAB] }
        try await store.put(p, batch: keys.map { Pair($0, [0]) })
        let done = Flag()
        let writer = Task {
            defer { done.set() }
            for round in 1...60 {
                try await store.put(p, batch: keys.map { Pair($0, [UInt8(round)]) })
                if kind == .disk && round % 20 == 0 { try store.flushIfDisk() }
            }
        }
        var folds = 0
        repeat {
            let seen = try await store.pairs(p)
            #expect(seen.map(\.key) == keys)
            #expect(Set(seen.map(\.value)).count == 1, "a torn batch: \(seen)")
            folds += 1
        } while !done.isSet
        try await writer.value
        #expect(folds > 0)
        #expect(Set(try await store.pairs(p).map(\.value)) == [[60]])
        try await store.close()
    }

    @Test(arguments: StoreKind.allCases)
    func aBatchWritesItsKeysTogether(_ kind: StoreKind) async throws {
        let store = try await openStore(kind)
        let p = PartitionID(2)
        let before = store.lastApplied
        let empty = try await store.onExecutor(of: p) { try store.apply(partition: p, batch: []) }
        #expect(empty == before, "an empty batch writes nothing")
        let writesBefore = store.storageStatistics?.writes
        // A key given twice takes its last value.
        try await store.put(p, batch: [Pair([1], [1]), Pair([2], [1]), Pair([1], [7])])
        if let writesBefore { #expect(store.storageStatistics?.writes == writesBefore + 1, "one log record") }
        #expect(try await store.pairs(p) == [Pair([1], [7]), Pair([2], [1])])
        #expect(try await store.onExecutor(of: p) { try store.getDurable(partition: p, key: [2]) } == [1])
        try await store.close()
    }

    /// A power cut keeps a synced batch and keeps an unsynced one whole or not at all, however
    /// the log's tail tears.
    @Test(arguments: UInt64(1)...8)
    func aBatchSurvivesAPowerCutWholeOrNotAtAll(seed: UInt64) async throws {
        let disk = FaultyFileSystem()
        let p = PartitionID(3)
        let first = try await openStore(.disk, disk: disk)
        try await first.put(p, batch: (0..<10).map { Pair([UInt8($0)], [1]) })
        _ = try await first.onExecutor(of: p) {
            try first.apply(partition: p, batch: (5..<15).map { ([UInt8($0)], [2]) })   // never synced
        }
        var rng = SplitMix64(seed: seed)
        disk.crash(tearing: true, rng: &rng)
        await first.abandon()

        let second = try await openStore(.disk, disk: disk)
        let kept = try await second.pairs(p)
        let synced = (0..<10).map { Pair([UInt8($0)], [1]) }
        let applied = (0..<5).map { Pair([UInt8($0)], [1]) } + (5..<15).map { Pair([UInt8($0)], [2]) }
        #expect(kept == synced || kept == applied, "seed \(seed): \(kept)")
        try await second.close()
    }

    @Test(arguments: StoreKind.allCases)
    func aDropRemovesOnePartitionOnly(_ kind: StoreKind) async throws {
        let disk = FaultyFileSystem()
        let store = try await openStore(kind, disk: disk)
        let ps = [PartitionID(0), PartitionID(1), PartitionID(2)]
        for p in ps {
            for key in Self.edgeKeys { try await store.put(p, key, key + [UInt8(p.index)]) }
        }
        try store.flushIfDisk()
        try await store.put(PartitionID(1), [0x42], [1])   // in the memtable too
        try await store.drop(partition: PartitionID(1))
        #expect(try await store.pairs(PartitionID(1)).isEmpty)
        #expect(try await store.count(partition: PartitionID(1)) == 0)
        #expect(try await store.read(PartitionID(1), [0x42]) == nil)
        for p in [PartitionID(0), PartitionID(2)] {
            #expect(try await store.pairs(p) == Self.edgeKeys.map { Pair($0, $0 + [UInt8(p.index)]) }.sorted(by: bytewise))
        }
        // Writes after the drop stay.
        try await store.put(PartitionID(1), [3], [3])
        #expect(try await store.pairs(PartitionID(1)) == [Pair([3], [3])])
        guard kind == .disk else { return try await store.close() }

        // Durable on return: a power cut right after keeps the drop.
        var rng = SplitMix64(seed: 1)
        disk.crash(tearing: false, rng: &rng)
        await store.abandon()
        let back = try await openStore(.disk, disk: disk)
        #expect(try await back.pairs(PartitionID(1)) == [Pair([3], [3])])
        #expect(try await back.count(partition: PartitionID(0)) == Self.edgeKeys.count)
        #expect(try await back.count(partition: PartitionID(2)) == Self.edgeKeys.count)
        try await back.close()
    }
}

/// Where the disk store's engine calls run: on the partition's own executor (a thread of its
/// own), never on the caller's cooperative-pool thread.
@Suite(.timeLimit(.minutes(3))) struct PartitionStoreIsolationTests {
    @Test func eachPartitionHasOneExecutorAndOnExecutorRunsThere() async throws {
        let store = try await openStore(.disk)
        let p = PartitionID(3)
        let executor = try #require(store.executor(for: p))
        #expect(store.executor(for: p).map { $0 === executor } == true)
        #expect(executor.isIsolatingCurrentContext() != true, "the test runs on the cooperative pool")
        #expect(try await store.onExecutor(of: p) { executor.isIsolatingCurrentContext() } == true)
        #expect(MemoryBackend().executor(for: p) == nil, "the memory store never blocks: no executor")
        try await store.close()
    }

    /// The vnode's log appends (a write) and table reads (a read missing the block cache) run
    /// on its partition's store executor: the vnode actor itself runs there. Without the log
    /// buffer: with it, a record reaches the file in the sync that makes it durable, which runs
    /// where group commit puts it (after the store thread's batch, or on the sync queue).
    @Test func aVnodesEngineCallsRunOnTheStoresThread() async throws {
        let recorder = RecordingFileSystem(FaultyFileSystem().session())
        let store = try await openStore(.disk, fs: recorder, cacheFlushedBlocks: false, logBufferBytes: 0)
        let (vnode, sup, task) = try await runningVnode(store)
        let executor = try #require(store.executor(for: vnode.partition))
        recorder.watch(executor)
        let actor = ActorID(node: "n1", epoch: 1)
        for i in 0..<5 {
            _ = try await vnode.coordinate(key: [UInt8(i)], sibling: Sibling(value: [UInt8(i)], timestampMillis: 1),
                                           context: VersionVector(), actor: actor)
        }
        let appends = recorder.calls.filter { $0.operation == "append" && $0.path.hasSuffix(".log") }
        #expect(appends.count == 5)
        #expect(appends.allSatisfy { $0.onWatched }, "log appends off the store's thread: \(appends)")

        try store.flushIfDisk()   // the keys move to a table; its data block is not cached yet
        recorder.reset()
        #expect(try await vnode.get([3])?.values.map(\.value) == [[3]])
        let reads = recorder.calls.filter { $0.operation == "read" && $0.path.hasSuffix(".sst") }
        #expect(!reads.isEmpty, "the read went to the table file")
        #expect(reads.allSatisfy { $0.onWatched }, "table reads off the store's thread: \(reads)")
        sup.finish(); task.cancel(); try await task.value
        try await store.close()
    }
}

/// A file system that records, for every append and read, whether it ran on the watched executor.
final class RecordingFileSystem: FileSystem {
    struct Call: Sendable, CustomStringConvertible {
        let operation: String
        let path: String
        let onWatched: Bool
        var description: String { "\(operation) \(path) on watched: \(onWatched)" }
    }

    private let inner: any FileSystem
    private let state = Mutex<(watched: (any SerialExecutor)?, calls: [Call])>((nil, []))

    init(_ inner: any FileSystem) { self.inner = inner }

    func watch(_ executor: any SerialExecutor) { state.withLock { $0 = (executor, []) } }
    func reset() { state.withLock { $0.calls = [] } }
    var calls: [Call] { state.withLock { $0.calls } }

    func record(_ operation: String, _ path: String) {
        state.withLock { s in
            guard let watched = s.watched else { return }
            s.calls.append(Call(operation: operation, path: path, onWatched: watched.isIsolatingCurrentContext() == true))
        }
    }

    func openAppendable(_ path: String, create: Bool) throws(StorageError) -> any AppendableFile {
        RecordingAppendable(try inner.openAppendable(path, create: create), path: path, fs: self)
    }
    func openReadable(_ path: String) throws(StorageError) -> any ReadableFile {
        RecordingReadable(try inner.openReadable(path), path: path, fs: self)
    }
    func rename(_ from: String, to: String) throws(StorageError) { try inner.rename(from, to: to) }
    func remove(_ path: String) throws(StorageError) { try inner.remove(path) }
    func truncate(_ path: String, to size: UInt64) throws(StorageError) { try inner.truncate(path, to: size) }
    func exists(_ path: String) -> Bool { inner.exists(path) }
    func list(_ directory: String) throws(StorageError) -> [String] { try inner.list(directory) }
    func createDirectory(_ path: String) throws(StorageError) { try inner.createDirectory(path) }
    func syncDirectory(_ path: String) throws(StorageError) { try inner.syncDirectory(path) }
}

final class RecordingAppendable: AppendableFile {
    let inner: any AppendableFile
    let path: String
    let fs: RecordingFileSystem
    init(_ inner: any AppendableFile, path: String, fs: RecordingFileSystem) {
        self.inner = inner
        self.path = path
        self.fs = fs
    }
    var size: UInt64 { inner.size }
    func append(_ bytes: [UInt8]) throws(StorageError) {
        fs.record("append", path)
        try inner.append(bytes)
    }
    func sync() throws(StorageError) { try inner.sync() }
    func close() throws(StorageError) { try inner.close() }
}

final class RecordingReadable: ReadableFile {
    let inner: any ReadableFile
    let path: String
    let fs: RecordingFileSystem
    init(_ inner: any ReadableFile, path: String, fs: RecordingFileSystem) {
        self.inner = inner
        self.path = path
        self.fs = fs
    }
    var size: UInt64 { inner.size }
    func read(at offset: UInt64, count: Int) throws(StorageError) -> [UInt8] {
        fs.record("read", path)
        return try inner.read(at: offset, count: count)
    }
    func close() { inner.close() }
}
