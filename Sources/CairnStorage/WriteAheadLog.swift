import Synchronization

/// The write-ahead log: a file of checksummed, length-prefixed records (Docs/storage-format.md).
///
/// ```
/// log     = *record *%x00   ; zeros written ahead of appends (`FileSystem.createLog`)
/// record  = checksum:u32be length:u32be type:u8 payload
/// checksum = masked CRC32C over type and payload
/// length  = payload bytes, <= WAL.maxRecordBytes
/// type    = %x01 (full record)
/// ```
public enum WAL {
    public static let headerBytes = 9
    public static let maxRecordBytes = 64 << 20
    static let typeFull: UInt8 = 1

    public static func frame(_ payload: [UInt8]) -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(headerBytes + payload.count)
        frame(payload, into: &out)
        return out
    }

    /// Appends `payload`'s record to `out`.
    static func frame(_ payload: [UInt8], into out: inout [UInt8]) {
        let crc = CRC32C.mask(CRC32C.update(typeFullChecksum, payload))
        appendU32(&out, crc)
        appendU32(&out, UInt32(payload.count))
        out.append(typeFull)
        out += payload
    }

    /// Appends one record whose payload `encode` writes straight into `out` (no payload array of
    /// its own): the header's room first, patched once the payload is in. A payload over
    /// `maxRecordBytes` is taken back out (`out` as it was) and its size returned instead.
    static func frame(into out: inout [UInt8], _ encode: (inout [UInt8]) -> Void) -> Int? {
        let start = out.count
        out.append(contentsOf: repeatElement(0, count: headerBytes))
        encode(&out)
        let count = out.count - start - headerBytes
        guard count <= maxRecordBytes else {
            out.removeSubrange(start...)
            return count
        }
        let crc = out.withUnsafeBufferPointer { b in
            CRC32C.mask(CRC32C.update(typeFullChecksum, buffer: UnsafeBufferPointer(rebasing: b[(start + headerBytes)...])))
        }
        for j in 0..<4 {
            out[start + j] = UInt8(truncatingIfNeeded: crc >> UInt32(24 - 8 * j))
            out[start + 4 + j] = UInt8(truncatingIfNeeded: UInt32(count) >> UInt32(24 - 8 * j))
        }
        out[start + 8] = typeFull
        return nil
    }

    /// The checksum of the type byte alone, where every full record's checksum starts.
    private static let typeFullChecksum = CRC32C.checksum([typeFull])

    static func appendU32(_ out: inout [UInt8], _ v: UInt32) {
        for s in stride(from: 24, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: v >> UInt32(s))) }
    }

    static func u32(_ b: ArraySlice<UInt8>) -> UInt32 { b.reduce(0) { $0 << 8 | UInt32($1) } }

    /// What recovery found in one log file.
    public struct Recovery: Sendable {
        public var records: [[UInt8]]
        /// Where the last good record ends: the log is truncated here before appending.
        public var validEnd: UInt64
        /// Bytes after `validEnd` that were a torn (incomplete or half-written) last record.
        public var tornTailBytes: UInt64
        /// Zero bytes after `validEnd`: space written ahead of appends, not a torn record.
        public var zeroTailBytes: UInt64 = 0
        /// Records skipped by `salvage` because they were corrupt, and the bytes they spanned.
        public var salvagedBytes: UInt64
        /// Corrupt stretches `salvage` skipped (each from a bad record to the next valid one).
        public var salvagedRegions = 0
    }

    /// Reads every record of `file`. Zero bytes after the last record end the log (space written
    /// ahead of appends; `zeroTailBytes`). A bad record is a torn tail when nothing valid follows
    /// it (a crash during the last append): recovery stops there and reports the bytes to truncate.
    /// A bad record followed by valid ones is corruption: it throws `.corruption` naming the file
    /// and offset, unless `salvage`, which skips to the next valid record and counts the bytes.
    public static func recover(_ file: any ReadableFile, path: String, salvage: Bool = false) throws(StorageError) -> Recovery {
        var records: [[UInt8]] = []
        var r = try replay(file, path: path, salvage: salvage) { (p: [UInt8], _) throws(StorageError) in records.append(p) }
        r.records = records
        return r
    }

    /// `recover`, handing each record to `body` with the offset where its frame starts, as it is
    /// found, instead of collecting them (the returned `records` is empty): replaying a large log
    /// holds one record at a time.
    public static func replay(_ file: any ReadableFile, path: String, salvage: Bool = false,
                              _ body: (_ payload: [UInt8], _ offset: UInt64) throws(StorageError) -> Void) throws(StorageError) -> Recovery {
        let size = file.size
        let data = try file.read(at: 0, count: Int(min(size, UInt64(Int.max))))
        var offset = 0
        var salvaged: UInt64 = 0
        var regions = 0
        while offset < data.count {
            if let (payload, next) = record(at: offset, in: data) {
                try body(payload, UInt64(offset))
                offset = next
                continue
            }
            // Bad record at `offset`: the zeroed space ahead of appends, a torn tail, or
            // corruption with good records after it?
            if data[offset...].allSatisfy({ $0 == 0 }) {
                return Recovery(records: [], validEnd: UInt64(offset), tornTailBytes: 0, zeroTailBytes: UInt64(data.count - offset),
                                salvagedBytes: salvaged, salvagedRegions: regions)
            }
            guard let resume = nextValidRecord(after: offset, in: data) else {
                return Recovery(records: [], validEnd: UInt64(offset), tornTailBytes: UInt64(data.count - offset),
                                salvagedBytes: salvaged, salvagedRegions: regions)
            }
            guard salvage else {
                throw .corruption(path: path, offset: UInt64(offset), reason: "bad log record followed by valid records at \(resume)")
            }
            salvaged += UInt64(resume - offset)
            regions += 1
            offset = resume
        }
        return Recovery(records: [], validEnd: UInt64(offset), tornTailBytes: 0, salvagedBytes: salvaged, salvagedRegions: regions)
    }

    /// The record at `offset` and where the next starts, if it is complete and its checksum holds.
    static func record(at offset: Int, in data: [UInt8]) -> ([UInt8], Int)? {
        guard data.count - offset >= headerBytes else { return nil }
        let length = Int(u32(data[offset + 4..<offset + 8]))
        guard length <= maxRecordBytes, data.count - offset - headerBytes >= length else { return nil }
        guard data[offset + 8] == typeFull else { return nil }
        let body = data[offset + 8..<offset + headerBytes + length]
        guard CRC32C.mask(CRC32C.checksum(body)) == u32(data[offset..<offset + 4]) else { return nil }
        return (Array(data[offset + headerBytes..<offset + headerBytes + length]), offset + headerBytes + length)
    }

    /// The first offset after `offset` where a valid record starts, if any.
    static func nextValidRecord(after offset: Int, in data: [UInt8]) -> Int? {
        var p = offset + 1
        while p + headerBytes <= data.count {
            if record(at: p, in: data) != nil { return p }
            p += 1
        }
        return nil
    }
}

