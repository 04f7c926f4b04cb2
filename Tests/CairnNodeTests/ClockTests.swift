import Testing
@testable import CairnNode
import CairnCore
import CairnWire
import Logging
import Synchronization


/// A value shared with tasks, behind a lock.
final class Shared<Value: Sendable>: Sendable {
    private let value: Mutex<Value>
    init(_ v: Value) { value = Mutex(v) }
    func update(_ body: (inout Value) -> Void) { value.withLock { body(&$0) } }
    var current: Value { value.withLock { $0 } }
}

/// The clock seam: virtual time moves only when told, and the node's waits follow it.
@Suite(.timeLimit(.minutes(3))) struct ManualClockTests {
    @Test func sleepersResumeInDeadlineOrderOnlyWhenTimeReachesThem() async throws {
        let clock = ManualClock()
        let order = Shared<[Int]>([])
        let start = clock.now()
        let tasks = [(3, 30), (1, 10), (2, 20)].map { (tag, ms) in
            Task {
                try await clock.sleep(until: start.advanced(by: .milliseconds(ms)))
                order.update { $0.append(tag) }
            }
        }
        try await settle("three sleepers") { clock.sleeping == 3 }
        clock.advance(by: .milliseconds(15))
        try await settle("the first resumed") { order.current == [1] }
        #expect(clock.sleeping == 2)
        clock.advance(by: .milliseconds(5))   // exactly the second's deadline
        try await settle("the second resumed") { order.current == [1, 2] }
        #expect(clock.sleeping == 1)
        clock.advance(by: .milliseconds(10))
        for t in tasks { try await t.value }
        #expect(order.current == [1, 2, 3])
        #expect(clock.elapsed == .milliseconds(30))
    }

    /// A task already cancelled when it goes to sleep does not sleep (its cancellation handler
    /// ran before there was a sleeper to resume). A node's scrub used to sleep to its next pass
    /// this way when shutdown cancelled it mid-pass, and the node never stopped.
    @Test func aTaskCancelledBeforeItSleepsDoesNotSleep() async throws {
        let clock = ManualClock()
        let sleeper = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            do {
                try await clock.sleep(for: .seconds(3600))
                return false
            } catch {
                return error is CancellationError
            }
        }
        #expect(await sleeper.value)
        #expect(clock.sleeping == 0)
    }

    @Test func aPastDeadlineReturnsAtOnceAndCancellationEndsASleep() async throws {
        let clock = ManualClock()
        try await clock.sleep(until: clock.now())
        let sleeper = Task { try await clock.sleep(for: .seconds(3600)) }
        try await settle("the sleeper waits") { clock.sleeping == 1 }
        sleeper.cancel()
        await #expect(throws: CancellationError.self) { try await sleeper.value }
        #expect(clock.sleeping == 0)
    }

    @Test func wallTimeMovesWithVirtualTime() {
        let clock = ManualClock(wallMillis: 1000)
        #expect(clock.wallMillis() == 1000)
        clock.advance(by: .milliseconds(2500))
        #expect(clock.wallMillis() == 3500)
    }

    /// A supervisor's restart backoff runs on the node's clock: nothing restarts until it moves.
    @Test func supervisorBackoffWaitsForVirtualTime() async throws {
        let clock = ManualClock()
        var policy = RestartPolicy()
        policy.backoffMin = .seconds(10)
        policy.backoffMax = .seconds(10)
        let sup = Supervisor(name: "t", policy: policy, logger: Logger(label: "t"), clock: clock)
        let child = FlakyChild(failures: 1)
        sup.spawn(child)
        let run = Task { try await sup.run() }
        try await settle("the child failed and its restart waits") { clock.sleeping == 1 }
        #expect(child.runs.load(ordering: .relaxed) == 1)
        clock.advance(by: .seconds(9))
        #expect(clock.sleeping == 1, "9 s of a 10 s backoff: still waiting")
        clock.advance(by: .seconds(1))
        try await settle("restarted") { child.runs.load(ordering: .relaxed) == 2 }
        sup.finish()
        run.cancel()
        _ = await run.result
    }
}

/// A network where nobody ever answers: requests wait until their caller gives up.
final class SilentTransport: Transport {
    let sent = Atomic<Int>(0)

    func send(to node: NodeName, _ message: Message, timeoutMillis: UInt32) async throws(ConnectionError) -> Message {
        sent.wrappingAdd(1, ordering: .relaxed)
        do {
            try await Task.sleep(for: .seconds(3600))   // only cancellation ends it
        } catch {
            throw .abandoned
        }
        throw .abandoned
    }

    func cast(to node: NodeName, _ message: Message) {}
    func openStream(to node: NodeName, kind: StreamKind, header: [UInt8], timeoutMillis: UInt32) async throws(StreamError) -> any OutboundStream {
        throw .connection(.notSent("silent"))
    }
    func downReasons(_ nodes: [NodeName]) -> [NodeName: String] { [:] }
    var peerCount: Int { 2 }
    var upCount: Int { 2 }
    var triedEveryPeer: Bool { true }
    func dropConnections() {}
}

