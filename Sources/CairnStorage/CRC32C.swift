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

    /// Extends `crc` (of earlier bytes; 0 to start) with `bytes`.
    public static func update(_ crc: UInt32, _ bytes: some Collection<UInt8>) -> UInt32 {
        var c = ~crc
        let t = tables
        var it = bytes.makeIterator()
        var pending: [UInt8] = []
        pending.reserveCapacity(8)
        while let b = it.next() {
            pending.append(b)
            if pending.count == 8 {
                let lo = c ^ (UInt32(pending[0]) | UInt32(pending[1]) << 8 | UInt32(pending[2]) << 16 | UInt32(pending[3]) << 24)
                c = t[7][Int(lo & 0xFF)] ^ t[6][Int((lo >> 8) & 0xFF)] ^ t[5][Int((lo >> 16) & 0xFF)] ^ t[4][Int(lo >> 24)]
                    ^ t[3][Int(pending[4])] ^ t[2][Int(pending[5])] ^ t[1][Int(pending[6])] ^ t[0][Int(pending[7])]
                pending.removeAll(keepingCapacity: true)
            }
        }
        for b in pending { c = t[0][Int((c ^ UInt32(b)) & 0xFF)] ^ (c >> 8) }
        return ~c
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
