import Testing
@testable import CairnStorage

@Suite struct MemtableTests {
    @Test func newestVersionAtOrBelowTheSnapshotWins() {
        let m = Memtable()
        m.add(key: [1], sequence: 1, kind: .value, value: [10])
        m.add(key: [1], sequence: 3, kind: .value, value: [30])
        m.add(key: [1], sequence: 5, kind: .deletion, value: [])
        m.add(key: [2], sequence: 2, kind: .value, value: [20])
        #expect(m.get([1])?.kind == .deletion)
        #expect(m.get([1], snapshot: 4)?.value == [30])
        #expect(m.get([1], snapshot: 2)?.value == [10])
        #expect(m.get([1], snapshot: 0) == nil)
        #expect(m.get([2])?.value == [20])
        #expect(m.get([3]) == nil)
        #expect(m.get([]) == nil)
    }

    /// The point index keeps a key's entry of highest sequence, whatever order entries arrive in.
    @Test func anOlderEntryAddedLaterDoesNotHideTheNewest() {
        let m = Memtable()
        m.add(key: [7], sequence: 9, kind: .value, value: [9])
        m.add(key: [7], sequence: 4, kind: .value, value: [4])
        #expect(m.get([7])?.value == [9])
        #expect(m.get([7], snapshot: 8)?.value == [4])
        #expect(m.get([7], snapshot: 3) == nil)
        for seq in [7, 2, 5, 8] as [UInt64] { m.add(key: [7], sequence: seq, kind: .value, value: [UInt8(seq)]) }
        #expect(m.allEntries().map(\.sequence) == [9, 8, 7, 5, 4, 2])
        #expect(m.get([7], snapshot: 6)?.value == [5] && m.get([7], snapshot: 3)?.value == [2])
    }

    @Test func scansInKeyOrderWithOneVersionPerKey() {
        let m = Memtable()
        for (k, seq) in [([5], 1), ([1], 2), ([3], 3), ([1], 4), ([9], 5), ([3, 0], 6)] as [([UInt8], UInt64)] {
            m.add(key: k, sequence: seq, kind: .value, value: [UInt8(seq)])
        }
        #expect(m.scan().map(\.key) == [[1], [3], [3, 0], [5], [9]])
        #expect(m.scan().first?.value == [4])
        #expect(m.scan(snapshot: 3).map(\.key) == [[1], [3], [5]])
        #expect(m.scan(snapshot: 3).first?.value == [2])
        #expect(m.scan(from: [3], to: [9]).map(\.key) == [[3], [3, 0], [5]])
        #expect(m.allEntries().map(\.sequence) == [4, 2, 3, 6, 1, 5])
    }

    /// A frozen memtable is walked without its lock: what a flush writes is what a scan sees,
    /// the newest entry per key, deletions included. Walking freezes the table.
    @Test func aFrozenMemtableWalksLikeAFullScan() {
        let m = Memtable()
        var rng = Seeded(state: 5)
        for seq in 1...2000 as ClosedRange<UInt64> {
            let k = [UInt8(rng.next() % 40), UInt8(rng.next() % 7)]
            m.add(key: k, sequence: seq, kind: rng.next() % 5 == 0 ? .deletion : .value, value: [UInt8(seq % 256)])
        }
        m.freeze()
        var walk = m.frozenEntries()
        var walked: [Memtable.Entry] = []
        while let e = walk.next() { walked.append(e) }
        #expect(walked == m.scan())
        #expect(walked.count == Set(walked.map(\.key)).count && walked.count > 200)
        #expect(m.get(walked[0].key) == walked[0])   // reads still answer
        let unfrozen = Memtable()
        unfrozen.add(key: [1], sequence: 1, kind: .value, value: [1])
        var one = unfrozen.frozenEntries()   // freezes it
        #expect(one.next()?.key == [1] && one.next() == nil)
    }

