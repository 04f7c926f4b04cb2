/// Every file operation the storage engine performs goes through this protocol, so tests can
/// replace the disk with one that loses unsynced data, tears writes, flips bits and fails syncs
/// (LevelDB's `Env` idea). Paths are plain strings; directories are created explicitly.
public protocol FileSystem: Sendable {
    /// Opens `path` for appending, creating it empty if `create` and it does not exist.
    func openAppendable(_ path: String, create: Bool) throws(StorageError) -> any AppendableFile
    /// See the extension's default.
    func createLog(_ path: String, preallocateBytes: Int) throws(StorageError) -> any AppendableFile
    func openReadable(_ path: String) throws(StorageError) -> any ReadableFile
    func rename(_ from: String, to: String) throws(StorageError)
    func remove(_ path: String) throws(StorageError)
    func truncate(_ path: String, to size: UInt64) throws(StorageError)
    func exists(_ path: String) -> Bool
    /// Names (not paths) of the entries of `directory`, sorted.
    func list(_ directory: String) throws(StorageError) -> [String]
    func createDirectory(_ path: String) throws(StorageError)
    /// Makes the directory's entries (creations, renames, removals) durable.
    func syncDirectory(_ path: String) throws(StorageError)
}

extension FileSystem {
    /// Creates `path` for a write-ahead log (as `openAppendable(create: true)`). A file system
    /// may extend the file ahead of its appends with zeroed chunks of `preallocateBytes` (0:
    /// never), so a sync after an append need not also record a new file size; a reader of a
    /// log must then accept zero bytes after its last record. Default: no preallocation.
    public func createLog(_ path: String, preallocateBytes: Int) throws(StorageError) -> any AppendableFile {
        try openAppendable(path, create: true)
    }

    /// Replaces `directory/name` with `bytes` crash-safely: write `name.tmp`, sync it, rename it
    /// over the old file, sync the directory (creating the directory if missing). A crash at any
    /// point leaves the old or the new file, never a torn one.
    public func replaceAtomically(_ name: String, in directory: String, with bytes: [UInt8]) throws(StorageError) {
        if !exists(directory) { try createDirectory(directory) }
        let path = directory + "/" + name
        let temporary = path + ".tmp"
        if exists(temporary) { try remove(temporary) }
        let file = try openAppendable(temporary, create: true)
        do {
            try file.append(bytes)
            try file.sync()
        } catch {
            try? file.close()
            throw error
        }
        try file.close()
        try rename(temporary, to: path)
        try syncDirectory(directory)
    }

    /// The whole content of `path` (nil: there is no such file).
    public func readWhole(_ path: String) throws(StorageError) -> [UInt8]? {
        guard exists(path) else { return nil }
        let file = try openReadable(path)
        defer { file.close() }
        return try file.read(at: 0, count: Int(clamping: file.size))
    }
}

/// A file being appended to. Owned by one writer at a time (not thread-safe).
public protocol AppendableFile: AnyObject {
    var size: UInt64 { get }
    func append(_ bytes: [UInt8]) throws(StorageError)
    /// `fdatasync`: everything appended so far is durable when this returns.
    func sync() throws(StorageError)
    /// Starts writing what was appended since the last call to the device and waits until it is
    /// written: it then no longer queues ahead of another file's sync. Promises no durability
    /// (neither metadata nor the device's cache): only `sync` does. Default: nothing.
    func writeOut() throws(StorageError)
    func close() throws(StorageError)
}

extension AppendableFile {
    public func writeOut() throws(StorageError) {}
}

/// A file read at explicit offsets. Thread-safe for concurrent reads.
public protocol ReadableFile: AnyObject {
    var size: UInt64 { get }
    /// Up to `count` bytes at `offset` (fewer only at the end of the file).
    func read(at offset: UInt64, count: Int) throws(StorageError) -> [UInt8]
    func close()
}

/// What can go wrong below the engine. `syncFailed` is fatal for the engine instance: after a
/// failed fsync the kernel may have dropped the dirty pages, and a retried fsync can report success
/// without writing them (PostgreSQL's "fsyncgate"), so nothing written since the last good sync
/// can be trusted until the files are reopened and recovered.
public enum StorageError: Error, Sendable, Hashable, CustomStringConvertible {
    case io(path: String, operation: String, errno: Int32)
    case syncFailed(path: String, errno: Int32)
    case corruption(path: String, offset: UInt64, reason: String)
    case notFound(path: String)
    /// A previous sync failed; the engine refuses writes until it is reopened.
    case writesRefused(String)
    case invalidArgument(String)

    public var description: String {
        switch self {
        case .io(let p, let op, let e): "\(op) \(p): \(Self.errnoText(e))"
        case .syncFailed(let p, let e): "fdatasync \(p) failed: \(Self.errnoText(e)); writes refused until reopened"
        case .corruption(let p, let o, let r): "corruption in \(p) at offset \(o): \(r)"
        case .notFound(let p): "\(p) does not exist"
        case .writesRefused(let why): "writes refused: \(why)"
        case .invalidArgument(let s): s
        }
    }

    static func errnoText(_ e: Int32) -> String {
        switch e {
        case 5: "I/O error (EIO)"
        case 28: "no space left on device (ENOSPC)"
        case 2: "no such file (ENOENT)"
        case 13: "permission denied (EACCES)"
        default: "errno \(e)"
        }
    }
}
