/// A table file the current version references.
public struct TableMeta: Sendable, Hashable {
    public var number: UInt64
    public var level: Int
    public var size: UInt64
    public var smallest: [UInt8]
    public var largest: [UInt8]
    /// The oldest and newest sequence numbers of the table's entries (range-tombstone bookkeeping).
    public var smallestSequence: UInt64
    public var largestSequence: UInt64
    /// Every range tombstone with a sequence ≤ this was applied when the table was written: the
    /// table holds nothing they hide.
    public var filteredThrough: UInt64
    public init(number: UInt64, level: Int, size: UInt64, smallest: [UInt8], largest: [UInt8],
                smallestSequence: UInt64 = 0, largestSequence: UInt64 = 0, filteredThrough: UInt64 = 0) {
        self.number = number
        self.level = level
        self.size = size
        self.smallest = smallest
        self.largest = largest
        self.smallestSequence = smallestSequence
        self.largestSequence = largestSequence
        self.filteredThrough = filteredThrough
    }

    /// Whether the table may hold entries `t` hides.
    func mayHoldEntriesHidden(by t: RangeTombstone) -> Bool {
        smallestSequence < t.sequence && filteredThrough < t.sequence && overlaps(t.lower, t.upper)
    }

    /// Whether the table's key span intersects `[lower, upper)` (nil upper: unbounded).
    func overlaps(_ lower: [UInt8], _ upper: [UInt8]?) -> Bool {
        if largest.isBefore(lower) { return false }
        if let upper, !smallest.isBefore(upper) { return false }
        return true
    }
}

/// `deleteRange(lower, upper)` as written at `sequence`: hides every entry with
/// `lower ≤ key < upper` and a smaller sequence. Lives until no table or memtable holds an entry
/// it hides; identified by its sequence.
public struct RangeTombstone: Sendable, Hashable {
    public var lower: [UInt8]
    public var upper: [UInt8]
    public var sequence: UInt64
    public init(lower: [UInt8], upper: [UInt8], sequence: UInt64) {
        self.lower = lower
        self.upper = upper
        self.sequence = sequence
    }

    func covers(_ key: [UInt8]) -> Bool {
        !key.isBefore(lower) && key.isBefore(upper)
    }

    /// Whether this tombstone hides the entry `(key, seq)` for a reader at `snapshot`.
    func hides(_ key: [UInt8], _ seq: UInt64, snapshot: UInt64 = .max) -> Bool {
        sequence > seq && sequence <= snapshot && covers(key)
    }
}

/// One change to the set of live files (a flush, a compaction, a new log).
///
/// ```
/// edit     = field*
/// field    = %x01 log-number:varint / %x02 next-file:varint / %x03 last-sequence:varint
///          / %x04 table / %x05 removed-level:varint removed-number:varint
///          / %x06 tombstone / %x07 removed-tombstone-sequence:varint
///          / %x08 quarantined-level:varint quarantined-number:varint
/// table    = level:varint number:varint size:varint smallest:blob largest:blob
///            smallest-sequence:varint largest-sequence:varint filtered-through:varint
/// tombstone = lower:blob upper:blob sequence:varint
/// ```
public struct VersionEdit: Sendable, Hashable {
    public var logNumber: UInt64?
    public var nextFile: UInt64?
    public var lastSequence: UInt64?
    public var added: [TableMeta] = []
    public var removed: [(level: Int, number: UInt64)] = []
    public var addedTombstones: [RangeTombstone] = []
    public var removedTombstones: [UInt64] = []
    /// Tables found corrupt, set aside from their level (see `Version.quarantined`).
    public var quarantined: [(level: Int, number: UInt64)] = []

    public init() {}