    /// Against a reference model: random keys, versions and deletions; every get at every
    /// snapshot and a full scan agree with the model.
    @Test func agreesWithAReferenceModel() {
        var rng = Seeded(state: 77)
        for _ in 0..<20 {
            let m = Memtable()
            var model: [[UInt8]: [(UInt64, EntryKind, [UInt8])]] = [:]
            var seq: UInt64 = 0
            for _ in 0..<Int.random(in: 1...400, using: &rng) {
                seq += 1
                // Short keys, and long ones sharing their first 7 bytes with zeros among the rest:
                // comparisons across both 8-byte prefix words and their zero padding.
                let long = Bool.random(using: &rng)
                let key = (0..<Int.random(in: long ? 6...20 : 0...3, using: &rng)).map { i in
                    long && i < 7 ? UInt8(1) : UInt8.random(in: 0...(long ? 2 : 3), using: &rng)
                }
                let kind: EntryKind = Int.random(in: 0...4, using: &rng) == 0 ? .deletion : .value
                let value: [UInt8] = kind == .value ? [UInt8(truncatingIfNeeded: seq)] : []
                m.add(key: key, sequence: seq, kind: kind, value: value)
                model[key, default: []].append((seq, kind, value))
            }
            #expect(m.count == Int(seq))
            let step = Int(max(seq / 7, 1))
            for snapshot in stride(from: UInt64(0), through: seq, by: step) {
                for (key, versions) in model {
                    let visible = versions.filter { $0.0 <= snapshot }
                    let expected = visible.max { $0.0 < $1.0 }
                    let got = m.get(key, snapshot: snapshot)
                    let sameSequence = got?.sequence == expected?.0
                    let sameKind = got?.kind == expected?.1
                    let gotValue: [UInt8] = got?.value ?? []
                    let expectedValue: [UInt8] = expected?.2 ?? []
                    #expect(sameSequence && sameKind && gotValue == expectedValue)
                }
                let expectedKeys = model.filter { $0.value.contains { $0.0 <= snapshot } }.keys.sorted { $0.lexicographicallyPrecedes($1) }
                #expect(m.scan(snapshot: snapshot).map(\.key) == expectedKeys)
            }
        }
    }

    @Test func tracksItsSize() {
        let m = Memtable()
        #expect(m.approximateBytes == 0)
        m.add(key: [UInt8](repeating: 1, count: 100), sequence: 1, kind: .value, value: [UInt8](repeating: 2, count: 1000))
        #expect(m.approximateBytes >= 1100)
    }
}

@Suite struct MemtableArenaTests {
    /// Entries live in the arena's blocks: 100,000 entries of 100-byte values are a few dozen
    /// allocations (freed together when the table goes), and every entry reads back whole.
    @Test func entriesShareTheArenasBlocks() {
        let m = Memtable()
        for i in 0..<100_000 {
            let key: [UInt8] = [0x20, UInt8(truncatingIfNeeded: i >> 16), UInt8(truncatingIfNeeded: i >> 8), UInt8(truncatingIfNeeded: i)]
            m.add(key: key, sequence: UInt64(i + 1), kind: .value, value: [UInt8](repeating: UInt8(truncatingIfNeeded: i), count: 100))
        }
        let blocks = m.arenaBlocks
        #expect(blocks > 1 && blocks <= m.approximateBytes / Arena.blockBytes + 2, "\(blocks) blocks for \(m.approximateBytes) bytes")
        #expect(m.get([0x20, 0, 0x30, 0x39])?.value == [UInt8](repeating: 0x39, count: 100))
        #expect(m.keyCount == 100_000)
    }

    /// A value larger than a quarter block gets a block of its own; the blocks around it keep
    /// filling, and an empty value or key takes no bytes.
    @Test func largeAndEmptyValuesRoundTrip() {
        let m = Memtable()
        let big = (0..<(Arena.blockBytes / 2)).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        m.add(key: [1], sequence: 1, kind: .value, value: [7])
        m.add(key: [2], sequence: 2, kind: .value, value: big)
        m.add(key: [3], sequence: 3, kind: .deletion, value: [])
        m.add(key: [], sequence: 4, kind: .value, value: [9])
        m.add(key: [2], sequence: 5, kind: .value, value: [5])
        #expect(m.arenaBlocks == 2)
        #expect(m.get([1])?.value == [7])
        #expect(m.get([2], snapshot: 4)?.value == big)
        #expect(m.get([2])?.value == [5])
        #expect(m.get([3])?.kind == .deletion && m.get([3])?.value == [])
        #expect(m.get([])?.value == [9])
        #expect(m.scan().map(\.key) == [[], [1], [2], [3]])
    }

