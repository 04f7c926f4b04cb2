import Foundation
import CairnCore
import Histogram
import Synchronization
import CStorageSupport

/// Everything one `load` or `run` needs.
public struct RunConfig: Sendable {
    public enum Phase: String, Sendable { case load, run }

    public var phase: Phase
    public var target: String
    public var records: UInt64
    public var operations: UInt64?
    public var duration: Duration?
    /// Open loop at this many operations per second; nil = closed loop.
    public var rate: Double?
    public var concurrency: Int
    public var valueSize: ClosedRange<Int>
    public var workload: Workload
    public var distribution: KeyDistribution
    public var verify: Bool
    public var seed: UInt64
    public var consistency: ConsistencyOptions
    public var timeoutMillis: UInt32
    /// Cairn: the client's connections to each node; nil derives them from `concurrency`.
    public var connectionsPerNode: Int?
    /// Where the open loop keeps its timetable (`--pacer`).
    public enum Pacer: String, Sendable {
        /// On the event loop, when every session is driven from its loop (`LoopPacer`); else as `thread`.
        case loop
        /// On a thread of its own that sleeps until each start and hands the request over.
        case thread
    }
    public var pacer = Pacer.loop
    /// Run phase: requests whose (intended) start falls in this first stretch of the run are
    /// sent as any other but left out of the latency figures and the throughput (a client's and
    /// a server's first moments: connections, caches, page faults), as wrk2's calibration period
    /// is. The run lasts `warmup` + `duration`. Zero: none.
    public var warmup: Duration = .zero

    public init(phase: Phase, target: String, records: UInt64, operations: UInt64? = nil, duration: Duration? = nil,
                rate: Double? = nil, concurrency: Int = 16, valueSize: ClosedRange<Int> = 100...100,
                workload: Workload = Workload.named("a") ?? Workload(name: "a", mix: [.read: 0.5, .update: 0.5], distribution: .zipfian),
                distribution: KeyDistribution? = nil, verify: Bool = false, seed: UInt64 = 1,
                consistency: ConsistencyOptions = .init(), timeoutMillis: UInt32 = 5000) {
        self.phase = phase
        self.target = target
        self.records = records
        self.operations = operations
        self.duration = duration
        self.rate = rate
        self.concurrency = max(concurrency, 1)
        self.valueSize = valueSize
        self.workload = workload
        self.distribution = distribution ?? workload.distribution
        self.verify = verify
        self.seed = seed
        self.consistency = consistency
        self.timeoutMillis = timeoutMillis
    }
}

/// Indexes into `WorkerStats.names`.
enum OpIndex {
    static let read = 0, update = 1, insert = 2, rmw = 3, delete = 4
}

/// The key of record `i`: `k` and 12 decimal digits (so keys sort like their indexes).
public func recordKey(_ i: UInt64) -> [UInt8] {
    var out = [UInt8](repeating: UInt8(ascii: "0"), count: 13)
    out[0] = UInt8(ascii: "k")
    var x = i
    var pos = 12
    while x > 0 && pos > 0 {
        out[pos] = UInt8(ascii: "0") + UInt8(x % 10)
        x /= 10
        pos -= 1
    }
    return out
}

/// Runs one phase against a target and returns its report.
///
/// Closed loop: `concurrency` workers, one request in flight each. Open loop (`rate`): requests
/// start on a fixed schedule; at most `concurrency` are in flight, and a request that had to
/// wait for a free connection counts the wait in its latency.
public final class Runner: Sendable {
    public let config: RunConfig
    let target: any LoadTarget
    let stop = Atomic<Bool>(false)
    let claimed = Atomic<UInt64>(0)
    let completed = Atomic<UInt64>(0)
    let inserted: Atomic<UInt64>
    /// Write sequence numbers start from the wall clock (µs, shifted), so runs never reuse them.
    let sequence = Atomic<UInt64>(UInt64(max(Date().timeIntervalSince1970, 0) * 1_000_000) << 12)
    /// Latency and error counters, shared by the sessions `w` with the same `w % workers.count`
    /// (`stats(for:)`): a few, each holding every operation's histograms from the start.
    let workers: [WorkerStats]

