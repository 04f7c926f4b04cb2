public import Synchronization

/// A value behind a `Mutex`, as a class so it can be shared by reference.
/// Critical sections must be short and must not suspend.
///
/// `@inlinable` so other modules get copies specialized for their `Value` (unspecialized, every
/// call looked up type metadata), but `@inline(never)`: a lock's critical section is never
/// inlined into the caller. Inlined into async functions of other modules (Swift 6.3.1, release
/// builds), a `withLock` in a `defer` after an awaited task group trapped at shutdown with "Call
/// to unlock Mutex on a thread which hasn't acquired the lock"; a call to a synchronous function
/// locks and unlocks on one thread.
public final class Locked<Value: Sendable>: Sendable {
    @usableFromInline let mutex: Mutex<Value>

    public init(_ value: sending Value) { mutex = Mutex(value) }

    @inlinable @inline(never)
    public func withLock<R: Sendable>(_ body: (inout sending Value) throws -> sending R) rethrows -> R {
        try mutex.withLock(body)
    }

    @inlinable
    public var value: Value {
        @inline(never) get { mutex.withLock { $0 } }
    }
}
