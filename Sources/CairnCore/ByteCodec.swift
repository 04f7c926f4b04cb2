/// Little helpers to encode and decode the byte grammars in `Docs/`.
///
/// `ByteReader` never traps on hostile input: every length is checked against the bytes that
/// remain and against a caller-supplied limit *before* anything is allocated.

/// An error raised while decoding bytes that came from a socket or a file.
public struct DecodeError: Error, Sendable, Hashable, CustomStringConvertible {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { "malformed input: \(reason)" }
}

/// Appends big-endian integers, LEB128 varints and length-prefixed byte strings to a buffer.
public struct ByteWriter: Sendable {
    public private(set) var bytes: [UInt8]

    public init(capacity: Int = 64) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    /// Forgets what was written, keeping the buffer (a writer reused as scratch space).
    public mutating func removeAll() { bytes.removeAll(keepingCapacity: true) }

    /// Bytes written so far.
    public var count: Int { bytes.count }

    /// Forgets what was written after the first `count` bytes.
    public mutating func truncate(to count: Int) {
        guard count >= 0, count < bytes.count else { return }
        bytes.removeSubrange(count...)
    }

    /// Exchanges the written bytes with `other` (no copy): hands them out, taking `other` (an
    /// emptied buffer, say) to write into next.
    public mutating func swapBytes(with other: inout [UInt8]) { swap(&bytes, &other) }

    public mutating func writeU8(_ v: UInt8) { bytes.append(v) }

    public mutating func writeU16(_ v: UInt16) {
        bytes.append(UInt8(truncatingIfNeeded: v >> 8))
        bytes.append(UInt8(truncatingIfNeeded: v))
    }

    public mutating func writeU32(_ v: UInt32) {
        for shift in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt32(shift))) }
    }

    /// Overwrites the four bytes at `offset` (written earlier, e.g. by `writeU32(0)` as a
    /// placeholder) with `v`, big-endian. `offset + 4` must not exceed what was written.
    public mutating func overwriteU32(at offset: Int, _ v: UInt32) {
        guard offset >= 0, offset + 4 <= bytes.count else { return }
        for i in 0..<4 { bytes[offset + i] = UInt8(truncatingIfNeeded: v >> UInt32(24 - 8 * i)) }
    }

    public mutating func writeU64(_ v: UInt64) {
        for shift in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt64(shift))) }
    }

    /// Unsigned LEB128: 7 bits per byte, least significant group first, high bit = more follows.
    public mutating func writeVarint(_ v: UInt64) {
        var rest = v
        while rest >= 0x80 {
            bytes.append(UInt8(truncatingIfNeeded: rest) | 0x80)
            rest >>= 7
        }
        bytes.append(UInt8(truncatingIfNeeded: rest))
    }

    public mutating func writeVarint(_ v: Int) { writeVarint(UInt64(clamping: v)) }

    /// How many bytes `writeVarint(v)` appends.
    public static func varintCount(_ v: UInt64) -> Int {
        var n = 1
        var rest = v
        while rest >= 0x80 {
            n += 1
            rest >>= 7
        }
        return n
    }

    /// `varint(length) bytes`.
    public mutating func writeBlob(_ blob: some Collection<UInt8>) {
        writeVarint(blob.count)
        bytes.append(contentsOf: blob)
    }

    public mutating func writeString(_ s: String) { writeBlob(s.utf8) }

    public mutating func writeRaw(_ raw: some Sequence<UInt8>) { bytes.append(contentsOf: raw) }
}

/// Reads what `ByteWriter` wrote from a borrowed byte collection. All reads are bounds-checked.
public struct ByteReader: Sendable {
    public let bytes: [UInt8]
    public private(set) var offset: Int

    public init(_ bytes: [UInt8]) {
        self.bytes = bytes
        self.offset = 0
    }

    /// Reads `bytes` from `offset` on (a frame's body past its header, without copying it).
    public init(_ bytes: [UInt8], from offset: Int) {
        self.bytes = bytes
        self.offset = min(max(offset, 0), bytes.count)
    }

    public var remaining: Int { bytes.count - offset }
    public var isAtEnd: Bool { offset >= bytes.count }

    // The `what` of a read names it in an error; evaluated only then.
    private mutating func need(_ n: Int, _ what: @autoclosure () -> String) throws(DecodeError) {
        if n < 0 || n > remaining { throw DecodeError("truncated \(what()): need \(n) bytes, have \(remaining)") }
    }

    public mutating func readU8(_ what: @autoclosure () -> String = "u8") throws(DecodeError) -> UInt8 {
        try need(1, what())
        defer { offset += 1 }
        return bytes[offset]
    }

