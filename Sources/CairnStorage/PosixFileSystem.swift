#if canImport(Glibc)
import Glibc
#endif
import CStorageSupport
import Synchronization

/// The real disk: plain POSIX calls (`fdatasync` for `sync`, an `fsync` of the directory for
/// `syncDirectory`). Thread-safe.
public struct PosixFileSystem: FileSystem {
    public init() {}

    public func openAppendable(_ path: String, create: Bool) throws(StorageError) -> any AppendableFile {
        let (fd, size) = try Self.open(path, O_WRONLY | O_APPEND | O_CLOEXEC | (create ? O_CREAT : 0))
        return PosixAppendableFile(fd: fd, path: path, size: size)
    }

    /// Without `O_APPEND`: appends are written at the file's logical end, which trails the
    /// zeroed chunks written ahead of it (`PosixAppendableFile`). ext4 and XFS then sync an
    /// append without an inode update: one device write per `fdatasync`, not two.
    public func createLog(_ path: String, preallocateBytes: Int) throws(StorageError) -> any AppendableFile {
        guard preallocateBytes > 0 else { return try openAppendable(path, create: true) }
        let (fd, size) = try Self.open(path, O_WRONLY | O_CREAT | O_CLOEXEC)
        return PosixAppendableFile(fd: fd, path: path, size: size, preallocateBytes: preallocateBytes)
    }

    public func openReadable(_ path: String) throws(StorageError) -> any ReadableFile {
        let (fd, size) = try Self.open(path, O_RDONLY | O_CLOEXEC)
        return PosixReadableFile(fd: fd, path: path, size: size)
    }

    /// Opens `path` and returns the descriptor with the file's current size.
    private static func open(_ path: String, _ flags: Int32) throws(StorageError) -> (Int32, UInt64) {
        let fd = Glibc.open(path, flags, 0o644)
        guard fd >= 0 else { throw errno == ENOENT ? .notFound(path: path) : .io(path: path, operation: "open", errno: errno) }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = errno
            Glibc.close(fd)
            throw .io(path: path, operation: "fstat", errno: e)
        }
        return (fd, UInt64(max(st.st_size, 0)))
    }

    public func rename(_ from: String, to: String) throws(StorageError) {
        guard Glibc.rename(from, to) == 0 else { throw .io(path: from, operation: "rename to \(to)", errno: errno) }
    }

    public func remove(_ path: String) throws(StorageError) {
        guard unlink(path) == 0 else { throw errno == ENOENT ? .notFound(path: path) : .io(path: path, operation: "unlink", errno: errno) }
    }

    public func truncate(_ path: String, to size: UInt64) throws(StorageError) {
        guard Glibc.truncate(path, off_t(clamping: size)) == 0 else { throw .io(path: path, operation: "truncate", errno: errno) }
    }

    public func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    public func list(_ directory: String) throws(StorageError) -> [String] {
        guard let dir = opendir(directory) else { throw .io(path: directory, operation: "opendir", errno: errno) }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafePointer(to: entry.pointee.d_name) { $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) } }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    public func createDirectory(_ path: String) throws(StorageError) {
        guard mkdir(path, 0o755) == 0 || errno == EEXIST else { throw .io(path: path, operation: "mkdir", errno: errno) }
    }

    public func syncDirectory(_ path: String) throws(StorageError) {
        let fd = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw .io(path: path, operation: "open directory", errno: errno) }
        defer { Glibc.close(fd) }
        guard fsync(fd) == 0 else { throw .syncFailed(path: path, errno: errno) }
    }
}

/// An open descriptor, closed exactly once: at `close()` or, if nobody called it (an old log
/// after a switch, a table dropped by compaction and still read by a snapshot), when the last
/// reference goes. Thread-safe.
final class Descriptor: Sendable {
    let fd: Int32
    private let closed = Atomic<Bool>(false)

    init(_ fd: Int32) { self.fd = fd }

    /// False only if this call closed it and close(2) failed (`errno` says why).
    @discardableResult
    func close() -> Bool {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return true }
        return Glibc.close(fd) == 0
    }

    deinit { close() }
}

final class PosixAppendableFile: AppendableFile {
    private let descriptor: Descriptor
    private var fd: Int32 { descriptor.fd }
    let path: String
    /// The logical size: the end of what was appended (zeroed chunks past it not counted).
    private(set) var size: UInt64
    /// 0: the descriptor is `O_APPEND`. Else appends are written at `size`, and before one
    /// would pass `zeroedEnd` the file is extended with zeros to the next multiple of this.
    private var preallocateBytes: Int
    /// Where the zeros written ahead end (≥ `size`).
    private var zeroedEnd: UInt64
    /// Where the last `writeOut` ended.
    private var writtenOut: UInt64 = 0
    /// False once the file system refused `sync_file_range` as unsupported.
    private var writeOutSupported = true