    /// A block's tail left unused when the next entry does not fit counts in the table's size:
    /// five 60,000-byte values take two blocks, and the size covers the whole first one.
    @Test func unusedBlockTailsCountInTheSize() {
        let m = Memtable()
        for i in 0..<5 { m.add(key: [UInt8(i)], sequence: UInt64(i + 1), kind: .value, value: [UInt8](repeating: 1, count: 60_000)) }
        #expect(m.arenaBlocks == 2)
        #expect(m.approximateBytes >= Arena.blockBytes + 60_000)
    }

    /// The index grows from its smallest size through many doublings and still finds every key;
    /// keys that share long prefixes (the partition bytes every stored key starts with) differ
    /// only past the index's hash-equal check.
    @Test func theIndexGrowsAndFindsEveryKey() {
        let m = Memtable(expectedKeys: 1)
        let prefix = [UInt8](repeating: 0x20, count: 20)
        for i in 0..<5_000 { m.add(key: prefix + [UInt8(i >> 8), UInt8(i & 255)], sequence: UInt64(i + 1), kind: .value, value: [UInt8(i & 255)]) }
        #expect(m.keyCount == 5_000)
        for i in stride(from: 0, to: 5_000, by: 7) { #expect(m.get(prefix + [UInt8(i >> 8), UInt8(i & 255)])?.sequence == UInt64(i + 1)) }
        #expect(m.get(prefix + [0xff, 0xff]) == nil)
    }
}

@Suite struct MemtableLifetimeTests {
    /// Nodes live in the arena, not in a chain of owning links: dropping a large memtable on a
    /// small-stack thread frees its blocks (a recursive release would overflow the stack).
    @Test func aLargeMemtableIsFreedWithoutRecursion() async {
        let done: Bool = await Task.detached {
            var m: Memtable? = Memtable()
            for i in 0..<300_000 {
                m?.add(key: [UInt8(truncatingIfNeeded: i >> 16), UInt8(truncatingIfNeeded: i >> 8), UInt8(truncatingIfNeeded: i)],
                       sequence: UInt64(i + 1), kind: .value, value: [1])
            }
            #expect(m?.count == 300_000)
            m = nil
            return m == nil
        }.value
        #expect(done)
    }
}

@Suite struct MemtableUpdateTests {
    /// An update heads its key's chain of versions: every version stays readable at its snapshot,
    /// in table order.
    @Test func anUpdateKeepsEveryVersionInTableOrder() {
        let m = Memtable(expectedKeys: 4)
        m.add(key: [2], sequence: 1, kind: .value, value: [1])
        m.add(key: [1], sequence: 2, kind: .value, value: [2])
        m.add(key: [3], sequence: 3, kind: .value, value: [3])
        m.add(key: [2], sequence: 4, kind: .value, value: [4])
        m.add(key: [2], sequence: 5, kind: .deletion, value: [])
        m.add(key: [2], sequence: 6, kind: .value, value: [6])
        #expect(m.allEntries().map(\.sequence) == [2, 6, 5, 4, 1, 3])
        #expect(m.get([2])?.value == [6])
        #expect(m.get([2], snapshot: 5)?.kind == .deletion)
        #expect(m.get([2], snapshot: 4)?.value == [4])
        #expect(m.get([2], snapshot: 3)?.value == [1])
        #expect(m.get([2], snapshot: 0) == nil)
        #expect(m.count == 6 && m.keyCount == 3)
        #expect(m.scan(snapshot: 4).map(\.value) == [[2], [4], [3]])
    }

