import Synchronization

/// A value behind a `Mutex`, as a class so it can be shared by reference.
/// Critical sections must be short and must not suspend.
public final class Locked<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>

    public init(_ value: sending Value) { mutex = Mutex(value) }

    public func withLock<R: Sendable>(_ body: (inout sending Value) throws -> sending R) rethrows -> R {
        try mutex.withLock(body)
    }

    public var value: Value { mutex.withLock { $0 } }
}
