import Testing
@testable import CairnNode
import CairnCore
import Logging
import Synchronization

/// A backend wrapper that fails writes while `failWrites` is set and can store raw bytes.
final class FaultyBackend: StorageBackend {
    let inner = MemoryBackend()
    let failWrites = Atomic<Bool>(false)
    var isPersistent: Bool { false }

    struct InjectedFault: Error, CustomStringConvertible { var description: String { "injected EIO" } }

    func get(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? { try inner.get(partition: partition, key: key) }

    func apply(partition: PartitionID, key: [UInt8], value: [UInt8]) throws -> DurabilityToken {
        if failWrites.load(ordering: .relaxed) { throw InjectedFault() }
        return try inner.apply(partition: partition, key: key, value: value)
    }

    func waitDurable(_ token: DurabilityToken) async throws {}
    func count(partition: PartitionID) throws -> Int { try inner.count(partition: partition) }
    func close() async throws {}
}

@Suite struct VnodeTests {
    let actor = ActorID(node: "n1", epoch: 5)

    private func runningVnode(_ backend: any StorageBackend, limits: Limits = Limits()) async throws -> (Vnode, Supervisor, Task<Void, any Error>) {
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

    private func waitServing(_ v: Vnode) async throws {
        for _ in 0..<2000 {
            if await v.isServing { return }
            try await Task.sleep(for: .milliseconds(1))
        }
        Issue.record("vnode never started serving")
    }

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
