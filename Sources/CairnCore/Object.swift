/// One value of a key as a replica stores it: bytes or a tombstone, with the writer's wall-clock
/// time (informational: it never decides which value wins).
public struct Sibling: Hashable, Sendable {
    public var value: [UInt8]
    public var isTombstone: Bool
    public var timestampMillis: UInt64

    public init(value: [UInt8], timestampMillis: UInt64) {
        self.value = value
        self.isTombstone = false
        self.timestampMillis = timestampMillis
    }

    public static func tombstone(timestampMillis: UInt64) -> Sibling {
        var s = Sibling(value: [], timestampMillis: timestampMillis)
        s.isTombstone = true
        return s
    }
}

/// The replicated state of one key: its DVVSet of siblings.
public typealias VersionedObject = DVVSet<Sibling>

extension DVVSet where Value == Sibling {
    /// Current object format (Docs/object-format.md).
    public static var formatVersion: UInt8 { 1 }

    /// Live values that are not tombstones.
    public var liveValues: [Sibling] { values.filter { !$0.isTombstone } }

    /// True when every value is a tombstone (the key reads as not found) or there is none.
    @inlinable
    public var isDeleted: Bool {
        anonymous.allSatisfy(\.isTombstone) && entries.allSatisfy { $0.values.allSatisfy(\.isTombstone) }
    }

    /// Applies both caps, dropping the oldest siblings first (by write timestamp, see
    /// `DVVSet.prune`) and never a value whose dot is in `protected`: at most `maxSiblings` values
    /// and at most `maxBytes` encoded, unless protected values alone exceed them. Returns how many
    /// values were dropped.
    @discardableResult
    /// `protected` is evaluated only when a cap is exceeded (the common write pays nothing for it).
    public mutating func prune(maxSiblings: Int, maxBytes: Int, protecting protectedDots: @autoclosure () -> Set<Dot> = []) -> Int {
        guard valueCount > maxSiblings || encodedSize > maxBytes else { return 0 }
        let protected = protectedDots()
        var dropped = prune(toAtMost: maxSiblings, protecting: protected, rank: \.timestampMillis)
        while encodedSize > maxBytes, dropOldestTail(protecting: protected, rank: \.timestampMillis) { dropped += 1 }
        return dropped
    }

    /// The length of `encoded()`, computed without encoding.
    public var encodedSize: Int {
        func varint(_ v: UInt64) -> Int { v < 0x80 ? 1 : (64 - v.leadingZeroBitCount + 6) / 7 }
        func sibling(_ s: Sibling) -> Int {
            1 + varint(s.timestampMillis) + (s.isTombstone ? 0 : varint(UInt64(s.value.count)) + s.value.count)
        }
        var n = 1 + varint(UInt64(entries.count)) + varint(UInt64(anonymous.count))
        for e in entries {
            n += varint(UInt64(e.actor.node.utf8.count)) + e.actor.node.utf8.count + 8
            n += varint(e.counter) + varint(UInt64(e.values.count))
            n += e.values.reduce(0) { $0 + sibling($1) }
        }
        return n + anonymous.reduce(0) { $0 + sibling($1) }
    }