/// A coordinator's deadline is the node's clock: with silent replicas, a W=2 write answers
/// "not reached" exactly when virtual time reaches the timeout, and not before.
@Suite(.timeLimit(.minutes(3))) struct VirtualDeadlineTests {
    @Test func aWriteCoordinatorGivesUpWhenVirtualTimeReachesItsDeadline() async throws {
        let clock = ManualClock()
        let metrics = NodeMetrics(maxInflight: 10)
        let vnodes = VnodeTable()
        let partition = PartitionID(0)
        let vnode = Vnode(partition: partition, backend: MemoryBackend(), limits: Limits(), metrics: metrics, logger: Logger(label: "t"))
        vnodes.insert(vnode)
        let sup = Supervisor(name: "t", policy: RestartPolicy(), logger: Logger(label: "t"), clock: clock)
        sup.spawn(vnode)
        let run = Task { try await sup.run() }
        try await settle("vnode serving") { await vnode.isServing }
        let network = SilentTransport()
        let me = try NodeName("n1")
        let ctx = CoordinatorContext(me: me, actor: ActorID(node: "n1", epoch: 1), vnodes: vnodes, transport: network,
                                     metrics: metrics, logger: Logger(label: "t"), clock: clock)
        let replicas = try [("n1", true), ("n2", false), ("n3", false)].map { name, local in
            ReplicaTarget(node: try NodeName(name), address: "\(name):1", isPrimary: true, isLocal: local)
        }
        let coordinator = WriteCoordinator(ctx: ctx, operation: .put, requirement: try QuorumRequirement(name: "W", quorum: .count(2), primary: .count(0), n: 3),
                                           partition: partition, replicas: replicas, key: [1], sibling: Sibling(value: [1], timestampMillis: 1),
                                           context: VersionVector(), timeoutMillis: 500, sloppy: false)
        let outcome = Shared<WriteCoordination.WriteOutcome?>(nil)
        let request = Task { await coordinator.run { o, _ in outcome.update { $0 = o } } }
        try await settle("both replicas asked") { network.sent.load(ordering: .relaxed) == 2 }
        try await settle("the deadline armed") { clock.sleeping >= 1 }
        clock.advance(by: .milliseconds(499))
        for _ in 0..<1000 { await Task.yield() }
        #expect(outcome.current == nil, "no answer before the deadline")
        clock.advance(by: .milliseconds(1))
        try await settle("answered at the deadline") { outcome.current != nil }
        guard case .quorumFailed(let f)? = outcome.current else { Issue.record("expected not reached"); return }
        #expect(f.kind == .notReached && f.achieved == 1)
        await request.value   // cancelled replica requests end at once (`abandoned`)
        sup.finish()
        run.cancel()
        _ = await run.result
    }
}

/// `SystemClock`'s sleeps: one thread and one heap for the process.
@Suite(.timeLimit(.minutes(1))) struct TimerQueueTests {
    /// A sleeper whose deadline comes before the one the thread is armed for re-arms it: with
    /// a sleeper an hour away armed, short sleeps still end at (or after) their own deadlines,
    /// not an hour later (the suite's time limit would stop the test first).
    @Test func anEarlierDeadlineArrivingLaterIsNotHeldBehindTheArmedOne() async throws {
        let timers = TimerQueue(name: "test.timers")
        let start = ContinuousClock.now
        let far = Task { try await timers.sleep(until: start.advanced(by: .seconds(3600))) }
        while timers.pending == 0 { try await Task.sleep(for: .milliseconds(1)) }
        for ms in [30, 10, 20] {
            let deadline = ContinuousClock.now.advanced(by: .milliseconds(ms))
            try await timers.sleep(until: deadline)
            #expect(ContinuousClock.now >= deadline)
        }
        #expect(timers.pending == 1)
        far.cancel()
        await #expect(throws: CancellationError.self) { try await far.value }
        #expect(timers.pending == 0)
        // A deadline already passed returns at once.
        try await timers.sleep(until: start)
    }

    /// A callback fires once, at or after its deadline, and cannot be cancelled after; callbacks
    /// cancelled long before their deadline do not pile up until the thread next wakes (the heap
    /// stays within 2 × live + 1024 entries).
    @Test func callbacksFireOnceAndCancelledOnesDoNotPileUp() async throws {
        let timers = TimerQueue(name: "test.timers")
        let fired = Tally()
        let deadline = ContinuousClock.now.advanced(by: .milliseconds(10))
        let soon = timers.schedule(at: deadline) { fired.add() }
        try await settle("the callback fired") { fired.count == 1 }
        #expect(ContinuousClock.now >= deadline)
        #expect(!timers.cancel(soon))

        let far = ContinuousClock.now.advanced(by: .seconds(3600))
        let kept = timers.schedule(at: far) { fired.add() }
        var withdrawn = 0
        for _ in 0..<50_000 where timers.cancel(timers.schedule(at: far) { fired.add() }) { withdrawn += 1 }
        #expect(withdrawn == 50_000)
        #expect(timers.pending == 1)
        #expect(timers.heapEntries <= 2 * 1 + 1024 + 1)
        #expect(timers.cancel(kept))
        #expect(fired.count == 1)
    }

    @Test func cancelledSleepersThrowAtOnceAndLeaveNothingBehind() async throws {
        let timers = TimerQueue(name: "test.timers")
        let far = ContinuousClock.now.advanced(by: .seconds(3600))
        let sleepers = (0..<500).map { _ in Task { try await timers.sleep(until: far) } }
        // Cancelled before, while, and after registering: each throws CancellationError.
        for (i, t) in sleepers.enumerated() {
            if i % 50 == 0 { await Task.yield() }
            t.cancel()
        }
        for t in sleepers {
            await #expect(throws: CancellationError.self) { try await t.value }
        }
        #expect(timers.pending == 0)
        // The queue keeps serving after the churn.
        try await timers.sleep(until: ContinuousClock.now.advanced(by: .milliseconds(5)))
        #expect(timers.pending == 0)
    }
}
