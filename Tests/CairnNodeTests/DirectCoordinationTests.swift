import Testing
@testable import CairnNode
import CairnCore
import CairnStorage
import CairnWire
import Logging
import Synchronization

/// A network the test answers by hand: `sendSoon` records each request with its callback.
final class ScriptedTransport: Transport {
    struct Request: Sendable {
        let node: NodeName
        let message: Message
        let done: @Sendable (Result<Message, ConnectionError>) -> Void
    }
    private let box = Mutex<[Request]>([])

    var requests: [Request] { box.withLock { $0 } }

    /// Answers the oldest request to `node` still unanswered; false if there is none.
    @discardableResult
    func answer(_ node: NodeName, _ result: Result<Message, ConnectionError>) -> Bool {
        let request = box.withLock { r -> Request? in
            guard let i = r.firstIndex(where: { $0.node == node }) else { return nil }
            return r.remove(at: i)
        }
        request?.done(result)
        return request != nil
    }

    func sendSoon(to node: NodeName, _ message: Message, timeoutMillis: UInt32,
                  _ done: @escaping @Sendable (Result<Message, ConnectionError>) -> Void) -> Bool {
        box.withLock { $0.append(Request(node: node, message: message, done: done)) }
        return true
    }

    func send(to node: NodeName, _ message: Message, timeoutMillis: UInt32) async throws(ConnectionError) -> Message {
        Issue.record("a direct request used send")
        throw .notSent("scripted: sendSoon only")
    }
    func cast(to node: NodeName, _ message: Message) {}
    func openStream(to node: NodeName, kind: StreamKind, header: [UInt8], timeoutMillis: UInt32) async throws(StreamError) -> any OutboundStream {
        throw .connection(.notSent("scripted"))
    }
    func downReasons(_ nodes: [NodeName]) -> [NodeName: String] { [:] }
    var peerCount: Int { 2 }
    var upCount: Int { 2 }
    var triedEveryPeer: Bool { true }
    func dropConnections() {}
}

/// Counts calls, from any thread.
final class Tally: Sendable {
    private let n = Atomic<Int>(0)
    func add() { n.wrappingAdd(1, ordering: .relaxed) }
    var count: Int { n.load(ordering: .relaxed) }
}

