/// An immutable sorted table (SSTable) file. Docs/storage-format.md, "Tables".
///
/// ```
/// table   = data-block* filter index-block footer
/// filter  = bloom-filter type:u8 checksum:u32be         ; whole-table filter, checksummed like a block
/// index   = block of (last-key-of-data-block → handle)  ; handle = offset:varint size:varint
/// footer  = filter-offset:u64be filter-size:u64be index-offset:u64be index-size:u64be
///           version:u32be magic:u64be                    ; 44 bytes
/// ```
public enum Table {
    public static let magic: UInt64 = 0x6361_6972_6E53_5354   // "cairnSST"
    public static let version: UInt32 = 1
    public static let footerBytes = 44

    struct Handle: Equatable {
        var offset: UInt64
        var size: UInt64

        func encoded() -> [UInt8] {
            var out: [UInt8] = []
            Coding.putVarint(&out, offset)
            Coding.putVarint(&out, size)
            return out
        }

        static func decode(_ b: [UInt8]) -> Handle? {
            var p = 0
            guard let o = Coding.getVarint(b, &p, limit: b.count), let s = Coding.getVarint(b, &p, limit: b.count), p == b.count else { return nil }
            return Handle(offset: o, size: s)
        }
    }
}

/// Writes one table. Keys must be added in strictly increasing order. `finish` writes the filter,
/// index and footer and syncs the file; the caller syncs the directory before relying on it.
public final class TableBuilder {
    let file: any AppendableFile
    let path: String
    let blockSize: Int
    let bitsPerKey: Int
    private var block: BlockBuilder
    private var index = BlockBuilder(restartInterval: 1)
    /// The filter's input: 8 bytes per key, not the keys (an 8 MiB table has ~70k of them).
    private var keyHashes: [UInt64] = []
    private var lastKey: [UInt8]?
    private var offset: UInt64 = 0
    /// 0: never. Else the blocks are written out (`AppendableFile.writeOut`) every this many bytes.
    let bytesPerSync: UInt64
    /// Where the last write-out ended.
    private var writtenOut: UInt64 = 0
    public private(set) var entries = 0
    /// Write-outs performed so far (see `bytesPerSync`).
    public private(set) var writeOuts = 0
    /// Where each data block goes as it is written, under the table's file number (see `init`).
    let caching: Caching?

    /// Data blocks put into `cache` as they are written, keyed as the table's reader (file
    /// `number`) looks them up: every block, or those whose last key `admits` says is worth it.
    public struct Caching {
        public let cache: BlockCache
        public let number: UInt64
        public let admits: (([UInt8]) -> Bool)?
        public init(cache: BlockCache, number: UInt64, admits: (([UInt8]) -> Bool)? = nil) {
            self.cache = cache
            self.number = number
            self.admits = admits
        }
    }

    /// `bytesPerSync`: write what was appended out to the device every this many bytes and wait
    /// for it (0: only `finish` syncs), so a table never floods the device queue ahead of a log sync.
    /// `caching`: data blocks put into the block cache as they are written (see `Caching`); the
    /// caller evicts the file if the table is not kept.
    public init(fs: any FileSystem, path: String, blockSize: Int = 4096, bitsPerKey: Int = 10, restartInterval: Int = 16,
                bytesPerSync: Int = 0, caching: Caching? = nil) throws(StorageError) {
        file = try fs.openAppendable(path, create: true)
        guard file.size == 0 else { throw .invalidArgument("\(path) already exists") }
        self.caching = caching
        self.path = path
        self.blockSize = max(blockSize, 256)
        self.bitsPerKey = bitsPerKey
        self.bytesPerSync = UInt64(max(bytesPerSync, 0))
        block = BlockBuilder(restartInterval: restartInterval)
    }

    /// Bytes written so far plus the open block: where to cut an output table.
    public var estimatedSize: UInt64 { offset + UInt64(block.estimatedSize) }

