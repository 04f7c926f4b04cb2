/// An SSTable data block: sorted entries with their keys prefix-compressed against the previous
/// key, and a restart point (a full key) every `restartInterval` entries so a reader can binary
/// search. Keys compare as unsigned bytes. Docs/storage-format.md, "Blocks".
///
/// ```
/// block    = entry* restart:u32be* restart-count:u32be
/// entry    = shared:varint unshared:varint value-length:varint key-suffix value
/// trailer  = type:u8 checksum:u32be    ; type 0 = uncompressed; masked CRC32C of block and type
/// ```
public struct BlockBuilder: Sendable {
    public let restartInterval: Int
    private var buffer: [UInt8] = []
    private var restarts: [UInt32] = [0]
    private var sinceRestart = 0
    private var lastKey: [UInt8] = []
    public private(set) var count = 0

    public init(restartInterval: Int = 16) { self.restartInterval = max(restartInterval, 1) }

    /// Bytes the finished block will take (without the trailer).
    public var estimatedSize: Int { buffer.count + restarts.count * 4 + 4 }
    public var isEmpty: Bool { count == 0 }

    /// Adds an entry; keys must arrive in strictly increasing order.
    public mutating func add(key: [UInt8], value: [UInt8]) throws(StorageError) {
        if count > 0 && !lastKey.isBefore(key) {
            throw .invalidArgument("block keys must be strictly increasing")
        }
        var shared = 0
        if sinceRestart < restartInterval {
            let limit = min(lastKey.count, key.count)
            while shared < limit && lastKey[shared] == key[shared] { shared += 1 }
        } else {
            restarts.append(UInt32(buffer.count))
            sinceRestart = 0
        }
        Coding.putVarint(&buffer, UInt64(shared))
        Coding.putVarint(&buffer, UInt64(key.count - shared))
        Coding.putVarint(&buffer, UInt64(value.count))
        buffer += key[shared...]
        buffer += value
        lastKey = key
        sinceRestart += 1
        count += 1
    }

    /// The block followed by its trailer (type and checksum).
    public func finish() -> [UInt8] {
        var out = buffer
        for r in restarts { Coding.putU32(&out, r) }
        Coding.putU32(&out, UInt32(restarts.count))
        out.append(0)
        Coding.putU32(&out, CRC32C.mask(CRC32C.checksum(out)))
        return out
    }
}

/// A decoded, verified block. Every length is checked against the block's bounds: a corrupt
/// block is reported (`StorageError.corruption`), never read past or returned as data.
public struct Block: Sendable {
    let data: [UInt8]
    let restarts: [Int]
    let limit: Int   // end of the entries

    private init(data: [UInt8], restarts: [Int], limit: Int) {
        self.data = data
        self.restarts = restarts
        self.limit = limit
    }

    /// A block with no entries (what an evicted cache slot holds).
    static let empty = Block(data: [], restarts: [0], limit: 0)

    /// Bytes this decoded block keeps in memory (its cache charge).
    var charge: Int { data.count + restarts.count * 8 + 64 }

    /// Verifies the trailer and the restart array. `path`/`offset` name the block in errors.
    public init(_ bytes: [UInt8], path: String, offset: UInt64) throws(StorageError) {
        func corrupt(_ why: String) -> StorageError { .corruption(path: path, offset: offset, reason: why) }
        guard bytes.count >= 5 + 4 else { throw corrupt("block of \(bytes.count) bytes is too short") }
        let stored = Coding.getU32(bytes, bytes.count - 4)
        let crc = bytes.withUnsafeBufferPointer { CRC32C.update(0, buffer: UnsafeBufferPointer(rebasing: $0[..<($0.count - 4)])) }
        guard CRC32C.mask(crc) == stored else { throw corrupt("block checksum mismatch") }
        guard bytes[bytes.count - 5] == 0 else { throw corrupt("unknown block compression \(bytes[bytes.count - 5])") }
        var block = bytes
        block.removeLast(5)   // in place: the array is uniquely ours
        guard block.count >= 4 else { throw corrupt("block has no restart count") }
        let n = Int(Coding.getU32(block, block.count - 4))
        guard n >= 1, n <= (block.count - 4) / 4 else { throw corrupt("bad restart count \(n)") }
        let limit = block.count - 4 - 4 * n
        var restarts: [Int] = []
        for i in 0..<n {
            let r = Int(Coding.getU32(block, limit + 4 * i))
            guard r < max(limit, 1), restarts.last.map({ $0 < r }) ?? (r == 0) else { throw corrupt("bad restart point \(r)") }
            restarts.append(r)
        }
        self.data = block
        self.restarts = restarts
        self.limit = limit
    }

