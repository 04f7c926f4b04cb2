import CairnCore
import CairnWire
import Logging

/// What a coordinator needs from its node. Immutable; thread-safe.
struct CoordinatorContext: Sendable {
    let me: NodeName
    let actor: ActorID
    let vnodes: VnodeTable
    let transport: any Transport
    let metrics: NodeMetrics
    let logger: Logger
    let clock: any NodeClock
    /// The failure detector's view: a dead replica is not sent to.
    var liveness = Liveness()
    /// Runs after a write is applied locally and before it counts (handoff's forward); false:
    /// the local copy must not count (the partition moved away and its new replicas did not
    /// take the write).
    var afterLocalWrite: (@Sendable (PartitionID, [UInt8], VersionedObject) async -> Bool)?
}

extension CoordinatorContext {
    /// Replicas among `nodes` not to send to, with why: down links, and members the failure
    /// detector holds dead.
    func unreachable(_ nodes: [NodeName]) -> [NodeName: String] {
        transport.downReasons(nodes).merging(liveness.downReasons(nodes)) { link, _ in link }
    }

    /// Sends one internode request and returns the reply, or what to record for that replica:
    /// an error reply becomes `.failed`, a connection failure keeps its delivery certainty.
    func ask(_ node: NodeName, _ message: Message, timeoutMillis: UInt32) async -> ReplicaAnswer {
        metrics.replicaRequests.increment()
        do throws(ConnectionError) {
            let reply = try await transport.send(to: node, message, timeoutMillis: timeoutMillis)
            if case .error(let e) = reply { return .failure(.failed(e.message)) }
            return .success(reply)
        } catch {
            return .failure(ReplicaOutcome(error))
        }
    }
}

/// A replica's reply, or what to record for it.
enum ReplicaAnswer: Sendable {
    case success(Message)
    case failure(ReplicaOutcome)
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
        case localApplied(VersionedObject)
        case localFailed(String)
        case localRejected(String)
        case acked(NodeName)
        case failed(NodeName, ReplicaOutcome)
        case deadline
    }

    private var machine: WriteCoordination
    private let ctx: CoordinatorContext
    private let partition: PartitionID
    private let key: [UInt8]
    private let sibling: Sibling
    private let context: VersionVector
    private let timeoutMillis: UInt32
    private let replicas: [ReplicaTarget]
    private var object: VersionedObject?

    init(ctx: CoordinatorContext, operation: OperationKind, requirement: QuorumRequirement, partition: PartitionID,
         replicas: [ReplicaTarget], key: [UInt8], sibling: Sibling, context: VersionVector, timeoutMillis: UInt32) {
        machine = WriteCoordination(operation: operation, requirement: requirement, replicas: replicas, timeoutMillis: timeoutMillis)
        self.ctx = ctx
        self.partition = partition
        self.key = key
        self.sibling = sibling
        self.context = context
        self.timeoutMillis = timeoutMillis
        self.replicas = replicas
    }

    /// Runs the request to its end; `respond` is called exactly once, as soon as the outcome is known.
    func run(respond: @escaping @Sendable (WriteCoordination.WriteOutcome, VersionedObject?) -> Void) async {
        let deadline = ctx.clock.now().advanced(by: .milliseconds(Int64(timeoutMillis)))
        var directives = machine.start(down: ctx.unreachable(replicas.filter { !$0.isLocal }.map(\.node)))
        await withTaskGroup(of: Event.self) { group in
            group.addDeadline(at: deadline, .deadline, on: ctx.clock)
            while true {
                for d in directives { perform(d, group: &group, respond: respond) }
                if machine.isFinished { break }
                guard let event = await group.next() else { break }
                switch event {
                case .localApplied(let o):
                    object = o
                    directives = machine.localApplied()
                case .localFailed(let why): directives = machine.localFailed(why)
                case .localRejected(let why): directives = machine.localRejected(why)
                case .acked(let n): directives = machine.replicaAcked(n)
                case .failed(let n, let outcome):
                    ctx.metrics.replicaFailures.increment()
                    directives = machine.replicaFailed(n, outcome)
                case .deadline: directives = machine.deadlinePassed()
                }
            }
            group.cancelAll()
        }
    }

    private func perform(_ d: WriteCoordination.Directive, group: inout TaskGroup<Event>,
                         respond: @Sendable (WriteCoordination.WriteOutcome, VersionedObject?) -> Void) {
        switch d {
        case .applyLocally:
            guard let vnode = ctx.vnodes.vnode(for: partition) else {
                group.addTask { [partition] in .localFailed("this node has no vnode for partition \(partition.index)") }
                return
            }
            let (key, sibling, context, actor, hook, partition) = (key, sibling, context, ctx.actor, ctx.afterLocalWrite, partition)
            group.addTask {
                do throws(VnodeError) {
                    let object = try await vnode.coordinate(key: key, sibling: sibling, context: context, actor: actor)
                    guard await hook?(partition, key, object) != false else {
                        return .localFailed("partition \(partition.index) moved away from this node during the write and its new replicas did not take it")
                    }
                    return .localApplied(object)
                } catch {
                    if case .rejected(let why) = error { return .localRejected(why) }
                    return .localFailed(error.description)
                }
            }
        case .replicate(let nodes):
            guard let object else { return }
            let message = Message.replicaPut(ReplicaPut(partition: partition, key: key, object: object))
            for node in nodes {
                let (ctx, ms) = (ctx, timeoutMillis)
                group.addTask {
                    switch await ctx.ask(node, message, timeoutMillis: ms) {
                    case .success(.replicaPutAck): .acked(node)
                    case .success(let other): .failed(node, .failed("unexpected reply \(other.type)"))
                    case .failure(let outcome): .failed(node, outcome)
                    }
                }
            }
        case .respond(let outcome):
            respond(outcome, object)
        case .finish:
            break
        }
    }
}