    /// A byte that must be 0 (false) or 1 (true).
    public mutating func readBool(_ what: String) throws(DecodeError) -> Bool {
        switch try readU8(what) {
        case 0: return false
        case 1: return true
        case let b: throw DecodeError("\(what) must be 0 or 1, not \(b)")
        }
    }

    public mutating func readU16(_ what: String = "u16") throws(DecodeError) -> UInt16 {
        try need(2, what)
        defer { offset += 2 }
        return UInt16(bytes[offset]) << 8 | UInt16(bytes[offset + 1])
    }

    public mutating func readU32(_ what: String = "u32") throws(DecodeError) -> UInt32 {
        try need(4, what)
        var v: UInt32 = 0
        for i in 0..<4 { v = v << 8 | UInt32(bytes[offset + i]) }
        offset += 4
        return v
    }

    public mutating func readU64(_ what: String = "u64") throws(DecodeError) -> UInt64 {
        try need(8, what)
        var v: UInt64 = 0
        for i in 0..<8 { v = v << 8 | UInt64(bytes[offset + i]) }
        offset += 8
        return v
    }

    public mutating func readVarint(_ what: @autoclosure () -> String = "varint") throws(DecodeError) -> UInt64 {
        var result: UInt64 = 0
        var shift: UInt64 = 0
        while true {
            let byte = try readU8(what())
            if shift == 63 && byte > 1 { throw DecodeError("\(what()) overflows 64 bits") }
            result |= UInt64(byte & 0x7F) << shift
            if byte & 0x80 == 0 {
                // A final zero group after the first byte is an over-long encoding: every value has
                // exactly one encoding, so equal objects have equal bytes.
                if byte == 0 && shift > 0 { throw DecodeError("\(what()) is not minimally encoded") }
                return result
            }
            shift += 7
            if shift > 63 { throw DecodeError("\(what()) longer than 10 bytes") }
        }
    }

    /// A varint that must be a count or length no greater than `limit`.
    public mutating func readCount(_ what: @autoclosure () -> String, limit: Int) throws(DecodeError) -> Int {
        let raw = try readVarint(what())
        guard raw <= UInt64(max(limit, 0)) else { throw DecodeError("\(what()) \(raw) exceeds limit \(limit)") }
        return Int(raw)
    }

    /// `varint(length) bytes` with `length <= limit`; the limit is checked before allocating.
    public mutating func readBlob(_ what: String, limit: Int) throws(DecodeError) -> [UInt8] {
        let n = try readCount("\(what) length", limit: limit)
        try need(n, what)
        defer { offset += n }
        return Array(bytes[offset..<offset + n])
    }

    /// Validated straight from the input (a short string, such as a node name, allocates nothing).
    /// ASCII, the common case, is decoded without the standard library's generic validation
    /// (which looked up type metadata on every call).
    public mutating func readString(_ what: String, limit: Int) throws(DecodeError) -> String {
        let n = try readCount("\(what) length", limit: limit)
        try need(n, what)
        let slice = bytes[offset..<offset + n]
        let s: String
        if slice.allSatisfy({ $0 < 0x80 }) {
            s = String(decoding: slice, as: UTF8.self)
        } else {
            guard let valid = String(validating: slice, as: UTF8.self) else { throw DecodeError("\(what) is not valid UTF-8") }
            s = valid
        }
        offset += n
        return s
    }

    public mutating func readRemaining() -> [UInt8] {
        defer { offset = bytes.count }
        return Array(bytes[offset...])
    }

    /// `what` is evaluated only for the error (a decoder names the message it read).
    public func expectEnd(_ what: @autoclosure () -> String) throws(DecodeError) {
        if !isAtEnd { throw DecodeError("\(remaining) trailing bytes after \(what())") }
    }
}

/// Fixed-width values stored alone (metadata entries): consecutive big-endian u64s.
public enum BigEndianWords {
    /// `values`, 8 bytes each.
    public static func encode(_ values: UInt64...) -> [UInt8] {
        var w = ByteWriter(capacity: 8 * values.count)
        for v in values { w.writeU64(v) }
        return w.bytes
    }

    /// Exactly `count` u64s; nil when `bytes` is any other length.
    public static func decode(_ bytes: [UInt8], count: Int) -> [UInt64]? {
        guard count >= 0, bytes.count == 8 * count else { return nil }
        var r = ByteReader(bytes)
        var out: [UInt64] = []
        out.reserveCapacity(count)
        for _ in 0..<count {
            guard let v = try? r.readU64() else { return nil }
            out.append(v)
        }
        return out
    }
}
