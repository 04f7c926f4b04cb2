import Testing
@testable import CairnNode
import Logging
import NIOPosix
import Synchronization

@Suite struct RestartTrackerTests {
    @Test func backoffDoublesUpToTheCapThenEscalatesPastTheIntensity() {
        var policy = RestartPolicy()
        policy.maxRestarts = 4
        policy.window = .seconds(10)
        policy.backoffMin = .milliseconds(100)
        policy.backoffMax = .milliseconds(300)
        var t = RestartTracker(policy: policy)
        let t0 = ContinuousClock.now
        #expect(t.onFailure(at: t0) == .restart(after: .milliseconds(100)))
        #expect(t.onFailure(at: t0 + .seconds(1)) == .restart(after: .milliseconds(200)))
        #expect(t.onFailure(at: t0 + .seconds(2)) == .restart(after: .milliseconds(300)))
        #expect(t.onFailure(at: t0 + .seconds(3)) == .restart(after: .milliseconds(300)))
        #expect(t.onFailure(at: t0 + .seconds(4)) == .escalate(failuresInWindow: 5))
    }

    @Test func failuresOutsideTheWindowAreForgotten() {
        var policy = RestartPolicy()
        policy.maxRestarts = 2
        policy.window = .seconds(10)
        var t = RestartTracker(policy: policy)
        let t0 = ContinuousClock.now
        _ = t.onFailure(at: t0)
        _ = t.onFailure(at: t0 + .seconds(1))
        #expect(t.onFailure(at: t0 + .seconds(30)) == .restart(after: policy.backoffMin))
    }
}

/// A child that fails its first `failures` runs, then runs until cancelled.
final class FlakyChild: SupervisedChild {
    let childName: String
    let failures: Int
    let runs = Atomic<Int>(0)
    let cancelled = Atomic<Int>(0)
    init(failures: Int, name: String = "flaky") {
        self.failures = failures
        childName = name
    }

    func run() async throws {
        let n = runs.wrappingAdd(1, ordering: .relaxed).newValue
        if n <= failures { throw TestFailure(run: n) }
        do {
            try await Task.sleep(for: .seconds(3600))
        } catch {
            cancelled.wrappingAdd(1, ordering: .relaxed)
            throw error
        }
    }

    struct TestFailure: Error { let run: Int }
}

/// A child that, once cancelled, keeps running until `finishLingering` (a vnode finishing its
/// last request while it retires).
final class LingeringChild: SupervisedChild {
    let childName: String
    let runs = Atomic<Int>(0)
    let lingering = Atomic<Bool>(false)
    private let release = Mutex<CheckedContinuation<Void, Never>?>(nil)
    init(name: String) { childName = name }

    func run() async throws {
        runs.wrappingAdd(1, ordering: .relaxed)
        try? await Task.sleep(for: .seconds(3600))
        await withCheckedContinuation { c in
            release.withLock { $0 = c }
            lingering.store(true, ordering: .relaxed)
        }
    }

    func finishLingering() { release.withLock { $0.take() }?.resume() }
}

/// Polls `condition` every millisecond, at most 10 s.
func poll(_ what: String, _ condition: () -> Bool) async throws {
    for _ in 0..<10_000 {
        if condition() { return }
        try await Task.sleep(for: .milliseconds(1))
    }
    Issue.record("timed out waiting: \(what)")
}

@Suite struct SupervisorTests {
    private func policy(max: Int) -> RestartPolicy {
        var p = RestartPolicy()
        p.maxRestarts = max
        p.window = .seconds(60)
        p.backoffMin = .milliseconds(1)
        p.backoffMax = .milliseconds(4)
        return p
    }

    @Test func restartsAFailedChildUntilItRuns() async throws {
        let restarts = Atomic<Int>(0)
        let sup = Supervisor(name: "test", policy: policy(max: 5), logger: Logger(label: "test")) { _ in
            restarts.wrappingAdd(1, ordering: .relaxed)
        }
        let child = FlakyChild(failures: 3)
        sup.spawn(child)
        let task = Task { try await sup.run() }
        while child.runs.load(ordering: .relaxed) < 4 { try await Task.sleep(for: .milliseconds(1)) }
        #expect(restarts.load(ordering: .relaxed) == 3)
        sup.finish()
        task.cancel()
        try await task.value
    }

