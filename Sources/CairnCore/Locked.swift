import Synchronization

/// A value behind a `Mutex`, as a class so it can be shared by reference.
/// Critical sections must be short and must not suspend.
///
/// Deliberately not `@inlinable`: inlined into async functions of other modules (Swift 6.3.1,
/// release builds), a `withLock` in a `defer` after an awaited task group trapped at shutdown
/// with "Call to unlock Mutex on a thread which hasn't acquired the lock".
public final class Locked<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>

    public init(_ value: sending Value) { mutex = Mutex(value) }

    public func withLock<R: Sendable>(_ body: (inout sending Value) throws -> sending R) rethrows -> R {
        try mutex.withLock(body)
    }

    public var value: Value { mutex.withLock { $0 } }
}
