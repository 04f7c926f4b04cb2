#if canImport(Glibc)
import Glibc
#endif
import CairnCore

/// The node's data directory, created if missing and held with an exclusive `flock` on its
/// `LOCK` file for the life of the node, so two nodes can never share one directory.
///
/// Thread-safe; `release()` is idempotent. The lock also ends when the process dies.
final class DataDirectory: Sendable {
    let path: String
    private let fd: Locked<Int32>

    struct LockError: Error, CustomStringConvertible {
        let description: String
    }

    init(path: String) throws(LockError) {
        self.path = path
        try Self.makeDirectories(path)
        let lockPath = path + "/LOCK"
        let fd = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw LockError(description: "cannot open \(lockPath): \(Self.errnoText())") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let why = errno == EWOULDBLOCK ? "another process holds it (is another node using \(path)?)" : Self.errnoText()
            close(fd)
            throw LockError(description: "cannot lock \(lockPath): \(why)")
        }
        self.fd = Locked(fd)
    }

    func release() {
        let old = fd.withLock { f in
            defer { f = -1 }
            return f
        }
        if old >= 0 { close(old) }
    }

    private static func makeDirectories(_ path: String) throws(LockError) {
        var current = path.hasPrefix("/") ? "" : "."
        for part in path.split(separator: "/") {
            current += "/" + part
            if mkdir(current, 0o755) != 0 && errno != EEXIST {
                throw LockError(description: "cannot create \(current): \(errnoText())")
            }
        }
    }

    private static func errnoText() -> String { String(cString: strerror(errno)) }
}
