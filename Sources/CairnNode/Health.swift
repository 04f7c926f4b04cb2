import NIOCore
import CairnCore
import CairnStorage

/// A value delivered once, awaited once; later deliveries are ignored. Cancellation of the
/// waiter delivers `onCancel`.
final class OneShot<Value: Sendable>: Sendable {
    private struct State {
        var value: Value?
        var waiter: CheckedContinuation<Value, Never>?
        var done = false
    }

    private let state = Locked(State())

    func deliver(_ v: Value) {
        let waiter: CheckedContinuation<Value, Never>? = state.withLock { s in
            guard !s.done else { return nil }
            s.done = true
            if let w = s.waiter {
                s.waiter = nil
                return w
            }
            s.value = v
            return nil
        }
        waiter?.resume(returning: v)
    }

    func wait(onCancel: Value) async -> Value {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Value, Never>) in
                let ready: Value? = state.withLock { s in
                    if let v = s.value { return v }
                    if s.done { return onCancel }
                    s.waiter = c
                    return nil
                }
                if let ready { c.resume(returning: ready) }
            }
        } onCancel: {
            deliver(onCancel)
        }
    }
}

/// Runs `probe` with a hard deadline. The probe runs in its own task, so a wedged probe (an actor
/// that never answers) cannot hold the caller past `bound`; it is abandoned, as the process is
/// about to be restarted by the watchdog anyway.
func checkWithin(_ bound: Duration, on clock: any NodeClock = SystemClock(), _ probe: @escaping @Sendable () async -> String?) async -> String? {
    let result = OneShot<String?>()
    let work = Task { result.deliver(await probe()) }
    let timer = Task {
        try? await clock.sleep(for: bound)
        result.deliver("health check did not finish within \(bound)")
    }
    let outcome = await result.wait(onCancel: "health check cancelled")
    timer.cancel()
    work.cancel()
    return outcome
}

extension CairnNode {
    /// The watchdog's health check: every event loop runs a task, the request group runs a job,
    /// every vnode actor answers, and storage answers a read. Returns nil when all did, else what
    /// did not.
    func probeHealth() async -> String? {
        for loop in eventLoopGroup.makeIterator() {
            do { try await loop.submit {}.get() } catch { return "event loop did not run a task: \(error)" }
        }
        guard await core.requests.probe() else { return "the request group is not running" }
        for p in core.vnodes.partitions {
            guard let v = core.vnodes.vnode(for: p) else { continue }
            _ = await v.isServing
        }
        do {
            guard let backend = core.backend else { return "storage is not open" }
            // On partition 0's executor: a wedged store thread withholds the ping.
            _ = try await backend.onExecutor(of: PartitionID(0)) { try backend.get(partition: PartitionID(0), key: [0]) }
        } catch StorageError.corruption {
            // Storage answered: the probe key sits in a damaged block. A data error for those keys
            // (served by replicas, reported in /health and metrics), not a reason to restart.
        } catch {
            return "storage did not answer a read: \(error)"
        }
        return nil
    }

    /// Pings systemd's watchdog at half its interval while the health check passes. Returns when
    /// cancelled.
    func runWatchdog(interval: Duration) async {
        let clock = core.clock
        var timer = WatchdogTimer(interval: interval, now: clock.now())
        var withheld = false
        while !Task.isCancelled {
            if timer.checkDue(at: clock.now()) {
                let started = clock.now()
                let failure = await checkWithin(timer.checkBound, on: clock) { [self] in await probeHealth() }
                switch timer.decide(failure: failure, started: started, finished: clock.now()) {
                case .ping:
                    notifier.ping()
                    if withheld { notifier.report(.healthy) }
                    withheld = false
                case .withhold(let why):
                    core.logger.error("health check failed; withholding the watchdog ping", metadata: ["reason": "\(why)"])
                    notifier.report(.unhealthy(why))
                    withheld = true
                }
            }
            do { try await clock.sleep(for: timer.sleepTime(from: clock.now())) } catch { return }
        }
    }
}
