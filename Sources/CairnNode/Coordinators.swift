import CairnCore
import CairnWire
import Logging

/// What a coordinator needs from its node. Immutable; thread-safe. A class: every request
/// carries it, and a reference costs one retain where a struct of closures and existentials
/// costs one per field.
final class CoordinatorContext: Sendable {
    let me: NodeName
    let actor: ActorID
    let vnodes: VnodeTable
    let transport: any Transport
    let metrics: NodeMetrics
    let logger: Logger
    let clock: any NodeClock
    /// The failure detector's view: a dead replica is not sent to.
    let liveness: Liveness
    /// Runs after a write is applied locally and before it counts (handoff's forward); false:
    /// the local copy must not count (the partition moved away and its new replicas did not
    /// take the write).
    let afterLocalWrite: (@Sendable (PartitionID, [UInt8], VersionedObject) async -> Bool)?
    /// Whether `afterLocalWrite` has nothing to do for a partition now (no handoff of it
    /// running): a write served from callbacks then counts its local copy without a task.
    let forwardsNothing: @Sendable (PartitionID) -> Bool
    /// This node's fallback vnode for a partition, started if it runs none (sloppy quorum).
    let fallbackVnode: (@Sendable (PartitionID) async -> Vnode?)?
    /// Keeps a durable hint of a write for each primary that missed it.
    let keepHints: (@Sendable (_ for: [NodeName], PartitionID, [UInt8], VersionedObject) async -> Void)?
    /// Whether this node's acknowledgements mean a synced copy (`PartitionStore.acknowledgesDurably`).
    let acknowledgesDurably: Bool
    /// Bounds the asynchronous read repairs in flight (`read_repair.max_inflight`).
    let readRepairs: ReadRepairLimiter
    /// Whether this node's copy of a partition is refilling (lost with its disk, no exchange
    /// completed since): its "not found" is no evidence (`ReadCoordination`).
    let isRefilling: @Sendable (PartitionID) -> Bool
    /// Whether this node's copy of a partition may hold stale values (the node was away past
    /// the hint window, no exchange completed since): none of its answers is evidence.
    let isStale: @Sendable (PartitionID) -> Bool

    init(me: NodeName, actor: ActorID, vnodes: VnodeTable, transport: any Transport, metrics: NodeMetrics, logger: Logger,
         clock: any NodeClock, liveness: Liveness = Liveness(),
         afterLocalWrite: (@Sendable (PartitionID, [UInt8], VersionedObject) async -> Bool)? = nil,
         forwardsNothing: @escaping @Sendable (PartitionID) -> Bool = { _ in false },
         fallbackVnode: (@Sendable (PartitionID) async -> Vnode?)? = nil,
         keepHints: (@Sendable (_ for: [NodeName], PartitionID, [UInt8], VersionedObject) async -> Void)? = nil,
         acknowledgesDurably: Bool = false, readRepairs: ReadRepairLimiter = ReadRepairLimiter(limit: 256),
         isRefilling: @escaping @Sendable (PartitionID) -> Bool = { _ in false },
         isStale: @escaping @Sendable (PartitionID) -> Bool = { _ in false }) {
        self.me = me
        self.actor = actor
        self.vnodes = vnodes
        self.transport = transport
        self.metrics = metrics
        self.logger = logger
        self.clock = clock
        self.liveness = liveness
        self.afterLocalWrite = afterLocalWrite
        self.forwardsNothing = forwardsNothing
        self.fallbackVnode = fallbackVnode
        self.keepHints = keepHints
        self.acknowledgesDurably = acknowledgesDurably
        self.readRepairs = readRepairs
        self.isRefilling = isRefilling
        self.isStale = isStale
    }
}

/// Counts asynchronous read repairs in flight against `read_repair.max_inflight`. Thread-safe.
final class ReadRepairLimiter: Sendable {
    let limit: Int
    private let inflight = Locked(0)

    init(limit: Int) { self.limit = max(limit, 0) }

    /// Takes `n` slots; false (nothing taken) when they would exceed the limit.
    func acquire(_ n: Int) -> Bool {
        inflight.withLock { i in
            guard i + n <= limit else { return false }
            i += n
            return true
        }
    }

    func release(_ n: Int) { inflight.withLock { $0 = max($0 - n, 0) } }

    var current: Int { inflight.value }
}