    /// How many `WorkerStats` a run keeps: twice the cores, 8 to 32, at most one per session.
    /// One per session allocated and zeroed ~190 KiB per operation type per session at its first
    /// counted sample: 256 sessions did ~100 MB of it in the first counted second of an open
    /// loop, on the generator's one event loop, and that second's p99 carried the stall.
    static func statShards(concurrency: Int) -> Int {
        max(1, min(concurrency, min(32, max(8, 2 * ProcessInfo.processInfo.activeProcessorCount))))
    }

    /// Where session `w` records.
    func stats(for w: Int) -> WorkerStats { workers[w % workers.count] }
    let verifier: Verifier?
    let chooser: KeyChooser
    private let startedAt = ContinuousClock.now
    private let progress: @Sendable (String) -> Void

    public init(config: RunConfig, target: any LoadTarget, progress: @escaping @Sendable (String) -> Void) {
        self.config = config
        self.target = target
        self.progress = progress
        workers = (0..<Self.statShards(concurrency: config.concurrency)).map { _ in WorkerStats(preallocated: true) }
        verifier = config.verify ? Verifier(depth: 2 * config.concurrency + 8) : nil
        chooser = KeyChooser.make(config.distribution, records: config.records)
        inserted = Atomic(config.records)
    }

    /// Ends the run early (SIGINT); the report covers what ran.
    public func requestStop() { stop.store(true, ordering: .relaxed) }

    let startedAtNanos = Runner.monotonicNanos()
    /// `config.warmup` where it applies (a run phase; never negative), else zero.
    private var warmup: Duration { config.phase == .run ? max(config.warmup, .zero) : .zero }
    /// Nanoseconds after `startedAtNanos` from which requests count (`RunConfig.warmup`); set once
    /// the sessions are connected.
    private let measuredFrom = Atomic<UInt64>(0)
    /// Requests that completed without error in the warm-up, and those that failed.
    private let warmupCompleted = Atomic<UInt64>(0)
    private let warmupErrors = Atomic<UInt64>(0)

    /// Nanoseconds since the runner was created (CLOCK_MONOTONIC, read directly: it is on every
    /// request's path).
    var elapsedNanos: UInt64 {
        let now = Self.monotonicNanos()
        return now > startedAtNanos ? now - startedAtNanos : 0
    }