    @Test func escalatesPastTheRestartIntensity() async throws {
        let sup = Supervisor(name: "test", policy: policy(max: 2), logger: Logger(label: "test"))
        let bad = FlakyChild(failures: 100, name: "bad")
        let good = FlakyChild(failures: 0, name: "good")
        sup.spawn(good)
        sup.spawn(bad)
        await #expect(throws: SupervisorEscalation.self) { try await sup.run() }
        #expect(bad.runs.load(ordering: .relaxed) == 3)
    }

    /// The intensity is the supervisor's: failures of different children add up.
    @Test func failuresOfDifferentChildrenCountTogether() async throws {
        let sup = Supervisor(name: "test", policy: policy(max: 3), logger: Logger(label: "test"))
        let children = (0..<4).map { FlakyChild(failures: 1, name: "c\($0)") }
        for c in children { sup.spawn(c) }
        await #expect(throws: SupervisorEscalation.self) { try await sup.run() }
        // Each failed once; no child alone came near the limit.
        #expect(children.allSatisfy { $0.runs.load(ordering: .relaxed) <= 2 })
    }

    @Test func aTerminatedChildStopsAndIsNotRestarted() async throws {
        let sup = Supervisor(name: "test", policy: policy(max: 5), logger: Logger(label: "test"))
        let a = FlakyChild(failures: 0, name: "a"), b = FlakyChild(failures: 0, name: "b")
        sup.spawn(a)
        sup.spawn(b)
        #expect(!sup.spawn(FlakyChild(failures: 0, name: "a")), "a duplicate id is refused")
        let task = Task { try await sup.run() }
        while a.runs.load(ordering: .relaxed) < 1 || b.runs.load(ordering: .relaxed) < 1 { try await Task.sleep(for: .milliseconds(1)) }
        sup.terminate("a")
        while a.cancelled.load(ordering: .relaxed) < 1 { try await Task.sleep(for: .milliseconds(1)) }
        #expect(sup.children == ["b"])
        try await Task.sleep(for: .milliseconds(20))
        #expect(a.runs.load(ordering: .relaxed) == 1 && b.cancelled.load(ordering: .relaxed) == 0)
        // The id is free again.
        let again = FlakyChild(failures: 0, name: "a")
        #expect(sup.spawn(again))
        while again.runs.load(ordering: .relaxed) < 1 { try await Task.sleep(for: .milliseconds(1)) }
        sup.finish()
        task.cancel()
        try await task.value
    }

    /// A vnode retired by one view and started again by the next: the new child shares the old
    /// one's id while the old run is still ending. It starts once that run has ended (never
    /// beside it), and is not dropped (it used to be: the vnode stayed "starting" for good).
    @Test func aChildSpawnedAgainWhileItsPreviousRunEndsStartsAfterIt() async throws {
        let sup = Supervisor(name: "test", policy: policy(max: 5), logger: Logger(label: "test"))
        let old = LingeringChild(name: "v")
        sup.spawn(old)
        let task = Task { try await sup.run() }
        try await poll("the first run started") { old.runs.load(ordering: .relaxed) == 1 }
        sup.terminate("v")
        let new = FlakyChild(failures: 0, name: "v")
        #expect(sup.spawn(new))
        try await poll("the first run is ending") { old.lingering.load(ordering: .relaxed) }
        try await Task.sleep(for: .milliseconds(20))
        #expect(new.runs.load(ordering: .relaxed) == 0, "started beside the previous run")
        old.finishLingering()
        try await poll("the new child started") { new.runs.load(ordering: .relaxed) == 1 }
        #expect(sup.children == ["v"])
        sup.finish()
        task.cancel()
        try await task.value
    }

