import CairnCore
import CairnWire
import Synchronization

// Client requests on the common path, driven by callbacks instead of a task and an actor:
// the same coordination machines as `WriteCoordinator` and `ReadCoordinator`, fed by the
// threads that end each step (the store thread that stamped or read, the log sync that made a
// write durable, the event loop a replica's reply came in on, the timer thread at the
// deadline). A task is spawned only for the rare step that must wait on something without a
// callback (keeping a hint, forwarding to a handoff receiver).
//
// `NodeCore.coordinateDirectly` chooses this path only when nothing irregular is known at the
// start: every primary reachable (no fallback, no hint to keep up front), the local copy a
// primary vnode whose store runs closures, the node on real time with no task executor of
// its own (a simulated node keeps its seeded order). Anything that turns irregular later
// (a replica failing or timing out, the partition starting a handoff) is handled here too,
// exactly as the actors handle it: the machines decide, the shells only perform.

/// How a direct request reaches a replica: `Transport.sendSoon`, else (a transport that serves
/// only `send`) a task that asks. Counted as `ask` counts.
private func askSoon(_ ctx: CoordinatorContext, _ node: NodeName, _ message: Message, timeoutMillis: UInt32,
                     _ done: @escaping @Sendable (ReplicaAnswer) -> Void) {
    let sent = ctx.transport.sendSoon(to: node, message, timeoutMillis: timeoutMillis) { done(ReplicaAnswer($0)) }
    if sent {
        ctx.metrics.replicaRequests.increment()
    } else {
        Task { done(await ctx.ask(node, message, timeoutMillis: timeoutMillis)) }
    }
}

/// The steps one event of a direct request calls for, in order: up to three inline (an event
/// nearly always calls for one to three), any more in an array. Performed outside the request's
/// lock; inline so that an event costs no allocation for them.
struct Steps<Element>: Sequence {
    private var first: Element?
    private var second: Element?
    private var third: Element?
    private var more: [Element] = []

    init() {}

    mutating func append(_ e: Element) {
        if first == nil { first = e } else if second == nil { second = e } else if third == nil { third = e } else { more.append(e) }
    }

    func makeIterator() -> Iterator { Iterator(steps: self) }

    struct Iterator: IteratorProtocol {
        let steps: Steps
        var index = 0

        mutating func next() -> Element? {
            defer { index += 1 }
            switch index {
            case 0: return steps.first
            case 1: return steps.second
            case 2: return steps.third
            default: return index - 3 < steps.more.count ? steps.more[index - 3] : nil
            }
        }
    }
}

extension Steps: Sendable where Element: Sendable {}

/// Arms a direct request's deadline on the process's timer thread (armed under the request's
/// lock, so the callback, which takes that lock, cannot run before the id is stored).
private func scheduleDeadline(afterMillis ms: UInt32, _ fire: @escaping @Sendable () -> Void) -> UInt64 {
    TimerQueue.shared.schedule(at: ContinuousClock.now.advanced(by: .milliseconds(Int64(ms))), fire)
}

/// One client write (put or delete) on the direct path: performs `WriteCoordination`'s
/// directives as `WriteCoordinator` does, with the same answers, hints and receipts.
///
/// Isolation: a lock around the machine; events arrive on any thread, and directives are
/// performed outside the lock (a step that completes at once re-enters `handle`). The
/// instance lives until the machine finished (which waits for every hint it asked for);
/// `ended` is called exactly once then, and `respond` exactly once before or at that moment.
final class DirectWrite: Sendable {
    private enum Event: Sendable {
        case localStamped(Vnode.Stamped)
        case localApplied
        case localFailed(String)
        case localRejected(String)
        case acked(NodeName, durable: Bool)
        case failed(NodeName, ReplicaOutcome)
        case deadline
        case hintKept
    }

    private enum Step: Sendable {
        case perform(WriteCoordination.Directive, VersionedObject?)
        /// Wait for the stamped write's sync, then run the after-write hook.
        case untilDurable(Vnode.Stamped)
        case answer(WriteCoordination.WriteOutcome, WriteCoordinator.Written)
        case end(timer: UInt64?)
    }

    private struct State: Sendable {
        var machine: WriteCoordination
        var object: VersionedObject?
        var writer: ActorID?
        var timer: UInt64?
        var ended = false
    }

    private let state: Mutex<State>
    private let ctx: CoordinatorContext
    private let vnode: Vnode
    private let partition: PartitionID
    private let key: [UInt8]
    private let sibling: Sibling
    private let context: VersionVector
    private let timeoutMillis: UInt32
    private let respond: @Sendable (WriteCoordination.WriteOutcome, WriteCoordinator.Written) -> Void
    private let ended: @Sendable () -> Void

