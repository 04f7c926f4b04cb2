import Dispatch
import Synchronization

/// An in-memory disk for tests that loses what a real disk may lose at a crash, and injects
/// faults on demand. Thread-safe.
///
/// Model: each file has durable bytes (as of its last sync) and bytes appended since. A
/// directory's entries (creations, renames, removals) are durable only after `syncDirectory`.
/// `crash(tearing:)` keeps exactly the durable state, optionally plus a prefix of each file's
/// unsynced bytes (a torn write: what a power cut may leave). Writes can be short: a full disk
/// (`setFreeSpace`) or an injected failure (`failNextWrite`) keeps a prefix of an append and
/// then fails it, as `write(2)` returning less followed by ENOSPC or EIO does.
public final class FaultyFileSystem: FileSystem, Sendable {
    final class Node: @unchecked Sendable {
        // Guarded by the file system's lock.
        var durable: [UInt8] = []
        var pending: [UInt8] = []
        var all: [UInt8] { durable + pending }
        var count: Int { durable.count + pending.count }
    }

    struct State {
        /// Current names → nodes, and the names that survive a crash.
        var entries: [String: Node] = [:]
        var durableEntries: [String: Node] = [:]
        var directories: Set<String> = ["/"]
        /// Incremented by every crash: handles and sessions of an earlier generation are dead.
        var generation = 0
        var failSyncs = 0
        var skipBeforeFailing = 0
        var syncCount = 0
        /// `AppendableFile.writeOut` calls (they make nothing durable here, as on a real disk).
        var writeOutCount = 0
        /// Bytes appends may still add (nil: unlimited).
        var freeSpace: Int?
        /// An armed short write (see `failNextWrite`).
        var writeFault: WriteFault?
        /// An armed failing sync (see `failNextSync(toPathContaining:losingData:)`).
        var syncFault: (match: String, losing: Bool)?
    }

    struct WriteFault {
        var match: String
        var skip: Int
        var keep: Int
        var errno: Int32
    }

    private let state = Mutex(State())
    /// While set, syncs of files whose path contains `match` wait on it (`holdSyncs`); a
    /// semaphore because they block a thread.
    private let syncGate = Mutex<(gate: DispatchSemaphore, match: String)?>(nil)
    private let heldSyncCount = Atomic<Int>(0)

    public init() {}

    // MARK: Faults

    /// The next `n` syncs (file or directory) fail with EIO, after `skipping` more succeed.
    public func failNextSyncs(_ n: Int, skipping: Int = 0) {
        state.withLock { s in
            s.failSyncs = n
            s.skipBeforeFailing = skipping
        }
    }

    /// The next sync of a file whose path contains `match` fails with EIO. `losingData`: the
    /// unsynced bytes are dropped (Linux may do that); otherwise they stay, still unsynced, and a
    /// reader sees them (the page cache kept them: a process restart without a crash reads them
    /// back, a crash drops them).
    public func failNextSync(toPathContaining match: String, losingData: Bool) {
        state.withLock { $0.syncFault = (match, losingData) }
    }

    /// Whether this sync should fail (called with the lock held).
    private static func syncFails(_ s: inout State) -> Bool {
        s.syncCount += 1
        if s.skipBeforeFailing > 0 {
            s.skipBeforeFailing -= 1
            return false
        }
        guard s.failSyncs > 0 else { return false }
        s.failSyncs -= 1
        return true
    }

    public var syncCount: Int { state.withLock { $0.syncCount } }
    /// Write-outs requested so far; they leave appended data as undurable as it was.
    public var writeOutCount: Int { state.withLock { $0.writeOutCount } }

    /// From now on every sync of a file whose path contains `match` (every file: "") blocks its
    /// calling thread, before it does anything, until `releaseSyncs` (a slow `fdatasync`, held
    /// open for as long as a test needs). Directory syncs are not held. Never hold syncs a test
    /// thread itself performs.
    public func holdSyncs(toPathContaining match: String = "") {
        syncGate.withLock { g in if g == nil { g = (DispatchSemaphore(value: 0), match) } }
    }

