public import Logging
import CairnCore
import CairnWire

/// When and how often a supervised child may be restarted (OTP's restart intensity).
///
/// More than `maxRestarts` failures within `window` escalates: the supervisor fails, and so does
/// the node's service (systemd then restarts the process). Restarts wait an exponential backoff
/// from `backoffMin` to `backoffMax`. Config keys: `supervisor.*`.
public struct RestartPolicy: Hashable, Sendable {
    public var maxRestarts = 5
    public var window: Duration = .seconds(30)
    public var backoffMin: Duration = .milliseconds(100)
    public var backoffMax: Duration = .seconds(5)
    public init() {}
}

/// Pure restart bookkeeping for one child. Time is an input.
public struct RestartTracker: Sendable {
    public enum Decision: Hashable, Sendable {
        case restart(after: Duration)
        case escalate(failuresInWindow: Int)
    }

    public let policy: RestartPolicy
    private var failures: [ContinuousClock.Instant] = []

    public init(policy: RestartPolicy) { self.policy = policy }

    public mutating func onFailure(at now: ContinuousClock.Instant) -> Decision {
        failures.append(now)
        failures.removeAll { now - $0 > policy.window }
        if failures.count > policy.maxRestarts { return .escalate(failuresInWindow: failures.count) }
        var delay = policy.backoffMin
        for _ in 1..<max(failures.count, 1) {
            delay = delay * 2
            if delay >= policy.backoffMax { break }
        }
        return .restart(after: min(delay, policy.backoffMax))
    }
}

/// A long-lived unit of work a supervisor keeps running. `run()` returns when the child is done
/// for good (or cancelled) and throws when it failed and should be restarted. `childName` is its
/// id: unique among the children of one supervisor.
public protocol SupervisedChild: Sendable {
    var childName: String { get }
    func run() async throws
}

public struct SupervisorEscalation: Error, CustomStringConvertible {
    public var supervisor: String
    public var child: String
    public var failures: Int
    public var lastError: any Error
    public var description: String {
        "supervisor \(supervisor): its children failed \(failures) times within the restart window (last: \(child): \(lastError)); escalating"
    }
}