/// How durable an acknowledged write is.
public enum SyncMode: Sendable, Hashable {
    /// Every acknowledged write is on disk (`fdatasync` before the acknowledgement).
    case always
    /// Synced at least every `milliseconds`; a crash can lose that much.
    case interval(milliseconds: Int)
    /// Never synced by the engine; the OS writes back when it likes.
    case none
}

/// Appends records to one log file (also the manifest's writer).
///
/// Failure rules (a writer never appends on top of a fragment):
/// - After a failed append (a short write followed by ENOSPC or EIO may have left part of a
///   record behind) every later `append` is refused with `writesRefused`: the fragment stays the
///   file's last bytes, so recovery sees it as a torn tail and drops it. `sync` still works: the
///   records appended before the failure are whole, and their writers may be acknowledged once
///   they are durable.
/// - After a failed sync every later `append` and `sync` is refused: the data since the last good
///   sync may be gone, and a retried fsync could lie.
/// - With a buffer, a failed write-out of it counts as both: the buffered records are lost, and
///   their writers, waiting for a sync, must never be told they are durable.
/// Either way the writer is done; the engine recovers by reopening (a new log or manifest).
///
/// Concurrency: `append` calls must be serialized by the caller (the engine's commit path);
/// `sync` may run concurrently with `append` (group commit: `write` and `fdatasync` on one
/// descriptor are safe together). The failure flags and the buffer are lock-protected. A
/// write-out takes the buffer under its lock and writes it under a second one (`fileWrite`):
/// file writes keep append order, and an appender never waits for a write in progress unless
/// its own append fills the buffer. Lock order: `fileWrite`, then `pending`, then `failure`.
public final class WALWriter: @unchecked Sendable {
    let file: any AppendableFile
    public let path: String
    private struct Failures {
        var write: StorageError?
        var sync: StorageError?
    }
    private let failure = Mutex(Failures())
    /// Framed records not yet written to the file (`bufferLimit` > 0), and the emptied array of
    /// the last write-out (reused, so a steady buffer allocates nothing).
    private let pending = Mutex<(bytes: [UInt8], spare: [UInt8])>(([], []))
    /// Held while the buffer is written to the file.
    private let fileWrite = Mutex(())
    private let writes = Atomic<Int>(0)
    /// Appended records are held in memory until a sync, the buffer reaching this many bytes,
    /// `writeOut` or `close` writes them to the file in one write; 0: each append writes at once.
    public let bufferLimit: Int