    /// Every entry in order.
    public func entries(path: String, offset: UInt64) throws(StorageError) -> [(key: [UInt8], value: [UInt8])] {
        var out: [(key: [UInt8], value: [UInt8])] = []
        var c = BlockCursor(self)
        while let v = try c.next(path: path, offset: offset) { out.append((c.key, Array(data[v]))) }
        return out
    }

    /// The header of the entry at `offset`: where its key suffix starts and the three lengths,
    /// checked against the block's bounds; nil if malformed.
    @inline(__always)
    func header(at offset: Int, sharedLimit: Int) -> (shared: Int, unshared: Int, valueLength: Int, keyStart: Int)? {
        var p = offset
        guard let shared = Coding.getVarint(data, &p, limit: limit), let unshared = Coding.getVarint(data, &p, limit: limit),
              let valueLength = Coding.getVarint(data, &p, limit: limit),
              shared <= UInt64(sharedLimit), unshared <= UInt64(limit - p), valueLength <= UInt64(limit - p) - unshared
        else { return nil }
        return (Int(shared), Int(unshared), Int(valueLength), p)
    }

    /// The first entry with key ≥ `target`, if any: binary search over the restart points
    /// (comparing restart keys in place), then a short `BlockCursor` scan. Allocates only the
    /// result.
    public func seek(_ target: [UInt8], path: String, offset: UInt64) throws(StorageError) -> (key: [UInt8], value: [UInt8])? {
        func malformed(_ at: Int) -> StorageError { .corruption(path: path, offset: offset, reason: "malformed entry at \(at)") }
        var lo = 0
        var hi = restarts.count - 1
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            guard let h = header(at: restarts[mid], sharedLimit: 0) else { throw malformed(restarts[mid]) }
            let c = data.withUnsafeBufferPointer { d in
                target.withUnsafeBufferPointer { t in
                    Coding.compare(UnsafeBufferPointer(rebasing: d[h.keyStart..<(h.keyStart + h.unshared)]), t)
                }
            }
            if c < 0 { lo = mid } else { hi = mid - 1 }
        }
        var c = BlockCursor(self, at: restarts[lo], keyCapacity: target.count)
        while let v = try c.next(path: path, offset: offset) {
            if c.key.compareBytes(target) >= 0 { return (c.key, Array(data[v])) }
        }
        return nil
    }
}

/// Walks a block's entries in order from a restart point, rebuilding each key (prefix
/// decompression) in one reused buffer: the one decoder behind `entries`, `seek` and table
/// iteration. Every length is checked against the block's bounds.
struct BlockCursor {
    let block: Block
    private(set) var offset: Int
    /// The key of the entry `next` last returned.
    private(set) var key: [UInt8] = []

    /// `offset` must be a restart point (0, or one of `block.restarts`).
    init(_ block: Block, at offset: Int = 0, keyCapacity: Int = 32) {
        self.block = block
        self.offset = offset
        key.reserveCapacity(keyCapacity)
    }

    /// Moves to the next entry: `key` becomes its key; returns its value's range in
    /// `block.data`, or nil at the end. A malformed entry is reported as corruption of the block
    /// at `offset` in `path`.
    mutating func next(path: String, offset blockOffset: UInt64) throws(StorageError) -> Range<Int>? {
        guard offset < block.limit else { return nil }
        guard let h = block.header(at: offset, sharedLimit: key.count) else {
            throw .corruption(path: path, offset: blockOffset, reason: "malformed entry at \(offset)")
        }
        key.removeSubrange(h.shared...)
        let keyEnd = h.keyStart + h.unshared
        key.append(contentsOf: block.data[h.keyStart..<keyEnd])
        offset = keyEnd + h.valueLength
        return keyEnd..<offset
    }
}
