public import CairnCore

/// A question one replica asks another during an exchange. Byte grammar:
/// Docs/anti-entropy.md, "Wire". Every request names the asker's tree shape; a replica whose
/// trees have another shape refuses (replicas only compare trees of one shape).
public struct AntiEntropyRequest: Hashable, Sendable {
    public enum Body: Hashable, Sendable {
        /// The partition's root hash (and whether the replica is still refilling).
        case root
        /// The children (level `level + 1`) of these nodes of `level`.
        case children(level: Int, parents: [Int])
        /// A page of keys of some segments.
        case keys(KeyQuery)
        /// The objects of these keys (absent keys are answered as absent).
        case fetch([[UInt8]])
        /// Merge these objects (DVV sync; never a new version).
        case push([(key: [UInt8], object: VersionedObject)])
        /// Which partitions the replica holds hints or fallback copies for (the partition field
        /// is unused): the tombstone rule asks every member before collecting.
        case pending

        public static func == (a: Body, b: Body) -> Bool {
            switch (a, b) {
            case (.root, .root): true
            case (.children(let l1, let p1), .children(let l2, let p2)): l1 == l2 && p1 == p2
            case (.keys(let q1), .keys(let q2)): q1 == q2
            case (.fetch(let k1), .fetch(let k2)): k1 == k2
            case (.push(let e1), .push(let e2)): e1.count == e2.count && zip(e1, e2).allSatisfy { $0.key == $1.key && $0.object == $1.object }
            case (.pending, .pending): true
            default: false
            }
        }

        public func hash(into h: inout Hasher) {
            switch self {
            case .root: h.combine(0)
            case .children(let l, let p): h.combine(l); h.combine(p)
            case .keys(let q): h.combine(q)
            case .fetch(let k): h.combine(k)
            case .push(let e): for x in e { h.combine(x.key); h.combine(x.object) }
            case .pending: h.combine(6)
            }
        }
    }

    public var partition: PartitionID
    public var shape: TreeShape
    public var body: Body

    public init(partition: PartitionID, shape: TreeShape, body: Body) {
        self.partition = partition
        self.shape = shape
        self.body = body
    }
}

/// A replica's answer to an `AntiEntropyRequest` (refusals travel as the wire's error replies).
public enum AntiEntropyReply: Hashable, Sendable {
    /// `refilling`: this replica lost its data and has not completed an exchange since.
    case root(UInt64, refilling: Bool)
    case hashes([UInt64])
    case keys(KeyPage)
    /// For each key asked, in order, its object (nil: absent).
    case objects([VersionedObject?])
    /// Objects merged.
    case pushed(Int)
    /// The replica's pending handoff data: the nodes it holds hints for, and the partitions it
    /// holds fallback copies of (ascending indexes).
    case pending(hintTargets: [String], fallbacks: [Int])
}

/// Encoding of requests and replies (pure). Decoding checks every count against what remains and
/// against `limits`; it never traps on malformed input.
public enum AntiEntropyCodec {
    static let version: UInt8 = 1
    /// Most entries one request or reply may carry (parents, keys, hashes, objects).
    public static let maxEntries = 1 << 20

    public static func encode(_ request: AntiEntropyRequest) -> [UInt8] {
        var w = ByteWriter()
        w.writeU8(version)
        w.writeU8(UInt8(truncatingIfNeeded: request.shape.depth))
        w.writeU32(request.partition.index)
        switch request.body {
        case .root:
            w.writeU8(1)
        case .children(let level, let parents):
            w.writeU8(2)
            w.writeU8(UInt8(truncatingIfNeeded: level))
            writeAscending(parents, &w)
        case .keys(let q):
            w.writeU8(3)
            w.writeVarint(q.limit)
            writeOptionalBlob(q.after, &w)
            writeAscending(q.segments, &w)
            writeAscending(q.objectsFor, &w)
        case .fetch(let keys):
            w.writeU8(4)
            w.writeVarint(keys.count)
            for k in keys { w.writeBlob(k) }
        case .push(let entries):
            w.writeU8(5)
            w.writeVarint(entries.count)
            for e in entries {
                w.writeBlob(e.key)
                w.writeBlob(e.object.encoded())
            }
        case .pending:
            w.writeU8(6)
        }
        return w.bytes
    }