    static func monotonicNanos() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(max(ts.tv_sec, 0)) &* 1_000_000_000 &+ UInt64(max(ts.tv_nsec, 0))
    }

    public func run() async throws(TargetError) -> RunReport {
        var sessions: [any TargetSession] = []
        for i in 0..<config.concurrency { sessions.append(try await target.session(index: i)) }
        let began = ContinuousClock.now
        let (from, overflow) = elapsedNanos.addingReportingOverflow(UInt64(warmup.wholeNanoseconds))
        measuredFrom.store(overflow ? .max : from, ordering: .relaxed)
        let reporter = Task { await reportProgress() }
        if config.phase == .run, let rate = config.rate {
            await runOpenLoop(sessions, schedule: OpenLoopSchedule(rate: rate))
        } else {
            await runClosedLoop(sessions)
        }
        let elapsed = ContinuousClock.now - began
        reporter.cancel()
        for s in sessions { await s.close() }
        return makeReport(elapsed: max(elapsed - warmup, .zero))
    }

    // MARK: Phases

    /// Event-loop-driven workers when every session supports it and every operation is a single
    /// request (read-modify-write and delete keep the async path).
    private func drivenSessions(_ sessions: [any TargetSession]) -> [any EventLoopDrivenSession]? {
        guard (config.workload.mix[.readModifyWrite] ?? 0) == 0, (config.workload.mix[.delete] ?? 0) == 0 else { return nil }
        let driven = sessions.compactMap { $0 as? any EventLoopDrivenSession }
        return driven.count == sessions.count ? driven : nil
    }

    private func workerSeed(_ w: Int) -> UInt64 { config.seed &+ UInt64(w) &* 0x9E37 &+ (config.phase == .load ? 0 : 1) }

    /// Closed loop (and the load phase): each worker plans and executes one request at a time.
    private func runClosedLoop(_ sessions: [any TargetSession]) async {
        if let driven = drivenSessions(sessions) {
            await withDiscardingTaskGroup { group in
                for (w, session) in driven.enumerated() {
                    let driver = ClosedLoopDriver(runner: self, stats: stats(for: w), rng: SplitMix64(seed: workerSeed(w)))
                    group.addTask { await session.runClosedLoop(driver) }
                }
            }
            return
        }
        await withDiscardingTaskGroup { group in
            for (w, session) in sessions.enumerated() {
                group.addTask { [self] in
                    var rng = SplitMix64(seed: workerSeed(w))
                    while let plan = planNext(&rng) { await execute(plan, session, stats: stats(for: w)) }
                }
            }
        }
    }

    /// Open loop. Sessions driven from their event loop, by default, keep the timetable on the
    /// loop (`LoopPacer`). Otherwise (`--pacer thread`, or sessions that need tasks) one thread
    /// of its own keeps it (an absolute `clock_nanosleep` per start with no timer slack, so its
    /// own lateness stays in the tens of microseconds and is not charged to the system under
    /// test), takes a free session (waiting for one counts in the latency, which runs from the
    /// intended start) and hands the request over: straight to the session's event loop when it
    /// can be driven, else to a task.
    private func runOpenLoop(_ sessions: [any TargetSession], schedule: OpenLoopSchedule) async {
        let driven = drivenSessions(sessions)
        let pool = SessionPool(count: sessions.count)
        let base = startedAtNanos
        // The timetable starts now, with every session connected: connecting is not charged to
        // the first requests.
        let offset = elapsedNanos
        if config.pacer == .loop, let driven {
            await LoopPacer(loop: LoopPacer.defaultLoop(), runner: self, sessions: driven, schedule: schedule,
                            seed: config.seed, base: base, offset: offset).run()
            return
        }
        await withCheckedContinuation { (finished: CheckedContinuation<Void, Never>) in
            let pacer = Thread { [self] in
                var rng = SplitMix64(seed: config.seed)
                cairn_precise_timers()
                while true {
                    // This thread is the only planner, so the next index is `claimed`.
                    let intended = schedule.intendedStartNanos(claimed.load(ordering: .relaxed), after: offset)
                    let deadline = base.addingReportingOverflow(intended)
                    Self.sleep(untilMonotonicNanos: deadline.overflow ? .max : deadline.partialValue)
                    let s = pool.take()
                    guard let plan = planNext(&rng, intendedStart: intended) else {
                        pool.give(s)
                        break
                    }
                    let stats = stats(for: s)
                    if let driven {
                        driven[s].start(plan) { values, error in
                            self.complete(plan, values: values, error: error, stats: stats)
                            pool.give(s)
                        }
                    } else {
                        Task {
                            await self.execute(plan, sessions[s], stats: stats)
                            pool.give(s)
                        }
                    }
                }
                pool.awaitAll()
                finished.resume()
            }
            pacer.name = "cairn-load pacer"
            pacer.start()
        }
    }

    /// Blocks the calling thread until CLOCK_MONOTONIC reads `deadline` (ns); returns at once if
    /// it has passed.
    static func sleep(untilMonotonicNanos deadline: UInt64) {
        var ts = timespec(tv_sec: Int(clamping: deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
        while clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nil) == EINTR {}
    }

    private func budgetExhausted(_ i: UInt64) -> Bool {
        if let ops = config.operations, i >= ops { return true }
        if let d = config.duration, ContinuousClock.now - startedAt >= d + warmup { return true }
        return false
    }

    // MARK: Operations

    /// The next request, or nil when the run is over: claims a budget slot, picks the operation
    /// and record, builds the value and registers the write with the verifier. Synchronous; shared
    /// by every load model. Latency is measured from `intendedStart` (open loop) or from now.
    func planNext(_ rng: inout SplitMix64, intendedStart: UInt64? = nil) -> ClosedLoopDriver.Plan? {
        if stop.load(ordering: .relaxed) { return nil }
        let n = claimed.wrappingAdd(1, ordering: .relaxed).oldValue
        let index: UInt64
        let op: Int
        if config.phase == .load {
            guard n < config.records, !budgetExhausted(n) else { return nil }
            (index, op) = (n, OpIndex.insert)
        } else {
            if budgetExhausted(n) { return nil }
            let newest = inserted.load(ordering: .relaxed) &- 1
            switch config.workload.pick(&rng) {
            case .read: (index, op) = (chooser.next(&rng, newest: newest), OpIndex.read)
            case .update: (index, op) = (chooser.next(&rng, newest: newest), OpIndex.update)
            case .readModifyWrite: (index, op) = (chooser.next(&rng, newest: newest), OpIndex.rmw)
            case .delete: (index, op) = (chooser.next(&rng, newest: newest), OpIndex.delete)
            case .insert: (index, op) = (inserted.wrappingAdd(1, ordering: .relaxed).oldValue, OpIndex.insert)
            }
        }
        let key = recordKey(index)
        let start = intendedStart ?? elapsedNanos
        if op == OpIndex.read { return ClosedLoopDriver.Plan(op: op, index: index, key: key, value: nil, seq: 0, start: start) }
        let seq = sequence.wrappingAdd(1, ordering: .relaxed).newValue
        verifier?.issued(key: index, seq: seq, at: elapsedNanos, isDelete: op == OpIndex.delete)
        let v = op == OpIndex.delete ? nil : value(for: key, seq: seq, rng: &rng)
        return ClosedLoopDriver.Plan(op: op, index: index, key: key, value: v, seq: seq, start: start)
    }

    /// Records a request's outcome (latency from the plan's start, verification). Synchronous.
    func complete(_ plan: ClosedLoopDriver.Plan, values: [[UInt8]]?, error: TargetError?, stats: WorkerStats) {
        completed.wrappingAdd(1, ordering: .relaxed)
        let counted = plan.start >= measuredFrom.load(ordering: .relaxed)
        if let error {
            if counted { stats.error(error.kind, error.message) } else { warmupErrors.wrappingAdd(1, ordering: .relaxed) }
            return
        }
        if counted {
            stats.record(plan.op, micros: latency(since: plan.start))
        } else {
            warmupCompleted.wrappingAdd(1, ordering: .relaxed)
        }
        if plan.op == OpIndex.read {
            verifier?.checkRead(key: plan.index, keyBytes: plan.key, started: plan.start, values: values ?? [])
        } else {
            verifier?.acknowledged(key: plan.index, seq: plan.seq, at: elapsedNanos)
        }
    }

    /// Performs a plan over an async session.
    private func execute(_ plan: ClosedLoopDriver.Plan, _ session: any TargetSession, stats: WorkerStats) async {
        do throws(TargetError) {
            switch plan.op {
            case OpIndex.read:
                complete(plan, values: try await session.read(plan.key).values, error: nil, stats: stats)
                return
            case OpIndex.delete:
                try await session.delete(plan.key)
            case OpIndex.rmw:
                let readStart = elapsedNanos
                let r = try await session.read(plan.key)
                verifier?.checkRead(key: plan.index, keyBytes: plan.key, started: readStart, values: r.values)
                try await session.write(plan.key, plan.value ?? [])
            default:
                try await session.write(plan.key, plan.value ?? [])
            }
            complete(plan, values: nil, error: nil, stats: stats)
        } catch {
            complete(plan, values: nil, error: error, stats: stats)
        }
    }

    private func latency(since start: UInt64) -> UInt64 {
        let now = elapsedNanos
        return now > start ? (now - start) / 1000 : 0
    }

    private func value(for key: [UInt8], seq: UInt64, rng: inout SplitMix64) -> [UInt8] {
        let size = config.valueSize.lowerBound == config.valueSize.upperBound
            ? config.valueSize.lowerBound
            : config.valueSize.lowerBound + Int(rng.next(below: UInt64(config.valueSize.count)))
        // Always self-checking when there is room, so a later `run --verify` can check what any
        // earlier run wrote.
        return size >= ValueFormat.headerBytes ? ValueFormat.make(key: key, seq: seq, size: size) : ValueFormat.filler(size: size, seq: seq)
    }

    // MARK: Reporting

    private func reportProgress() async {
        var last: UInt64 = 0
        var second = 0
        while !Task.isCancelled {
            do { try await Task.sleep(for: .seconds(1)) } catch { return }
            second += 1
            var interval: [String: Histogram<UInt64>] = [:]
            var errors = 0
            for w in workers { w.drainInterval(into: &interval, errors: &errors) }
            let done = completed.load(ordering: .relaxed)
            var line = String(format: "[%4ds] %9d ops/s", second, Int(done &- last))
            for op in interval.keys.sorted() {
                if let h = interval[op], h.totalCount > 0 {
                    line += "  \(op) p50 \(h.valueAtPercentile(50))µs p99 \(h.valueAtPercentile(99))µs"
                }
            }
            line += "  errors \(errors)"
            if interval.values.allSatisfy({ $0.totalCount == 0 }),
               Runner.monotonicNanos() &- startedAtNanos < measuredFrom.load(ordering: .relaxed) &+ 1_500_000_000 {
                line += "  (warm-up: not counted)"
            }
            last = done
            progress(line)
        }
    }

    private func makeReport(elapsed: Duration) -> RunReport {
        var totals: [String: Histogram<UInt64>] = [:]
        var errors: [String: Int] = [:]
        var samples: [String: [String]] = [:]
        for w in workers { w.totals(into: &totals, errors: &errors, samples: &samples) }
        let siblingReads = target.siblingReads
        var report = RunReport(config: config, elapsed: elapsed, operations: totals.mapValues(OperationSummary.init), errors: errors,
                               verification: verifier?.result, firstFailures: verifier?.firstFailures ?? [], siblingReads: siblingReads)
        report.errorSamples = samples
        report.warmupOperations = warmupCompleted.load(ordering: .relaxed)
        report.warmupErrors = warmupErrors.load(ordering: .relaxed)
        return report
    }
}