extension CoordinatorContext {
    /// Replicas among `nodes` not to send to, with why: down links, and members the failure
    /// detector holds dead.
    func unreachable(_ nodes: [NodeName]) -> [NodeName: String] {
        transport.downReasons(nodes).merging(liveness.downReasons(nodes)) { link, _ in link }
    }

    /// Whether `unreachable` names none of the replicas other than this node's (without
    /// building the reasons).
    func reachesAll(_ replicas: [ReplicaTarget]) -> Bool {
        replicas.allSatisfy { $0.isLocal || (transport.reaches($0.node) && liveness.status(of: $0.node) != .dead) }
    }

    /// Sends one internode request and returns the reply, or what to record for that replica:
    /// an error reply becomes `.failed`, a connection failure keeps its delivery certainty.
    func ask(_ node: NodeName, _ message: Message, timeoutMillis: UInt32) async -> ReplicaAnswer {
        metrics.replicaRequests.increment()
        do throws(ConnectionError) {
            return ReplicaAnswer(.success(try await transport.send(to: node, message, timeoutMillis: timeoutMillis)))
        } catch {
            return ReplicaAnswer(.failure(error))
        }
    }
}

extension CoordinatorContext {
    /// The local vnode a request for `partition` uses in `role`: the primary one, or (a
    /// fallback) the fallback one, started when `start` and none runs.
    func localVnode(_ partition: PartitionID, fallback: Bool, start: Bool) async -> Vnode? {
        guard fallback else { return vnodes.vnode(for: partition) }
        if let v = vnodes.vnode(for: VnodeKey(partition: partition, role: .fallback)) { return v }
        return start ? await fallbackVnode?(partition) : nil
    }
}

/// A replica's expected reply, or what to record for it.
enum ReplicaResult<Value: Sendable>: Sendable {
    case success(Value)
    case failure(ReplicaOutcome)
}

/// A replica's reply, or what to record for it.
enum ReplicaAnswer: Sendable {
    case success(Message)
    case failure(ReplicaOutcome)

    /// What a request's result records: an error reply is `.failed`, a connection failure keeps
    /// its delivery certainty.
    init(_ result: Result<Message, ConnectionError>) {
        switch result {
        case .success(.error(let e)): self = .failure(.failed(e.message))
        case .success(let reply): self = .success(reply)
        case .failure(let error): self = .failure(ReplicaOutcome(error))
        }
    }

    /// A replica put's acknowledgement (whether its copy is durable), or what to record.
    var putAck: ReplicaResult<Bool> {
        switch self {
        case .success(.replicaPutAck(let durable)): .success(durable)
        case .success(let other): .failure(.failed("unexpected reply \(other.type)"))
        case .failure(let outcome): .failure(outcome)
        }
    }

    /// A replica get's answer, or what to record.
    var getReply: ReplicaResult<ReplicaGetReply> {
        switch self {
        case .success(.replicaGetReply(let r)): .success(r)
        case .success(let other): .failure(.failed("unexpected reply \(other.type)"))
        case .failure(let outcome): .failure(outcome)
        }
    }
}

extension TaskGroup {
    /// Adds a child that returns `event` at `deadline` on `clock` (or at once when cancelled).
    /// The deadline is an instant fixed by the caller, so it does not move with when the child
    /// task happens to start.
    mutating func addDeadline(at deadline: ContinuousClock.Instant, _ event: ChildTaskResult, on clock: any NodeClock) {
        addTask {
            do { try await clock.sleep(until: deadline) } catch { /* the request finished first */ }
            return event
        }
    }
}

/// Maps a connection failure to what the coordinator reports for that replica.
extension ReplicaOutcome {
    init(_ error: ConnectionError) {
        switch error {
        case .connectFailed(let s), .notSent(let s): self = .notSent(s)
        case .tooManyPending(let n): self = .notSent("\(n) requests pending on the connection")
        case .timedOut(let ms): self = .timedOut(afterMillis: ms)
        case .lost(let s): self = .connectionLost(s)
        case .abandoned: self = .connectionLost("the coordinator stopped waiting")
        case .protocolViolation(let s): self = .failed(s)
        }
    }
}

