import CStorageSupport

/// CRC-32C (Castagnoli, polynomial 0x1EDC6F41, reflected 0x82F63B78), table-driven, slicing by 8.
/// `crc32c("123456789") == 0xE3069283`.
public enum CRC32C {
    static let tables: [[UInt32]] = {
        var t = [[UInt32]](repeating: [UInt32](repeating: 0, count: 256), count: 8)
        for i in 0..<256 {
            var c = UInt32(i)
            for _ in 0..<8 { c = c & 1 == 1 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
            t[0][i] = c
        }
        for i in 0..<256 {
            for k in 1..<8 { t[k][i] = (t[k - 1][i] >> 8) ^ t[0][Int(t[k - 1][i] & 0xFF)] }
        }
        return t
    }()

    static let hardware = cairn_crc32c_hardware_available() == 1
    /// The slicing-by-8 table, flat: table k at `k * 256`.
    static let flat: [UInt32] = tables.flatMap { $0 }

    /// Extends `crc` (of earlier bytes; 0 to start) with `bytes`: the CPU's CRC32 instruction when
    /// it has one, else slicing by 8 over the tables.
    public static func update(_ crc: UInt32, _ bytes: some Collection<UInt8>) -> UInt32 {
        if let r = bytes.withContiguousStorageIfAvailable({ update(crc, buffer: $0) }) { return r }
        return update(crc, buffer: Array(bytes))
    }

    static func update(_ crc: UInt32, buffer: [UInt8]) -> UInt32 {
        buffer.withUnsafeBufferPointer { update(crc, buffer: $0) }
    }

    static func update(_ crc: UInt32, buffer b: UnsafeBufferPointer<UInt8>) -> UInt32 {
        guard let base = b.baseAddress, b.count > 0 else { return crc }
        if hardware { return ~cairn_crc32c_hardware(~crc, base, b.count) }
        return software(crc, b)
    }

    /// Slicing by 8 (the path for CPUs without the instruction; tests check it against the other).
    static func software(_ crc: UInt32, _ b: UnsafeBufferPointer<UInt8>) -> UInt32 {
        flat.withUnsafeBufferPointer { t in
            var c = ~crc
            var i = 0
            let n = b.count
            while i + 8 <= n {
                let lo = c ^ (UInt32(b[i]) | UInt32(b[i + 1]) << 8 | UInt32(b[i + 2]) << 16 | UInt32(b[i + 3]) << 24)
                c = t[7 * 256 + Int(lo & 0xFF)] ^ t[6 * 256 + Int((lo >> 8) & 0xFF)] ^ t[5 * 256 + Int((lo >> 16) & 0xFF)]
                    ^ t[4 * 256 + Int(lo >> 24)] ^ t[3 * 256 + Int(b[i + 4])] ^ t[2 * 256 + Int(b[i + 5])]
                    ^ t[256 + Int(b[i + 6])] ^ t[Int(b[i + 7])]
                i += 8
            }
            while i < n {
                c = t[Int((c ^ UInt32(b[i])) & 0xFF)] ^ (c >> 8)
                i += 1
            }
            return ~c
        }
    }

    public static func checksum(_ bytes: some Collection<UInt8>) -> UInt32 { update(0, bytes) }

    /// Stored checksums are masked (rotated and offset), so a CRC over data that itself contains
    /// CRCs does not degenerate (LevelDB's reasoning).
    public static func mask(_ crc: UInt32) -> UInt32 { ((crc >> 15) | (crc << 17)) &+ 0xA282_EAD8 }
    public static func unmask(_ masked: UInt32) -> UInt32 {
        let rot = masked &- 0xA282_EAD8
        return (rot >> 17) | (rot << 15)
    }
}
