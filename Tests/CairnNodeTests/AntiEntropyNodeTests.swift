import Testing
@testable import CairnNode
@testable import CairnStorage
import CairnAntiEntropy
import CairnCore
import Logging

/// A vnode's anti-entropy tree against its storage, and key listings over a store.
@Suite struct AntiEntropyNodeTests {
    let actor = ActorID(node: "n1", epoch: 5)
    let shape = TreeShape.standard

    /// A vnode keeping a tree, serving under a supervisor.
    private func vnode(_ backend: any PartitionStore, stampActor: ActorID? = nil, freshActor: (@Sendable () -> ActorID)? = nil,
                       mayForgetDamaged: @escaping @Sendable (PartitionID) -> Bool = { _ in false }) async throws -> (Vnode, Supervisor, Task<Void, any Error>) {
        let v = Vnode(partition: PartitionID(3), backend: backend, limits: Limits(), metrics: NodeMetrics(maxInflight: 10), logger: Logger(label: "t"),
                      stampActor: stampActor, treeShape: shape, freshActor: freshActor, mayForgetDamaged: mayForgetDamaged)
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

    /// A block of the vnode's table fails its checksum. The tree built from storage leaves out
    /// exactly the keys reads cannot serve; a replica's object for a damaged key replaces it (the
    /// tree kept equal), and so does a client's write; from the first replacement the vnode
    /// stamps with a fresh actor, recorded in the store, so a restart keeps it. Once the damage
    /// is handled, a read of a damaged key drops it here and answers not found, and keeps doing
    /// so; before, it fails.
    @Test func aDamagedKeyIsReplacedUnderAFreshStampActorAndTheTreeLeavesItOut() async throws {
        let disk = FaultyFileSystem()
        let p = PartitionID(3)
        var store = try await openStore(.disk, disk: disk)
        let (v0, sup0, task0) = try await vnode(store)
        var written: [[UInt8]: VersionedObject] = [:]
        for i in 0..<300 {
            let k = Array("key-\(1000 + i)".utf8)
            written[k] = try await v0.coordinate(key: k, sibling: Sibling(value: [UInt8](repeating: UInt8(i & 0xFF), count: 100), timestampMillis: 1),
                                                 context: VersionVector(), actor: actor)
        }
        sup0.finish(); task0.cancel(); try await task0.value
        try store.flushIfDisk()
        try await store.close()
        // The largest table holds the partition's keys (a smaller one, the store's metadata).
        let tables = try disk.list("/db").filter { $0.hasSuffix(".sst") }.map { "/db/" + $0 }
        let path = try #require(tables.max { (disk.contents($0)?.count ?? 0) < (disk.contents($1)?.count ?? 0) })
        let reader = try TableReader(fs: disk, path: path)
        try #require(reader.blockCount >= 4)
        disk.flipBit(path, byte: Int(reader.index[reader.blockCount / 2].handle.offset) + 9, bit: 1)

        store = try await openStore(.disk, disk: disk)
        let fresh = ActorID(node: "n1", epoch: 77)
        let handled = Locked(false)
        let (v, sup, task) = try await vnode(store, freshActor: { fresh }, mayForgetDamaged: { p in p == PartitionID(3) && handled.value })
        var damaged: [[UInt8]] = []
        var expected = SegmentTree(shape: shape)
        for (k, o) in written {
            do {
                #expect(try await v.get(k) == o)
                expected.update(key: k, old: 0, new: KeyVersionHash.hash(key: k, object: o))
            } catch {
                damaged.append(k)
            }
        }
        try #require(damaged.count >= 3, "the damaged block hides keys")
        #expect(try await build(v) { _ in } == false)
        #expect(await v.readyTree == expected, "the tree holds exactly the readable keys")
        #expect(v.stampActor == nil)

        // A replica's copy of a damaged key replaces it; the tree gains it.
        let k1 = damaged[0]
        let original = try #require(written[k1])
        #expect(try await v.merge(key: k1, object: original) == original)
        #expect(try await v.get(k1) == original)
        expected.update(key: k1, old: 0, new: KeyVersionHash.hash(key: k1, object: original))
        #expect(await v.readyTree == expected)
        #expect(v.stampActor == fresh)

        // A client's write over another damaged key: stamped by the fresh actor, not the node's.
        let k2 = damaged[1]
        let (object, writer) = try await v.coordinateStamped(key: k2, sibling: Sibling(value: [42], timestampMillis: 2), context: VersionVector(), actor: actor)
        #expect(writer == fresh)
        #expect(object.context[fresh] == 1 && object.context[actor] == 0)

        // A read of a third damaged key fails until the damage is handled; then it is dropped:
        // not found, now and on every read after (durable or not yet), and the tree unchanged.
        let k3 = damaged[2]
        await #expect(throws: VnodeError.self) { try await v.get(k3) }
        handled.withLock { $0 = true }
        let before = await v.readyTree
        #expect(try await v.get(k3) == nil)
        #expect(try await v.get(k3) == nil)
        #expect(try await v.getAll([k3]) == [nil])
        #expect(await v.readyTree == before)
        sup.finish(); task.cancel(); try await task.value
        try await store.close()

        let back = try await openStore(.disk, disk: disk)
        #expect(Vnode.savedStampActor(in: back, partition: p, node: "n1") == fresh)
        #expect(Vnode.savedStampActor(in: back, partition: PartitionID(4), node: "n1") == nil)
        try await back.close()
    }

    /// `collect` drops a tombstone whose version is still the one swept, keeps the tree equal to
    /// the storage, raises the counter floor (kept in metadata, so a new vnode has it), and the
    /// key's next write is never covered by the dropped clock: an old copy of the tombstone
    /// arriving afterwards (riak_kv#679's doomstone) does not erase it.
    @Test func collectingATombstoneKeepsTheTreeAndAFloorSoALaterWriteSurvivesTheOldTombstone() async throws {
        let backend = MemoryBackend()
        let (tv, sup, task) = try await vnode(backend)
        #expect(try await build(tv) { _ in } == false)
        let k: [UInt8] = [7]
        var object = try await tv.coordinate(key: k, sibling: Sibling(value: [1], timestampMillis: 1), context: VersionVector(), actor: actor)
        for i in 2...4 {
            object = try await tv.coordinate(key: k, sibling: Sibling(value: [UInt8(i)], timestampMillis: UInt64(i)), context: object.context, actor: actor)
        }
        let tombstone = try await tv.coordinate(key: k, sibling: .tombstone(timestampMillis: 5), context: object.context, actor: actor)
        _ = try await tv.coordinate(key: [8], sibling: Sibling(value: [1], timestampMillis: 1), context: VersionVector(), actor: actor)
        // A stale hash (a write came since the sweep) collects nothing.
        #expect(try await tv.collect([(k, 12345)], nodeActor: actor) == 0)
        #expect(try await tv.get(k) == tombstone)
        #expect(try await tv.collect([(k, KeyVersionHash.hash(key: k, object: tombstone))], nodeActor: actor) == 1)
        #expect(try await tv.get(k) == nil)
        #expect(await tv.readyTree == (try await fromScratch(backend)), "the tree no longer holds the collected key")
        // A new write of the key starts past every counter of the dropped history.
        let fresh = try await tv.coordinate(key: k, sibling: Sibling(value: [42], timestampMillis: 9), context: VersionVector(), actor: actor)
        #expect(fresh.context[actor] > tombstone.context[actor])
        // The old tombstone comes back (a fallback, an old replica): the new write stays.
        let merged = try await tv.merge(key: k, object: tombstone)
        #expect(merged.liveValues.map(\.value) == [[42]])
        // On a key collected and not written since, a returning copy of the collected history
        // (the tombstone, or an older value it deleted) is not stored again; newer history is.
        let other: [UInt8] = [11]
        var old = try await tv.coordinate(key: other, sibling: Sibling(value: [5], timestampMillis: 1), context: VersionVector(), actor: actor)
        let oldValue = old
        old = try await tv.coordinate(key: other, sibling: .tombstone(timestampMillis: 2), context: old.context, actor: actor)
        #expect(try await tv.collect([(other, KeyVersionHash.hash(key: other, object: old))], nodeActor: actor) == 1)
        _ = try await tv.merge(key: other, object: old)
        _ = try await tv.merge(key: other, object: oldValue)
        #expect(try await tv.get(other) == nil, "collected history does not come back")
        var newer = VersionedObject()
        try newer.update(context: VersionVector(), value: Sibling(value: [6], timestampMillis: 3), actor: ActorID(node: "n2", epoch: 1))
        _ = try await tv.merge(key: other, object: newer)
        #expect(try await tv.get(other)?.liveValues.map(\.value) == [[6]])
        #expect(await tv.readyTree == (try await fromScratch(backend)))
        sup.finish(); task.cancel(); try await task.value
        // The floor outlives the vnode: a new one on the same store starts from it.
        let floor = try #require(Vnode.savedCounterFloor(in: backend, partition: PartitionID(3)))
        #expect(floor.epoch == actor.epoch && floor.counter > tombstone.context[actor])
        let (again, sup2, task2) = try await vnode(backend)
        let started = try await again.coordinate(key: [10], sibling: Sibling(value: [1], timestampMillis: 10), context: VersionVector(), actor: actor)
        #expect(started.context[actor] == floor.counter)
        sup2.finish(); task2.cancel(); try await task2.value
    }

    /// A node that comes back from longer than the hint window (its last heartbeat older than
    /// `hints.max_age`) counts every partition as refilling *and* stale until an exchange of it
    /// completes; one back sooner does not.
    @Test func aNodeAwayPastTheHintWindowRefillsAndItsAnswersAreStaleUntilExchanged() async throws {
        let hour: UInt64 = 3_600_000
        func store(aliveAt: UInt64) async throws -> MemoryBackend {
            let b = MemoryBackend()
            let state = AntiEntropyState()
            try await state.load(from: b, logger: Logger(label: "t"))
            try await state.heartbeat(store: b, nowMillis: aliveAt)
            return b
        }
        let away = AntiEntropyState()
        try await away.load(from: try await store(aliveAt: 10 * hour), logger: Logger(label: "t"), nowMillis: 14 * hour, awayLimitMillis: 3 * hour)
        #expect(away.isRefilling(PartitionID(5)) && away.isStale(PartitionID(5)))
        away.settle(PartitionID(5))
        #expect(!away.isRefilling(PartitionID(5)) && !away.isStale(PartitionID(5)))
        #expect(away.isStale(PartitionID(6)))
        let back = AntiEntropyState()
        try await back.load(from: try await store(aliveAt: 10 * hour), logger: Logger(label: "t"), nowMillis: 12 * hour, awayLimitMillis: 3 * hour)
        #expect(!back.isRefilling(PartitionID(5)) && !back.isStale(PartitionID(5)))
    }

    /// The trees saved at a clean shutdown read back as they were (`aae-trees`, Docs/anti-entropy.md).
    @Test func savedTreesRoundTripAndDamageIsRefused() throws {
        var trees: [PartitionID: SegmentTree] = [:]
        for p in [0, 3, 200] as [UInt32] {
            var t = SegmentTree(shape: shape)
            for i in 0..<50 { t.update(key: Array("k\(p)-\(i)".utf8), old: 0, new: UInt64(i) &* 0x9E37_79B9_7F4A_7C15 | 1) }
            trees[PartitionID(p)] = t
        }
        let bytes = AntiEntropyState.encodeTrees(trees)
        #expect(try AntiEntropyState.decodeTrees(bytes) == trees)
        #expect(try AntiEntropyState.decodeTrees(AntiEntropyState.encodeTrees([:])) == [:])
        var damaged = bytes
        damaged[damaged.count / 2] ^= 1
        #expect(throws: DecodeError.self) { _ = try AntiEntropyState.decodeTrees(damaged) }
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