    public static func == (a: VersionEdit, b: VersionEdit) -> Bool {
        a.logNumber == b.logNumber && a.nextFile == b.nextFile && a.lastSequence == b.lastSequence && a.added == b.added
            && a.removed.map { [UInt64($0.level), $0.number] } == b.removed.map { [UInt64($0.level), $0.number] }
            && a.addedTombstones == b.addedTombstones && a.removedTombstones == b.removedTombstones
            && a.quarantined.map { [UInt64($0.level), $0.number] } == b.quarantined.map { [UInt64($0.level), $0.number] }
    }

    public func hash(into h: inout Hasher) {
        h.combine(logNumber); h.combine(nextFile); h.combine(lastSequence); h.combine(added)
    }

    func encoded() -> [UInt8] {
        var out: [UInt8] = []
        func blob(_ b: [UInt8]) { Coding.putVarint(&out, UInt64(b.count)); out += b }
        if let v = logNumber { out.append(1); Coding.putVarint(&out, v) }
        if let v = nextFile { out.append(2); Coding.putVarint(&out, v) }
        if let v = lastSequence { out.append(3); Coding.putVarint(&out, v) }
        for t in added {
            out.append(4)
            Coding.putVarint(&out, UInt64(t.level)); Coding.putVarint(&out, t.number); Coding.putVarint(&out, t.size)
            blob(t.smallest); blob(t.largest)
            Coding.putVarint(&out, t.smallestSequence); Coding.putVarint(&out, t.largestSequence)
            Coding.putVarint(&out, t.filteredThrough)
        }
        for r in removed { out.append(5); Coding.putVarint(&out, UInt64(r.level)); Coding.putVarint(&out, r.number) }
        for t in addedTombstones { out.append(6); blob(t.lower); blob(t.upper); Coding.putVarint(&out, t.sequence) }
        for n in removedTombstones { out.append(7); Coding.putVarint(&out, n) }
        for q in quarantined { out.append(8); Coding.putVarint(&out, UInt64(q.level)); Coding.putVarint(&out, q.number) }
        return out
    }

    static func decode(_ b: [UInt8]) -> VersionEdit? {
        var e = VersionEdit()
        var p = 0
        func v() -> UInt64? { Coding.getVarint(b, &p, limit: b.count) }
        func blob() -> [UInt8]? {
            guard let n = v(), n <= UInt64(b.count - p) else { return nil }
            defer { p += Int(n) }
            return Array(b[p..<p + Int(n)])
        }
        while p < b.count {
            let tag = b[p]
            p += 1
            switch tag {
            case 1: guard let x = v() else { return nil }; e.logNumber = x
            case 2: guard let x = v() else { return nil }; e.nextFile = x
            case 3: guard let x = v() else { return nil }; e.lastSequence = x
            case 4:
                guard let level = v(), level < UInt64(CompactionPolicy.levels), let number = v(), let size = v(), let small = blob(), let large = blob(),
                      let lowSeq = v(), let highSeq = v(), let filtered = v() else { return nil }
                e.added.append(TableMeta(number: number, level: Int(level), size: size, smallest: small, largest: large,
                                         smallestSequence: lowSeq, largestSequence: highSeq, filteredThrough: filtered))
            case 5:
                guard let level = v(), level < UInt64(CompactionPolicy.levels), let number = v() else { return nil }
                e.removed.append((Int(level), number))
            case 6:
                guard let lower = blob(), let upper = blob(), let seq = v() else { return nil }
                e.addedTombstones.append(RangeTombstone(lower: lower, upper: upper, sequence: seq))
            case 7:
                guard let seq = v() else { return nil }
                e.removedTombstones.append(seq)
            case 8:
                guard let level = v(), level < UInt64(CompactionPolicy.levels), let number = v() else { return nil }
                e.quarantined.append((Int(level), number))
            default: return nil
            }
        }
        return e
    }
}