    /// Syncs waiting in `holdSyncs` now.
    public var heldSyncs: Int { heldSyncCount.load(ordering: .relaxed) }

    /// Lets every held sync, and every later one, proceed.
    public func releaseSyncs() {
        syncGate.withLock { g in
            g?.gate.signal()
            g = nil
        }
    }

    /// A small disk: from now on appends may add only `bytes` more bytes in all (nil: unlimited,
    /// which also frees a full disk). An append that does not fit keeps the part that fits, then
    /// fails with ENOSPC. Removing files does not give space back; call this again to free it.
    public func setFreeSpace(_ bytes: Int?) {
        state.withLock { $0.freeSpace = bytes.map { max($0, 0) } }
    }

    /// Bytes appends may still add (nil: unlimited).
    public var freeSpace: Int? { state.withLock { $0.freeSpace } }

    /// Arms one short write: the append after `skipping` more appends to a file whose path
    /// contains `match` ("" matches every file) keeps the first `keeping` bytes of its data, then
    /// fails with `errno` (5, EIO, by default; 28 is ENOSPC).
    public func failNextWrite(toPathContaining match: String = "", skipping: Int = 0, keeping: Int, errno: Int32 = 5) {
        state.withLock { $0.writeFault = WriteFault(match: match, skip: max(skipping, 0), keep: max(keeping, 0), errno: errno) }
    }

    /// Flips one bit of a file's current contents.
    public func flipBit(_ path: String, byte: Int, bit: Int = 0) {
        state.withLock { s in
            guard let node = s.entries[path] else { return }
            if byte < node.durable.count {
                node.durable[byte] ^= UInt8(1 << (bit & 7))
            } else if byte - node.durable.count < node.pending.count {
                node.pending[byte - node.durable.count] ^= UInt8(1 << (bit & 7))
            }
        }
    }

    /// Simulates a power cut: only durable state survives; with `tearing`, each file keeps a
    /// random prefix of its unsynced bytes (chosen by `rng`).
    public func crash(tearing: Bool, rng: inout some RandomNumberGenerator) {
        state.withLock { s in
            s.generation += 1
            s.entries = s.durableEntries
            var seen = Set<ObjectIdentifier>()
            for node in s.entries.values where seen.insert(ObjectIdentifier(node)).inserted {
                if tearing && !node.pending.isEmpty {
                    let keep = Int.random(in: 0...node.pending.count, using: &rng)
                    node.durable += node.pending.prefix(keep)
                }
                node.pending = []
            }
        }
    }

    /// A view of this disk for one "process": once the disk crashes, every operation through the
    /// session (and every file it opened) fails with EIO, as a dead process can write nothing —
    /// so a database left running across `crash` cannot touch the recovered state.
    public func session() -> any FileSystem { FaultySession(fs: self, generation: state.withLock { $0.generation }) }

    func checkAlive(_ generation: Int?, _ path: String) throws(StorageError) {
        try state.withLock { s throws(StorageError) in try Self.alive(s, generation, path) }
    }

    /// Called with the lock held, so a crash cannot slip between the check and the change.
    static func alive(_ s: State, _ generation: Int?, _ path: String) throws(StorageError) {
        if let generation, s.generation != generation { throw .io(path: path, operation: "after crash", errno: 5) }
    }

    /// The bytes a file holds now (tests).
    public func contents(_ path: String) -> [UInt8]? { state.withLock { $0.entries[path]?.all } }

    // MARK: FileSystem

    static func parent(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        let p = String(path[..<slash])
        return p.isEmpty ? "/" : p
    }

    public func openAppendable(_ path: String, create: Bool) throws(StorageError) -> any AppendableFile {
        try openAppendable(path, create: create, generation: nil)
    }