    /// `vnode`: the local primary's (it serves without tasks); `replicas`: the key's primaries.
    init(ctx: CoordinatorContext, vnode: Vnode, operation: OperationKind, requirement: QuorumRequirement, partition: PartitionID,
         replicas: [ReplicaTarget], key: [UInt8], sibling: Sibling, context: VersionVector, timeoutMillis: UInt32, sloppy: Bool,
         respond: @escaping @Sendable (WriteCoordination.WriteOutcome, WriteCoordinator.Written) -> Void,
         ended: @escaping @Sendable () -> Void) {
        state = Mutex(State(machine: WriteCoordination(operation: operation, requirement: requirement, replicas: replicas,
                                                       timeoutMillis: timeoutMillis, sloppy: sloppy)))
        self.ctx = ctx
        self.vnode = vnode
        self.partition = partition
        self.key = key
        self.sibling = sibling
        self.context = context
        self.timeoutMillis = timeoutMillis
        self.respond = respond
        self.ended = ended
    }

    /// Starts the request with no replica known down (the caller checked).
    func start() {
        let steps = state.withLock { s in
            s.timer = scheduleDeadline(afterMillis: timeoutMillis) { [self] in handle(.deadline) }
            return Self.settle(&s, s.machine.start(down: [:]))
        }
        run(steps)
    }

    /// Whether an acknowledgement is decided and waits for hints to be kept (for tests).
    var isHoldingAnswer: Bool { state.withLock { $0.machine.isHoldingAcknowledgement } }

    private func handle(_ event: Event) {
        let steps = state.withLock { s -> Steps<Step> in
            guard !s.ended else { return Steps() }
            switch event {
            case .localStamped(let stamped):
                s.object = stamped.object
                s.writer = stamped.writer
                var steps = Self.settle(&s, s.machine.localStamped())
                steps.append(.untilDurable(stamped))
                return steps
            case .localApplied: return Self.settle(&s, s.machine.localApplied(durable: ctx.acknowledgesDurably))
            case .localFailed(let why): return Self.settle(&s, s.machine.localFailed(why))
            case .localRejected(let why): return Self.settle(&s, s.machine.localRejected(why))
            case .acked(let n, let durable): return Self.settle(&s, s.machine.replicaAcked(n, durable: durable))
            case .failed(let n, let outcome):
                ctx.metrics.replicaFailures.increment()
                return Self.settle(&s, s.machine.replicaFailed(n, outcome))
            case .deadline: return Self.settle(&s, s.machine.deadlinePassed())
            case .hintKept: return Self.settle(&s, s.machine.hintKept())
            }
        }
        run(steps)
    }

    /// The steps `directives` call for; the end once the machine finished (every replica
    /// reported or timed out, every hint kept).
    private static func settle(_ s: inout State, _ directives: [WriteCoordination.Directive]) -> Steps<Step> {
        var steps = Steps<Step>()
        for d in directives {
            switch d {
            case .respond(let outcome): steps.append(.answer(outcome, .init(object: s.object, writer: s.writer, receipt: s.machine.receipt)))
            case .finish: break
            default: steps.append(.perform(d, s.object))
            }
        }
        if s.machine.isFinished {
            s.ended = true
            steps.append(.end(timer: s.timer))
        }
        return steps
    }

    private func run(_ steps: Steps<Step>) {
        for step in steps {
            switch step {
            case .perform(let d, let object): perform(d, object)
            case .untilDurable(let stamped): untilDurable(stamped)
            case .answer(let outcome, let written): respond(outcome, written)
            case .end(let timer):
                if let timer { TimerQueue.shared.cancel(timer) }
                ended()
            }
        }
    }

    private func perform(_ d: WriteCoordination.Directive, _ object: VersionedObject?) {
        switch d {
        case .applyLocally:
            let started = vnode.stampSoon(key: key, sibling: sibling, context: context, actor: ctx.actor) { [self] result in
                switch result {
                case .success(let stamped): handle(.localStamped(stamped))
                case .failure(.rejected(let why)): handle(.localRejected(why))
                case .failure(let error): handle(.localFailed(error.description))
                }
            }
            if !started { handle(.localFailed("the vnode of partition \(partition.index) runs no closures")) }
        case .replicate(let nodes):
            guard let object else { return }
            // Only primaries take part: the request started with none down, so no fallback was chosen.
            let message = Message.replicaPut(ReplicaPut(partition: partition, key: key, object: object, fallback: false))
            for node in nodes {
                askSoon(ctx, node, message, timeoutMillis: timeoutMillis) { [self] answer in
                    switch answer.putAck {
                    case .success(let durable): handle(.acked(node, durable: durable))
                    case .failure(let outcome): handle(.failed(node, outcome))
                    }
                }
            }
        case .keepHint(let nodes):
            guard let object, let keep = ctx.keepHints else { return handle(.hintKept) }
            let (partition, key) = (partition, key)
            Task { [self] in
                await keep(nodes, partition, key, object)
                handle(.hintKept)
            }
        case .respond, .finish:
            break   // taken by `settle`
        }
    }

