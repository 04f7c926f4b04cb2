import Testing
import PropertyBased
@testable import CairnCore

private let a = ActorID(node: "a", epoch: 1)
private let b = ActorID(node: "b", epoch: 1)
private let c = ActorID(node: "c", epoch: 7)
private let actors = [a, b, c]

/// A random history over three replicas, replayed from a list of small integers so the property
/// library can generate and shrink it. Each step is one of: a client read at a replica followed
/// by a coordinated write there (with that read's context, or a stale one), or a sync between two
/// replicas.
private func replay(_ steps: [Int]) -> [DVVSet<Int>] {
    snapshots(steps).suffix(3)
}

/// Every replica's state after every step of one history (dots are unique within a history, as
/// actor epochs guarantee in the real system; states of *different* histories must not be mixed).
private func snapshots(_ steps: [Int]) -> [DVVSet<Int>] {
    var all: [DVVSet<Int>] = []
    var replicas = [DVVSet<Int>(), DVVSet<Int>(), DVVSet<Int>()]
    var contexts: [VersionVector] = [VersionVector()]
    var nextValue = 0
    for s in steps {
        let r = s % 3
        switch (s / 3) % 3 {
        case 0:  // read then write with the fresh context
            contexts.append(replicas[r].context)
            nextValue += 1
            try? replicas[r].update(context: replicas[r].context, value: nextValue, actor: actors[r])
        case 1:  // write with an older context
            let ctx = contexts[(s / 9) % contexts.count]
            nextValue += 1
            try? replicas[r].update(context: ctx, value: nextValue, actor: actors[r])
        default:  // replicate r's state to the next replica
            let to = (r + 1) % 3
            replicas[to] = DVVSet.sync(replicas[to], replicas[r])
        }
        all += replicas
    }
    return all.isEmpty ? replicas : all
}

private let histories = Gen.int(in: 0...200).array(of: 0...40)

@Suite struct DVVSetProperties {
    @Test func syncIsCommutative() async {
        await propertyCheck(count: 300, input: histories, Gen.int(in: 0...999), Gen.int(in: 0...999)) { h, i, j in
            let s = snapshots(h)
            let (x, y) = (s[i % s.count], s[j % s.count])
            #expect(DVVSet.sync(x, y).isEquivalent(to: DVVSet.sync(y, x)))
        }
    }

    @Test func syncIsAssociative() async {
        await propertyCheck(count: 300, input: histories, Gen.int(in: 0...999), Gen.int(in: 0...999), Gen.int(in: 0...999)) { h, i, j, k in
            let s = snapshots(h)
            let (x, y, z) = (s[i % s.count], s[j % s.count], s[k % s.count])
            let left = DVVSet.sync(DVVSet.sync(x, y), z)
            let right = DVVSet.sync(x, DVVSet.sync(y, z))
            #expect(left.isEquivalent(to: right))
        }
    }

    @Test func syncIsIdempotent() async {
        await propertyCheck(count: 300, input: histories) { h in
            for x in replay(h) {
                #expect(DVVSet.sync(x, x) == x)
                let merged = DVVSet.sync(replay(h))
                #expect(DVVSet.sync(merged, x).isEquivalent(to: merged))
            }
        }
    }

    @Test func invariantsHoldAfterAnyHistory() async {
        await propertyCheck(count: 300, input: histories) { h in
            for x in replay(h) {
                #expect(DVVSet(entries: x.entries, anonymous: x.anonymous) != nil)
            }
        }
    }

    /// Writing with the context of a read supersedes exactly the siblings that read returned:
    /// everything else survives, and the new value is present.
    @Test func writeWithReadContextSupersedesExactlyWhatWasRead() async {
        await propertyCheck(count: 300, input: histories, Gen.int(in: 0...2)) { h, r in
            let replicas = replay(h)
            let read = replicas[r]
            var server = DVVSet.sync(replicas)   // the coordinator may know more than the reader saw
            let unseen = Set(server.values).subtracting(read.values)
            try server.update(context: read.context, value: -1, actor: actors[r])
            #expect(Set(server.values) == unseen.union([-1]))
        }
    }