    func openAppendable(_ path: String, create: Bool, generation: Int?) throws(StorageError) -> any AppendableFile {
        try state.withLock { s throws(StorageError) in
            try Self.alive(s, generation, path)
            if s.entries[path] == nil {
                guard create else { throw .notFound(path: path) }
                guard s.directories.contains(Self.parent(path)) else { throw .io(path: path, operation: "open", errno: 2) }
                s.entries[path] = Node()
            }
        }
        return FaultyAppendableFile(fs: self, path: path, generation: generation)
    }

    public func openReadable(_ path: String) throws(StorageError) -> any ReadableFile {
        guard let bytes = contents(path) else { throw .notFound(path: path) }
        return FaultyReadableFile(bytes: bytes)
    }

    public func rename(_ from: String, to: String) throws(StorageError) { try rename(from, to: to, generation: nil) }

    func rename(_ from: String, to: String, generation: Int?) throws(StorageError) {
        try state.withLock { s throws(StorageError) in
            try Self.alive(s, generation, from)
            guard let node = s.entries.removeValue(forKey: from) else { throw .notFound(path: from) }
            s.entries[to] = node
        }
    }

    public func remove(_ path: String) throws(StorageError) { try remove(path, generation: nil) }

    func remove(_ path: String, generation: Int?) throws(StorageError) {
        try state.withLock { s throws(StorageError) in
            try Self.alive(s, generation, path)
            guard s.entries.removeValue(forKey: path) != nil else { throw .notFound(path: path) }
        }
    }

    public func truncate(_ path: String, to size: UInt64) throws(StorageError) { try truncate(path, to: size, generation: nil) }

    func truncate(_ path: String, to size: UInt64, generation: Int?) throws(StorageError) {
        try state.withLock { s throws(StorageError) in
            try Self.alive(s, generation, path)
            guard let node = s.entries[path] else { throw .notFound(path: path) }
            let n = Int(min(size, UInt64(node.all.count)))
            // A truncate is a metadata change the engine syncs right after; model it as durable.
            node.durable = Array(node.all.prefix(n))
            node.pending = []
        }
    }

    public func exists(_ path: String) -> Bool { state.withLock { $0.entries[path] != nil || $0.directories.contains(path) } }

    public func list(_ directory: String) throws(StorageError) -> [String] {
        state.withLock { s in
            s.entries.keys.filter { Self.parent($0) == directory }.map { String($0.split(separator: "/").last ?? "") }.sorted()
        }
    }

    public func createDirectory(_ path: String) throws(StorageError) {
        state.withLock { _ = $0.directories.insert(path) }
    }

    public func syncDirectory(_ path: String) throws(StorageError) { try syncDirectory(path, generation: nil) }

    func syncDirectory(_ path: String, generation: Int?) throws(StorageError) {
        try state.withLock { s throws(StorageError) in
            try Self.alive(s, generation, path)
            if let f = s.syncFault, path.contains(f.match) {
                s.syncFault = nil
                s.syncCount += 1
                if f.losing { s.entries[path]?.pending = [] }
                throw .syncFailed(path: path, errno: 5)
            }
            if Self.syncFails(&s) { throw .syncFailed(path: path, errno: 5) }
            s.durableEntries = s.durableEntries.filter { Self.parent($0.key) != path }
            for (name, node) in s.entries where Self.parent(name) == path { s.durableEntries[name] = node }
        }
    }

    // Used by the file handles.
    func append(_ path: String, _ bytes: [UInt8], generation: Int? = nil) throws(StorageError) {
        try state.withLock { s throws(StorageError) in
            try Self.alive(s, generation, path)
            guard let node = s.entries[path] else { throw .io(path: path, operation: "write", errno: 9) }
            var accepted = bytes.count
            var failure: Int32?
            if var f = s.writeFault, path.contains(f.match) {
                if f.skip > 0 {
                    f.skip -= 1
                    s.writeFault = f
                } else {
                    s.writeFault = nil
                    accepted = min(accepted, f.keep)
                    failure = f.errno
                }
            }
            if let free = s.freeSpace {
                if accepted > free {
                    accepted = free
                    failure = 28
                }
                s.freeSpace = free - accepted
            }
            node.pending += bytes.prefix(accepted)
            if let failure { throw .io(path: path, operation: "write", errno: failure) }
        }
    }

