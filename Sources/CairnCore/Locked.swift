public import Synchronization

/// A value behind a `Mutex`, as a class so it can be shared by reference.
/// Critical sections must be short and must not suspend.
///
/// `@inlinable`: callers in other modules (every request takes a few of these locks) get a
/// specialized lock, not a generic call through runtime metadata.
public final class Locked<Value: Sendable>: Sendable {
    @usableFromInline let mutex: Mutex<Value>

    @inlinable
    public init(_ value: sending Value) { mutex = Mutex(value) }

    @inlinable
    public func withLock<R: Sendable>(_ body: (inout sending Value) throws -> sending R) rethrows -> R {
        try mutex.withLock(body)
    }

    @inlinable
    public var value: Value { mutex.withLock { $0 } }
}