    /// Encodes the object as in Docs/object-format.md.
    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: encodedSize)   // exact: the encoding allocates once
        w.writeU8(Self.formatVersion)
        w.writeVarint(entries.count)
        for e in entries {
            e.actor.encode(into: &w)
            w.writeVarint(e.counter)
            w.writeVarint(e.values.count)
            for v in e.values { v.encode(into: &w) }
        }
        w.writeVarint(anonymous.count)
        for v in anonymous { v.encode(into: &w) }
        return w.bytes
    }

    /// Decodes and validates an object. Throws `DecodeError` for any input that is not exactly one
    /// well-formed object within `limits`; never traps.
    public static func decode(_ bytes: [UInt8], limits: Limits) throws(DecodeError) -> VersionedObject {
        var r = ByteReader(bytes)
        let version = try r.readU8("object format")
        guard version == formatVersion else { throw DecodeError("unknown object format \(version)") }
        // Every entry takes at least 11 bytes, every sibling at least 2: bound counts by what remains.
        let entryCount = try r.readCount("entry count", limit: min(limits.maxActorsPerObject, r.remaining / 11))
        var entries: [Entry] = []
        entries.reserveCapacity(entryCount)
        var total = 0
        for _ in 0..<entryCount {
            let actor = try ActorID.decode(from: &r)
            let counter = try r.readVarint("counter")
            guard counter <= limits.maxDotCounter else { throw DecodeError("counter \(counter) of \(actor) is implausibly large") }
            let n = try r.readCount("value count", limit: min(limits.maxSiblingsOnDecode - total, r.remaining / 2))
            guard UInt64(n) <= counter else { throw DecodeError("entry of \(actor) holds \(n) values but counter \(counter)") }
            if let last = entries.last, !(last.actor < actor) { throw DecodeError("entries not sorted by actor") }
            var values: [Sibling] = []
            values.reserveCapacity(n)
            for _ in 0..<n { values.append(try Sibling.decode(from: &r, limits: limits)) }
            total += n
            entries.append(Entry(actor: actor, counter: counter, values: values))
        }
        let anonCount = try r.readCount("anonymous count", limit: min(limits.maxSiblingsOnDecode - total, r.remaining / 2))
        var anonymous: [Sibling] = []
        for _ in 0..<anonCount { anonymous.append(try Sibling.decode(from: &r, limits: limits)) }
        try r.expectEnd("object")
        guard let object = DVVSet(entries: entries, anonymous: anonymous) else { throw DecodeError("object violates DVV invariants") }
        return object
    }
}

extension Sibling {
    func encode(into w: inout ByteWriter) {
        w.writeU8(isTombstone ? 1 : 0)
        w.writeVarint(timestampMillis)
        if !isTombstone { w.writeBlob(value) }
    }

    static func decode(from r: inout ByteReader, limits: Limits) throws(DecodeError) -> Sibling {
        let flags = try r.readU8("sibling flags")
        guard flags & ~1 == 0 else { throw DecodeError("unknown sibling flags \(flags)") }
        let ts = try r.readVarint("timestamp")
        if flags & 1 == 1 { return .tombstone(timestampMillis: ts) }
        return Sibling(value: try r.readBlob("value", limit: limits.maxValueBytes), timestampMillis: ts)
    }
}

/// What a write's reply tells its writer (Docs/object-format.md §3, "Write replies").
///
/// Invariant: `context` covers exactly `written`, the values in `concurrent`, and what was already
/// superseded; so a writer that passes `context` back supersedes only values it has been shown
/// (the one it wrote and `concurrent`). A writer that does not want to supersede `concurrent`
/// must merge them into its next value, as after a read.
public struct WriteAcknowledgement: Hashable, Sendable {
    public var context: VersionVector
    /// The value (or tombstone) the write stored, as stored (the coordinator's timestamp).
    public var written: Sibling
    /// Every other live value the context covers: values this write did not supersede.
    public var concurrent: [Sibling]

    public init(context: VersionVector, written: Sibling, concurrent: [Sibling]) {
        self.context = context
        self.written = written
        self.concurrent = concurrent
    }
}

extension DVVSet where Value == Sibling {
    /// The acknowledgement of the write that stored `actor`'s newest value: the stored object's
    /// context, that value, and every other live value. Nil when `actor` has no live value (a
    /// coordinator's own new value is never pruned, so a coordinator always gets one).
    public func acknowledgement(of actor: ActorID) -> WriteAcknowledgement? {
        guard let own = entries.firstIndex(where: { $0.actor == actor }), let written = entries[own].values.first else { return nil }
        var concurrent = anonymous
        for (i, e) in entries.enumerated() {
            concurrent.append(contentsOf: i == own ? e.values.dropFirst() : e.values[...])
        }
        return WriteAcknowledgement(context: context, written: written, concurrent: concurrent)
    }
}