    /// `bufferLimit`: see the property. A writer whose caller acknowledges writes without a sync
    /// must call `writeOut` first (or use 0), or a process crash loses what the buffer holds.
    public init(file: any AppendableFile, path: String, bufferLimit: Int = 0) {
        self.file = file
        self.path = path
        self.bufferLimit = max(0, bufferLimit)
    }

    /// Bytes appended so far, buffered ones included (waits for a write-out in progress).
    public var size: UInt64 { fileWrite.withLock { _ in file.size + UInt64(pending.withLock { $0.bytes.count }) } }

    /// Writes to the file so far (one per append without a buffer; one per emptied buffer with one).
    public var fileWrites: Int { writes.load(ordering: .relaxed) }

    /// Writes the buffered records to the file (not synced). A failed write loses the buffered
    /// records, whose writers may be waiting for a sync: the writer then refuses every later
    /// append and sync, so none of them is ever reported durable.
    public func writeOut() throws(StorageError) {
        try fileWrite.withLock { _ throws(StorageError) in
            var out = pending.withLock { p -> [UInt8] in
                let taken = p.bytes
                p.bytes = p.spare
                p.spare = []
                return taken
            }
            guard !out.isEmpty else { return }
            try write(out, losingWaiters: true)
            // Reused unless a record far past the bound made it large.
            guard out.capacity <= 2 * bufferLimit + (1 << 16) else { return }
            out.removeAll(keepingCapacity: true)
            pending.withLock { p in if p.spare.capacity < out.capacity { p.spare = out } }
        }
    }

    /// Writes `bytes` to the file, recording a failure by the failure rules: `losingWaiters`
    /// (the buffer's records, which writers may be waiting to sync) refuses later syncs too.
    private func write(_ bytes: [UInt8], losingWaiters: Bool) throws(StorageError) {
        do throws(StorageError) {
            try file.append(bytes)
        } catch {
            failure.withLock { f in
                f.write = f.write ?? error
                if losingWaiters { f.sync = f.sync ?? error }
            }
            throw error
        }
        writes.add(1, ordering: .relaxed)
    }

    /// Why this writer refuses appends, if it does (a failed append or a failed sync).
    public var appendFailure: StorageError? { failure.withLock { $0.sync ?? $0.write } }

    /// The error an append throws after a failure (see the type's failure rules), if any.
    private var refusal: StorageError? {
        failure.withLock { f in
            if let e = f.sync { return .writesRefused("an earlier sync or buffered write of \(path) failed (\(e))") }
            if let e = f.write { return .writesRefused("an earlier write to \(path) failed (\(e)); nothing is appended after it") }
            return nil
        }
    }

