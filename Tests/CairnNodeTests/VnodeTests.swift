import Testing
@testable import CairnNode
import CairnCore
import Logging
import Synchronization
import CairnStorage

/// A backend wrapper that fails writes while `failWrites` is set and can store raw bytes.
final class FaultyBackend: PartitionStore {
    let inner = MemoryBackend()
    let failWrites = Atomic<Bool>(false)
    var isPersistent: Bool { false }

    struct InjectedFault: Error, CustomStringConvertible { var description: String { "injected EIO" } }

    func get(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? { try inner.get(partition: partition, key: key) }
    func getDurable(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? { try inner.getDurable(partition: partition, key: key) }
    var lastApplied: DurabilityToken { inner.lastApplied }

    func apply(partition: PartitionID, key: [UInt8], value: [UInt8]) throws -> DurabilityToken {
        if failWrites.load(ordering: .relaxed) { throw InjectedFault() }
        return try inner.apply(partition: partition, key: key, value: value)
    }

    func apply(partition: PartitionID, batch: [(key: [UInt8], value: [UInt8])]) throws -> DurabilityToken {
        if failWrites.load(ordering: .relaxed) { throw InjectedFault() }
        return try inner.apply(partition: partition, batch: batch)
    }

    func delete(partition: PartitionID, keys: [[UInt8]]) throws -> DurabilityToken {
        if failWrites.load(ordering: .relaxed) { throw InjectedFault() }
        return try inner.delete(partition: partition, keys: keys)
    }

    func executor(for partition: PartitionID) -> (any SerialExecutor)? { nil }
    func waitDurable(_ token: DurabilityToken) async throws {}
    func fold<A: Sendable>(partition: PartitionID, after: [UInt8]?, into initial: A,
                           _ visit: @Sendable (inout A, [UInt8], [UInt8]) throws -> FoldStep) async throws -> PartitionFold<A> {
        try await inner.fold(partition: partition, after: after, into: initial, visit)
    }
    func count(partition: PartitionID) async throws -> Int { try await inner.count(partition: partition) }
    func drop(partition: PartitionID) async throws { try await inner.drop(partition: partition) }
    func close() async throws {}
}

/// Yields until `condition` holds; bounded by a step count, not by time (for waits on work that
/// is already runnable, never on real time passing).
func settle(_ what: String, _ condition: () async -> Bool) async throws {
    for _ in 0..<100_000 {
        if await condition() { return }
        await Task.yield()
    }
    Issue.record("never: \(what)")
    throw CancellationError()
}

/// A vnode under a fast-restarting supervisor, serving.
func runningVnode(_ backend: any PartitionStore, limits: Limits = Limits()) async throws -> (Vnode, Supervisor, Task<Void, any Error>) {
    let vnode = Vnode(partition: PartitionID(3), backend: backend, limits: limits, metrics: NodeMetrics(maxInflight: 10), logger: Logger(label: "t"))
    var policy = RestartPolicy()
    policy.backoffMin = .milliseconds(1)
    policy.backoffMax = .milliseconds(2)
    policy.maxRestarts = 3
    let sup = Supervisor(name: "t", policy: policy, logger: Logger(label: "t"))
    sup.spawn(vnode)
    let task = Task { try await sup.run() }
    try await waitServing(vnode)
    return (vnode, sup, task)
}

func waitServing(_ v: Vnode) async throws {
    for _ in 0..<2000 {
        if await v.isServing { return }
        try await Task.sleep(for: .milliseconds(1))
    }
    Issue.record("vnode never started serving")
}

@Suite struct VnodeTests {
    let actor = ActorID(node: "n1", epoch: 5)

    @Test func coordinateAndMergeFollowDVVSemantics() async throws {
        let (v, sup, task) = try await runningVnode(MemoryBackend())
        let first = try await v.coordinate(key: [1], sibling: Sibling(value: [1], timestampMillis: 1), context: VersionVector(), actor: actor)
        let stale = first.context
        _ = try await v.coordinate(key: [1], sibling: Sibling(value: [2], timestampMillis: 2), context: stale, actor: actor)
        _ = try await v.coordinate(key: [1], sibling: Sibling(value: [3], timestampMillis: 3), context: stale, actor: actor)
        let now = try #require(try await v.get([1]))
        #expect(Set(now.values.map(\.value)) == [[2], [3]])
        // A replica's object with a concurrent write from another actor merges in as a sibling.
        var remote = VersionedObject()
        try remote.update(context: VersionVector(), value: Sibling(value: [9], timestampMillis: 4), actor: ActorID(node: "n2", epoch: 1))
        let merged = try await v.merge(key: [1], object: remote)
        #expect(Set(merged.values.map(\.value)) == [[2], [3], [9]])
        sup.finish(); task.cancel(); try await task.value
    }

    /// A forged context counter (2^48 passes the wire decoder) is refused before anything is
    /// stored; stored, it would have made the next write of that actor overflow the object's
    /// counter limit and every replica read the key as corrupt.
    @Test func aForgedContextCounterIsRefusedAndTheKeyStaysUsable() async throws {
        let (v, sup, task) = try await runningVnode(MemoryBackend())
        let n2 = ActorID(node: "n2", epoch: 1)
        let limits = Limits()
        for counter in [limits.maxDotCounter, limits.maxDotCounter / 2 + 1] {
            await #expect(throws: VnodeError.rejected("context counter \(counter) of \(n2) is beyond any this store issues")) {
                _ = try await v.coordinate(key: [5], sibling: Sibling(value: [1], timestampMillis: 1), context: VersionVector([(n2, counter)]), actor: actor)
            }
        }
        #expect(try await v.get([5]) == nil, "nothing stored")
        let ok = try await v.coordinate(key: [5], sibling: Sibling(value: [2], timestampMillis: 1), context: VersionVector([(n2, 3)]), actor: actor)
        _ = try await v.coordinate(key: [5], sibling: Sibling(value: [3], timestampMillis: 2), context: ok.context, actor: n2)
        #expect(try await v.get([5])?.values.map(\.value) == [[3]])
        sup.finish(); task.cancel(); try await task.value
    }

    @Test func siblingsAreCappedNotRefused() async throws {
        var limits = Limits()
        limits.maxSiblings = 3
        let (v, sup, task) = try await runningVnode(MemoryBackend(), limits: limits)
        for i in 0..<10 {
            _ = try await v.coordinate(key: [7], sibling: Sibling(value: [UInt8(i)], timestampMillis: 1), context: VersionVector(), actor: actor)
        }
        let o = try #require(try await v.get([7]))
        #expect(o.valueCount == 3)
        #expect(Set(o.values.map(\.value)) == [[7], [8], [9]])
        sup.finish(); task.cancel(); try await task.value
    }

    @Test func aStorageFailureRestartsTheVnodeWhichThenServesAgain() async throws {
        let backend = FaultyBackend()
        let (v, sup, task) = try await runningVnode(backend)
        _ = try await v.coordinate(key: [1], sibling: Sibling(value: [1], timestampMillis: 1), context: VersionVector(), actor: actor)
        backend.failWrites.store(true, ordering: .relaxed)
        await #expect(throws: VnodeError.self) {
            try await v.coordinate(key: [1], sibling: Sibling(value: [2], timestampMillis: 2), context: VersionVector(), actor: actor)
        }
        backend.failWrites.store(false, ordering: .relaxed)
        try await waitServing(v)
        let o = try #require(try await v.get([1]))
        #expect(o.values.map(\.value) == [[1]])   // the failed write was not applied
        _ = try await v.coordinate(key: [1], sibling: Sibling(value: [3], timestampMillis: 3), context: o.context, actor: actor)
        #expect(try await v.get([1])?.values.map(\.value) == [[3]])
        sup.finish(); task.cancel(); try await task.value
    }

