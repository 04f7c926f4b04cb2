import CairnAntiEntropy
import CairnCore
import Testing

/// One replica's partition in memory, with its tree kept the way a vnode keeps it.
struct Replica {
    var objects: [[UInt8]: VersionedObject] = [:]
    var tree: SegmentTree
    let actor: ActorID
    init(shape: TreeShape, name: String) {
        tree = SegmentTree(shape: shape)
        actor = ActorID(node: name, epoch: 1)
    }

    mutating func store(_ key: [UInt8], _ object: VersionedObject?) {
        let old = objects[key].map { KeyVersionHash.hash(key: key, object: $0) } ?? 0
        let new = object.map { KeyVersionHash.hash(key: key, object: $0) } ?? 0
        objects[key] = object
        tree.update(key: key, old: old, new: new)
    }

    mutating func write(_ key: [UInt8], _ value: UInt8, millis: UInt64) {
        var o = objects[key] ?? VersionedObject()
        try? o.update(context: o.context, value: Sibling(value: [value], timestampMillis: millis), actor: actor)
        store(key, o)
    }

    mutating func merge(_ key: [UInt8], _ incoming: VersionedObject) {
        let merged = objects[key].map { VersionedObject.sync($0, incoming) } ?? incoming
        store(key, merged)
    }

    func rebuilt() -> SegmentTree {
        var t = SegmentTree(shape: tree.shape)
        for (k, o) in objects { t.update(key: k, old: 0, new: KeyVersionHash.hash(key: k, object: o)) }
        return t
    }

    func page(_ q: KeyQuery, withObjects: Bool) -> KeyPage {
        let segments = Set(q.segments), objectSegments = Set(q.objectsFor)
        var out: [KeyEntry] = []
        for k in objects.keys.sorted(by: { $0.lexicographicallyPrecedes($1) }) {
            if let after = q.after, !after.lexicographicallyPrecedes(k) { continue }
            let s = KeyVersionHash.segment(of: k, shape: tree.shape)
            guard segments.contains(s), let o = objects[k] else { continue }
            out.append(KeyEntry(key: k, hash: KeyVersionHash.hash(key: k, object: o), object: withObjects && objectSegments.contains(s) ? o : nil))
            if out.count == q.limit { return KeyPage(entries: out, through: k) }
        }
        return KeyPage(entries: out, through: nil)
    }
}

/// Runs one exchange between `a` (local) and `b` (remote) to its end, performing every repair.
@discardableResult
func exchange(_ a: inout Replica, _ b: inout Replica, settings: ExchangeSettings = .init()) -> (ExchangeSummary?, String?) {
    var m = ExchangeMachine(shape: a.tree.shape, settings: settings)
    var step = m.start()
    for _ in 0..<100_000 {
        switch step {
        case .compareRoots:
            step = m.roots(local: a.tree.root, remote: b.tree.root)
        case .compareChildren(let level, let parents):
            step = m.children(local: a.tree.children(level: level, of: parents), remote: b.tree.children(level: level, of: parents))
        case .listKeys(let q):
            step = m.keys(local: a.page(q, withObjects: false), remote: b.page(q, withObjects: true))
        case .repair(let repairs):
            for r in repairs {
                switch r {
                case .push(let k): if let o = a.objects[k] { b.merge(k, o) }
                case .take(let k, let o): a.merge(k, o)
                case .pull(let k): if let o = b.objects[k] { a.merge(k, o) }
                case .reconcile(let k):
                    if let o = b.objects[k] { a.merge(k, o) }
                    if let o = a.objects[k] { b.merge(k, o) }
                }
            }
            step = m.repaired()
        case .finished(let s): return (s, nil)
        case .failed(let why): return (nil, why)
        }
    }
    return (nil, "did not end")
}

func key(_ i: Int) -> [UInt8] { Array("k\(i)".utf8) }

@Suite struct SegmentTreeTests {
    @Test func incrementalUpdatesEqualATreeRebuiltFromScratch() throws {
        for seed in UInt64(1)...20 {
            var rng = SplitMix64(seed: seed)
            var r = Replica(shape: try TreeShape(depth: 2 + Int(seed % 2)), name: "a")
            for step in 0..<2000 {
                let k = key(Int(rng.next(below: 300)))
                switch rng.next(below: 4) {
                case 0: r.store(k, nil)  // delete outright (a collected tombstone)
                case 1:  // a tombstone: a new version
                    var o = r.objects[k] ?? VersionedObject()
                    try? o.update(context: o.context, value: .tombstone(timestampMillis: UInt64(step)), actor: r.actor)
                    r.store(k, o)
                default: r.write(k, UInt8(truncatingIfNeeded: step), millis: UInt64(step))
                }
            }
            #expect(r.tree == r.rebuilt(), "seed \(seed)")
        }
    }