    /// Records up to this many bytes (by the caller's estimate) are encoded straight into the
    /// buffer, under its lock; larger ones into their own array first, so a large record's
    /// encoding and checksum never hold up the syncer taking the buffer.
    static let inPlaceRecordBytes = 8 << 10

    /// Appends one record whose payload `encode` writes, then syncs if `sync`. A record of at
    /// most `inPlaceRecordBytes` (by `estimatedBytes`, the payload's size or about it) is encoded
    /// in place into the buffer, when there is one: no array per record. Failure rules as
    /// `append(_:sync:)`; a payload over `WAL.maxRecordBytes` is refused and nothing is appended.
    public func append(encoding encode: (inout [UInt8]) -> Void, estimatedBytes: Int, sync: Bool) throws(StorageError) {
        if let refused = refusal { throw refused }
        if bufferLimit > 0, estimatedBytes <= Self.inPlaceRecordBytes {
            let (oversized, full) = pending.withLock { b in
                let oversized = WAL.frame(into: &b.bytes, encode)
                return (oversized, b.bytes.count >= bufferLimit)
            }
            if let oversized { throw .invalidArgument("log record of \(oversized) bytes exceeds \(WAL.maxRecordBytes)") }
            if full { try writeOut() }
        } else {
            var bytes: [UInt8] = []
            bytes.reserveCapacity(WAL.headerBytes + max(0, estimatedBytes))
            if let oversized = WAL.frame(into: &bytes, encode) {
                throw .invalidArgument("log record of \(oversized) bytes exceeds \(WAL.maxRecordBytes)")
            }
            if bufferLimit > 0 {
                let full = pending.withLock { b in
                    b.bytes += bytes
                    return b.bytes.count >= bufferLimit
                }
                if full { try writeOut() }
            } else {
                try write(bytes, losingWaiters: false)
            }
        }
        if sync { try self.sync() }
    }

    /// Appends `payloads` as consecutive records, then syncs if `sync`. On a failed write the
    /// writer refuses every later append (see the type's failure rules) and the error is thrown.
    public func append(_ payloads: [[UInt8]], sync: Bool) throws(StorageError) {
        if let refused = refusal { throw refused }
        for p in payloads where p.count > WAL.maxRecordBytes {
            throw .invalidArgument("log record of \(p.count) bytes exceeds \(WAL.maxRecordBytes)")
        }
        if bufferLimit > 0 {
            let full = pending.withLock { b in
                for p in payloads { WAL.frame(p, into: &b.bytes) }
                return b.bytes.count >= bufferLimit
            }
            if full { try writeOut() }
        } else {
            var bytes: [UInt8] = []
            bytes.reserveCapacity(payloads.reduce(0) { $0 + WAL.headerBytes + $1.count })
            for p in payloads { WAL.frame(p, into: &bytes) }
            try write(bytes, losingWaiters: false)
        }
        if sync { try self.sync() }
    }

    /// Makes everything appended so far durable, writing out the buffer first. Without a buffer,
    /// also after a failed append (what was appended before it is whole); refused after a failed
    /// sync or a failed write-out of the buffer.
    public func sync() throws(StorageError) {
        if let f = failure.withLock({ $0.sync }) { throw .writesRefused("an earlier sync or buffered write of \(path) failed (\(f))") }
        try writeOut()
        do {
            try file.sync()
        } catch {
            failure.withLock { $0.sync = $0.sync ?? error }
            throw error
        }
    }

    /// Writes out the buffer (not synced; `Database.abandon` closes this way too, so an abandoned
    /// database leaves its buffered records in the file, unsynced), then closes the file; the
    /// write's failure is thrown after the close.
    public func close() throws(StorageError) {
        var failed: StorageError?
        do throws(StorageError) { try writeOut() } catch { failed = error }
        try file.close()
        if let failed { throw failed }
    }
}