/// The shell of one write (put or delete): performs `WriteCoordination`'s directives.
///
/// Isolation: actor, one per request; it lives until the machine finishes (every replica answered
/// or the deadline passed), which may be after the client got its answer. Supervised by the
/// node's request group.
actor WriteCoordinator {
    private enum Event: Sendable {
        /// Stored, not yet durable: replicate now; the local copy counts once durable.
        case localStamped(VersionedObject, writer: ActorID, vnode: Vnode, token: DurabilityToken, space: PartitionID)
        case localApplied(VersionedObject, writer: ActorID)
        case localFailed(String)
        case localRejected(String)
        case acked(NodeName, durable: Bool)
        case failed(NodeName, ReplicaOutcome)
        case deadline
        case hintKept
    }

    private var machine: WriteCoordination
    private let ctx: CoordinatorContext
    private let partition: PartitionID
    private let key: [UInt8]
    private let sibling: Sibling
    private let context: VersionVector
    private let timeoutMillis: UInt32
    private let candidates: [ReplicaTarget]
    private var object: VersionedObject?
    /// The actor that stamped the write (the node's, or its fallback vnode's).
    private var writer: ActorID?

    /// `replicas`: the key's primaries, then its fallback candidates (`WriteCoordination`).
    init(ctx: CoordinatorContext, operation: OperationKind, requirement: QuorumRequirement, partition: PartitionID,
         replicas: [ReplicaTarget], key: [UInt8], sibling: Sibling, context: VersionVector, timeoutMillis: UInt32, sloppy: Bool) {
        machine = WriteCoordination(operation: operation, requirement: requirement, replicas: replicas, timeoutMillis: timeoutMillis,
                                    sloppy: sloppy)
        self.ctx = ctx
        self.partition = partition
        self.key = key
        self.sibling = sibling
        self.context = context
        self.timeoutMillis = timeoutMillis
        self.candidates = replicas
    }

    /// What `respond` gets beside the outcome: the stored object and the actor that stamped the
    /// write (once applied locally), and the durability receipt so far.
    struct Written: Sendable {
        var object: VersionedObject?
        var writer: ActorID?
        var receipt: [ReplicaAck]
    }

    /// Runs the request to its end (every replica answered or the deadline passed, every hint
    /// kept); `respond` is called exactly once, when the machine decides the outcome (an
    /// acknowledgement waits for the hints asked for before it: `WriteCoordination`).
    func run(respond: @escaping @Sendable (WriteCoordination.WriteOutcome, Written) -> Void) async {
        let deadline = ctx.clock.now().advanced(by: .milliseconds(Int64(timeoutMillis)))
        var directives = machine.start(down: ctx.unreachable(candidates.filter { !$0.isLocal }.map(\.node)))
        await withTaskGroup(of: Event.self) { group in
            group.addDeadline(at: deadline, .deadline, on: ctx.clock)
            while true {
                for d in directives {
                    if case .respond(let outcome) = d {
                        respond(outcome, Written(object: object, writer: writer, receipt: machine.receipt))
                    } else {
                        perform(d, group: &group)
                    }
                }
                if machine.isFinished { break }
                guard let event = await group.next() else { break }
                switch event {
                case .localStamped(let o, let w, let vnode, let token, let space):
                    object = o
                    writer = w
                    directives = machine.localStamped()
                    let (hook, key) = (ctx.afterLocalWrite, key)
                    group.addTask {
                        do throws(VnodeError) { try await vnode.untilDurable(token) } catch { return .localFailed(error.description) }
                        guard await hook?(space, key, o) != false else {
                            return .localFailed("partition \(space.home.index) moved away from this node during the write and its new replicas did not take it")
                        }
                        return .localApplied(o, writer: w)
                    }
                case .localApplied(let o, let w):
                    object = o
                    writer = w
                    directives = machine.localApplied(durable: ctx.acknowledgesDurably)
                case .localFailed(let why): directives = machine.localFailed(why)
                case .localRejected(let why): directives = machine.localRejected(why)
                case .acked(let n, let durable): directives = machine.replicaAcked(n, durable: durable)
                case .failed(let n, let outcome):
                    ctx.metrics.replicaFailures.increment()
                    directives = machine.replicaFailed(n, outcome)
                case .deadline: directives = machine.deadlinePassed()
                case .hintKept: directives = machine.hintKept()
                }
            }
            group.cancelAll()
        }
    }

    private func perform(_ d: WriteCoordination.Directive, group: inout TaskGroup<Event>) {
        switch d {
        case .applyLocally:
            let fallback = !(machine.replicas.first(where: \.isLocal)?.isPrimary ?? true)
            let (key, sibling, context, actor, partition, ctx) = (key, sibling, context, ctx.actor, partition, ctx)
            group.addTask {
                guard let vnode = await ctx.localVnode(partition, fallback: fallback, start: true) else {
                    return .localFailed("this node has no \(fallback ? "fallback " : "")vnode for partition \(partition.index)")
                }
                do throws(VnodeError) {
                    let (object, writer, token) = try await vnode.stampWithoutWaiting(key: key, sibling: sibling, context: context, actor: actor)
                    return .localStamped(object, writer: writer, vnode: vnode, token: token, space: fallback ? partition.fallbackSpace : partition)
                } catch {
                    if case .rejected(let why) = error { return .localRejected(why) }
                    return .localFailed(error.description)
                }
            }
        case .replicate(let nodes):
            guard let object else { return }
            for node in nodes {
                let fallback = !(machine.replicas.first { $0.node == node }?.isPrimary ?? true)
                let message = Message.replicaPut(ReplicaPut(partition: partition, key: key, object: object, fallback: fallback))
                let (ctx, ms) = (ctx, timeoutMillis)
                group.addTask {
                    switch await ctx.ask(node, message, timeoutMillis: ms).putAck {
                    case .success(let durable): .acked(node, durable: durable)
                    case .failure(let outcome): .failed(node, outcome)
                    }
                }
            }
        case .keepHint(let nodes):
            let (partition, key, object, keep) = (partition, key, object, ctx.keepHints)
            group.addTask {
                if let object, let keep { await keep(nodes, partition, key, object) }
                return .hintKept
            }
        case .respond:
            break   // answered by `run`
        case .finish:
            break
        }
    }
}