/// The direct path's shells (`DirectWrite`, `DirectRead`) on a vnode with a store thread and a
/// gated sync, replicas answered by hand: the answers, hints, repairs and ends the task path's
/// actors give, in the order the protocol requires.
@Suite(.timeLimit(.minutes(2))) struct DirectCoordinationTests {
    let n1: NodeName
    let n2: NodeName
    let n3: NodeName
    let partition = PartitionID(3)   // `runningVnode`'s

    init() throws {
        (n1, n2, n3) = (try NodeName("n1"), try NodeName("n2"), try NodeName("n3"))
    }

    private var replicas: [ReplicaTarget] {
        [n1, n2, n3].map { ReplicaTarget(node: $0, address: "\($0):1", isPrimary: true, isLocal: $0 == n1) }
    }

    private func context(_ vnode: Vnode, _ net: ScriptedTransport, repairs: ReadRepairLimiter = ReadRepairLimiter(limit: 8),
                         keepHints: (@Sendable ([NodeName], PartitionID, [UInt8], VersionedObject) async -> Void)? = nil) -> CoordinatorContext {
        let table = VnodeTable()
        table.insert(vnode)
        return CoordinatorContext(me: n1, actor: ActorID(node: "n1", epoch: 1), vnodes: table, transport: net,
                                  metrics: NodeMetrics(maxInflight: 10), logger: Logger(label: "t"), clock: SystemClock(),
                                  forwardsNothing: { _ in true }, keepHints: keepHints, acknowledgesDurably: true, readRepairs: repairs)
    }

    private func write(_ ctx: CoordinatorContext, _ vnode: Vnode, w: Int, timeoutMillis: UInt32 = 60_000,
                       outcome: Answer<(WriteCoordination.WriteOutcome, WriteCoordinator.Written)>, ends: Tally) throws -> DirectWrite {
        DirectWrite(ctx: ctx, vnode: vnode, operation: .put, requirement: try QuorumRequirement(name: "W", quorum: .count(w), primary: .count(0), n: 3),
                    partition: partition, replicas: replicas, key: [1], sibling: Sibling(value: [42], timestampMillis: 1),
                    context: VersionVector(), timeoutMillis: timeoutMillis, sloppy: true,
                    respond: { outcome.set(($0, $1)) }, ended: { ends.add() })
    }

    /// The stamped object goes to the replicas while the local copy syncs; the answer comes at W
    /// with the receipt in arrival order; a replica that fails after the answer gets a hint, and
    /// the request ends only once every replica reported.
    @Test func aWriteReplicatesBeforeItsOwnSyncAndAnswersAtW() async throws {
        let backend = GatedBackend(thread: ThreadExecutor(label: "t-store"))
        let (vnode, sup, task) = try await runningVnode(backend)
        let net = ScriptedTransport()
        let kept = Mutex<[[NodeName]]>([])
        let ctx = context(vnode, net) { targets, _, _, _ in kept.withLock { $0.append(targets) } }
        let outcome = Answer<(WriteCoordination.WriteOutcome, WriteCoordinator.Written)>()
        let ends = Tally()
        try write(ctx, vnode, w: 2, outcome: outcome, ends: ends).start()

        try await settle("the write went to both replicas") { net.requests.count == 2 }
        try await settle("the local copy waits for its sync") { backend.waiting == 1 }
        let sent = net.requests.map(\.message)
        guard case .replicaPut(let put)? = sent.first else { Issue.record("sent \(sent)"); return }
        #expect(put.object.values.map(\.value) == [[42]] && !put.fallback)
        net.answer(n2, .success(.replicaPutAck(durable: true)))
        #expect(outcome.value == nil, "answered with one acknowledgement of two")
        backend.sync()
        try await settle("answered") { outcome.value != nil }
        let (o, written) = try #require(outcome.value)
        #expect(o == .acknowledged)
        #expect(written.receipt.map(\.node) == ["n2", "n1"] && written.receipt.allSatisfy(\.durable))
        #expect(written.writer == ActorID(node: "n1", epoch: 1) && written.object == put.object)
        #expect(ends.count == 0, "ended with n3 still to answer")
        net.answer(n3, .failure(.notSent("n3 is down")))
        try await settle("ended") { ends.count == 1 }
        #expect(kept.withLock { $0 } == [[n3]])
        #expect(try await vnode.get([1]) == put.object)
        sup.finish(); task.cancel(); try await task.value
    }

    /// A primary that failed before the quorum was met gets its hint kept before the
    /// acknowledgement goes out (a coordinator crashing right after answering still has it).
    @Test func anAcknowledgementWaitsForTheHintsKeptBeforeIt() async throws {
        let backend = GatedBackend(thread: ThreadExecutor(label: "t-store"))
        let (vnode, sup, task) = try await runningVnode(backend)
        let net = ScriptedTransport()
        let (gate, open) = AsyncStream.makeStream(of: Void.self)
        let kept = Mutex<[[NodeName]]>([])
        let ctx = context(vnode, net) { targets, _, _, _ in
            kept.withLock { $0.append(targets) }
            for await _ in gate { break }
        }
        let outcome = Answer<(WriteCoordination.WriteOutcome, WriteCoordinator.Written)>()
        let ends = Tally()
        let w = try write(ctx, vnode, w: 2, outcome: outcome, ends: ends)
        w.start()
        try await settle("the write went to both replicas") { net.requests.count == 2 }
        net.answer(n3, .failure(.timedOut(afterMillis: 5)))
        try await settle("the hint is being kept") { kept.withLock { $0 } == [[n3]] }
        net.answer(n2, .success(.replicaPutAck(durable: true)))
        try await settle("the local copy waits for its sync") { backend.waiting == 1 }
        backend.sync()
        try await settle("W met, the answer held for the hint") { w.isHoldingAnswer }
        #expect(outcome.value == nil)
        open.yield()
        try await settle("answered once the hint was kept") { outcome.value != nil }
        #expect(outcome.value?.0 == .acknowledged)
        try await settle("ended") { ends.count == 1 }
        sup.finish(); task.cancel(); try await task.value
    }

    /// Silent replicas and a local sync that has not completed: at the deadline the write
    /// answers not reached with no acknowledgement, hints both replicas, and ends; what comes
    /// after (the sync, a late reply) changes nothing.
    @Test func aWriteWithSilentReplicasAnswersAtItsDeadline() async throws {
        let backend = GatedBackend(thread: ThreadExecutor(label: "t-store"))
        let (vnode, sup, task) = try await runningVnode(backend)
        let net = ScriptedTransport()
        let kept = Mutex<Set<NodeName>>([])
        let ctx = context(vnode, net) { targets, _, _, _ in kept.withLock { $0.formUnion(targets) } }
        let outcome = Answer<(WriteCoordination.WriteOutcome, WriteCoordinator.Written)>()
        let ends = Tally()
        try write(ctx, vnode, w: 2, timeoutMillis: 50, outcome: outcome, ends: ends).start()
        try await settle("answered at the deadline") { outcome.value != nil }
        guard case .quorumFailed(let f)? = outcome.value?.0 else { Issue.record("expected not reached: \(String(describing: outcome.value))"); return }
        #expect(f.kind == .notReached && f.achieved == 0)
        try await settle("ended") { ends.count == 1 }
        #expect(kept.withLock { $0 } == [n2, n3])
        try await settle("the local copy waits for its sync") { backend.waiting == 1 }
        backend.sync()
        net.answer(n2, .success(.replicaPutAck(durable: true)))
        try await settle("the local copy is durable") { (try? await vnode.get([1])) != nil }
        #expect(ends.count == 1 && outcome.value?.0 == .quorumFailed(f))
        sup.finish(); task.cancel(); try await task.value
    }

    /// A read answers with the merge of R answers, repairs the replica whose copy differed once
    /// every answer is in, holds a `read_repair.max_inflight` slot until the repair reports, and
    /// ends after it.
    @Test func aReadAnswersAtRAndRepairsAStaleReplica() async throws {
        let backend = GatedBackend(thread: ThreadExecutor(label: "t-store"))
        let (vnode, sup, task) = try await runningVnode(backend)
        var stored = VersionedObject()
        try stored.update(context: VersionVector(), value: Sibling(value: [7], timestampMillis: 1), actor: ActorID(node: "n2", epoch: 1))
        let merging = Task { [stored] in try await vnode.merge(key: [1], object: stored) }
        try await settle("the local copy waits for its sync") { backend.waiting == 1 }
        backend.sync()
        _ = try await merging.value

        let net = ScriptedTransport()
        let repairs = ReadRepairLimiter(limit: 8)
        let ctx = context(vnode, net, repairs: repairs)
        let outcome = Answer<ReadCoordination.ReadOutcome>()
        let ends = Tally()
        DirectRead(ctx: ctx, vnode: vnode, requirement: try QuorumRequirement(name: "R", quorum: .count(2), primary: .count(0), n: 3),
                   partition: partition, replicas: replicas, key: [1], timeoutMillis: 60_000, sloppy: true, repair: .async,
                   respond: { outcome.set($0) }, ended: { ends.add() }).start()
        try await settle("both replicas asked") { net.requests.count == 2 }
        net.answer(n2, .success(.replicaGetReply(ReplicaGetReply(object: nil))))
        try await settle("answered") { outcome.value != nil }
        #expect(outcome.value == .answered(stored))
        #expect(ends.count == 0)
        net.answer(n3, .success(.replicaGetReply(ReplicaGetReply(object: stored))))
        let repair = try #require(net.requests.first)
        #expect(repair.node == n2 && repair.message == .replicaPut(ReplicaPut(partition: partition, key: [1], object: stored)))
        #expect(repairs.current == 1)
        net.answer(n2, .success(.replicaPutAck(durable: true)))
        #expect(ends.count == 1)
        #expect(repairs.current == 0)
        sup.finish(); task.cancel(); try await task.value
    }
}
