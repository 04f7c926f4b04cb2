/// Byte helpers for the storage formats (the engine is standalone: no dependency on the
/// cluster's modules).
enum Coding {
    static func putVarint(_ out: inout [UInt8], _ v: UInt64) {
        var x = v
        while x >= 0x80 {
            out.append(UInt8(truncatingIfNeeded: x) | 0x80)
            x >>= 7
        }
        out.append(UInt8(truncatingIfNeeded: x))
    }

    /// Reads a varint at `offset` within `limit`; nil if truncated or longer than 10 bytes.
    static func getVarint(_ b: [UInt8], _ offset: inout Int, limit: Int) -> UInt64? {
        var result: UInt64 = 0
        var shift: UInt64 = 0
        while offset < limit && shift <= 63 {
            let byte = b[offset]
            offset += 1
            result |= UInt64(byte & 0x7F) << shift
            if byte & 0x80 == 0 { return result }
            shift += 7
        }
        return nil
    }

    static func putU32(_ out: inout [UInt8], _ v: UInt32) {
        for s in stride(from: 24, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: v >> UInt32(s))) }
    }

    static func getU32(_ b: [UInt8], _ at: Int) -> UInt32 {
        UInt32(b[at]) << 24 | UInt32(b[at + 1]) << 16 | UInt32(b[at + 2]) << 8 | UInt32(b[at + 3])
    }

    /// A fast, well-mixed 64-bit hash for filters (FNV-1a with a SplitMix finalizer).
    static func hash64(_ bytes: [UInt8]) -> UInt64 {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325
        for b in bytes {
            h ^= UInt64(b)
            h = h &* 0x0000_0100_0000_01B3
        }
        h = (h ^ (h >> 30)) &* 0xBF58_476D_1CE4_E5B9
        h = (h ^ (h >> 27)) &* 0x94D0_49BB_1331_11EB
        return h ^ (h >> 31)
    }
}

/// A Bloom filter over a table's keys: `bitsPerKey` bits each (default 10), k = bitsPerKey × ln 2
/// probes by double hashing. With 10 bits per key the false-positive rate is about 0.8 %; there
/// are no false negatives.
///
/// ```
/// filter = bits:OCTET* k:u8         ; bit i of the filter is bit (i % 8) of byte i / 8
/// ```
public struct BloomFilter: Sendable {
    public let bytes: [UInt8]

    public static func build(keys: [[UInt8]], bitsPerKey: Int = 10) -> BloomFilter {
        build(hashes: keys.map(Coding.hash64), bitsPerKey: bitsPerKey)
    }

    /// The filter over keys given by their `Coding.hash64`.
    static func build(hashes: [UInt64], bitsPerKey: Int = 10) -> BloomFilter {
        let k = max(1, min(30, Int((Double(bitsPerKey) * 0.69).rounded())))
        let bits = max(hashes.count * bitsPerKey, 64)
        var out = [UInt8](repeating: 0, count: (bits + 7) / 8)
        let nbits = UInt64(out.count * 8)
        for h in hashes {
            var a = h & 0xFFFF_FFFF
            let delta = (h >> 32) | 1
            for _ in 0..<k {
                let pos = Int(a % nbits)
                out[pos / 8] |= UInt8(1 << (pos % 8))
                a &+= delta
            }
        }
        out.append(UInt8(k))
        return BloomFilter(bytes: out)
    }

    public init(bytes: [UInt8]) { self.bytes = bytes }

    /// False only when `key` was certainly not added. A malformed filter answers true (it never
    /// hides data).
    public func mayContain(_ key: [UInt8]) -> Bool {
        guard bytes.count >= 2, let k = bytes.last, k >= 1, k <= 30 else { return true }
        let nbits = UInt64((bytes.count - 1) * 8)
        let h = Coding.hash64(key)
        var a = h & 0xFFFF_FFFF
        let delta = (h >> 32) | 1
        for _ in 0..<Int(k) {
            let pos = Int(a % nbits)
            if bytes[pos / 8] & UInt8(1 << (pos % 8)) == 0 { return false }
            a &+= delta
        }
        return true
    }
}

#if canImport(Glibc)
import Glibc
#endif

extension Array where Element == UInt8 {
    /// Unsigned byte order (memcmp), the order of every key in the engine: negative, zero or
    /// positive as `self` sorts before, equal to, or after `other`.
    @inline(__always)
    func compareBytes(_ other: [UInt8]) -> Int {
        withUnsafeBufferPointer { a in
            other.withUnsafeBufferPointer { b in Coding.compare(a, b) }
        }
    }

    /// `self` sorts strictly before `other` in unsigned byte order.
    @inline(__always)
    func isBefore(_ other: [UInt8]) -> Bool { compareBytes(other) < 0 }
}

extension Coding {
    @inline(__always)
    static func compare(_ a: UnsafeBufferPointer<UInt8>, _ b: UnsafeBufferPointer<UInt8>) -> Int {
        let n = Swift.min(a.count, b.count)
        if n > 0, let x = a.baseAddress, let y = b.baseAddress {
            let r = memcmp(x, y, n)
            if r != 0 { return Int(r) }
        }
        return a.count - b.count
    }
}