    public func add(key: [UInt8], value: [UInt8]) throws(StorageError) {
        if let lastKey, !lastKey.isBefore(key) { throw .invalidArgument("table keys must be strictly increasing") }
        try block.add(key: key, value: value)
        keyHashes.append(Coding.hash64(key))
        lastKey = key
        entries += 1
        if block.estimatedSize >= blockSize { try flushBlock() }
    }

    private func flushBlock() throws(StorageError) {
        guard !block.isEmpty, let lastKey else { return }
        let bytes = block.finish()
        try file.append(bytes)
        if let caching, caching.admits?(lastKey) ?? true {
            let written = try Block(bytes, path: path, offset: offset)
            caching.cache.insert(BlockCache.Key(file: caching.number, offset: offset), written, charge: written.charge)
        }
        try index.add(key: lastKey, value: Table.Handle(offset: offset, size: UInt64(bytes.count)).encoded())
        offset += UInt64(bytes.count)
        block = BlockBuilder(restartInterval: block.restartInterval)
        if bytesPerSync > 0, offset - writtenOut >= bytesPerSync {
            try file.writeOut()
            writtenOut = offset
            writeOuts += 1
        }
    }

    /// Finishes and syncs the table; returns its size in bytes.
    @discardableResult
    public func finish() throws(StorageError) -> UInt64 {
        try flushBlock()
        var filter = BloomFilter.build(hashes: keyHashes, bitsPerKey: bitsPerKey).bytes
        keyHashes = []
        filter.append(0)
        Coding.putU32(&filter, CRC32C.mask(CRC32C.checksum(filter)))
        let filterHandle = Table.Handle(offset: offset, size: UInt64(filter.count))
        try file.append(filter)
        offset += UInt64(filter.count)
        let indexBytes = index.finish()
        let indexHandle = Table.Handle(offset: offset, size: UInt64(indexBytes.count))
        try file.append(indexBytes)
        offset += UInt64(indexBytes.count)
        var footer: [UInt8] = []
        for v in [filterHandle.offset, filterHandle.size, indexHandle.offset, indexHandle.size] {
            Coding.putU32(&footer, UInt32(truncatingIfNeeded: v >> 32))
            Coding.putU32(&footer, UInt32(truncatingIfNeeded: v))
        }
        Coding.putU32(&footer, Table.version)
        Coding.putU32(&footer, UInt32(truncatingIfNeeded: Table.magic >> 32))
        Coding.putU32(&footer, UInt32(truncatingIfNeeded: Table.magic))
        try file.append(footer)
        offset += UInt64(footer.count)
        try file.sync()
        try file.close()
        return offset
    }
}

/// Reads one table. Every block is verified (checksum, bounds) when read; a corrupt table is
/// reported with its path and offset, never returned as data. Thread-safe.
///
/// A table whose footer, filter or index is corrupt can still be opened as *damaged*
/// (`init(damaged:meta:path:)`): it has no index, and a lookup of any key in its stated range, or
/// an iteration entering it, throws the error that damaged it; keys outside the range are
/// simply not there. Nothing it might hold is ever reported as absent.
public final class TableReader: Sendable {
    let file: UncheckedFile?
    public let path: String
    /// The table's file number: its blocks' key in the block cache.
    public let number: UInt64
    let cache: BlockCache?
    let index: [(lastKey: [UInt8], handle: Table.Handle)]
    let filter: BloomFilter
    /// Set when the table could not be opened: the error, and the key range the manifest states.
    let damaged: (error: StorageError, smallest: [UInt8], largest: [UInt8])?

    /// `ReadableFile` reads are thread-safe by contract.
    struct UncheckedFile: @unchecked Sendable { let file: any ReadableFile }