    public static func decodeRequest(_ bytes: [UInt8], limits: Limits) throws(DecodeError) -> AntiEntropyRequest {
        var r = ByteReader(bytes)
        let v = try r.readU8("anti-entropy version")
        guard v == version else { throw DecodeError("unknown anti-entropy version \(v)") }
        let depth = Int(try r.readU8("tree depth"))
        let shape: TreeShape
        do { shape = try TreeShape(depth: depth) } catch { throw DecodeError(error.reason) }
        let partition = PartitionID(try r.readU32("partition"))
        let body: AntiEntropyRequest.Body
        switch try r.readU8("anti-entropy request") {
        case 1:
            body = .root
        case 2:
            let level = Int(try r.readU8("level"))
            guard level < shape.depth else { throw DecodeError("level \(level) has no children in a tree of depth \(shape.depth)") }
            let parents = try readAscending(&r, below: shape.width(of: level))
            body = .children(level: level, parents: parents)
        case 3:
            let limit = try r.readCount("page limit", limit: maxEntries)
            let after = try readOptionalBlob(&r, limit: limits.maxKeyBytes)
            let segments = try readAscending(&r, below: shape.segments)
            let objectsFor = try readAscending(&r, below: shape.segments)
            body = .keys(KeyQuery(segments: segments, objectsFor: objectsFor, after: after, limit: limit))
        case 4:
            let n = try r.readCount("key count", limit: min(maxEntries, r.remaining))
            var keys: [[UInt8]] = []
            for _ in 0..<n { keys.append(try r.readBlob("key", limit: limits.maxKeyBytes)) }
            body = .fetch(keys)
        case 5:
            let n = try r.readCount("object count", limit: min(maxEntries, r.remaining / 2))
            var entries: [(key: [UInt8], object: VersionedObject)] = []
            for _ in 0..<n {
                let key = try r.readBlob("key", limit: limits.maxKeyBytes)
                let object = try VersionedObject.decode(try r.readBlob("object", limit: limits.maxFrameBytes), limits: limits)
                entries.append((key, object))
            }
            body = .push(entries)
        case 6:
            body = .pending
        case let k:
            throw DecodeError("unknown anti-entropy request \(k)")
        }
        try r.expectEnd("anti-entropy request")
        return AntiEntropyRequest(partition: partition, shape: shape, body: body)
    }

    public static func encode(_ reply: AntiEntropyReply) -> [UInt8] {
        var w = ByteWriter()
        switch reply {
        case .root(let hash, let refilling):
            w.writeU8(1)
            w.writeU64(hash)
            w.writeU8(refilling ? 1 : 0)
        case .hashes(let hashes):
            w.writeU8(2)
            w.writeVarint(hashes.count)
            for h in hashes { w.writeU64(h) }
        case .keys(let page):
            w.writeU8(3)
            w.writeVarint(page.entries.count)
            for e in page.entries {
                w.writeBlob(e.key)
                // An object carries its version hash: the receiver computes it.
                if let o = e.object {
                    w.writeU8(1)
                    w.writeBlob(o.encoded())
                } else {
                    w.writeU8(0)
                    w.writeU64(e.hash)
                }
            }
            writeOptionalBlob(page.through, &w)
        case .objects(let objects):
            w.writeU8(4)
            w.writeVarint(objects.count)
            for o in objects { writeOptionalBlob(o?.encoded(), &w) }
        case .pushed(let n):
            w.writeU8(5)
            w.writeVarint(n)
        case .pending(let targets, let fallbacks):
            w.writeU8(6)
            w.writeVarint(targets.count)
            for t in targets { w.writeBlob(Array(t.utf8)) }
            writeAscending(fallbacks, &w)
        }
        return w.bytes
    }