    /// Two writes with the same (stale) context are concurrent: both survive.
    @Test func twoWritesWithTheSameContextBothSurvive() async {
        await propertyCheck(count: 300, input: histories, Gen.int(in: 0...2), Gen.int(in: 0...2)) { h, r1, r2 in
            let replicas = replay(h)
            let ctx = replicas[r1].context
            var server = DVVSet.sync(replicas)
            try server.update(context: ctx, value: -1, actor: actors[r2])
            try server.update(context: ctx, value: -2, actor: actors[r2])
            #expect(server.values.contains(-1))
            #expect(server.values.contains(-2))
        }
    }

    @Test func encodeDecodeRoundTrip() async {
        await propertyCheck(count: 200, input: histories) { h throws in
            for x in replay(h) {
                let object = VersionedObject(entries: x.entries.map { e in
                    .init(actor: e.actor, counter: e.counter, values: e.values.map { Sibling(value: Array("v\($0)".utf8), timestampMillis: UInt64($0)) })
                }, anonymous: [])
                guard let object else { Issue.record("invalid object"); return }
                #expect(try VersionedObject.decode(object.encoded(), limits: Limits()) == object)
            }
        }
    }
}

@Suite struct DVVSetCases {
    /// riak_kv#746: two clients alternately write through the same coordinator, each with the
    /// context of its own previous write. With per-actor vector clocks this grows siblings without
    /// bound; with DVV the sibling count stays at the number of truly concurrent writers (2).
    @Test func interleavedWritersDoNotExplodeSiblings() throws {
        var server = DVVSet<String>()
        var ctxX = VersionVector()
        var ctxY = VersionVector()
        for i in 0..<50 {
            try server.update(context: ctxX, value: "x\(i)", actor: a)
            ctxX = server.context
            #expect(server.valueCount <= 2)
            try server.update(context: ctxY, value: "y\(i)", actor: a)
            ctxY = server.context
            #expect(server.valueCount <= 2)
        }
        #expect(Set(server.values) == ["x49", "y49"])
    }

    @Test func blindWriteIsConcurrentWithEverything() throws {
        var s = DVVSet<String>()
        try s.update(context: VersionVector(), value: "one", actor: a)
        try s.update(context: VersionVector(), value: "two", actor: b)
        #expect(Set(s.values) == ["one", "two"])
        try s.update(context: s.context, value: "three", actor: a)
        #expect(s.values == ["three"])
    }

    @Test func replicaMergeKeepsConcurrentAndDropsSuperseded() throws {
        var r1 = DVVSet<String>()
        try r1.update(context: VersionVector(), value: "v1", actor: a)
        var r2 = r1
        try r1.update(context: r1.context, value: "v2-a", actor: a)   // supersedes v1
        try r2.update(context: r2.context, value: "v2-b", actor: b)   // also supersedes v1, concurrently
        let merged = DVVSet.sync(r1, r2)
        #expect(Set(merged.values) == ["v2-a", "v2-b"])
        #expect(r1.strictlyPrecedes(merged))
        #expect(!merged.strictlyPrecedes(r1))
    }

    @Test func counterOverflowIsAnErrorNotATrap() throws {
        let full = DVVSet<Int>(entries: [.init(actor: a, counter: .max, values: [])], anonymous: [])
        guard var clock = full else { Issue.record("invalid"); return }
        #expect(throws: VersionError.counterOverflow(a)) { try clock.event(actor: a, value: 1) }
    }

    @Test func pruneKeepsTheNewestAndPropagatesAsSuperseded() throws {
        var s = DVVSet<Int>()
        for i in 0..<10 { try s.update(context: VersionVector(), value: i, actor: actors[i % 3]) }
        var pruned = s
        #expect(pruned.prune(toAtMost: 4, rank: { UInt64($0) }) == 6)
        #expect(pruned.valueCount == 4)
        #expect(Set(pruned.values) == [6, 7, 8, 9])
        // A replica that still holds the pruned values converges to the pruned set.
        #expect(DVVSet.sync(s, pruned).isEquivalent(to: pruned))
    }
}