    public init(fs: any FileSystem, path: String, number: UInt64 = 0, cache: BlockCache? = nil) throws(StorageError) {
        let f = try fs.openReadable(path)
        let size = f.size
        func corrupt(_ offset: UInt64, _ why: String) -> StorageError { .corruption(path: path, offset: offset, reason: why) }
        guard size >= UInt64(Table.footerBytes) else { throw corrupt(0, "file of \(size) bytes is shorter than a footer") }
        let footerAt = size - UInt64(Table.footerBytes)
        let footer = try f.read(at: footerAt, count: Table.footerBytes)
        guard footer.count == Table.footerBytes else { throw corrupt(footerAt, "short footer") }
        func u64(_ i: Int) -> UInt64 { UInt64(Coding.getU32(footer, i)) << 32 | UInt64(Coding.getU32(footer, i + 4)) }
        guard u64(36) == Table.magic else { throw corrupt(footerAt, "bad magic number: not a cairn table") }
        guard Coding.getU32(footer, 32) == Table.version else { throw corrupt(footerAt, "unsupported table version \(Coding.getU32(footer, 32))") }
        let filterHandle = Table.Handle(offset: u64(0), size: u64(8))
        let indexHandle = Table.Handle(offset: u64(16), size: u64(24))
        for h in [filterHandle, indexHandle] {
            guard h.offset <= footerAt, h.size <= footerAt - h.offset, h.size <= UInt64(Int32.max) else {
                throw corrupt(footerAt, "footer points outside the file")
            }
        }
        let filterBytes = try f.read(at: filterHandle.offset, count: Int(filterHandle.size))
        guard filterBytes.count >= 5, CRC32C.mask(CRC32C.checksum(filterBytes.dropLast(4))) == Coding.getU32(filterBytes, filterBytes.count - 4) else {
            throw corrupt(filterHandle.offset, "filter checksum mismatch")
        }
        let indexBlock = try Block(try f.read(at: indexHandle.offset, count: Int(indexHandle.size)), path: path, offset: indexHandle.offset)
        var index: [(lastKey: [UInt8], handle: Table.Handle)] = []
        for e in try indexBlock.entries(path: path, offset: indexHandle.offset) {
            guard let h = Table.Handle.decode(e.value), h.offset <= filterHandle.offset, h.size <= filterHandle.offset - h.offset else {
                throw corrupt(indexHandle.offset, "bad block handle in the index")
            }
            index.append((e.key, h))
        }
        file = UncheckedFile(file: f)
        self.path = path
        self.number = number
        self.cache = cache
        self.index = index
        filter = BloomFilter(bytes: Array(filterBytes.dropLast(5)))
        damaged = nil
    }

    /// A table that could not be opened (`error`): reads in `meta`'s key range throw `error`.
    public init(damaged error: StorageError, meta: TableMeta, path: String) {
        file = nil
        self.path = path
        number = meta.number
        cache = nil
        index = []
        filter = BloomFilter(bytes: [])
        damaged = (error, meta.smallest, meta.largest)
    }

    /// Why the table could not be opened; nil for a healthy table.
    public var damage: StorageError? { damaged?.error }

    /// The table's smallest key when it is damaged (its index cannot say).
    var damagedSmallest: [UInt8]? { damaged?.smallest }

    /// The table's largest key: the index's last, or the stated one when damaged.
    var largestKey: [UInt8]? { damaged?.largest ?? index.last?.lastKey }

    public var blockCount: Int { index.count }

    /// The block at `h`, from the cache when it is there; verified when read from the file, and
    /// then cached if `fillCache` (compaction reads pass false: a merge's blocks are read once
    /// and would only push out what readers use).
    func readBlock(_ h: Table.Handle, fillCache: Bool = true) throws(StorageError) -> Block {
        let key = BlockCache.Key(file: number, offset: h.offset)
        if let cache, let b = cache.get(key) { return b }
        guard let file else { throw damage ?? .corruption(path: path, offset: h.offset, reason: "table has no file") }
        let b = try Block(try file.file.read(at: h.offset, count: Int(h.size)), path: path, offset: h.offset)
        if fillCache { cache?.insert(key, b, charge: b.charge) }
        return b
    }