/// One driven worker's state. Used by one request's completion at a time (a worker has one
/// request in flight, and each completion starts the next), so its random generator needs no
/// lock; shared counters are atomics, and its `WorkerStats` (shared with a few workers) locks.
public final class ClosedLoopDriver: @unchecked Sendable {
    public struct Plan: Sendable {
        public let op: Int
        public let index: UInt64
        public let key: [UInt8]
        /// nil for a read.
        public let value: [UInt8]?
        public let seq: UInt64
        public let start: UInt64
    }

    let runner: Runner
    let stats: WorkerStats
    var rng: SplitMix64

    init(runner: Runner, stats: WorkerStats, rng: SplitMix64) {
        self.runner = runner
        self.stats = stats
        self.rng = rng
    }

    public func next() -> Plan? { runner.planNext(&rng) }

    public func finish(_ plan: Plan, values: [[UInt8]]?, error: TargetError?) {
        runner.complete(plan, values: values, error: error, stats: stats)
    }
}

/// The sessions free to take a request in the open loop. `take` blocks the pacer thread until one
/// is free; completions `give` theirs back from any thread.
final class SessionPool: Sendable {
    private let free: Mutex<[Int]>
    private let available: DispatchSemaphore
    private let count: Int

    init(count: Int) {
        self.count = count
        free = Mutex(Array((0..<count).reversed()))
        available = DispatchSemaphore(value: count)
    }

    func take() -> Int {
        available.wait()
        return free.withLock { $0.popLast() } ?? 0
    }

    func give(_ s: Int) {
        free.withLock { $0.append(s) }
        available.signal()
    }

    /// Blocks until every session has been given back (nothing in flight).
    func awaitAll() {
        for _ in 0..<count { available.wait() }
        for _ in 0..<count { available.signal() }
    }
}
