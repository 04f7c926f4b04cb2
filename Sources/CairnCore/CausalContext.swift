/// The opaque causal context a client gets from a read and hands back on its next write.
///
/// Encoded (Docs/object-format.md, `context`): a format byte, then the version vector's dots.
/// Clients must treat it as opaque; its text form is unpadded base64url.
public struct CausalContext: Hashable, Sendable, CustomStringConvertible {
    public static var formatVersion: UInt8 { 1 }

    public let vector: VersionVector

    public init(_ vector: VersionVector) { self.vector = vector }

    public static let empty = CausalContext(VersionVector())

    public var bytes: [UInt8] {
        var w = ByteWriter(capacity: encodedCount)
        encode(into: &w)
        return w.bytes
    }

    /// `bytes.count`, without encoding.
    public var encodedCount: Int { Self.encodedCount(of: vector.dots.lazy.map { ($0.actor, $0.counter) }) }

    /// `encodedCount` of the context whose vector holds these (actor, counter) dots (one per
    /// actor), without building it. Inlinable: specialized where called (a generic call across
    /// modules looked up the lazy collection's metadata on every write).
    @inlinable
    public static func encodedCount(of dots: some Collection<(ActorID, UInt64)>) -> Int {
        var n = 1 + ByteWriter.varintCount(UInt64(dots.count))
        for (actor, counter) in dots {
            let name = actor.node.utf8.count
            n += ByteWriter.varintCount(UInt64(name)) + name + 8 + ByteWriter.varintCount(counter)
        }
        return n
    }

    /// Appends `bytes` as a blob (`varint(length) bytes`; the empty context is the empty blob)
    /// without building them apart first.
    public func writeBlob(into w: inout ByteWriter) {
        guard !vector.isEmpty else { return w.writeVarint(0) }
        w.writeVarint(encodedCount)
        encode(into: &w)
    }

    private func encode(into w: inout ByteWriter) {
        w.writeU8(Self.formatVersion)
        w.writeVarint(vector.dots.count)
        for d in vector.dots {
            d.actor.encode(into: &w)
            w.writeVarint(d.counter)
        }
    }

    /// Decodes a context; an empty byte string is the empty context.
    public init(bytes: [UInt8], limits: Limits = .init()) throws(DecodeError) {
        if bytes.isEmpty {
            self = .empty
            return
        }
        guard bytes.count <= limits.maxContextBytes else {
            throw DecodeError("context of \(bytes.count) bytes exceeds limit \(limits.maxContextBytes)")
        }
        var r = ByteReader(bytes)
        let version = try r.readU8("context format")
        guard version == Self.formatVersion else { throw DecodeError("unknown context format \(version)") }
        let n = try r.readCount("context dot count", limit: min(limits.maxActorsPerObject, r.remaining / 10))
        var dots: [Dot] = []
        dots.reserveCapacity(n)
        for _ in 0..<n {
            let actor = try ActorID.decode(from: &r)
            let counter = try r.readVarint("context counter")
            guard counter <= limits.maxDotCounter else { throw DecodeError("context counter \(counter) is implausibly large") }
            if let last = dots.last, !(last.actor < actor) { throw DecodeError("context dots not sorted by actor") }
            dots.append(Dot(actor: actor, counter: counter))
        }
        try r.expectEnd("context")
        vector = VersionVector(sortedDots: dots)
    }

    /// Unpadded base64url of `bytes`; the empty context is the empty string.
    public var token: String { vector.isEmpty ? "" : Base64URL.encode(bytes) }

    public init(token: String, limits: Limits = .init()) throws(DecodeError) {
        guard let raw = Base64URL.decode(token) else { throw DecodeError("context token is not base64url") }
        try self.init(bytes: raw, limits: limits)
    }

    public var description: String { token }
}

/// RFC 4648 §5 base64url without padding (and standard base64, for JSON output).
public enum Base64URL {
    private static let urlAlphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)
    private static let stdAlphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

    public static func encode(_ bytes: [UInt8]) -> String { encode(bytes, alphabet: urlAlphabet, pad: false) }

    /// Standard base64 with padding.
    public static func encodeStandard(_ bytes: [UInt8]) -> String { encode(bytes, alphabet: stdAlphabet, pad: true) }

    private static func encode(_ bytes: [UInt8], alphabet: [UInt8], pad: Bool) -> String {
        var out: [UInt8] = []
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var i = 0
        while i + 3 <= bytes.count {
            let n = UInt32(bytes[i]) << 16 | UInt32(bytes[i + 1]) << 8 | UInt32(bytes[i + 2])
            for shift in [18, 12, 6, 0] { out.append(alphabet[Int((n >> UInt32(shift)) & 63)]) }
            i += 3
        }
        let rest = bytes.count - i
        if rest == 1 {
            let n = UInt32(bytes[i]) << 16
            out.append(alphabet[Int((n >> 18) & 63)]); out.append(alphabet[Int((n >> 12) & 63)])
            if pad { out.append(contentsOf: Array("==".utf8)) }
        } else if rest == 2 {
            let n = UInt32(bytes[i]) << 16 | UInt32(bytes[i + 1]) << 8
            out.append(alphabet[Int((n >> 18) & 63)]); out.append(alphabet[Int((n >> 12) & 63)]); out.append(alphabet[Int((n >> 6) & 63)])
            if pad { out.append(UInt8(ascii: "=")) }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Accepts both alphabets, with or without padding; nil on any other character.
    public static func decode(_ text: String) -> [UInt8]? {
        var values: [UInt8] = []
        values.reserveCapacity(text.utf8.count)
        for c in text.utf8 {
            switch c {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"): values.append(c - UInt8(ascii: "A"))
            case UInt8(ascii: "a")...UInt8(ascii: "z"): values.append(c - UInt8(ascii: "a") + 26)
            case UInt8(ascii: "0")...UInt8(ascii: "9"): values.append(c - UInt8(ascii: "0") + 52)
            case UInt8(ascii: "-"), UInt8(ascii: "+"): values.append(62)
            case UInt8(ascii: "_"), UInt8(ascii: "/"): values.append(63)
            case UInt8(ascii: "="): continue
            default: return nil
            }
        }
        if values.count % 4 == 1 { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(values.count * 3 / 4)
        var i = 0
        while i + 4 <= values.count {
            let n = UInt32(values[i]) << 18 | UInt32(values[i + 1]) << 12 | UInt32(values[i + 2]) << 6 | UInt32(values[i + 3])
            out.append(UInt8(truncatingIfNeeded: n >> 16)); out.append(UInt8(truncatingIfNeeded: n >> 8)); out.append(UInt8(truncatingIfNeeded: n))
            i += 4
        }
        let rest = values.count - i
        if rest >= 2 {
            var n = UInt32(values[i]) << 18 | UInt32(values[i + 1]) << 12
            if rest == 3 { n |= UInt32(values[i + 2]) << 6 }
            out.append(UInt8(truncatingIfNeeded: n >> 16))
            if rest == 3 { out.append(UInt8(truncatingIfNeeded: n >> 8)) }
        }
        return out
    }
}

extension DVVSet {
    /// `CausalContext(context).encodedCount`: the bytes of the context a reader of this clock
    /// gets, without building the context.
    @inlinable
    public var contextEncodedCount: Int { CausalContext.encodedCount(of: entries.lazy.map { ($0.actor, $0.counter) }) }
}