    /// Whether the block that would hold `key` is in the block cache (a key readers have asked
    /// for lately). Neither counted nor made more recent.
    func cachesBlock(covering key: [UInt8]) -> Bool {
        guard let cache else { return false }
        let i = blockIndex(atOrAfter: key)
        return i < index.count && cache.contains(BlockCache.Key(file: number, offset: index[i].handle.offset))
    }

    /// Reads the block at `h` from the file and checks it (checksum and entries), bypassing the
    /// cache: a verification of what is on disk.
    func verifyBlock(_ h: Table.Handle) throws(StorageError) {
        guard let file else { throw damage ?? .corruption(path: path, offset: h.offset, reason: "table has no file") }
        _ = try Block(try file.file.read(at: h.offset, count: Int(h.size)), path: path, offset: h.offset).entries(path: path, offset: h.offset)
    }

    /// The index of the first block whose last key is ≥ `key` (`blockCount` if none).
    func blockIndex(atOrAfter key: [UInt8]) -> Int {
        var lo = 0
        var hi = index.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if index[mid].lastKey.isBefore(key) { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// The value stored under exactly `key`, or nil. Consults the Bloom filter first.
    public func get(_ key: [UInt8]) throws(StorageError) -> [UInt8]? {
        guard case .found(let value, _) = try lookup(key, inMemoryOnly: false) else { return nil }
        return value
    }

    /// The engine's entry (kind, sequence, value) stored under exactly `key`, or nil.
    func entry(_ key: [UInt8]) throws(StorageError) -> Memtable.Entry? {
        guard case .entry(let e) = try probe(key, inMemoryOnly: false) else { return nil }
        return e
    }

    /// What a probe of one table for a key found.
    enum Probe {
        case entry(Memtable.Entry)
        case absent
        /// Answering needs a block the cache does not hold (only when `inMemoryOnly`).
        case needsDisk
    }

    /// `entry`; with `inMemoryOnly`, without reading the file: the filter, the index and cached
    /// blocks only.
    func probe(_ key: [UInt8], inMemoryOnly: Bool) throws(StorageError) -> Probe {
        switch try lookup(key, inMemoryOnly: inMemoryOnly) {
        case .found(let value, let blockOffset): .entry(try InternalValue.decode(key: key, value, path: path, offset: blockOffset))
        case .absent: .absent
        case .needsDisk: .needsDisk
        }
    }

    private enum Lookup {
        /// The stored value and the offset of the block holding it.
        case found([UInt8], blockOffset: UInt64)
        case absent
        case needsDisk
    }

    private func lookup(_ key: [UInt8], inMemoryOnly: Bool) throws(StorageError) -> Lookup {
        if let d = damaged {
            guard !key.isBefore(d.smallest), !d.largest.isBefore(key) else { return .absent }
            throw d.error
        }
        guard filter.mayContain(key) else { return .absent }
        let i = blockIndex(atOrAfter: key)
        guard i < index.count else { return .absent }
        let h = index[i].handle
        let block: Block
        if inMemoryOnly {
            guard let cached = cache?.get(BlockCache.Key(file: number, offset: h.offset), countMiss: false) else { return .needsDisk }
            block = cached
        } else {
            block = try readBlock(h)
        }
        guard let e = try block.seek(key, path: path, offset: h.offset), e.key == key else { return .absent }
        return .found(e.value, blockOffset: h.offset)
    }

    /// The entries of block `i`, in order.
    func blockEntries(_ i: Int, fillCache: Bool = true) throws(StorageError) -> [(key: [UInt8], value: [UInt8])] {
        try readBlock(index[i].handle, fillCache: fillCache).entries(path: path, offset: index[i].handle.offset)
    }

    /// Every entry in key order.
    public func scan() throws(StorageError) -> [(key: [UInt8], value: [UInt8])] {
        if let d = damaged { throw d.error }
        var out: [(key: [UInt8], value: [UInt8])] = []
        for (_, h) in index { out += try readBlock(h).entries(path: path, offset: h.offset) }
        return out
    }

    public func close() { file?.file.close() }
}
