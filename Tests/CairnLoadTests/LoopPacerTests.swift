import Testing
import NIOCore
import NIOPosix
import Synchronization
@testable import CairnLoad

/// The open loop kept on an event loop (`LoopPacer`) and on a thread, against sessions that
/// answer from a loop of their own after a delay: every scheduled request runs once, a session
/// never carries two requests at once, and no request leaves before its slot in the timetable.
@Suite struct LoopPacerTests {
    /// What the sessions saw, shared by all of them.
    final class Tally: Sendable {
        let sent = Atomic<Int>(0)
        let overlaps = Atomic<Int>(0)
        let early = Atomic<Int>(0)
        /// The runner's start (CLOCK_MONOTONIC ns), set before the run.
        let runStart = Atomic<UInt64>(0)
    }

    /// A driven session that answers each request 300 µs later on `loop`.
    final class SlowSession: EventLoopDrivenSession {
        let loop: any EventLoop
        let tally: Tally
        let busy = Atomic<Bool>(false)

        init(loop: any EventLoop, tally: Tally) {
            self.loop = loop
            self.tally = tally
        }

        func read(_ key: [UInt8]) async throws(TargetError) -> ReadResult { ReadResult(values: []) }
        func write(_ key: [UInt8], _ value: [UInt8]) async throws(TargetError) {}
        func delete(_ key: [UInt8]) async throws(TargetError) {}
        func close() async {}
        func runClosedLoop(_ driver: ClosedLoopDriver) async {}

        func start(_ plan: ClosedLoopDriver.Plan, then finish: @escaping @Sendable ([[UInt8]]?, TargetError?) -> Void) {
            if busy.exchange(true, ordering: .acquiringAndReleasing) { tally.overlaps.add(1, ordering: .relaxed) }
            tally.sent.add(1, ordering: .relaxed)
            if Runner.monotonicNanos() < tally.runStart.load(ordering: .relaxed) &+ plan.start { tally.early.add(1, ordering: .relaxed) }
            loop.scheduleTask(in: .microseconds(300)) { [self] in
                busy.store(false, ordering: .releasing)
                finish(plan.value == nil ? [] : nil, nil)
            }
        }
    }

    struct SlowTarget: LoadTarget {
        let loop: any EventLoop
        let tally: Tally
        var description: String { "slow" }
        func session(index: Int) async throws(TargetError) -> any TargetSession { SlowSession(loop: loop, tally: tally) }
        func close() async {}
    }

    @Test(arguments: [RunConfig.Pacer.loop, .thread])
    func everyScheduledRequestRunsOnceOnAFreeSessionAndNeverEarly(pacer: RunConfig.Pacer) async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let tally = Tally()
        // 4 sessions at 2,000 ops/s, each busy 300 µs a request: at most 0.6 in flight on
        // average, so the timetable, not the sessions, sets the pace.
        var config = RunConfig(phase: .run, target: "slow", records: 100, operations: 400, rate: 2000, concurrency: 4, seed: 3)
        config.pacer = pacer
        let runner = Runner(config: config, target: SlowTarget(loop: group.next(), tally: tally)) { _ in }
        tally.runStart.store(runner.startedAtNanos, ordering: .relaxed)
        let report = try await runner.run()
        #expect(report.totalOperations == 400 && report.totalErrors == 0)
        #expect(tally.sent.load(ordering: .relaxed) == 400)
        #expect(tally.overlaps.load(ordering: .relaxed) == 0, "a session was given a request while one was in flight")
        #expect(tally.early.load(ordering: .relaxed) == 0, "requests left before their slot")
        #expect(report.elapsed >= .milliseconds(199))
        try await group.shutdownGracefully()
    }

    /// One session busy far longer than the timetable's spacing: requests wait for it (counted
    /// from their intended start) instead of overlapping, and all of them still run.
    @Test(arguments: [RunConfig.Pacer.loop, .thread])
    func aBusySessionHoldsRequestsBackWithoutOverlap(pacer: RunConfig.Pacer) async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let tally = Tally()
        var config = RunConfig(phase: .run, target: "slow", records: 100, operations: 50, rate: 20_000, concurrency: 1, seed: 4)
        config.pacer = pacer
        let runner = Runner(config: config, target: SlowTarget(loop: group.next(), tally: tally)) { _ in }
        tally.runStart.store(runner.startedAtNanos, ordering: .relaxed)
        let report = try await runner.run()
        #expect(report.totalOperations == 50 && report.totalErrors == 0)
        #expect(tally.overlaps.load(ordering: .relaxed) == 0)
        // 50 requests one after another, 300 µs each.
        #expect(report.elapsed >= .milliseconds(15))
        try await group.shutdownGracefully()
    }
}