    /// Walks between adds: each sorts only the keys that arrived since the last one and merges
    /// them into the recent run, which is folded into the base past its bound; every walk (and
    /// a flush's) agrees with a model whether the keys lie in one run or both, and a walk with
    /// nothing new reuses the view.
    @Test(arguments: [1, 50, 4096]) func walksBetweenAddsMergeNewKeysInOrder(recentKeysMinimum: Int) {
        let m = Memtable(expectedKeys: 0, recentKeysMinimum: recentKeysMinimum)
        var sawBothRuns = false, sawBase = false
        var model: [[UInt8]: UInt64] = [:]
        var rng = Seeded(state: 11)
        var seq: UInt64 = 0
        for round in 0..<30 {
            for _ in 0..<(round % 3 == 0 ? 1 : Int(rng.next() % 200)) {
                seq += 1
                // Long shared prefixes, so the order falls past both prefix words at times.
                let key: [UInt8] = [0x01, 0, 0, 0, UInt8(rng.next() % 3)] + (0..<Int(rng.next() % 14)).map { _ in UInt8(rng.next() % 3) }
                m.add(key: key, sequence: seq, kind: .value, value: [UInt8(truncatingIfNeeded: seq)])
                model[key] = seq
            }
            let expected = model.keys.sorted { $0.lexicographicallyPrecedes($1) }
            #expect(m.scan().map(\.key) == expected)
            #expect(m.scan().map(\.sequence) == expected.compactMap { model[$0] })
            #expect(m.sortedView() === m.sortedView())
            let view = m.sortedView()
            #expect(view.count == model.count && view.recent.count <= max(recentKeysMinimum, view.base.count / 16))
            if !view.base.isEmpty { sawBase = true }
            if !view.base.isEmpty && !view.recent.isEmpty { sawBothRuns = true }
            let lower = expected[expected.count / 2]
            #expect(m.scan(from: lower).map(\.key) == Array(expected[(expected.count / 2)...]))
        }
        #expect(m.keyCount == model.count)
        // Under 4096 keys stay in the recent run; with smaller bounds, walks use both runs.
        #expect(recentKeysMinimum == 4096 ? !sawBase : sawBothRuns)
        let flushed = Array(IteratorSequence(m.frozenEntries())).map(\.key)
        #expect(flushed == model.keys.sorted { $0.lexicographicallyPrecedes($1) })
    }

    /// A cursor walks the table as it was when made: keys added later are not in its view, and
    /// versions added later are not seen even at the unbounded snapshot.
    @Test func aCursorWalksTheKeysHeldWhenItWasMade() {
        let m = Memtable()
        m.add(key: [2], sequence: 1, kind: .value, value: [1])
        m.add(key: [4], sequence: 2, kind: .value, value: [2])
        let cursor = m.cursor(from: [], snapshot: .max)
        m.add(key: [3], sequence: 3, kind: .value, value: [3])
        m.add(key: [4], sequence: 4, kind: .value, value: [4])
        #expect([cursor.next(), cursor.next(), cursor.next()].map { $0?.value } == [[1], [2], nil])
        let fresh = m.cursor(from: [3], snapshot: .max)
        #expect([fresh.next(), fresh.next(), fresh.next()].map { $0?.key } == [[3], [4], nil])
    }

    /// A cursor at a snapshot still returns the version its snapshot sees when the key is updated
    /// before the cursor reaches it, once; one that has passed the key does not see it again.
    @Test func aCursorParkedOnAnUpdatedKeySeesItsSnapshot() {
        let m = Memtable()
        for (i, k) in ([[1], [2], [3]] as [[UInt8]]).enumerated() { m.add(key: k, sequence: UInt64(i + 1), kind: .value, value: [UInt8(i)]) }
        let cursor = m.cursor(from: [], snapshot: 3)
        #expect(cursor.next()?.key == [1])          // parked on [2]'s node
        m.add(key: [2], sequence: 4, kind: .value, value: [40])
        m.add(key: [1], sequence: 5, kind: .value, value: [50])   // already passed
        m.add(key: [2], sequence: 6, kind: .value, value: [60])
        let rest = [cursor.next(), cursor.next(), cursor.next()]
        #expect(rest.map { $0?.key } == [[2], [3], nil])
        #expect(rest[0]?.value == [1] && rest[0]?.sequence == 2)
        let fresh = m.cursor(from: [], snapshot: .max)
        #expect([fresh.next(), fresh.next(), fresh.next()].map { $0?.value } == [[50], [60], [2]])
    }
}