    func sync(_ path: String, generation: Int? = nil) throws(StorageError) {
        if let (gate, match) = syncGate.withLock({ $0 }), path.contains(match) {
            heldSyncCount.wrappingAdd(1, ordering: .relaxed)
            gate.wait()
            gate.signal()   // pass the release on to the next held sync
            heldSyncCount.wrappingSubtract(1, ordering: .relaxed)
        }
        try state.withLock { s throws(StorageError) in
            try Self.alive(s, generation, path)
            if let f = s.syncFault, path.contains(f.match) {
                s.syncFault = nil
                s.syncCount += 1
                if f.losing { s.entries[path]?.pending = [] }
                throw .syncFailed(path: path, errno: 5)
            }
            if Self.syncFails(&s) {
                // Like Linux after a failed fsync: the dirty data may be gone.
                s.entries[path]?.pending = []
                throw .syncFailed(path: path, errno: 5)
            }
            guard let node = s.entries[path] else { throw .io(path: path, operation: "fdatasync", errno: 9) }
            node.durable += node.pending
            node.pending = []
        }
    }

    func size(_ path: String) -> UInt64 { state.withLock { UInt64($0.entries[path]?.count ?? 0) } }

    func writeOut(_ path: String, generation: Int?) throws(StorageError) {
        try state.withLock { s throws(StorageError) in
            try Self.alive(s, generation, path)
            s.writeOutCount += 1
        }
    }
}

final class FaultyAppendableFile: AppendableFile {
    let fs: FaultyFileSystem
    let path: String
    let generation: Int?

    init(fs: FaultyFileSystem, path: String, generation: Int?) {
        self.fs = fs
        self.path = path
        self.generation = generation
    }

    var size: UInt64 { fs.size(path) }
    func append(_ bytes: [UInt8]) throws(StorageError) { try fs.append(path, bytes, generation: generation) }
    func sync() throws(StorageError) { try fs.sync(path, generation: generation) }
    func writeOut() throws(StorageError) { try fs.writeOut(path, generation: generation) }
    func close() throws(StorageError) {}
}

/// `FaultyFileSystem.session()`: the disk as one process sees it, dead after a crash.
struct FaultySession: FileSystem {
    let fs: FaultyFileSystem
    let generation: Int

    func openAppendable(_ path: String, create: Bool) throws(StorageError) -> any AppendableFile {
        try fs.openAppendable(path, create: create, generation: generation)
    }
    func openReadable(_ path: String) throws(StorageError) -> any ReadableFile {
        try fs.checkAlive(generation, path)
        return try fs.openReadable(path)
    }
    func rename(_ from: String, to: String) throws(StorageError) { try fs.rename(from, to: to, generation: generation) }
    func remove(_ path: String) throws(StorageError) { try fs.remove(path, generation: generation) }
    func truncate(_ path: String, to size: UInt64) throws(StorageError) { try fs.truncate(path, to: size, generation: generation) }
    func exists(_ path: String) -> Bool { fs.exists(path) }
    func list(_ directory: String) throws(StorageError) -> [String] {
        try fs.checkAlive(generation, directory)
        return try fs.list(directory)
    }
    func createDirectory(_ path: String) throws(StorageError) {
        try fs.checkAlive(generation, path)
        try fs.createDirectory(path)
    }
    func syncDirectory(_ path: String) throws(StorageError) { try fs.syncDirectory(path, generation: generation) }
}

final class FaultyReadableFile: ReadableFile {
    let bytes: [UInt8]
    init(bytes: [UInt8]) { self.bytes = bytes }
    var size: UInt64 { UInt64(bytes.count) }
    func read(at offset: UInt64, count: Int) throws(StorageError) -> [UInt8] {
        guard offset < UInt64(bytes.count), count > 0 else { return [] }
        let start = Int(offset)
        return Array(bytes[start..<min(start + count, bytes.count)])
    }
    func close() {}
}
