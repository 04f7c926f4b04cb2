import CairnRing

/// Self-checking values for `--verify`. Every value carries its key's hash, a sequence number and
/// a checksum over everything else, so a read can tell a correct value from a corrupt one or one
/// that belongs to another key.
///
/// ```
/// value = magic:"CLV1" seq:u64be key-hash:u64be length:u32be checksum:u64be filler
/// checksum = XXH64 over magic seq key-hash length filler (everything but the checksum)
/// ```
/// `length` is the whole value's size (≥ 32). Every value of at least 32 bytes is written this way
/// (with or without `--verify`); smaller ones are plain filler and cannot be verified.
public enum ValueFormat {
    public static let headerBytes = 32
    static let magic: [UInt8] = Array("CLV1".utf8)

    public enum Check: Equatable, Sendable {
        case ok(seq: UInt64)
        case corrupt(String)
        case wrongKey
    }

    public static func make(key: [UInt8], seq: UInt64, size: Int) -> [UInt8] {
        let size = max(size, headerBytes)
        var v = [UInt8]()
        v.reserveCapacity(size)
        v += magic
        append(&v, seq)
        append(&v, KeyHash.hash(key))
        let len = UInt32(clamping: size)
        for s in stride(from: 24, through: 0, by: -8) { v.append(UInt8(truncatingIfNeeded: len >> UInt32(s))) }
        v += [UInt8](repeating: 0, count: 8)   // checksum placeholder
        var filler = seq &* 0x9E37_79B9_7F4A_7C15
        while v.count < size {
            filler = filler &* 6_364_136_223_846_793_005 &+ 1
            v.append(UInt8(truncatingIfNeeded: filler >> 56))
        }
        let sum = checksum(v)
        for (i, s) in stride(from: 56, through: 0, by: -8).enumerated() { v[24 + i] = UInt8(truncatingIfNeeded: sum >> UInt64(s)) }
        return v
    }

    public static func check(_ value: [UInt8], key: [UInt8]) -> Check {
        guard value.count >= headerBytes else { return .corrupt("\(value.count) bytes, shorter than the header") }
        guard Array(value[0..<4]) == magic else { return .corrupt("bad magic") }
        let length = value[20..<24].reduce(0) { $0 << 8 | Int($1) }
        guard length == value.count else { return .corrupt("length field \(length) but \(value.count) bytes") }
        let stored = read64(value, 24)
        guard stored == checksum(value) else { return .corrupt("checksum mismatch") }
        guard read64(value, 12) == KeyHash.hash(key) else { return .wrongKey }
        return .ok(seq: read64(value, 4))
    }

    static func checksum(_ v: [UInt8]) -> UInt64 {
        var copy = v
        for i in 24..<32 where i < copy.count { copy[i] = 0 }
        return KeyHash.hash(copy, seed: 0xC4EC)
    }

    static func append(_ v: inout [UInt8], _ x: UInt64) {
        for s in stride(from: 56, through: 0, by: -8) { v.append(UInt8(truncatingIfNeeded: x >> UInt64(s))) }
    }

    static func read64(_ v: [UInt8], _ at: Int) -> UInt64 {
        v[at..<at + 8].reduce(0) { $0 << 8 | UInt64($1) }
    }

    /// Plain values (no `--verify`): cheap filler of the requested size.
    public static func filler(size: Int, seq: UInt64) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: max(size, 0))
        var x = seq | 1
        for i in out.indices {
            x = x &* 6_364_136_223_846_793_005 &+ 1
            out[i] = UInt8(truncatingIfNeeded: x >> 56)
        }
        return out
    }
}