    @Test func aCorruptStoredObjectIsNeverServed() async throws {
        let backend = FaultyBackend()
        let (v, sup, task) = try await runningVnode(backend)
        _ = try backend.inner.apply(partition: PartitionID(3), key: [5], value: [1, 0xFF, 0xFF])
        await #expect(throws: VnodeError.self) { try await v.get([5]) }
        // Only that key is affected: the vnode keeps serving others.
        #expect(await v.isServing)
        _ = try await v.coordinate(key: [6], sibling: Sibling(value: [1], timestampMillis: 1), context: VersionVector(), actor: actor)
        #expect(try await v.get([6]) != nil)
        sup.finish(); task.cancel(); try await task.value
    }
}

@Suite struct VnodeCapTests {
    /// Two concurrent values that cannot both fit: the older one is pruned, the write being
    /// acknowledged always survives — even when its timestamp is the older one.
    @Test func theAcknowledgedWriteSurvivesTheByteCap() async throws {
        var limits = Limits()
        limits.maxValueBytes = 6000
        limits.maxObjectBytes = 10_000
        let vnode = Vnode(partition: PartitionID(1), backend: MemoryBackend(), limits: limits, metrics: NodeMetrics(maxInflight: 1), logger: Logger(label: "t"))
        let sup = Supervisor(name: "t", policy: RestartPolicy(), logger: Logger(label: "t"))
        sup.spawn(vnode)
        let task = Task { try await sup.run() }
        while !(await vnode.isServing) { try await Task.sleep(for: .milliseconds(1)) }
        let a = ActorID(node: "a", epoch: 1), b = ActorID(node: "b", epoch: 1)
        _ = try await vnode.coordinate(key: [1], sibling: Sibling(value: Array(repeating: 1, count: 6000), timestampMillis: 900),
                                       context: VersionVector(), actor: b)
        let stored = try await vnode.coordinate(key: [1], sibling: Sibling(value: Array(repeating: 2, count: 6000), timestampMillis: 100),
                                                context: VersionVector(), actor: a)
        #expect(stored.values.map { $0.value.first } == [2])
        #expect(try await vnode.get([1])?.values.map { $0.value.first } == [2])
        sup.finish(); task.cancel(); try await task.value
    }
}