/// The shell of one read: performs `ReadCoordination`'s directives.
///
/// Isolation: actor, one per request; lives until every replica answered or the deadline passed.
actor ReadCoordinator {
    private enum Event: Sendable {
        case replied(NodeName, VersionedObject?)
        case failed(NodeName, ReplicaOutcome)
        case deadline
    }

    private var machine: ReadCoordination
    private let ctx: CoordinatorContext
    private let partition: PartitionID
    private let key: [UInt8]
    private let timeoutMillis: UInt32
    private let replicas: [ReplicaTarget]

    init(ctx: CoordinatorContext, requirement: QuorumRequirement, partition: PartitionID, replicas: [ReplicaTarget],
         key: [UInt8], timeoutMillis: UInt32) {
        machine = ReadCoordination(requirement: requirement, replicas: replicas, timeoutMillis: timeoutMillis)
        self.ctx = ctx
        self.partition = partition
        self.key = key
        self.timeoutMillis = timeoutMillis
        self.replicas = replicas
    }

    func run(respond: @escaping @Sendable (ReadCoordination.ReadOutcome) -> Void) async {
        let deadline = ctx.clock.now().advanced(by: .milliseconds(Int64(timeoutMillis)))
        var directives = machine.start(down: ctx.unreachable(replicas.filter { !$0.isLocal }.map(\.node)))
        await withTaskGroup(of: Event.self) { group in
            group.addDeadline(at: deadline, .deadline, on: ctx.clock)
            while true {
                for d in directives { perform(d, group: &group, respond: respond) }
                if machine.isFinished { break }
                guard let event = await group.next() else { break }
                switch event {
                case .replied(let n, let o): directives = machine.replied(n, o)
                case .failed(let n, let outcome):
                    if n != ctx.me { ctx.metrics.replicaFailures.increment() }
                    directives = machine.replicaFailed(n, outcome)
                case .deadline: directives = machine.deadlinePassed()
                }
            }
            group.cancelAll()
        }
    }

    private func perform(_ d: ReadCoordination.Directive, group: inout TaskGroup<Event>,
                         respond: @Sendable (ReadCoordination.ReadOutcome) -> Void) {
        switch d {
        case .fetch(let nodes):
            for node in nodes {
                if node == ctx.me {
                    guard let vnode = ctx.vnodes.vnode(for: partition) else {
                        group.addTask { [partition] in .failed(node, .failed("no local vnode for partition \(partition.index)")) }
                        continue
                    }
                    let key = key
                    group.addTask {
                        do throws(VnodeError) { return .replied(node, try await vnode.get(key)) } catch { return .failed(node, .failed(error.description)) }
                    }
                } else {
                    let message = Message.replicaGet(ReplicaGet(partition: partition, key: key))
                    let (ctx, ms) = (ctx, timeoutMillis)
                    group.addTask {
                        switch await ctx.ask(node, message, timeoutMillis: ms) {
                        case .success(.replicaGetReply(let r)): .replied(node, r.object)
                        case .success(let other): .failed(node, .failed("unexpected reply \(other.type)"))
                        case .failure(let outcome): .failed(node, outcome)
                        }
                    }
                }
            }
        case .respond(let outcome):
            respond(outcome)
        case .finish:
            // `divergent` replicas are where read repair (a later capability) will write the merge.
            break
        }
    }
}
