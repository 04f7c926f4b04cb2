public import Logging

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
/// for good (or cancelled) and throws when it failed and should be restarted.
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
        "supervisor \(supervisor): child \(child) failed \(failures) times within the restart window (last: \(lastError)); escalating"
    }
}

/// Runs children in a task group, restarting each failed child with backoff and escalating past
/// the restart intensity (the group is cancelled and `run()` throws `SupervisorEscalation`).
///
/// Isolation: actor; children run as child tasks of `run()`, so cancelling `run()` stops them all.
/// Children may be added while running with `spawn`.
public actor Supervisor {
    public nonisolated let name: String
    private let policy: RestartPolicy
    private let logger: Logger
    private let onRestart: @Sendable (String) -> Void
    private let clock: any NodeClock
    private let spawns: AsyncStream<any SupervisedChild>
    private let spawnContinuation: AsyncStream<any SupervisedChild>.Continuation

    public init(name: String, policy: RestartPolicy, logger: Logger, clock: any NodeClock = SystemClock(),
                onRestart: @escaping @Sendable (String) -> Void = { _ in }) {
        self.name = name
        self.clock = clock
        self.policy = policy
        self.logger = logger
        self.onRestart = onRestart
        (spawns, spawnContinuation) = AsyncStream.makeStream(of: (any SupervisedChild).self)
    }

    /// Adds a child; it starts immediately if `run()` is running, else when it starts.
    public nonisolated func spawn(_ child: any SupervisedChild) {
        spawnContinuation.yield(child)
    }

    /// Stops accepting children; `run()` returns once every child has returned.
    public nonisolated func finish() {
        spawnContinuation.finish()
    }

    public func run() async throws {
        // A throwing child (an escalation) cancels the group; it also finishes `spawns`, which ends
        // this loop, so the group then rethrows the escalation.
        try await withThrowingDiscardingTaskGroup { group in
            for await child in spawns {
                group.addTask { try await self.supervise(child) }
            }
        }
    }

    private func supervise(_ child: any SupervisedChild) async throws {
        var tracker = RestartTracker(policy: policy)
        while true {
            do {
                try await child.run()
                return
            } catch {
                if Task.isCancelled { return }
                switch tracker.onFailure(at: clock.now()) {
                case .restart(let delay):
                    logger.warning("child failed; restarting", metadata: [
                        "supervisor": "\(name)", "child": "\(child.childName)", "error": "\(error)", "backoff": "\(delay)",
                    ])
                    onRestart(child.childName)
                    try await clock.sleep(for: delay)
                case .escalate(let n):
                    logger.error("restart intensity exceeded; escalating", metadata: [
                        "supervisor": "\(name)", "child": "\(child.childName)", "failures": "\(n)", "error": "\(error)",
                    ])
                    spawnContinuation.finish()
                    throw SupervisorEscalation(supervisor: name, child: child.childName, failures: n, lastError: error)
                }
            }
        }
    }
}
