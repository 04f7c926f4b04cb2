#if canImport(Glibc)
import Glibc
#endif
import CairnCore
import CStorageSupport
import Dispatch
import Foundation
import Synchronization

/// Every `SystemClock` sleep of the process, and every deadline callback (`schedule`), on one
/// thread: sleepers in a min-heap by deadline, woken (or called) when it passes. A request's deadline is one of these sleeps, and nearly every one is
/// cancelled long before it fires (the request answered first); a `Task.sleep` per request
/// armed and disarmed a Dispatch timer source each time, through Dispatch's manager thread.
/// Here arming is a heap push under a lock, cancelling a dictionary removal, and the thread
/// wakes only for the earliest live deadline.
///
/// Invariants: every sleeper is resumed exactly once, at or after its deadline, or with
/// `CancellationError` when its task is cancelled; every callback is called once, unless
/// `cancel` withdrew it first. Cancelled sleepers leave their heap entry behind; the thread
/// drops such entries when they reach the top, and the cancellation that takes the heap past
/// `2 × live + 1024` entries (its bound; the live sleepers are bounded by the requests and tasks
/// that wait: `pending`) rebuilds it from the live sleepers. Thread-safe.
public final class TimerQueue: Sendable {
    /// The process's queue (its thread starts with the first sleep).
    public static let shared = TimerQueue(name: "cairn.timers")

    private struct Entry {
        let deadline: ContinuousClock.Instant
        let id: UInt64
    }

    private enum Sleeper {
        /// Its id is drawn, its continuation not registered yet.
        case arriving
        case waiting(CheckedContinuation<Void, any Error>)
        /// A callback deadline (`schedule`): called on the queue's thread once it passes.
        case callback(@Sendable () -> Void)
        /// Cancelled before its continuation was registered.
        case cancelled
    }

    private struct State {
        var heap: [Entry] = []
        var sleepers: [UInt64: Sleeper] = [:]
        var nextID: UInt64 = 0
        /// The deadline the thread sleeps until (nil: no thread yet, or it sleeps with no deadline).
        var armed: ContinuousClock.Instant?
        var started = false

        mutating func push(_ e: Entry) {
            heap.append(e)
            var i = heap.count - 1
            while i > 0 {
                let parent = (i - 1) / 2
                guard heap[i].deadline < heap[parent].deadline else { break }
                heap.swapAt(i, parent)
                i = parent
            }
        }

        mutating func popTop() {
            guard let last = heap.popLast(), !heap.isEmpty else { return }
            heap[0] = last
            var i = 0
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                if l < heap.count && heap[l].deadline < heap[m].deadline { m = l }
                if r < heap.count && heap[r].deadline < heap[m].deadline { m = r }
                if m == i { return }
                heap.swapAt(i, m)
                i = m
            }
        }

        /// Pushes `e`; says whether the thread must be started, or signalled (its deadline is
        /// later than this one).
        mutating func arm(_ e: Entry) -> (signal: Bool, start: Bool) {
            push(e)
            let start = !started
            started = true
            // The thread needs a new deadline only when this one comes first.
            let signal = !start && (armed.map { e.deadline < $0 } ?? true)
            if signal || start { armed = e.deadline }
            return (signal, start)
        }

        /// `prune` once the heap is past its bound. Called on every cancellation, so a rebuild
        /// costs O(live) at most every `live + 1024` cancellations (amortized O(1) each), instead
        /// of the thread finding the stale entries of a whole timeout's worth of requests (at
        /// 10,000 requests a second and a 10 s timeout, 100,000) when it next wakes, and holding
        /// the lock every request needs while it drops them.
        mutating func pruneIfLarge() {
            if heap.count > 2 * sleepers.count + 1024 { prune() }
        }