/// The shell of one read: performs `ReadCoordination`'s directives, read repair included.
///
/// Isolation: actor, one per request; lives until every replica answered (or the deadline
/// passed) and every repair it sent reported.
actor ReadCoordinator {
    private enum Event: Sendable {
        case replied(NodeName, VersionedObject?, refilling: Bool, stale: Bool = false)
        case failed(NodeName, ReplicaOutcome)
        case repaired(NodeName)
        case repairFailed(NodeName, String)
        case repairSkipped(NodeName)
        case deadline
    }

    private var machine: ReadCoordination
    private let ctx: CoordinatorContext
    private let partition: PartitionID
    private let key: [UInt8]
    private let timeoutMillis: UInt32
    private let candidates: [ReplicaTarget]
    private let mode: ReadRepairMode
    /// Limiter slots this request holds for asynchronous repairs.
    private var held = 0
    /// Events that happened while directives were performed (a local read memory answered),
    /// taken before waiting on the group.
    private var ready: [Event] = []

    init(ctx: CoordinatorContext, requirement: QuorumRequirement, partition: PartitionID, replicas: [ReplicaTarget],
         key: [UInt8], timeoutMillis: UInt32, sloppy: Bool, repair: ReadRepairMode) {
        machine = ReadCoordination(requirement: requirement, replicas: replicas, timeoutMillis: timeoutMillis, sloppy: sloppy, repair: repair)
        self.ctx = ctx
        self.partition = partition
        self.key = key
        self.timeoutMillis = timeoutMillis
        self.candidates = replicas
        mode = repair
    }

    func run(respond: @escaping @Sendable (ReadCoordination.ReadOutcome) -> Void) async {
        let deadline = ctx.clock.now().advanced(by: .milliseconds(Int64(timeoutMillis)))
        var directives = machine.start(down: ctx.unreachable(candidates.filter { !$0.isLocal }.map(\.node)))
        await withTaskGroup(of: Event.self) { group in
            group.addDeadline(at: deadline, .deadline, on: ctx.clock)
            while true {
                for d in directives { perform(d, group: &group, respond: respond) }
                if machine.isFinished { break }
                let next: Event
                if ready.isEmpty {
                    guard let event = await group.next() else { break }
                    next = event
                } else {
                    next = ready.removeFirst()
                }
                switch next {
                case .replied(let n, let o, let refilling, let stale): directives = machine.replied(n, o, refilling: refilling, stale: stale)
                case .failed(let n, let outcome):
                    if n != ctx.me { ctx.metrics.replicaFailures.increment() }
                    directives = machine.replicaFailed(n, outcome)
                case .repaired(let n):
                    ctx.metrics.readRepairs.increment(outcome: "acknowledged")
                    directives = machine.repairAcked(n)
                case .repairFailed(let n, let why):
                    ctx.metrics.readRepairs.increment(outcome: "failed")
                    ctx.logger.debug("read repair failed", metadata: ["node": "\(n)", "partition": "\(partition.index)", "error": "\(why)"])
                    directives = machine.repairFailed(n, why)
                case .repairSkipped(let n): directives = machine.repairFailed(n, "skipped: read_repair.max_inflight reached")
                case .deadline: directives = machine.deadlinePassed()
                }
            }
            group.cancelAll()
        }
        if held > 0 {
            ctx.readRepairs.release(held)
            held = 0
            ctx.metrics.readRepairsInflight.record(ctx.readRepairs.current)
        }
    }

    private func perform(_ d: ReadCoordination.Directive, group: inout TaskGroup<Event>,
                         respond: @Sendable (ReadCoordination.ReadOutcome) -> Void) {
        switch d {
        case .fetch(let nodes):
            for node in nodes {
                let fallback = !(machine.replicas.first { $0.node == node }?.isPrimary ?? true)
                if node == ctx.me {
                    // Memory answers most reads of a primary copy: no hop to the store's thread.
                    if !fallback, let vnode = ctx.vnodes.vnode(for: partition), case .answered(let object) = vnode.getInMemory(key) {
                        ctx.metrics.memoryReadsCoordinator.increment()
                        ready.append(.replied(node, object, refilling: ctx.isRefilling(partition), stale: ctx.isStale(partition)))
                        continue
                    }
                    let (ctx, partition, key) = (ctx, partition, key)
                    group.addTask {
                        guard let vnode = await ctx.localVnode(partition, fallback: fallback, start: false) else {
                            // A fallback that holds nothing for the partition has no copy: not found.
                            if fallback { return .replied(node, nil, refilling: false) }
                            return .failed(node, .failed("no local vnode for partition \(partition.index)"))
                        }
                        let (refilling, stale) = (!fallback && ctx.isRefilling(partition), !fallback && ctx.isStale(partition))
                        do throws(VnodeError) { return .replied(node, try await vnode.get(key), refilling: refilling, stale: stale) } catch {
                            return .failed(node, .failed(error.description))
                        }
                    }
                } else {
                    let message = Message.replicaGet(ReplicaGet(partition: partition, key: key, fallback: fallback))
                    let (ctx, ms) = (ctx, timeoutMillis)
                    group.addTask {
                        switch await ctx.ask(node, message, timeoutMillis: ms).getReply {
                        case .success(let r): .replied(node, r.object, refilling: r.refilling && !fallback, stale: r.stale && !fallback)
                        case .failure(let outcome): .failed(node, outcome)
                        }
                    }
                }
            }
        case .repair(let targets, let object):
            // Asynchronous repairs are bounded node-wide; a blocking read's are part of its answer.
            if mode == .async {
                guard ctx.readRepairs.acquire(targets.count) else {
                    ctx.metrics.readRepairs.increment(outcome: "skipped_overload", by: targets.count)
                    for n in targets { group.addTask { .repairSkipped(n) } }
                    return
                }
                held += targets.count
                ctx.metrics.readRepairsInflight.record(ctx.readRepairs.current)
            }
            for node in targets {
                ctx.metrics.readRepairs.increment(outcome: "sent")
                if node == ctx.me {
                    let (ctx, partition, key) = (ctx, partition, key)
                    group.addTask {
                        guard let vnode = ctx.vnodes.vnode(for: partition) else { return .repairFailed(node, "no local vnode") }
                        do throws(VnodeError) {
                            let merged = try await vnode.merge(key: key, object: object)
                            guard await ctx.afterLocalWrite?(partition, key, merged) != false else {
                                return .repairFailed(node, "the partition moved away during the repair")
                            }
                            return .repaired(node)
                        } catch { return .repairFailed(node, error.description) }
                    }
                } else {
                    let message = Message.replicaPut(ReplicaPut(partition: partition, key: key, object: object))
                    let (ctx, ms) = (ctx, timeoutMillis)
                    group.addTask {
                        switch await ctx.ask(node, message, timeoutMillis: ms).putAck {
                        case .success: .repaired(node)
                        case .failure(let outcome): .repairFailed(node, "\(outcome)")
                        }
                    }
                }
            }
        case .respond(let outcome):
            respond(outcome)
        case .finish:
            break
        }
    }
}