    public static func decodeReply(_ bytes: [UInt8], limits: Limits) throws(DecodeError) -> AntiEntropyReply {
        var r = ByteReader(bytes)
        let reply: AntiEntropyReply
        switch try r.readU8("anti-entropy reply") {
        case 1:
            let hash = try r.readU64("root")
            reply = .root(hash, refilling: try r.readBool("refilling"))
        case 2:
            let n = try r.readCount("hash count", limit: min(maxEntries, r.remaining / 8))
            var hashes: [UInt64] = []
            hashes.reserveCapacity(n)
            for _ in 0..<n { hashes.append(try r.readU64("hash")) }
            reply = .hashes(hashes)
        case 3:
            let n = try r.readCount("key count", limit: min(maxEntries, r.remaining / 3))
            var entries: [KeyEntry] = []
            for _ in 0..<n {
                let key = try r.readBlob("key", limit: limits.maxKeyBytes)
                let flags = try r.readU8("entry flags")
                guard flags & ~1 == 0 else { throw DecodeError("unknown key entry flags \(flags)") }
                if flags & 1 == 0 {
                    entries.append(KeyEntry(key: key, hash: try r.readU64("version hash")))
                } else {
                    let object = try VersionedObject.decode(try r.readBlob("object", limit: limits.maxFrameBytes), limits: limits)
                    entries.append(KeyEntry(key: key, hash: KeyVersionHash.hash(key: key, object: object), object: object))
                }
            }
            reply = .keys(KeyPage(entries: entries, through: try readOptionalBlob(&r, limit: limits.maxKeyBytes)))
        case 4:
            let n = try r.readCount("object count", limit: min(maxEntries, r.remaining))
            var objects: [VersionedObject?] = []
            for _ in 0..<n {
                objects.append(try readOptionalBlob(&r, limit: limits.maxFrameBytes).map { raw throws(DecodeError) in
                    try VersionedObject.decode(raw, limits: limits)
                })
            }
            reply = .objects(objects)
        case 5:
            reply = .pushed(try r.readCount("merged", limit: maxEntries))
        case 6:
            let n = try r.readCount("hint target count", limit: min(maxEntries, r.remaining))
            var targets: [String] = []
            for _ in 0..<n { targets.append(String(decoding: try r.readBlob("hint target", limit: 255), as: UTF8.self)) }
            reply = .pending(hintTargets: targets, fallbacks: try readAscending(&r, below: Int(Int32.max)))
        case let k:
            throw DecodeError("unknown anti-entropy reply \(k)")
        }
        try r.expectEnd("anti-entropy reply")
        return reply
    }

    // MARK: Pieces

    /// `count:varint first:varint (gap:varint)*`: ascending values as differences.
    static func writeAscending(_ values: [Int], _ w: inout ByteWriter) {
        w.writeVarint(values.count)
        var previous = 0
        for (i, v) in values.enumerated() {
            w.writeVarint(i == 0 ? v : v - previous)
            previous = v
        }
    }

    static func readAscending(_ r: inout ByteReader, below bound: Int) throws(DecodeError) -> [Int] {
        let n = try r.readCount("count", limit: min(bound, r.remaining))
        var out: [Int] = []
        out.reserveCapacity(n)
        var previous = 0
        for i in 0..<n {
            let step = try r.readVarint("value")
            guard step < UInt64(bound), i == 0 || step > 0 else { throw DecodeError("values not strictly ascending below \(bound)") }
            let (v, overflow) = previous.addingReportingOverflow(Int(step))
            guard !overflow, v < bound else { throw DecodeError("value beyond \(bound)") }
            out.append(v)
            previous = v
        }
        return out
    }

    static func writeOptionalBlob(_ blob: [UInt8]?, _ w: inout ByteWriter) {
        if let blob {
            w.writeU8(1)
            w.writeBlob(blob)
        } else {
            w.writeU8(0)
        }
    }

    static func readOptionalBlob(_ r: inout ByteReader, limit: Int) throws(DecodeError) -> [UInt8]? {
        try r.readBool("present") ? try r.readBlob("bytes", limit: limit) : nil
    }
}