/// Runs children in a task group, restarting each failed child after a backoff, and escalating
/// when its children together fail more often than its restart intensity allows (OTP's
/// one-for-one supervisor): the group is cancelled and `run()` throws `SupervisorEscalation`.
///
/// Children have ids (`childName`): `spawn` adds one (a duplicate id is refused and logged),
/// `terminate` stops one for good. A supervisor is itself a `SupervisedChild`, so supervisors
/// nest; when its parent restarts it, `run()` starts every child still registered, afresh.
///
/// Isolation: actor; children run as child tasks of `run()`, so cancelling `run()` stops them
/// all. `spawn`, `terminate` and `finish` may be called from anywhere, before or during `run()`.
public actor Supervisor: SupervisedChild {
    public nonisolated let name: String
    public nonisolated var childName: String { name }
    private let policy: RestartPolicy
    private let logger: Logger
    private let onRestart: @Sendable (String) -> Void
    private let clock: any NodeClock
    private let registry = Locked(Registry())
    /// The restart intensity of this run: every child's failures count together.
    private var intensity: RestartTracker

    /// What `run()` hears about while it runs.
    private enum Event: Sendable {
        /// A child registered, with the signal that terminates this registration of it.
        case spawned(any SupervisedChild, StopSignal)
        case ended(String)
    }

    private struct Registry {
        /// Registered children in spawn order, with the signal that terminates each.
        var order: [String] = []
        var children: [String: (child: any SupervisedChild, stop: StopSignal)] = [:]
        var sink: AsyncStream<Event>.Continuation?
        var finished = false
    }

    public init(name: String, policy: RestartPolicy, logger: Logger, clock: any NodeClock = SystemClock(),
                onRestart: @escaping @Sendable (String) -> Void = { _ in }) {
        self.name = name
        self.clock = clock
        self.policy = policy
        self.logger = logger
        self.onRestart = onRestart
        intensity = RestartTracker(policy: policy)
    }

    /// Adds a child; it starts at once if `run()` is running, else when it starts. Returns false
    /// (and logs) if a child with its id is registered already.
    @discardableResult
    public nonisolated func spawn(_ child: any SupervisedChild) -> Bool {
        let id = child.childName
        let added: Bool = registry.withLock { r in
            guard r.children[id] == nil else { return false }
            let stop = StopSignal()
            r.order.append(id)
            r.children[id] = (child, stop)
            r.sink?.yield(.spawned(child, stop))
            return true
        }
        if !added { logger.error("a child with this id is running already; not spawned", metadata: ["supervisor": "\(name)", "child": "\(id)"]) }
        return added
    }

    /// Stops child `id` for good (cancelling its run) and forgets it. No-op for an unknown id.
    public nonisolated func terminate(_ id: String) {
        let stop: StopSignal? = registry.withLock { r in
            r.order.removeAll { $0 == id }
            return r.children.removeValue(forKey: id)?.stop
        }
        stop?.stop()
    }

    /// Ids of the registered children, in spawn order.
    public nonisolated var children: [String] { registry.withLock { $0.order } }

    /// Stops accepting children; `run()` returns once every child has returned.
    public nonisolated func finish() {
        registry.withLock { r in
            r.finished = true
            r.sink?.finish()
        }
    }

    public func run() async throws {
        let (events, sink) = AsyncStream.makeStream(of: Event.self)
        let initial: [(any SupervisedChild, StopSignal)] = registry.withLock { r in
            r.sink = sink
            if r.finished { sink.finish() }
            return r.order.compactMap { id in r.children[id].map { ($0.child, $0.stop) } }
        }
        defer { registry.withLock { $0.sink = nil } }
        intensity = RestartTracker(policy: policy)
        // A throwing child (an escalation) cancels the group; it also finishes `events`, which
        // ends this loop, so the group then rethrows the escalation.
        try await withThrowingDiscardingTaskGroup { group in
            var running = Set<String>()
            // A child spawned again under an id whose previous run is still ending (terminated,
            // not yet returned): it starts once that run has ended, never beside it.
            var waiting: [String: (any SupervisedChild, StopSignal)] = [:]
            func start(_ child: any SupervisedChild, _ stop: StopSignal) {
                guard running.insert(child.childName).inserted else {
                    waiting[child.childName] = (child, stop)
                    return
                }
                group.addTask { try await self.supervise(child, stop: stop, sink: sink) }
            }
            for (child, stop) in initial { start(child, stop) }
            for await event in events {
                switch event {
                case .spawned(let child, let stop): start(child, stop)
                case .ended(let id):
                    running.remove(id)
                    if let (child, stop) = waiting.removeValue(forKey: id), !stop.isStopped { start(child, stop) }
                }
            }
        }
    }

    /// Runs `child` until it returns, is terminated (`stop`), or escalates.
    private func supervise(_ child: any SupervisedChild, stop: StopSignal, sink: AsyncStream<Event>.Continuation) async throws {
        let id = child.childName
        defer { sink.yield(.ended(id)) }
        if stop.isStopped { return }
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await self.restartLoop(child, sink: sink) }
            group.addTask { await stop.wait() }
            // Whichever ends first (the child for good, or a terminate) ends both.
            defer { group.cancelAll() }
            try await group.next()
        }
    }

    /// Runs `child`, restarting it after each failure with its own backoff, until it returns or
    /// the supervisor's intensity is exceeded.
    private func restartLoop(_ child: any SupervisedChild, sink: AsyncStream<Event>.Continuation) async throws {
        let id = child.childName
        var backoff = RestartTracker(policy: policy)
        while true {
            do {
                try await child.run()
                return
            } catch {
                if Task.isCancelled { return }
                let now = clock.now()
                if case .escalate(let n) = intensity.onFailure(at: now) {
                    logger.error("restart intensity exceeded; escalating", metadata: [
                        "supervisor": "\(name)", "child": "\(id)", "failures": "\(n)", "error": "\(error)",
                    ])
                    sink.finish()
                    throw SupervisorEscalation(supervisor: name, child: id, failures: n, lastError: error)
                }
                let delay: Duration = if case .restart(let d) = backoff.onFailure(at: now) { d } else { policy.backoffMax }
                logger.warning("child failed; restarting", metadata: [
                    "supervisor": "\(name)", "child": "\(id)", "error": "\(error)", "backoff": "\(delay)",
                ])
                onRestart(id)
                try await clock.sleep(for: delay)
            }
        }
    }
}

/// A child's "terminate" flag: `stop()` sets it for good and wakes every waiter; a waiter whose
/// task is cancelled returns without setting it (so one run's end does not terminate the next).
/// Thread-safe.
final class StopSignal: Sendable {
    private let stopped = Locked(false)
    private let changed = Condition()

    func stop() {
        stopped.withLock { $0 = true }
        changed.notifyAll()
    }

    var isStopped: Bool { stopped.value }

    /// Returns once stopped, or when the calling task is cancelled.
    func wait() async {
        _ = await changed.wait(until: { isStopped })
    }
}