    @Test func removingEveryKeyLeavesTheEmptyTree() throws {
        var r = Replica(shape: .standard, name: "a")
        for i in 0..<500 { r.write(key(i), 1, millis: 1) }
        #expect(r.tree.root != 0)
        for i in 0..<500 { r.store(key(i), nil) }
        #expect(r.tree == SegmentTree(shape: .standard))
        #expect(r.tree.isEmpty)
    }

    @Test func theSameHistoryHashesAlikeAndAnyChangeDiffers() {
        var a = Replica(shape: .standard, name: "a")
        a.write(key(1), 7, millis: 5)
        var b = Replica(shape: .standard, name: "b")
        b.merge(key(1), a.objects[key(1)] ?? VersionedObject())
        #expect(a.tree == b.tree)
        b.write(key(1), 8, millis: 6)
        #expect(a.tree.root != b.tree.root)
        #expect(KeyVersionHash.hash(key: key(1), object: VersionedObject()) != 0)
    }

    @Test func encodingRoundTripsAndDetectsDamage() throws {
        var r = Replica(shape: .standard, name: "a")
        for i in 0..<100 { r.write(key(i), 1, millis: 1) }
        let bytes = r.tree.encoded()
        #expect(bytes.count < 100 * 11 + 20, "sparse: \(bytes.count) bytes")
        #expect(try SegmentTree.decode(bytes) == r.tree)
        #expect(try SegmentTree.decode(SegmentTree(shape: .standard).encoded()) == SegmentTree(shape: .standard))
        var full = SegmentTree(shape: .standard)
        for s in 0..<4096 { full.apply(segment: s, delta: UInt64(s) + 1) }
        #expect(try SegmentTree.decode(full.encoded()) == full)
        var damaged = bytes
        damaged[100] ^= 0x10
        #expect(throws: DecodeError.self) { try SegmentTree.decode(damaged) }
        #expect(throws: DecodeError.self) { try SegmentTree.decode(Array(bytes.prefix(50))) }
        #expect(throws: (any Error).self) { try TreeShape(depth: 9) }
        #expect(TreeShape.standard.memoryBytes == 4369 * 8)
    }

    @Test func aTreeOfChangesSinceASnapshotCompletesTheSnapshotsTree() {
        var live = Replica(shape: .standard, name: "a")
        for i in 0..<200 { live.write(key(i), 1, millis: 1) }
        let snapshotTree = live.rebuilt()
        var delta = SegmentTree(shape: .standard)
        for i in 150..<260 {  // overwrites and inserts after the snapshot, recorded apart
            let k = key(i)
            let old = live.objects[k].map { KeyVersionHash.hash(key: k, object: $0) } ?? 0
            live.write(k, 2, millis: 2)
            delta.update(key: k, old: old, new: live.objects[k].map { KeyVersionHash.hash(key: k, object: $0) } ?? 0)
        }
        var combined = snapshotTree
        combined.merge(delta)
        #expect(combined == live.tree)
    }
}