/// The live files: tables by level, the current log, counters. Built by applying edits in order.
public struct Version: Sendable, Hashable {
    public var tables: [Int: [TableMeta]] = [:]
    /// Live tables set aside because they are corrupt (a compaction met a bad block, or the table
    /// could not be opened). They keep their data and stay readable where it is intact, but
    /// belong to no level: no compaction reads them, and a read weighs their entries by sequence
    /// instead of by position (newer data may since sit below them). Each keeps the level it
    /// was taken from. Removed only by a range deletion that covers it.
    public var quarantined: [TableMeta] = []
    public var logNumber: UInt64 = 0
    public var nextFile: UInt64 = 1
    public var lastSequence: UInt64 = 0
    /// Range tombstones recorded by flushes and not yet retired, oldest first.
    public var tombstones: [RangeTombstone] = []

    public init() {}

    public mutating func apply(_ e: VersionEdit) {
        if let v = e.logNumber { logNumber = v }
        if let v = e.nextFile { nextFile = max(nextFile, v) }
        if let v = e.lastSequence { lastSequence = max(lastSequence, v) }
        for r in e.removed {
            tables[r.level]?.removeAll { $0.number == r.number }
            quarantined.removeAll { $0.number == r.number }
        }
        for t in e.added { tables[t.level, default: []].append(t) }
        for q in e.quarantined {
            guard let t = tables[q.level]?.first(where: { $0.number == q.number }) else { continue }
            tables[q.level]?.removeAll { $0.number == q.number }
            quarantined.append(t)
        }
        for level in tables.keys {
            // Level 0 newest first (its tables overlap); deeper levels by key (they do not).
            if level == 0 { tables[level]?.sort { $0.number > $1.number } }
            else { tables[level]?.sort { $0.smallest.isBefore($1.smallest) } }
        }
        tombstones.removeAll { e.removedTombstones.contains($0.sequence) }
        for t in e.addedTombstones where !tombstones.contains(where: { $0.sequence == t.sequence }) { tombstones.append(t) }
        tombstones.sort { $0.sequence < $1.sequence }
    }

    /// Every live table, level by level, then the quarantined ones.
    public var allTables: [TableMeta] { tables.keys.sorted().flatMap { tables[$0] ?? [] } + quarantined }

    /// Checks the numbers a manifest states before the engine computes with them (a manifest's
    /// checksums can hold over values no engine wrote): the last sequence and the next file number
    /// within the engine's bounds (`Database.maxSequence`, `Database.maxFileNumber`), the log
    /// number and every table number below the next file number, no table or range tombstone
    /// newer than the last sequence. Sizes are not checked: they are only summed, saturating.
    /// Throws `.corruption` naming `path` (the manifest).
    public func validate(path: String) throws(StorageError) {
        func bad(_ why: String) -> StorageError { .corruption(path: path, offset: 0, reason: why) }
        guard lastSequence < Database.maxSequence else { throw bad("last sequence \(lastSequence) is out of range") }
        guard nextFile < Database.maxFileNumber else { throw bad("next file number \(nextFile) is out of range") }
        guard logNumber <= nextFile else { throw bad("log number \(logNumber) is past the next file number \(nextFile)") }
        for t in allTables {
            guard t.number < nextFile else { throw bad("table \(t.number) is not below the next file number \(nextFile)") }
            guard t.smallestSequence <= t.largestSequence, t.largestSequence <= lastSequence else {
                throw bad("table \(t.number) holds sequences \(t.smallestSequence)...\(t.largestSequence), past the last sequence \(lastSequence)")
            }
        }
        for t in tombstones where t.sequence > lastSequence {
            throw bad("range tombstone \(t.sequence) is past the last sequence \(lastSequence)")
        }
    }
}

extension Sequence where Element == TableMeta {
    /// The tables' total size, saturating at `UInt64.max`: sizes come from the manifest.
    var totalSize: UInt64 { reduce(0) { $0.addingSaturating($1.size) } }
}

extension UInt64 {
    /// `self + other`, or `UInt64.max` if that overflows (counters fed by numbers from files).
    func addingSaturating(_ other: UInt64) -> UInt64 {
        let (sum, overflow) = addingReportingOverflow(other)
        return overflow ? .max : sum
    }
}

