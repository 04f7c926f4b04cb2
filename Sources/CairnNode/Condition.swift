import CairnCore

/// Waiting for a predicate over shared state without polling: whoever changes the state calls
/// `notifyAll()`, and `wait(until:deadline:clock:)` re-checks the predicate only then (and once
/// at the deadline).
///
/// A generation counter closes the race between a waiter's check and its sleep: a notify that
/// comes in between makes the wait return at once. Thread-safe.
final class Condition: Sendable {
    private struct State {
        var generation: UInt64 = 0
        var nextID: UInt64 = 0
        var waiters: [UInt64: CheckedContinuation<Void, Never>] = [:]
    }
    private let state = Locked(State())

    init() {}

    func notifyAll() {
        let waiters: [CheckedContinuation<Void, Never>] = state.withLock { s in
            s.generation &+= 1
            defer { s.waiters = [:] }
            return s.waiters.sorted { $0.key < $1.key }.map(\.value)
        }
        for w in waiters { w.resume() }
    }

    /// Returns true once `predicate` holds, false if `deadline` passes (or the task is
    /// cancelled) first.
    func wait(until predicate: () -> Bool, deadline: ContinuousClock.Instant, clock: any NodeClock) async -> Bool {
        while true {
            let seen = state.withLock { $0.generation }
            if predicate() { return true }
            if clock.now() >= deadline || Task.isCancelled { return false }
            await withTaskGroup(of: Void.self) { group in
                group.addTask { try? await clock.sleep(until: deadline) }
                group.addTask { await self.changed(after: seen) }
                await group.next()
                group.cancelAll()
            }
        }
    }

    /// Returns true once `predicate` holds, false if the task is cancelled first. No deadline.
    func wait(until predicate: () -> Bool) async -> Bool {
        while true {
            let seen = state.withLock { $0.generation }
            if predicate() { return true }
            if Task.isCancelled { return false }
            await changed(after: seen)
        }
    }

    /// Returns after a `notifyAll` that follows generation `seen` (at once if one already did),
    /// or when the task is cancelled.
    private func changed(after seen: UInt64) async {
        let id: UInt64 = state.withLock { s in
            defer { s.nextID += 1 }
            return s.nextID
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let now: Bool = state.withLock { s in
                    if s.generation != seen || Task.isCancelled { return true }
                    s.waiters[id] = c
                    return false
                }
                if now { c.resume() }
            }
        } onCancel: {
            state.withLock { $0.waiters.removeValue(forKey: id) }?.resume()
        }
    }
}