    /// Once the local copy is durable (and, while the partition is handed off, forwarded), it counts.
    private func untilDurable(_ stamped: Vnode.Stamped) {
        let waiting = vnode.whenDurable(stamped.token) { [self] error in
            if let error { return handle(.localFailed(error.description)) }
            if ctx.forwardsNothing(partition) { return handle(.localApplied) }
            guard let hook = ctx.afterLocalWrite else { return handle(.localApplied) }
            let (partition, key) = (partition, key)
            Task { [self] in
                guard await hook(partition, key, stamped.object) else {
                    return handle(.localFailed("partition \(partition.index) moved away from this node during the write and its new replicas did not take it"))
                }
                handle(.localApplied)
            }
        }
        if !waiting { handle(.localFailed("the vnode of partition \(partition.index) runs no closures")) }
    }
}

/// One client read on the direct path: performs `ReadCoordination`'s directives as
/// `ReadCoordinator` does, read repair included (bounded by `read_repair.max_inflight` like
/// the actor's).
///
/// Isolation: as `DirectWrite`. Lives until the machine finished (every replica answered or
/// the deadline passed, every repair reported); `ended` is called exactly once then.
final class DirectRead: Sendable {
    private enum Event: Sendable {
        case replied(NodeName, VersionedObject?, refilling: Bool, stale: Bool)
        case failed(NodeName, ReplicaOutcome)
        case repaired(NodeName)
        case repairFailed(NodeName, String)
        case repairSkipped(NodeName)
        case deadline
    }

    private enum Step: Sendable {
        case fetch([NodeName])
        case repair([NodeName], VersionedObject)
        /// Repairs the limiter refused.
        case skip([NodeName])
        case answer(ReadCoordination.ReadOutcome)
        case end(timer: UInt64?, release: Int)
    }

    private struct State: Sendable {
        var machine: ReadCoordination
        var timer: UInt64?
        /// Limiter slots held for asynchronous repairs.
        var held = 0
        var ended = false
    }

    private let state: Mutex<State>
    private let ctx: CoordinatorContext
    private let vnode: Vnode
    private let partition: PartitionID
    private let key: [UInt8]
    private let timeoutMillis: UInt32
    private let mode: ReadRepairMode
    private let respond: @Sendable (ReadCoordination.ReadOutcome) -> Void
    private let ended: @Sendable () -> Void

    /// `vnode`: the local primary's (it serves without tasks); `replicas`: the key's primaries.
    init(ctx: CoordinatorContext, vnode: Vnode, requirement: QuorumRequirement, partition: PartitionID, replicas: [ReplicaTarget],
         key: [UInt8], timeoutMillis: UInt32, sloppy: Bool, repair: ReadRepairMode,
         respond: @escaping @Sendable (ReadCoordination.ReadOutcome) -> Void, ended: @escaping @Sendable () -> Void) {
        state = Mutex(State(machine: ReadCoordination(requirement: requirement, replicas: replicas, timeoutMillis: timeoutMillis,
                                                      sloppy: sloppy, repair: repair)))
        self.ctx = ctx
        self.vnode = vnode
        self.partition = partition
        self.key = key
        self.timeoutMillis = timeoutMillis
        mode = repair
        self.respond = respond
        self.ended = ended
    }

    /// Starts the request with no replica known down (the caller checked).
    func start() {
        let steps = state.withLock { s in
            s.timer = scheduleDeadline(afterMillis: timeoutMillis) { [self] in handle(.deadline) }
            return settle(&s, s.machine.start(down: [:]))
        }
        run(steps)
    }

    private func handle(_ event: Event) {
        let steps = state.withLock { s -> Steps<Step> in
            guard !s.ended else { return Steps() }
            switch event {
            case .replied(let n, let o, let refilling, let stale): return settle(&s, s.machine.replied(n, o, refilling: refilling, stale: stale))
            case .failed(let n, let outcome):
                if n != ctx.me { ctx.metrics.replicaFailures.increment() }
                return settle(&s, s.machine.replicaFailed(n, outcome))
            case .repaired(let n):
                ctx.metrics.readRepairs.increment(outcome: "acknowledged")
                return settle(&s, s.machine.repairAcked(n))
            case .repairFailed(let n, let why):
                ctx.metrics.readRepairs.increment(outcome: "failed")
                ctx.logger.debug("read repair failed", metadata: ["node": "\(n)", "partition": "\(partition.index)", "error": "\(why)"])
                return settle(&s, s.machine.repairFailed(n, why))
            case .repairSkipped(let n): return settle(&s, s.machine.repairFailed(n, "skipped: read_repair.max_inflight reached"))
            case .deadline: return settle(&s, s.machine.deadlinePassed())
            }
        }
        run(steps)
    }