        /// Drops entries of sleepers no longer waiting from the top, and rebuilds the heap from
        /// the live sleepers when stale entries dominate.
        mutating func prune() {
            while let top = heap.first, sleepers[top.id] == nil { popTop() }
            if heap.count > 2 * sleepers.count + 1024 {
                let live = heap.filter { sleepers[$0.id] != nil }
                heap = []
                heap.reserveCapacity(live.count)
                for e in live { push(e) }
            }
        }
    }

    private let state = Mutex(State())
    private let wake = DispatchSemaphore(value: 0)
    private let name: String

    init(name: String) { self.name = name }

    /// Sleepers waiting.
    public var pending: Int { state.withLock { $0.sleepers.count } }

    /// Heap entries, live or stale (for tests of the bound).
    var heapEntries: Int { state.withLock { $0.heap.count } }

    /// Returns at or after `deadline`; throws `CancellationError` promptly when the calling task
    /// is cancelled (also when it already was).
    public func sleep(until deadline: ContinuousClock.Instant) async throws {
        try Task.checkCancellation()
        if deadline <= .now { return }
        let id = arrive()
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
                let (signal, start, refused) = state.withLock { s -> (Bool, Bool, Bool) in
                    if case .cancelled = s.sleepers[id] {
                        s.sleepers[id] = nil
                        return (false, false, true)
                    }
                    s.sleepers[id] = .waiting(c)
                    let (signal, start) = s.arm(Entry(deadline: deadline, id: id))
                    return (signal, start, false)
                }
                if refused { return c.resume(throwing: CancellationError()) }
                if start { startThread() } else if signal { wake.signal() }
            }
        } onCancel: {
            let c: CheckedContinuation<Void, any Error>? = state.withLock { s in
                switch s.sleepers[id] {
                case .waiting(let c)?:
                    s.sleepers[id] = nil
                    s.pruneIfLarge()
                    return c
                case .arriving?:
                    s.sleepers[id] = .cancelled
                    return nil
                case .cancelled?, .callback?, nil:
                    return nil  // marked already, or resumed already (a callback's id is never a sleep's)
                }
            }
            c?.resume(throwing: CancellationError())
        }
    }

    /// Calls `fire` once, on the queue's thread, at or after `deadline`, unless `cancel` with the
    /// returned id comes first. For callers that must not suspend (a request served from an event
    /// loop); `fire` must not block.
    public func schedule(at deadline: ContinuousClock.Instant, _ fire: @escaping @Sendable () -> Void) -> UInt64 {
        let (id, signal, start) = state.withLock { s -> (UInt64, Bool, Bool) in
            s.nextID &+= 1
            s.sleepers[s.nextID] = .callback(fire)
            let (signal, start) = s.arm(Entry(deadline: deadline, id: s.nextID))
            return (s.nextID, signal, start)
        }
        if start { startThread() } else if signal { wake.signal() }
        return id
    }

    /// Withdraws a `schedule`d callback; true if it had not fired (it never will now).
    @discardableResult
    public func cancel(_ id: UInt64) -> Bool {
        state.withLock { s in
            guard case .callback? = s.sleepers[id] else { return false }
            s.sleepers[id] = nil
            s.pruneIfLarge()
            return true
        }
    }

    /// Draws a sleeper's id. A synchronous method on purpose: the lock is never taken in the
    /// body of an async function (see `Locked`).
    private func arrive() -> UInt64 {
        state.withLock { s in
            s.nextID &+= 1
            s.sleepers[s.nextID] = .arriving
            return s.nextID
        }
    }

    private func startThread() {
        let thread = Thread { [self] in
            cairn_set_thread_name(name)
            cairn_precise_timers()
            run()
        }
        thread.start()
    }

    /// The thread: resumes every sleeper whose deadline passed, then sleeps until the earliest
    /// live deadline (or until a sleeper with an earlier one signals).
    private func run() {
        while true {
            let now = ContinuousClock.now
            let (due, next) = state.withLock { s -> ([Sleeper], ContinuousClock.Instant?) in
                var due: [Sleeper] = []
                while let top = s.heap.first, top.deadline <= now {
                    s.popTop()
                    if let sleeper = s.sleepers.removeValue(forKey: top.id) { due.append(sleeper) }
                }
                s.prune()
                s.armed = s.heap.first?.deadline
                return (due, s.armed)
            }
            for sleeper in due {
                switch sleeper {
                case .waiting(let c): c.resume()
                case .callback(let fire): fire()
                case .arriving, .cancelled: break
                }
            }
            if let next {
                let wait = now.duration(to: next)
                _ = wake.wait(timeout: .now() + .nanoseconds(Int(clamping: wait.wholeNanoseconds)))
            } else {
                wake.wait()
            }
        }
    }
}
