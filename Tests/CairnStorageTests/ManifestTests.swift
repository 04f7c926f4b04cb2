import Testing
@testable import CairnStorage

@Suite struct ManifestTests {
    func table(_ n: UInt64, level: Int, _ lo: UInt8, _ hi: UInt8) -> TableMeta {
        TableMeta(number: n, level: level, size: 1000 + n, smallest: [lo], largest: [hi])
    }

    @Test func editsRoundTrip() {
        var e = VersionEdit()
        e.logNumber = 7
        e.nextFile = 12
        e.lastSequence = 99_999
        e.added = [table(8, level: 0, 1, 9), table(9, level: 1, 0, 200)]
        e.removed = [(0, 3), (1, 4)]
        #expect(VersionEdit.decode(e.encoded()) == e)
        var q = VersionEdit()
        q.quarantined = [(1, 9)]
        #expect(VersionEdit.decode(q.encoded()) == q && q.encoded() == [8, 1, 9])
        var v = Version()
        v.apply(e)
        v.apply(q)
        #expect(v.tables[1]?.map(\.number) == [] && v.quarantined.map(\.number) == [9] && v.allTables.count == 2)
        var dropped = VersionEdit()
        dropped.removed = [(1, 9)]
        v.apply(dropped)
        #expect(v.quarantined.isEmpty)
        #expect(VersionEdit.decode([9]) == nil)
        #expect(VersionEdit.decode([4, 1]) == nil)
    }

    @Test func aVersionIsRebuiltFromTheManifest() throws {
        let fs = FaultyFileSystem()
        try fs.createDirectory("/db")
        #expect(try Manifest.recover(fs: fs, directory: "/db") == nil)
        var v = Version()
        v.logNumber = 1
        let writer = try Manifest.create(fs: fs, directory: "/db", number: 2, version: v)
        var flush = VersionEdit()
        flush.added = [table(3, level: 0, 10, 20)]
        flush.logNumber = 4
        flush.lastSequence = 500
        flush.nextFile = 5
        try Manifest.record(flush, to: writer)
        v.apply(flush)
        var compaction = VersionEdit()
        compaction.removed = [(0, 3)]
        compaction.added = [table(5, level: 1, 10, 20)]
        try Manifest.record(compaction, to: writer)
        v.apply(compaction)
        let (back, name) = try #require(try Manifest.recover(fs: fs, directory: "/db"))
        #expect(name == "MANIFEST-000002")
        #expect(back == v)
        #expect(back.tables[1]?.map(\.number) == [5] && (back.tables[0] ?? []).isEmpty)
        #expect(back.lastSequence == 500 && back.logNumber == 4)
    }

    /// Switching CURRENT to a new manifest, with a sync failing at each step in turn and then a
    /// crash: CURRENT names the old manifest or the new one, never anything else, and the
    /// manifest it names recovers.
    @Test func currentSwitchesAtomically() throws {
        for failingSync in 0..<4 {
            let fs = FaultyFileSystem()
            var rng = Seeded(state: UInt64(failingSync) + 1)
            try fs.createDirectory("/db")
            var v = Version()
            v.logNumber = 1
            _ = try Manifest.create(fs: fs, directory: "/db", number: 2, version: v)
            v.logNumber = 9
            // Manifest.create syncs: the new manifest, the directory, CURRENT.tmp, the directory.
            fs.failNextSyncs(1, skipping: failingSync)
            _ = try? Manifest.create(fs: fs, directory: "/db", number: 3, version: v)
            fs.crash(tearing: true, rng: &rng)
            let (back, name) = try #require(try Manifest.recover(fs: fs, directory: "/db"))
            #expect(name == "MANIFEST-000002" || name == "MANIFEST-000003", "step \(failingSync): \(name)")
            #expect(back.logNumber == (name == "MANIFEST-000002" ? 1 : 9))
        }
        // Without a failure the switch completes and survives a crash.
        let fs = FaultyFileSystem()
        var rng = Seeded(state: 42)
        try fs.createDirectory("/db")
        _ = try Manifest.create(fs: fs, directory: "/db", number: 2, version: Version())
        var v = Version()
        v.logNumber = 5
        _ = try Manifest.create(fs: fs, directory: "/db", number: 3, version: v)
        fs.crash(tearing: true, rng: &rng)
        #expect(try Manifest.recover(fs: fs, directory: "/db")?.manifest == "MANIFEST-000003")
    }

    @Test func aTornManifestTailKeepsEveryCompleteEdit() throws {
        let fs = FaultyFileSystem()
        try fs.createDirectory("/db")
        let writer = try Manifest.create(fs: fs, directory: "/db", number: 2, version: Version())
        var e = VersionEdit()
        e.lastSequence = 77
        try Manifest.record(e, to: writer)
        let size = fs.contents("/db/MANIFEST-000002")?.count ?? 0
        var late = VersionEdit()
        late.lastSequence = 88
        try Manifest.record(late, to: writer)
        try fs.truncate("/db/MANIFEST-000002", to: UInt64(size + 4))
        #expect(try Manifest.recover(fs: fs, directory: "/db")?.0.lastSequence == 77)
    }

    @Test func rangeTombstonesAndTableSequencesRoundTripAndReplay() {
        var e = VersionEdit()
        e.added = [TableMeta(number: 9, level: 2, size: 10, smallest: [1], largest: [5], smallestSequence: 3, largestSequence: 70, filteredThrough: 44)]
        e.addedTombstones = [RangeTombstone(lower: [1, 0], upper: [2], sequence: 50)]
        #expect(VersionEdit.decode(e.encoded()) == e)
        var v = Version()
        v.apply(e)
        #expect(v.tombstones.map(\.sequence) == [50])
        #expect(v.tables[2]?.first?.filteredThrough == 44)
        let t = RangeTombstone(lower: [1, 0], upper: [2], sequence: 50)
        #expect(t.hides([1, 0, 7], 49) && !t.hides([1, 0, 7], 50) && !t.hides([2], 1) && !t.hides([0, 9], 1))
        #expect(t.hides([1, 5], 10, snapshot: 60) && !t.hides([1, 5], 10, snapshot: 40), "invisible to older snapshots")
        #expect(v.tables[2]?.first?.mayHoldEntriesHidden(by: t) == true)
        var retire = VersionEdit()
        retire.removedTombstones = [50]
        v.apply(retire)
        #expect(v.tombstones.isEmpty)
        var deep = VersionEdit()
        deep.added = [TableMeta(number: 1, level: 7, size: 1, smallest: [1], largest: [1])]
        #expect(VersionEdit.decode(deep.encoded()) == nil, "a level the engine does not have is corruption")
    }
}