    private func settle(_ s: inout State, _ directives: [ReadCoordination.Directive]) -> Steps<Step> {
        var steps = Steps<Step>()
        for d in directives {
            switch d {
            case .fetch(let nodes): steps.append(.fetch(nodes))
            case .respond(let outcome): steps.append(.answer(outcome))
            case .repair(let targets, let object):
                // Asynchronous repairs are bounded node-wide; a blocking read's are part of its answer.
                if mode == .async {
                    guard ctx.readRepairs.acquire(targets.count) else {
                        ctx.metrics.readRepairs.increment(outcome: "skipped_overload", by: targets.count)
                        steps.append(.skip(targets))
                        continue
                    }
                    s.held += targets.count
                    ctx.metrics.readRepairsInflight.record(ctx.readRepairs.current)
                }
                steps.append(.repair(targets, object))
            case .finish:
                break
            }
        }
        if s.machine.isFinished {
            s.ended = true
            steps.append(.end(timer: s.timer, release: s.held))
            s.held = 0
        }
        return steps
    }

    private func run(_ steps: Steps<Step>) {
        for step in steps {
            switch step {
            case .fetch(let nodes): for n in nodes { fetch(n) }
            case .repair(let targets, let object): for n in targets { repair(n, object) }
            case .skip(let targets): for n in targets { handle(.repairSkipped(n)) }
            case .answer(let outcome): respond(outcome)
            case .end(let timer, let release):
                if let timer { TimerQueue.shared.cancel(timer) }
                if release > 0 {
                    ctx.readRepairs.release(release)
                    ctx.metrics.readRepairsInflight.record(ctx.readRepairs.current)
                }
                ended()
            }
        }
    }

    private func fetch(_ node: NodeName) {
        guard node == ctx.me else {
            let message = Message.replicaGet(ReplicaGet(partition: partition, key: key, fallback: false))
            return askSoon(ctx, node, message, timeoutMillis: timeoutMillis) { [self] answer in
                switch answer.getReply {
                case .success(let r): handle(.replied(node, r.object, refilling: r.refilling, stale: r.stale))
                case .failure(let outcome): handle(.failed(node, outcome))
                }
            }
        }
        let (refilling, stale) = (ctx.isRefilling(partition), ctx.isStale(partition))
        // Memory answers most reads of a primary copy: no hop to the store's thread.
        if case .answered(let object) = vnode.getInMemory(key) {
            ctx.metrics.memoryReadsCoordinator.increment()
            return handle(.replied(node, object, refilling: refilling, stale: stale))
        }
        let started = vnode.getSoon(key) { [self] result in
            switch result {
            case .success(let object): handle(.replied(node, object, refilling: refilling, stale: stale))
            case .failure(let error): handle(.failed(node, .failed(error.description)))
            }
        }
        if !started { handle(.failed(node, .failed("the vnode of partition \(partition.index) runs no closures"))) }
    }

    private func repair(_ node: NodeName, _ object: VersionedObject) {
        ctx.metrics.readRepairs.increment(outcome: "sent")
        guard node == ctx.me else {
            let message = Message.replicaPut(ReplicaPut(partition: partition, key: key, object: object))
            return askSoon(ctx, node, message, timeoutMillis: timeoutMillis) { [self] answer in
                switch answer.putAck {
                case .success: handle(.repaired(node))
                case .failure(let outcome): handle(.repairFailed(node, "\(outcome)"))
                }
            }
        }
        let started = vnode.mergeSoon(key: key, object: object) { [self] result in
            switch result {
            case .failure(let error): handle(.repairFailed(node, error.description))
            case .success(let merged):
                guard !ctx.forwardsNothing(partition), let hook = ctx.afterLocalWrite else { return handle(.repaired(node)) }
                let (partition, key) = (partition, key)
                Task { [self] in
                    guard await hook(partition, key, merged) else { return handle(.repairFailed(node, "the partition moved away during the repair")) }
                    handle(.repaired(node))
                }
            }
        }
        if !started { handle(.repairFailed(node, "the vnode of partition \(partition.index) runs no closures")) }
    }
}