    init(fd: Int32, path: String, size: UInt64, preallocateBytes: Int = 0) {
        descriptor = Descriptor(fd)
        self.path = path
        self.size = size
        self.preallocateBytes = preallocateBytes
        zeroedEnd = size
    }

    /// Writes all of `bytes`. A short write followed by an error (ENOSPC, EIO) leaves a prefix
    /// in the file: `size` counts it, and the error is thrown.
    func append(_ bytes: [UInt8]) throws(StorageError) {
        if preallocateBytes > 0, size + UInt64(bytes.count) > zeroedEnd { zeroAhead(past: size + UInt64(bytes.count)) }
        var written = 0
        defer { size += UInt64(written) }
        while written < bytes.count {
            let n = bytes.withUnsafeBytes { raw in
                let start = raw.baseAddress.map { $0 + written }
                return preallocateBytes > 0 ? pwrite(fd, start, bytes.count - written, off_t(size) + off_t(written))
                    : write(fd, start, bytes.count - written)
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw .io(path: path, operation: "write", errno: errno)
            }
            written += n
        }
    }

    /// Zero chunks written ahead of appends, shared by every preallocating file.
    private static let zeros = [UInt8](repeating: 0, count: 64 << 10)

    /// Extends the file with zeros from `zeroedEnd` to the first multiple of `preallocateBytes`
    /// past `end`. A failure (a full disk) only stops preallocation for this file: appends then
    /// extend it themselves, and whatever zeros were written read as the log's zero tail.
    private func zeroAhead(past end: UInt64) {
        let chunk = UInt64(preallocateBytes)
        let target = (end / chunk + 1) * chunk
        var at = max(zeroedEnd, size)
        while at < target {
            let count = Int(min(UInt64(Self.zeros.count), target - at))
            let n = Self.zeros.withUnsafeBytes { pwrite(fd, $0.baseAddress, count, off_t(at)) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else {
                preallocateBytes = 0
                zeroedEnd = at
                // Later appends go through `write` at the descriptor's offset: put it at the logical end.
                lseek(fd, off_t(size), SEEK_SET)
                return
            }
            at += UInt64(n)
        }
        zeroedEnd = target
    }

    func sync() throws(StorageError) {
        guard fdatasync(fd) == 0 else { throw .syncFailed(path: path, errno: errno) }
    }

    /// `sync_file_range` over what was appended since the last call. A file system that does not
    /// support it (EINVAL, ENOSYS, EOPNOTSUPP, ESPIPE) turns write-outs off for this file: they
    /// were only pacing. Any other failure is reported as a failed sync: the kernel may have
    /// dropped the pages it could not write (as after fsync).
    func writeOut() throws(StorageError) {
        guard writeOutSupported, size > writtenOut else { return }
        guard cairn_write_out(fd, Int64(clamping: writtenOut), Int64(clamping: size - writtenOut)) == 0 else {
            let e = errno
            if [EINVAL, ENOSYS, EOPNOTSUPP, ESPIPE].contains(e) {
                writeOutSupported = false
                return
            }
            throw .syncFailed(path: path, errno: e)
        }
        writtenOut = size
    }

    func close() throws(StorageError) {
        guard descriptor.close() else { throw .io(path: path, operation: "close", errno: errno) }
    }
}

final class PosixReadableFile: ReadableFile {
    private let descriptor: Descriptor
    private var fd: Int32 { descriptor.fd }
    let path: String
    let size: UInt64

    init(fd: Int32, path: String, size: UInt64) {
        descriptor = Descriptor(fd)
        self.path = path
        self.size = size
    }

    func read(at offset: UInt64, count: Int) throws(StorageError) -> [UInt8] {
        guard count > 0, offset < size else { return [] }
        let n = Int(min(UInt64(count), size - offset))
        var out = [UInt8](repeating: 0, count: n)
        var got = 0
        while got < n {
            let r = out.withUnsafeMutableBytes { raw in pread(fd, raw.baseAddress.map { $0 + got }, n - got, off_t(clamping: offset + UInt64(got))) }
            if r < 0 {
                if errno == EINTR { continue }
                throw .io(path: path, operation: "pread", errno: errno)
            }
            if r == 0 { break }
            got += r
        }
        return got == n ? out : Array(out.prefix(got))
    }

    func close() { descriptor.close() }
}