/// A backend whose log syncs wait for the test: writes are visible to `get` at once, to
/// `getDurable` only once a sync covers them; `sync(failing:)` completes or fails every pending
/// wait. Thread-safe.
final class GatedBackend: PartitionStore {
    private struct State {
        var latest: [[UInt8]: [UInt8]] = [:]
        var durable: [[UInt8]: [UInt8]] = [:]
        var pending: [(key: [UInt8], value: [UInt8])] = []
        var sequence: UInt64 = 0
        var durableSequence: UInt64 = 0
        var failed = false
        var waiters: [(UInt64, CheckedContinuation<Void, any Error>)] = []
    }
    private let state = Mutex(State())
    struct SyncFailed: Error {}
    /// Where the vnode runs (nil: a default actor's executor); a thread runs closures too, so
    /// the vnode serves `getSoon` and `mergeSoon`.
    let thread: ThreadExecutor?

    init(thread: ThreadExecutor? = nil) { self.thread = thread }

    var isPersistent: Bool { false }
    var waiting: Int { state.withLock { $0.waiters.count } }

    func get(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? { state.withLock { $0.latest[key] } }
    func getDurable(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? { state.withLock { $0.durable[key] } }
    var lastApplied: DurabilityToken { DurabilityToken(sequence: state.withLock { $0.sequence }) }

    func apply(partition: PartitionID, key: [UInt8], value: [UInt8]) throws -> DurabilityToken {
        state.withLock { s in
            s.latest[key] = value
            s.pending.append((key, value))
            s.sequence += 1
            return DurabilityToken(sequence: s.sequence)
        }
    }

    func waitDurable(_ token: DurabilityToken) async throws {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
            state.withLock { s in
                if s.failed { c.resume(throwing: SyncFailed()) } else if s.durableSequence >= token.sequence { c.resume() } else { s.waiters.append((token.sequence, c)) }
            }
        }
    }

    /// Completes (or fails) the sync of everything applied so far.
    func sync(failing: Bool = false) {
        let waiters = state.withLock { s in
            if failing {
                s.failed = true
            } else {
                for (k, v) in s.pending { s.durable[k] = v }
                s.durableSequence = s.sequence
            }
            s.pending = []
            defer { s.waiters = [] }
            return s.waiters
        }
        for (_, c) in waiters { if failing { c.resume(throwing: SyncFailed()) } else { c.resume() } }
    }

    func apply(partition: PartitionID, batch: [(key: [UInt8], value: [UInt8])]) throws -> DurabilityToken {
        state.withLock { s in
            for (key, value) in batch {
                s.latest[key] = value
                s.pending.append((key, value))
            }
            s.sequence += 1
            return DurabilityToken(sequence: s.sequence)
        }
    }

    /// Deletes are durable at once (no test here gates them).
    func delete(partition: PartitionID, keys: [[UInt8]]) throws -> DurabilityToken {
        state.withLock { s in
            for k in keys {
                s.latest[k] = nil
                s.durable[k] = nil
            }
            s.sequence += 1
            return DurabilityToken(sequence: s.sequence)
        }
    }

    func executor(for partition: PartitionID) -> (any SerialExecutor)? { thread }
    func fold<A: Sendable>(partition: PartitionID, after: [UInt8]?, into initial: A,
                           _ visit: @Sendable (inout A, [UInt8], [UInt8]) throws -> FoldStep) async throws -> PartitionFold<A> {
        PartitionFold(accumulator: initial, resumeAfter: nil)
    }
    func count(partition: PartitionID) async throws -> Int { state.withLock { $0.latest.count } }
    func drop(partition: PartitionID) async throws {}
    func close() async throws {}
}

/// Issue 10 items 2, 3, 5 and 6: what a vnode shows and acknowledges relative to durability,
/// corrupt blocks, and the sibling cap on replicas.
@Suite(.timeLimit(.minutes(3))) struct VnodeDurabilityTests {
    let n1 = ActorID(node: "n1", epoch: 5)
    let n2 = ActorID(node: "n2", epoch: 5)

    private func object(_ value: UInt8, ts: UInt64, by actor: ActorID) throws -> VersionedObject {
        var o = VersionedObject()
        try o.update(context: VersionVector(), value: Sibling(value: [value], timestampMillis: ts), actor: actor)
        return o
    }

    /// Item 2: a dot is never observable before it is durable.
    @Test func aWriteIsInvisibleToReadsUntilItsSyncCompletes() async throws {
        let backend = GatedBackend()
        let (v, sup, task) = try await runningVnode(backend)
        let write = Task { try await v.coordinate(key: [1], sibling: Sibling(value: [1], timestampMillis: 1), context: VersionVector(), actor: n1) }
        try await settle("the write waits for its sync") { backend.waiting == 1 }
        #expect(try await v.get([1]) == nil)
        backend.sync()
        let stored = try await write.value
        #expect(try await v.get([1]) == stored)
        sup.finish(); task.cancel(); try await task.value
    }

    /// Item 2: a write whose sync failed (a power cut would lose it) is never shown; its dot can
    /// be reissued after a restart without anyone having seen it.
    @Test func aWriteWhoseSyncFailedIsNeverShown() async throws {
        let backend = GatedBackend()
        let (v, sup, task) = try await runningVnode(backend)
        let write = Task { try await v.coordinate(key: [1], sibling: Sibling(value: [1], timestampMillis: 1), context: VersionVector(), actor: n1) }
        try await settle("the write waits for its sync") { backend.waiting == 1 }
        backend.sync(failing: true)
        await #expect(throws: VnodeError.self) { try await write.value }
        try await settle("the vnode restarted") { await v.isServing }
        #expect(try await v.get([1]) == nil)
        sup.finish(); task.cancel(); try await task.value
    }

    /// Item 3: a replica put that changes nothing is acknowledged only once the write already
    /// holding it is durable, and fails when that write's sync failed.
    @Test func aNoChangeMergeWaitsForTheCoveringWrite() async throws {
        let backend = GatedBackend()
        let (v, sup, task) = try await runningVnode(backend)
        let older = try object(1, ts: 1, by: n2)
        var newer = older
        try newer.update(context: older.context, value: Sibling(value: [2], timestampMillis: 2), actor: n2)
        let first = Task { try await v.merge(key: [1], object: newer) }
        try await settle("the newer merge waits for its sync") { backend.waiting == 1 }
        let secondDone = Flag()
        let second = Task {
            defer { secondDone.set() }
            return try await v.merge(key: [1], object: older)
        }
        try await settle("the older merge waits too, or was acknowledged") { backend.waiting == 2 || secondDone.isSet }
        #expect(!secondDone.isSet, "acknowledged before anything was durable")
        backend.sync(failing: true)
        await #expect(throws: VnodeError.self) { try await first.value }
        await #expect(throws: VnodeError.self) { try await second.value }
        try await settle("the vnode restarted") { await v.isServing }
        sup.finish(); task.cancel(); try await task.value
    }

    @Test func aNoChangeMergeIsAcknowledgedOnceDurable() async throws {
        let backend = GatedBackend()
        let (v, sup, task) = try await runningVnode(backend)
        let o = try object(1, ts: 1, by: n2)
        let first = Task { try await v.merge(key: [1], object: o) }
        try await settle("the merge waits for its sync") { backend.waiting == 1 }
        let second = Task { try await v.merge(key: [1], object: o) }
        try await settle("the duplicate waits too") { backend.waiting == 2 }
        backend.sync()
        #expect(try await first.value == o)
        #expect(try await second.value == o)
        sup.finish(); task.cancel(); try await task.value
    }

    /// A handoff batch: every entry merged, one durability wait for the batch (not one per
    /// key), and nothing acknowledged before that sync; a failed sync fails the batch.
    @Test func aBatchMergeWaitsOnceForEveryEntryToBeDurable() async throws {
        let backend = GatedBackend()
        let (v, sup, task) = try await runningVnode(backend)
        let entries = try (1...5).map { i in (key: [UInt8(i)], object: try object(UInt8(i), ts: UInt64(i), by: n2)) }
        let done = Flag()
        let batch = Task {
            defer { done.set() }
            try await v.mergeAll(entries)
        }
        try await settle("the batch waits for one sync") { backend.waiting == 1 }
        #expect(!done.isSet, "acknowledged before anything was durable")
        backend.sync()
        try await batch.value
        for e in entries { #expect(try await v.get(e.key) == e.object) }
        let failing = Task { try await v.mergeAll([(key: [9], object: try object(9, ts: 9, by: n2))]) }
        try await settle("the next batch waits for its sync") { backend.waiting == 1 }
        backend.sync(failing: true)
        await #expect(throws: VnodeError.self) { try await failing.value }
        try await settle("the vnode restarted") { await v.isServing }
        sup.finish(); task.cancel(); try await task.value
    }

    /// The event loop's path (`mergeSoon`, `getSoon`) keeps `merge`'s and `get`'s promises: no
    /// acknowledgement before the sync, nothing shown before it is durable, a failed sync fails
    /// the request and restarts the vnode.
    @Test func mergeSoonAcknowledgesOnlyDurableWritesAndGetSoonShowsOnlyThose() async throws {
        let backend = GatedBackend(thread: ThreadExecutor(label: "t-store"))
        let (v, sup, task) = try await runningVnode(backend)
        #expect(v.servesWithoutTasks)
        let o = try object(1, ts: 1, by: n2)
        let merged = Answer<Result<VersionedObject, VnodeError>>()
        #expect(v.mergeSoon(key: [1], object: o) { merged.set($0) })
        try await settle("the merge waits for its sync") { backend.waiting == 1 }
        #expect(merged.value == nil, "acknowledged before anything was durable")
        let before = Answer<Result<VersionedObject?, VnodeError>>()
        #expect(v.getSoon([1]) { before.set($0) })
        try await settle("the read answered") { before.value != nil }
        #expect(try before.value?.get() == .some(nil))
        backend.sync()
        try await settle("the merge answered") { merged.value != nil }
        #expect(try merged.value?.get() == o)
        let after = Answer<Result<VersionedObject?, VnodeError>>()
        #expect(v.getSoon([1]) { after.set($0) })
        try await settle("the read answered") { after.value != nil }
        #expect(try after.value?.get() == o)
        #expect(try await v.get([1]) == o)

        let failing = Answer<Result<VersionedObject, VnodeError>>()
        #expect(v.mergeSoon(key: [2], object: try object(2, ts: 2, by: n2)) { failing.set($0) })
        try await settle("the next merge waits for its sync") { backend.waiting == 1 }
        backend.sync(failing: true)
        try await settle("the merge answered") { failing.value != nil }
        #expect(throws: VnodeError.self) { try failing.value?.get() }
        try await settle("the vnode restarted") { await v.isServing }
        sup.finish(); task.cancel(); try await task.value
    }

    /// A vnode whose store names no thread has no event-loop path: the callers take `get`.
    @Test func aVnodeWithoutAStoreThreadServesOnlyThroughTasks() async throws {
        let (v, sup, task) = try await runningVnode(GatedBackend())
        #expect(!v.servesWithoutTasks)
        #expect(!v.getSoon([1]) { _ in Issue.record("answered without a store thread") })
        #expect(!v.mergeSoon(key: [1], object: try object(1, ts: 1, by: n2)) { _ in Issue.record("answered without a store thread") })
        sup.finish(); task.cancel(); try await task.value
    }

    /// Item 6: at max_siblings = 1, a replica merge never prunes the values it acknowledges:
    /// every incoming live value that survives the plain DVV merge is stored. Blind writes by
    /// three coordinators, replicated in a seeded random order (late, reordered, duplicated).
    @Test func aReplicaNeverPrunesTheValueItAcknowledges() async throws {
        var limits = Limits()
        limits.maxSiblings = 1
        let actors = (0..<3).map { ActorID(node: "n\($0)", epoch: 1) }
        for seed in UInt64(1)...30 {
            var rng = SplitMix64(seed: seed)
            let vnodes = try await (0..<3).asyncMap { _ in try await runningVnode(MemoryBackend(), limits: limits) }
            var inFlight: [(to: Int, object: VersionedObject)] = []
            for step in 0..<40 {
                if inFlight.isEmpty || rng.next(below: 2) == 0 {
                    let c = Int(rng.next(below: 3))
                    let stored = try await vnodes[c].0.coordinate(
                        key: [1], sibling: Sibling(value: [UInt8(step)], timestampMillis: rng.next(below: 1000)),
                        context: VersionVector(), actor: actors[c])
                    for r in 0..<3 where r != c { inFlight.append((r, stored)) }
                } else {
                    let m = inFlight.remove(at: Int(rng.next(below: UInt64(inFlight.count))))
                    let before = try await vnodes[m.to].0.get([1])
                    let unpruned = before.map { VersionedObject.sync($0, m.object) } ?? m.object
                    let after = try await vnodes[m.to].0.merge(key: [1], object: m.object)
                    let kept = Set(after.liveDots)
                    for dot in m.object.liveDots where unpruned.liveDots.contains(dot) {
                        #expect(kept.contains(dot), "seed \(seed) step \(step): the merge pruned incoming \(dot)")
                    }
                }
            }
            for (v, sup, task) in vnodes { _ = v; sup.finish(); task.cancel(); try await task.value }
        }
    }

    /// Item 5 (vnode side): a checksum failure under a key fails that key only; the vnode keeps
    /// serving, and is not restarted.
    @Test func aCorruptBlockFailsTheKeyNotTheVnode() async throws {
        let backend = CorruptingBackend()
        let (v, sup, task) = try await runningVnode(backend)
        _ = try await v.coordinate(key: [2], sibling: Sibling(value: [2], timestampMillis: 1), context: VersionVector(), actor: n1)
        backend.corruptKeys.withLock { _ = $0.insert([1]) }
        let incoming = try object(1, ts: 1, by: n2)
        for _ in 0..<20 {
            for attempt in [{ try await v.get([1]) }, { try await v.merge(key: [1], object: incoming) }] as [() async throws -> VersionedObject?] {
                do {
                    _ = try await attempt()
                    Issue.record("a read under a corrupt block succeeded")
                } catch let error as VnodeError {
                    // A data error for this key, never "unavailable: restarting".
                    guard case .storage(_, let reason) = error else { Issue.record("vnode failed: \(error)"); continue }
                    #expect(reason.contains("cannot serve the key"))
                }
            }
        }
        #expect(await v.isServing)
        #expect(try await v.get([2])?.values.map(\.value) == [[2]])
        sup.finish(); task.cancel(); try await task.value
    }
}

/// A value delivered once from another thread.
final class Answer<T: Sendable>: Sendable {
    private let box = Mutex<T?>(nil)
    func set(_ v: T) { box.withLock { $0 = v } }
    var value: T? { box.withLock { $0 } }
}

final class Flag: Sendable {
    private let value = Mutex(false)
    func set() { value.withLock { $0 = true } }
    var isSet: Bool { value.withLock { $0 } }
}

/// A memory backend whose reads of some keys fail with a block checksum error.
final class CorruptingBackend: PartitionStore {
    let inner = MemoryBackend()
    let corruptKeys = Mutex<Set<[UInt8]>>([])
    var isPersistent: Bool { false }

    private func check(_ key: [UInt8]) throws {
        if corruptKeys.withLock({ $0.contains(key) }) {
            throw StorageError.corruption(path: "000012.sst", offset: 4096, reason: "block checksum mismatch")
        }
    }
    func get(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? { try check(key); return try inner.get(partition: partition, key: key) }
    func getDurable(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? { try check(key); return try inner.getDurable(partition: partition, key: key) }
    var lastApplied: DurabilityToken { inner.lastApplied }
    func apply(partition: PartitionID, key: [UInt8], value: [UInt8]) throws -> DurabilityToken { try inner.apply(partition: partition, key: key, value: value) }
    func apply(partition: PartitionID, batch: [(key: [UInt8], value: [UInt8])]) throws -> DurabilityToken { try inner.apply(partition: partition, batch: batch) }
    func delete(partition: PartitionID, keys: [[UInt8]]) throws -> DurabilityToken { try inner.delete(partition: partition, keys: keys) }
    func executor(for partition: PartitionID) -> (any SerialExecutor)? { nil }
    func waitDurable(_ token: DurabilityToken) async throws {}
    func fold<A: Sendable>(partition: PartitionID, after: [UInt8]?, into initial: A,
                           _ visit: @Sendable (inout A, [UInt8], [UInt8]) throws -> FoldStep) async throws -> PartitionFold<A> {
        try await inner.fold(partition: partition, after: after, into: initial, visit)
    }
    func count(partition: PartitionID) async throws -> Int { try await inner.count(partition: partition) }
    func drop(partition: PartitionID) async throws { try await inner.drop(partition: partition) }
    func close() async throws {}
}

extension Range where Bound == Int {
    func asyncMap<T>(_ f: (Int) async throws -> T) async rethrows -> [T] {
        var out: [T] = []
        for i in self { out.append(try await f(i)) }
        return out
    }
}
