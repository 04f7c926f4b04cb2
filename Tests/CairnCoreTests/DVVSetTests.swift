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

    /// The merge of a first answer and the rest is the merge of them all, exactly (the first
    /// one, alone, is returned as it is).
    @Test func syncOfAFirstAndTheRestIsSyncOfAll() async {
        await propertyCheck(count: 300, input: histories, Gen.int(in: 0...999), Gen.int(in: 0...3)) { h, i, n in
            let s = snapshots(h)
            let all = (0..<(n + 1)).map { s[(i + 7 * $0) % s.count] }
            #expect(DVVSet.sync(all[0], all.dropFirst()) == DVVSet.sync(all))
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
    /// A counter floor starts an actor's history past any dot it issued for a dropped history
    /// (a collected tombstone), and never renumbers live values.
    @Test func aFloorAppliesOnlyWhereTheActorHasNoLiveValue() throws {
        var fresh = DVVSet<String>()
        try fresh.update(context: VersionVector(), value: "w", actor: a, floor: 40)
        #expect(fresh.context[a] == 40)
        // An entry with no live value (superseded by another actor) jumps to the floor.
        var superseded = DVVSet<String>()
        try superseded.update(context: VersionVector(), value: "x", actor: a)
        try superseded.update(context: superseded.context, value: "y", actor: b)
        try superseded.update(context: superseded.context, value: "z", actor: a, floor: 40)
        #expect(superseded.context[a] == 40 && superseded.values == ["z"])
        // A live value of the actor keeps counting from it: its dot must keep its number.
        var live = DVVSet<String>()
        try live.update(context: VersionVector(), value: "x", actor: a)
        try live.update(context: VersionVector(), value: "sibling", actor: a, floor: 40)
        #expect(live.context[a] == 2 && Set(live.values) == ["x", "sibling"])
        // Below the counter a floor changes nothing.
        var high = DVVSet<String>()
        for i in 0..<5 { try high.update(context: high.context, value: "v\(i)", actor: a) }
        try high.update(context: high.context, value: "next", actor: a, floor: 3)
        #expect(high.context[a] == 6)
    }

    /// The doomstone sequence (riak_kv#679) on clocks: a tombstone {a:5} is collected, a new
    /// write of the key starts a fresh history at `a`, and an old copy of the tombstone comes
    /// back (a fallback, a lagging replica). Without a floor the new write's dot (a,1) is covered
    /// by the tombstone and the write is lost; with the floor it survives.
    @Test func aWriteAfterACollectedTombstoneSurvivesTheOldTombstoneWithAFloor() throws {
        var old = DVVSet<String>()
        for i in 0..<5 { try old.update(context: old.context, value: "v\(i)", actor: a) }
        try old.update(context: old.context, value: "<deleted>", actor: a)
        let tombstone = old   // {a:6}, its one value the deletion
        var reused = DVVSet<String>()
        try reused.update(context: VersionVector(), value: "new", actor: a)
        #expect(!DVVSet.sync(tombstone, reused).values.contains("new"), "without a floor the new write is discarded")
        var floored = DVVSet<String>()
        try floored.update(context: VersionVector(), value: "new", actor: a, floor: tombstone.context[a] + 1)
        #expect(DVVSet.sync(tombstone, floored).values.contains("new"))
        #expect(DVVSet.sync(floored, tombstone).values.contains("new"))
    }

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