    /// Supervisors nest: a child supervisor that escalates is restarted by its parent, and
    /// starts its children afresh; past the parent's intensity the parent escalates.
    @Test func aNestedSupervisorIsRestartedWithItsChildren() async throws {
        let parent = Supervisor(name: "parent", policy: policy(max: 1), logger: Logger(label: "test"))
        let inner = Supervisor(name: "inner", policy: policy(max: 0), logger: Logger(label: "test"))
        let child = FlakyChild(failures: 100, name: "bad")
        inner.spawn(child)
        parent.spawn(inner)
        await #expect(throws: SupervisorEscalation.self) { try await parent.run() }
        // inner escalated at its child's first failure, was restarted once, escalated again.
        #expect(child.runs.load(ordering: .relaxed) == 2)
    }
}

@Suite struct RequestServiceTests {
    @Test func refusesBeyondTheInflightBoundAndAcceptsAgainAfterwards() async throws {
        let service = RequestService(limit: 2, metrics: NodeMetrics(maxInflight: 2))
        let runner = Task { await service.run() }
        let (gate, open) = AsyncStream.makeStream(of: Void.self)
        let box = GateBox(gate)
        #expect(service.submit { await box.wait() })
        #expect(service.submit { await box.wait() })
        #expect(!service.submit {})              // third one refused at once
        #expect(service.inflightCount == 2)
        open.finish()
        while service.inflightCount > 0 { try await Task.sleep(for: .milliseconds(1)) }
        #expect(service.submit {})
        service.finish()
        await runner.value
    }
}

@Suite struct RequestsOnEventLoopsTests {
    /// A request started on an event loop runs there, counts in flight within the bound, and
    /// keeps `run()` from returning after `finish()` until it ends; nothing starts after `finish()`.
    @Test func startedRequestsRunOnTheirLoopAndAreWaitedFor() async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let loop = group.next()
        let executor = EventLoopTaskExecutor(loop)
        let service = RequestService(limit: 2, metrics: NodeMetrics(maxInflight: 2))
        let runner = Task { await service.run() }
        let (gate, open) = AsyncStream.makeStream(of: Void.self)
        let box = GateBox(gate)
        let onLoop = Atomic<Int>(0)
        for _ in 0..<2 {
            #expect(service.start(on: executor) {
                if loop.inEventLoop { onLoop.add(1, ordering: .relaxed) }
                await box.wait()
                if loop.inEventLoop { onLoop.add(1, ordering: .relaxed) }
            })
        }
        #expect(!service.start(on: executor) {}, "a third is refused: the bound is 2")
        #expect(service.inflightCount == 2)
        service.finish()
        #expect(!service.start(on: executor) {}, "nothing starts after finish")
        let ended = Atomic<Bool>(false)
        let watcher = Task { await runner.value; ended.store(true, ordering: .relaxed) }
        try await Task.sleep(for: .milliseconds(50))
        let endedEarly = ended.load(ordering: .relaxed)
        #expect(!endedEarly, "run() waits for the started requests")
        open.finish()
        await watcher.value
        #expect(service.inflightCount == 0)
        let ranOnLoop = onLoop.load(ordering: .relaxed)
        #expect(ranOnLoop == 4, "both ran on the loop before and after suspending")
    }

    /// Cancelling `run()` cancels the requests started on loops.
    @Test func cancellingTheServiceCancelsStartedRequests() async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let service = RequestService(limit: 4, metrics: NodeMetrics(maxInflight: 4))
        let runner = Task { await service.run() }
        let cancelled = Atomic<Bool>(false)
        #expect(service.start(on: EventLoopTaskExecutor(group.next())) {
            do { try await Task.sleep(for: .seconds(600)) } catch { cancelled.store(true, ordering: .relaxed) }
        })
        service.finish()
        runner.cancel()
        await runner.value
        let wasCancelled = cancelled.load(ordering: .relaxed)
        #expect(wasCancelled)
        #expect(service.inflightCount == 0)
    }
}

/// Lets many tasks wait for one stream to finish.
final class GateBox: Sendable {
    let stream: AsyncStream<Void>
    let (done, doneSink) = AsyncStream.makeStream(of: Void.self)
    init(_ s: AsyncStream<Void>) { stream = s }
    func wait() async {
        // Only one task may iterate the stream; others would trap, so each waits on `done`.
        if claimed.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged {
            for await _ in stream {}
            doneSink.finish()
        } else {
            for await _ in done {}
        }
    }
    private let claimed = Atomic<Bool>(false)
}