@Suite struct ExchangeMachineTests {
    /// Two replicas with random divergence (missing keys on either side, concurrent writes,
    /// newer versions, tombstones) agree after one exchange, and a second finds them in sync.
    @Test func oneExchangeBringsDivergedReplicasToTheSameKeysAndTree() throws {
        for seed in UInt64(1)...30 {
            var rng = SplitMix64(seed: seed)
            let shape = try TreeShape(depth: 2 + Int(seed % 2))
            var a = Replica(shape: shape, name: "a"), b = Replica(shape: shape, name: "b")
            for i in 0..<400 {
                let k = key(i)
                a.write(k, 1, millis: 1)
                b.merge(k, a.objects[k] ?? VersionedObject())
            }
            for _ in 0..<Int(rng.next(below: 60)) {
                let k = key(Int(rng.next(below: 500)))
                switch rng.next(below: 3) {
                case 0: a.write(k, 2, millis: 2)
                case 1: b.write(k, 3, millis: 3)
                default: b.store(k, nil)
                }
            }
            var settings = ExchangeSettings()
            settings.keysPerPage = 1 + Int(rng.next(below: 20))
            settings.maxParentsPerQuery = 1 + Int(rng.next(below: 8))
            let before = (a.objects, b.objects)
            let (summary, failure) = exchange(&a, &b, settings: settings)
            #expect(failure == nil)
            #expect(a.objects == b.objects, "seed \(seed)")
            #expect(a.tree == b.tree)
            // Nothing either side held is lost: every version held before is covered now.
            for (k, o) in before.0 { #expect(a.objects[k].map { !$0.strictlyPrecedes(o) && VersionedObject.sync($0, o) == $0 } ?? false) }
            for (k, o) in before.1 { #expect(a.objects[k].map { VersionedObject.sync($0, o) == $0 } ?? false) }
            #expect(summary?.inSync == false || before.0 == before.1)
            let (again, _) = exchange(&a, &b)
            #expect(again?.inSync == true)
        }
    }

    @Test func anInSyncPartitionCostsTwoRootHashes() {
        var a = Replica(shape: .standard, name: "a"), b = Replica(shape: .standard, name: "b")
        for i in 0..<3000 {
            a.write(key(i), 1, millis: 1)
            b.merge(key(i), a.objects[key(i)] ?? VersionedObject())
        }
        let (s, _) = exchange(&a, &b)
        #expect(s?.inSync == true)
        #expect(s?.treeHashes == 2)
        #expect(s?.keysCompared == 0)
    }

    @Test func oneDifferingKeyDescendsOneBranchAndListsOneSegment() throws {
        let shape = try TreeShape(depth: 4)
        var a = Replica(shape: shape, name: "a"), b = Replica(shape: shape, name: "b")
        for i in 0..<20_000 {
            a.write(key(i), 1, millis: 1)
            b.merge(key(i), a.objects[key(i)] ?? VersionedObject())
        }
        a.write(key(77), 2, millis: 2)
        let (s, _) = exchange(&a, &b)
        #expect(s?.segmentsDiffering == 1)
        // Root, then 16 children per level, on both sides.
        #expect(s?.treeHashes == 2 + 2 * 16 * 4)
        #expect((s?.keysCompared ?? 0) <= 3)
        #expect(s?.keysToRemote == 1 && s?.keysToLocal == 1)
        #expect(a.objects == b.objects)
    }

    @Test func aWipedReplicaTakesObjectsFromTheListingWithoutASecondTrip() {
        var a = Replica(shape: .standard, name: "a"), b = Replica(shape: .standard, name: "b")
        for i in 0..<500 { b.write(key(i), 1, millis: 1) }
        var m = ExchangeMachine(shape: a.tree.shape)
        var step = m.start()
        var pulls = 0, takes = 0
        while true {
            switch step {
            case .compareRoots: step = m.roots(local: a.tree.root, remote: b.tree.root)
            case .compareChildren(let l, let p): step = m.children(local: a.tree.children(level: l, of: p), remote: b.tree.children(level: l, of: p))
            case .listKeys(let q):
                #expect(q.objectsFor == q.segments)
                step = m.keys(local: a.page(q, withObjects: false), remote: b.page(q, withObjects: true))
            case .repair(let rs):
                for r in rs {
                    if case .take(let k, let o) = r { takes += 1; a.merge(k, o) }
                    if case .pull = r { pulls += 1 }
                }
                step = m.repaired()
            case .finished, .failed:
                #expect(takes == 500 && pulls == 0)
                #expect(a.objects == b.objects)
                return
            }
        }
    }

    @Test func theSegmentBoundTruncatesAndTheNextExchangeGoesOn() {
        var a = Replica(shape: .standard, name: "a"), b = Replica(shape: .standard, name: "b")
        for i in 0..<2000 { b.write(key(i), 1, millis: 1) }
        var settings = ExchangeSettings()
        settings.maxSegmentsPerExchange = 100
        let (first, _) = exchange(&a, &b, settings: settings)
        #expect(first?.truncated == true)
        #expect(first?.segmentsDiffering == 100)
        #expect(a.objects.count < 2000 && a.objects.count > 0)
        var rounds = 1
        while a.tree != b.tree, rounds < 100 {
            exchange(&a, &b, settings: settings)
            rounds += 1
        }
        #expect(a.objects == b.objects)
        #expect(rounds > 5)
    }

    @Test func aMalformedRemoteAnswerFailsTheExchange() {
        var a = Replica(shape: .standard, name: "a"), b = Replica(shape: .standard, name: "b")
        for i in 0..<50 { b.write(key(i), 1, millis: 1) }
        var m = ExchangeMachine(shape: .standard)
        _ = m.start()
        guard case .compareChildren(let l, let p) = m.roots(local: a.tree.root, remote: b.tree.root) else { Issue.record("no descent"); return }
        guard case .failed = m.children(local: a.tree.children(level: l, of: p), remote: [1, 2, 3]) else { Issue.record("short answer accepted"); return }

        var m2 = ExchangeMachine(shape: .standard)
        var step = m2.start()
        while true {
            switch step {
            case .compareRoots: step = m2.roots(local: a.tree.root, remote: b.tree.root)
            case .compareChildren(let l, let p): step = m2.children(local: a.tree.children(level: l, of: p), remote: b.tree.children(level: l, of: p))
            case .listKeys(let q):
                var page = b.page(q, withObjects: false)
                page.entries.reverse()  // out of order
                step = m2.keys(local: a.page(q, withObjects: false), remote: page)
                guard case .failed = step else { Issue.record("unordered page accepted"); return }
                return
            default: Issue.record("unexpected \(step)"); return
            }
        }
    }
}

@Suite struct AntiEntropyCodecTests {
    @Test func requestsAndRepliesRoundTrip() throws {
        var o = VersionedObject()
        try o.update(context: o.context, value: Sibling(value: [1, 2], timestampMillis: 3), actor: ActorID(node: "n1", epoch: 9))
        let requests: [AntiEntropyRequest.Body] = [
            .root, .children(level: 1, parents: [0, 3, 15]),
            .keys(KeyQuery(segments: [1, 7, 4000], objectsFor: [7], after: [9, 9], limit: 10)),
            .keys(KeyQuery(segments: [], objectsFor: [], after: nil, limit: 1)),
            .fetch([[1], [2, 3]]), .push([(key: [4], object: o)]), .pending,
        ]
        for body in requests {
            let r = AntiEntropyRequest(partition: PartitionID(12), shape: .standard, body: body)
            #expect(try AntiEntropyCodec.decodeRequest(AntiEntropyCodec.encode(r), limits: Limits()) == r)
        }
        let replies: [AntiEntropyReply] = [
            .root(77, refilling: true), .hashes([1, 2, 3]),
            .keys(KeyPage(entries: [KeyEntry(key: [1], hash: KeyVersionHash.hash(key: [1], object: o), object: o), KeyEntry(key: [2], hash: 6)], through: [2])),
            .keys(KeyPage(entries: [], through: nil)), .objects([o, nil]), .pushed(4),
            .pending(hintTargets: ["n2", "n3"], fallbacks: [0, 5, 63]), .pending(hintTargets: [], fallbacks: []),
        ]
        for reply in replies {
            #expect(try AntiEntropyCodec.decodeReply(AntiEntropyCodec.encode(reply), limits: Limits()) == reply)
        }
    }

    @Test func malformedBytesAreErrorsNotTraps() {
        var rng = SplitMix64(seed: 42)
        let good = AntiEntropyCodec.encode(AntiEntropyRequest(partition: PartitionID(1), shape: .standard,
                                                              body: .keys(KeyQuery(segments: [1, 2], objectsFor: [2], after: [1], limit: 5))))
        for _ in 0..<5000 {
            var b = good
            let i = Int(rng.next(below: UInt64(b.count)))
            b[i] = UInt8(truncatingIfNeeded: rng.next())
            if rng.next(below: 4) == 0 { b = Array(b.prefix(Int(rng.next(below: UInt64(b.count))))) }
            _ = try? AntiEntropyCodec.decodeRequest(b, limits: Limits())
            _ = try? AntiEntropyCodec.decodeReply(b, limits: Limits())
        }
        // Segments must ascend and stay below the tree's width.
        var w = [UInt8]([1, 3, 0, 0, 0, 1, 2, 1])
        w += [2, 0, 0]  // level 1, two parents: 0 then a zero step
        #expect(throws: DecodeError.self) { try AntiEntropyCodec.decodeRequest(w, limits: Limits()) }
    }
}
