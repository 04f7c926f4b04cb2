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

    /// A driven session whose every request fails before it is sent: `finish` runs on the stack
    /// of `start`, as `CairnClient`'s does when no node can be reached.
    final class RefusingSession: EventLoopDrivenSession {
        func read(_ key: [UInt8]) async throws(TargetError) -> ReadResult { throw TargetError("connection", "refused") }
        func write(_ key: [UInt8], _ value: [UInt8]) async throws(TargetError) { throw TargetError("connection", "refused") }
        func delete(_ key: [UInt8]) async throws(TargetError) { throw TargetError("connection", "refused") }
        func close() async {}
        func runClosedLoop(_ driver: ClosedLoopDriver) async {}
        func start(_ plan: ClosedLoopDriver.Plan, then finish: @escaping @Sendable ([[UInt8]]?, TargetError?) -> Void) {
            finish(nil, TargetError("connection", "refused"))
        }
    }

    struct RefusingTarget: LoadTarget {
        var description: String { "refusing" }
        func session(index: Int) async throws(TargetError) -> any TargetSession { RefusingSession() }
        func close() async {}
    }

    /// Requests that fail on the spot, far behind the timetable: each completion comes back on
    /// the stack that sent it, and the loop pacer still never nests (20,000 deep would overflow
    /// the loop thread's stack); every failure is counted.
    @Test func failuresOnTheSendersStackDoNotNest() async throws {
        var config = RunConfig(phase: .run, target: "refusing", records: 100, operations: 20_000, rate: 10_000_000, concurrency: 2, seed: 6)
        config.pacer = .loop
        let report = try await Runner(config: config, target: RefusingTarget()) { _ in }.run()
        #expect(report.totalOperations == 0)
        #expect(report.totalErrors == 20_000)
    }

    struct SlowTarget: LoadTarget {
        let loop: any EventLoop
        let tally: Tally
        var description: String { "slow" }
        func session(index: Int) async throws(TargetError) -> any TargetSession { SlowSession(loop: loop, tally: tally) }
        func close() async {}
    }

    /// Runs `config` with `pacer` against slow sessions on a loop of their own: the report, what
    /// the sessions saw, and the wall time of the run.
    private func run(_ config: RunConfig, pacer: RunConfig.Pacer) async throws -> (RunReport, Tally, Duration) {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let tally = Tally()
        var config = config
        config.pacer = pacer
        let runner = Runner(config: config, target: SlowTarget(loop: group.next(), tally: tally)) { _ in }
        tally.runStart.store(runner.startedAtNanos, ordering: .relaxed)
        let began = ContinuousClock.now
        let report = try await runner.run()
        let wall = ContinuousClock.now - began
        try await group.shutdownGracefully()
        return (report, tally, wall)
    }

    /// Every one of `count` requests was sent once, answered without error and counted, and no
    /// session carried two at once.
    private func expectEachRanOnceAlone(_ report: RunReport, _ tally: Tally, count: Int) {
        #expect(report.totalOperations == UInt64(count) && report.totalErrors == 0)
        #expect(tally.sent.load(ordering: .relaxed) == count)
        #expect(tally.overlaps.load(ordering: .relaxed) == 0, "a session was given a request while one was in flight")
    }

    @Test(arguments: [RunConfig.Pacer.loop, .thread])
    func everyScheduledRequestRunsOnceOnAFreeSessionAndNeverEarly(pacer: RunConfig.Pacer) async throws {
        // 4 sessions at 2,000 ops/s, each busy 300 µs a request: at most 0.6 in flight on
        // average, so the timetable, not the sessions, sets the pace.
        let (report, tally, _) = try await run(RunConfig(phase: .run, target: "slow", records: 100, operations: 400, rate: 2000,
                                                         concurrency: 4, seed: 3), pacer: pacer)
        expectEachRanOnceAlone(report, tally, count: 400)
        #expect(tally.early.load(ordering: .relaxed) == 0, "requests left before their slot")
        #expect(report.elapsed >= .milliseconds(199))
    }

    /// `--warmup`: the requests of the first stretch run but are not counted, and the report's
    /// seconds leave that stretch out.
    @Test(arguments: [RunConfig.Pacer.loop, .thread])
    func warmUpRequestsRunButAreNotCounted(pacer: RunConfig.Pacer) async throws {
        var config = RunConfig(phase: .run, target: "slow", records: 100, duration: .milliseconds(200), rate: 2000, concurrency: 4, seed: 5)
        config.warmup = .milliseconds(100)
        let (report, tally, wall) = try await run(config, pacer: pacer)
        let sent = tally.sent.load(ordering: .relaxed)
        // About 600 sent (300 ms at 2,000 ops/s), about 200 of them in the warm-up; a slow
        // machine sends fewer, but the warm-up's stay out of the count whatever their number.
        #expect(report.totalOperations > 0 && report.warmupOperations > 0, "\(report.totalOperations) counted of \(sent)")
        #expect(report.totalOperations + report.warmupOperations == UInt64(sent))
        #expect(report.totalErrors == 0 && report.warmupErrors == 0)
        #expect(report.elapsed <= wall - .milliseconds(90))
    }

    /// One session busy far longer than the timetable's spacing: requests wait for it (counted
    /// from their intended start) instead of overlapping, and all of them still run.
    @Test(arguments: [RunConfig.Pacer.loop, .thread])
    func aBusySessionHoldsRequestsBackWithoutOverlap(pacer: RunConfig.Pacer) async throws {
        let (report, tally, _) = try await run(RunConfig(phase: .run, target: "slow", records: 100, operations: 50, rate: 20_000,
                                                         concurrency: 1, seed: 4), pacer: pacer)
        expectEachRanOnceAlone(report, tally, count: 50)
        // 50 requests one after another, 300 µs each.
        #expect(report.elapsed >= .milliseconds(15))
    }
}
