import Testing
@testable import CairnNode
import CairnAntiEntropy
import CairnCore
import Logging

/// A vnode's anti-entropy tree against its storage, and key listings over a store.
@Suite struct AntiEntropyNodeTests {
    let actor = ActorID(node: "n1", epoch: 5)
    let shape = TreeShape.standard

    /// A vnode keeping a tree, serving under a supervisor.
    private func vnode(_ backend: any PartitionStore) async throws -> (Vnode, Supervisor, Task<Void, any Error>) {
        let v = Vnode(partition: PartitionID(3), backend: backend, limits: Limits(), metrics: NodeMetrics(maxInflight: 10), logger: Logger(label: "t"),
                      treeShape: shape)
        let sup = Supervisor(name: "t", policy: RestartPolicy(), logger: Logger(label: "t"))
        sup.spawn(v)
        let task = Task { try await sup.run() }
        try await waitServing(v)
        return (v, sup, task)
    }

    /// The tree the storage holds now, built from scratch.
    private func fromScratch(_ backend: any PartitionStore) async throws -> SegmentTree {
        var t = SegmentTree(shape: shape)
        let all = try await backend.fold(partition: PartitionID(3), after: nil, into: [(key: [UInt8], value: [UInt8])]()) { acc, k, v in
            acc.append((k, v))
            return .continue
        }.accumulator
        for (k, v) in all { t.update(key: k, old: 0, new: KeyVersionHash.hash(key: k, object: try VersionedObject.decode(v, limits: Limits()))) }
        return t
    }

    private func build(_ v: Vnode, writesDuring: (Vnode) async throws -> Void) async throws -> Bool? {
        guard let (snapshot, generation) = try await v.beginTreeBuild(shape: shape) else { return nil }
        try await writesDuring(v)
        var t = SegmentTree(shape: shape)
        var after: [UInt8]?
        while true {
            let page = try await snapshot.page(after, 7)
            for (k, value) in page { t.update(key: k, old: 0, new: KeyVersionHash.hash(key: k, object: try VersionedObject.decode(value, limits: Limits()))) }
            guard page.count == 7, let last = page.last else { break }
            after = last.key
        }
        return await v.finishTreeBuild(t, generation: generation)
    }

    @Test func aTreeBuiltWhileWritesGoOnEqualsTheStorageAndWritesKeepItSo() async throws {
        let backend = MemoryBackend()
        let (tv, sup, task) = try await vnode(backend)
        #expect(tv.needsTreeBuild)
        #expect(await tv.treeRoot() == nil)
        for i in 0..<50 {
            _ = try await tv.coordinate(key: [UInt8(i)], sibling: Sibling(value: [1], timestampMillis: 1), context: VersionVector(), actor: actor)
        }
        // Writes between the snapshot and the end of the build land in the delta.
        let drift = try await build(tv) { tv in
            for i in 40..<70 {
                let ctx = try await tv.get([UInt8(i)])?.context ?? VersionVector()
                _ = try await tv.coordinate(key: [UInt8(i)], sibling: Sibling(value: [2], timestampMillis: 2), context: ctx, actor: actor)
            }
        }
        #expect(drift == false)
        #expect(await tv.readyTree == (try await fromScratch(backend)))
        // From now on every write, merge and tombstone keeps the tree equal to the storage's.
        var remote = VersionedObject()
        try remote.update(context: VersionVector(), value: Sibling(value: [9], timestampMillis: 4), actor: ActorID(node: "n2", epoch: 1))
        _ = try await tv.merge(key: [5], object: remote)
        _ = try await tv.mergeAll([(key: [200], object: remote), (key: [201], object: remote)])
        let ctx = try await tv.get([6])?.context ?? VersionVector()
        _ = try await tv.coordinate(key: [6], sibling: .tombstone(timestampMillis: 5), context: ctx, actor: actor)
        #expect(await tv.readyTree == (try await fromScratch(backend)))
        sup.finish(); task.cancel(); try await task.value
    }

    @Test func aRebuildReportsATreeThatDriftedFromItsStorage() async throws {
        let backend = MemoryBackend()
        let (tv, sup, task) = try await vnode(backend)
        #expect(try await build(tv) { _ in } == false)
        _ = try await tv.coordinate(key: [1], sibling: Sibling(value: [1], timestampMillis: 1), context: VersionVector(), actor: actor)
        #expect(try await build(tv) { _ in } == false, "a tree kept by writes matches its storage")
        // Bytes changed under the vnode (damage, a bug): the next rebuild finds and fixes it.
        var other = VersionedObject()
        try other.update(context: VersionVector(), value: Sibling(value: [7], timestampMillis: 1), actor: ActorID(node: "n9", epoch: 1))
        _ = try backend.apply(partition: PartitionID(3), key: [1], value: other.encoded())
        #expect(try await build(tv) { _ in } == true)
        #expect(await tv.readyTree == (try await fromScratch(backend)))
        // A build begun while another runs is refused; an abandoned one leaves the last tree.
        let first = try await tv.beginTreeBuild(shape: shape)
        #expect(first != nil)
        #expect(try await tv.beginTreeBuild(shape: shape) == nil)
        if let first { await tv.abandonTreeBuild(generation: first.generation) }
        #expect(await tv.readyTree == (try await fromScratch(backend)))
        sup.finish(); task.cancel(); try await task.value
    }

    @Test func keyListingsPageThroughTheAskedSegmentsOnly() async throws {
        let backend = MemoryBackend()
        var o = VersionedObject()
        try o.update(context: VersionVector(), value: Sibling(value: [1], timestampMillis: 1), actor: actor)
        for i in 0..<500 { _ = try backend.apply(partition: PartitionID(3), key: Array("k\(i)".utf8), value: o.encoded()) }
        let all = (0..<500).map { Array("k\($0)".utf8) }.sorted { $0.lexicographicallyPrecedes($1) }
        let segments = Array(Set(all.prefix(40).map { KeyVersionHash.segment(of: $0, shape: shape) })).sorted()
        let expected = all.filter { segments.contains(KeyVersionHash.segment(of: $0, shape: shape)) }
        var got: [[UInt8]] = []
        var after: [UInt8]?
        var pages = 0
        repeat {
            let q = KeyQuery(segments: segments, objectsFor: [segments[0]], after: after, limit: 5)
            let page = try await AntiEntropyManager.listKeys(backend, partition: PartitionID(3), query: q, shape: shape, withObjects: true,
                                                             maxBytes: 1 << 20, limits: Limits())
            #expect(page.entries.count <= 5)
            for e in page.entries {
                #expect(e.hash == KeyVersionHash.hash(key: e.key, object: o))
                #expect((e.object != nil) == (KeyVersionHash.segment(of: e.key, shape: shape) == segments[0]))
            }
            got += page.entries.map(\.key)
            after = page.through
            pages += 1
        } while after != nil && pages < 1000
        #expect(got == expected)
        #expect(pages > 1)
    }
}