/// The manifest: a log (the WAL format) of version edits, named by `CURRENT`.
///
/// `CURRENT` holds the manifest's file name and a newline. It is replaced atomically: write
/// `CURRENT.tmp`, sync it, rename it over `CURRENT`, sync the directory. A crash at any point
/// leaves the old or the new `CURRENT`, never a torn one.
public enum Manifest {
    public static let currentName = "CURRENT"

    public static func fileName(_ n: UInt64) -> String {
        let d = String(n)
        return "MANIFEST-" + String(repeating: "0", count: max(0, 6 - d.count)) + d
    }

    /// Points `CURRENT` at `manifest` (a file name in `directory`), crash-safely.
    public static func installCurrent(fs: any FileSystem, directory: String, manifest: String) throws(StorageError) {
        try fs.replaceAtomically(currentName, in: directory, with: Array((manifest + "\n").utf8))
    }

    /// Writes a new manifest holding `version` as one edit and installs it.
    public static func create(fs: any FileSystem, directory: String, number: UInt64, version: Version) throws(StorageError) -> WALWriter {
        let name = fileName(number)
        let path = directory + "/" + name
        let writer = WALWriter(file: try fs.openAppendable(path, create: true), path: path)
        var snapshot = VersionEdit()
        snapshot.logNumber = version.logNumber
        snapshot.nextFile = version.nextFile
        snapshot.lastSequence = version.lastSequence
        snapshot.added = version.allTables
        snapshot.addedTombstones = version.tombstones
        snapshot.quarantined = version.quarantined.map { ($0.level, $0.number) }
        try writer.append([snapshot.encoded()], sync: true)
        try fs.syncDirectory(directory)
        try installCurrent(fs: fs, directory: directory, manifest: name)
        return writer
    }

    /// Appends an edit durably (the caller applies it to its version only after this returns).
    /// If the append or its sync fails, `writer` refuses every later edit: the torn edit stays
    /// the manifest's last bytes, which recovery drops (the edit was never applied).
    public static func record(_ edit: VersionEdit, to writer: WALWriter) throws(StorageError) {
        try writer.append([edit.encoded()], sync: true)
    }

    /// What recovery rebuilt from the manifest `CURRENT` names.
    public struct Recovered: Sendable {
        public var version: Version
        /// The manifest's file name.
        public var manifest: String
        /// Bytes of a torn last edit that were dropped (an append cut short by a crash or a
        /// failed write; it was never applied).
        public var tornTailBytes: UInt64
    }

    /// Reads `CURRENT` and replays the manifest it names. nil when there is no `CURRENT` (a new
    /// database). The version is not checked here: `Database.open` calls `Version.validate`.
    public static func recover(fs: any FileSystem, directory: String) throws(StorageError) -> (Version, manifest: String)? {
        try recoverReporting(fs: fs, directory: directory).map { ($0.version, $0.manifest) }
    }

    /// `recover`, also reporting the torn tail it dropped.
    public static func recoverReporting(fs: any FileSystem, directory: String) throws(StorageError) -> Recovered? {
        let currentPath = directory + "/" + currentName
        guard fs.exists(currentPath) else { return nil }
        let c = try fs.openReadable(currentPath)
        let text = String(decoding: try c.read(at: 0, count: 256), as: UTF8.self)
        c.close()
        guard text.hasSuffix("\n"), text.hasPrefix("MANIFEST-"), !text.dropLast().contains("/") else {
            throw .corruption(path: currentPath, offset: 0, reason: "CURRENT does not name a manifest")
        }
        let name = String(text.dropLast())
        let path = directory + "/" + name
        let r = try WAL.recover(try fs.openReadable(path), path: path)
        var version = Version()
        for (i, record) in r.records.enumerated() {
            guard let e = VersionEdit.decode(record) else {
                throw .corruption(path: path, offset: UInt64(i), reason: "manifest record \(i) is not a version edit")
            }
            version.apply(e)
        }
        return Recovered(version: version, manifest: name, tornTailBytes: r.tornTailBytes)
    }
}
