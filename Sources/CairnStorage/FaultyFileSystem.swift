import Synchronization

/// An in-memory disk for tests that loses what a real disk may lose at a crash, and injects
/// faults on demand. Thread-safe.
///
/// Model: each file has durable bytes (as of its last sync) and bytes appended since. A
/// directory's entries (creations, renames, removals) are durable only after `syncDirectory`.
/// `crash(tearing:)` keeps exactly the durable state, optionally plus a prefix of each file's
/// unsynced bytes (a torn write: what a power cut may leave).
public final class FaultyFileSystem: FileSystem, Sendable {
    final class Node: @unchecked Sendable {
        // Guarded by the file system's lock.
        var durable: [UInt8] = []
        var pending: [UInt8] = []
        var all: [UInt8] { durable + pending }
    }

    struct State {
        /// Current names → nodes, and the names that survive a crash.
        var entries: [String: Node] = [:]
        var durableEntries: [String: Node] = [:]
        var directories: Set<String> = ["/"]
        var failSyncs = 0
        var skipBeforeFailing = 0
        var syncCount = 0
    }

    private let state = Mutex(State())

    public init() {}

    // MARK: Faults

    /// The next `n` syncs (file or directory) fail with EIO, after `skipping` more succeed.
    public func failNextSyncs(_ n: Int, skipping: Int = 0) {
        state.withLock { s in
            s.failSyncs = n
            s.skipBeforeFailing = skipping
        }
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

    /// The bytes a file holds now (tests).
    public func contents(_ path: String) -> [UInt8]? { state.withLock { $0.entries[path]?.all } }

    // MARK: FileSystem

    static func parent(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        let p = String(path[..<slash])
        return p.isEmpty ? "/" : p
    }

    public func openAppendable(_ path: String, create: Bool) throws(StorageError) -> any AppendableFile {
        try state.withLock { s throws(StorageError) in
            if s.entries[path] == nil {
                guard create else { throw .notFound(path: path) }
                guard s.directories.contains(Self.parent(path)) else { throw .io(path: path, operation: "open", errno: 2) }
                s.entries[path] = Node()
            }
        }
        return FaultyAppendableFile(fs: self, path: path)
    }

    public func openReadable(_ path: String) throws(StorageError) -> any ReadableFile {
        guard let bytes = contents(path) else { throw .notFound(path: path) }
        return FaultyReadableFile(bytes: bytes)
    }

    public func rename(_ from: String, to: String) throws(StorageError) {
        try state.withLock { s throws(StorageError) in
            guard let node = s.entries.removeValue(forKey: from) else { throw .notFound(path: from) }
            s.entries[to] = node
        }
    }

    public func remove(_ path: String) throws(StorageError) {
        try state.withLock { s throws(StorageError) in
            guard s.entries.removeValue(forKey: path) != nil else { throw .notFound(path: path) }
        }
    }

    public func truncate(_ path: String, to size: UInt64) throws(StorageError) {
        try state.withLock { s throws(StorageError) in
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

    public func syncDirectory(_ path: String) throws(StorageError) {
        try state.withLock { s throws(StorageError) in
            if Self.syncFails(&s) { throw .syncFailed(path: path, errno: 5) }
            s.durableEntries = s.durableEntries.filter { Self.parent($0.key) != path }
            for (name, node) in s.entries where Self.parent(name) == path { s.durableEntries[name] = node }
        }
    }

    // Used by the file handles.
    func append(_ path: String, _ bytes: [UInt8]) throws(StorageError) {
        try state.withLock { s throws(StorageError) in
            guard let node = s.entries[path] else { throw .io(path: path, operation: "write", errno: 9) }
            node.pending += bytes
        }
    }

    func sync(_ path: String) throws(StorageError) {
        try state.withLock { s throws(StorageError) in
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

    func size(_ path: String) -> UInt64 { state.withLock { UInt64($0.entries[path]?.all.count ?? 0) } }
}

final class FaultyAppendableFile: AppendableFile {
    let fs: FaultyFileSystem
    let path: String

    init(fs: FaultyFileSystem, path: String) {
        self.fs = fs
        self.path = path
    }

    var size: UInt64 { fs.size(path) }
    func append(_ bytes: [UInt8]) throws(StorageError) { try fs.append(path, bytes) }
    func sync() throws(StorageError) { try fs.sync(path) }
    func close() throws(StorageError) {}
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
