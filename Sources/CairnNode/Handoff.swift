import CairnCore
import CairnMembership
import CairnRing
import CairnStorage
import CairnWire
import Logging

/// The handoff stream's bytes (Docs/cluster-state.md §4): the open's header names the transfer;
/// each chunk is a batch of stored objects or a keepalive.
enum HandoffWire {
    static let format: UInt8 = 1

    struct Header: Hashable, Sendable {
        var id: TransferID
        var stream: UInt64
        var transfer: PartitionTransfer
    }

    enum Chunk: Sendable {
        case batch(sequence: UInt64, entries: [(key: [UInt8], object: [UInt8])])
        case keepalive
    }

    static func encode(_ h: Header) -> [UInt8] {
        var w = ByteWriter(capacity: 48)
        w.writeU8(format)
        w.writeU64(h.id.value)
        w.writeU64(h.stream)
        w.writeU32(h.transfer.partition.index)
        w.writeString(h.transfer.from.value)
        w.writeString(h.transfer.to.value)
        return w.bytes
    }

    static func header(_ bytes: [UInt8]) throws(DecodeError) -> Header {
        var r = ByteReader(bytes)
        let f = try r.readU8("handoff format")
        guard f == format else { throw DecodeError("handoff format \(f) is not \(format)") }
        let id = TransferID(try r.readU64("transfer id"))
        let stream = try r.readU64("stream")
        let p = PartitionID(try r.readU32("partition"))
        let from = try name(try r.readString("from", limit: NodeName.maxBytes))
        let to = try name(try r.readString("to", limit: NodeName.maxBytes))
        try r.expectEnd("handoff header")
        return Header(id: id, stream: stream, transfer: PartitionTransfer(partition: p, from: from, to: to))
    }

    static func encode(sequence: UInt64, entries: [(key: [UInt8], object: [UInt8])]) -> [UInt8] {
        var w = ByteWriter(capacity: 16 + entries.reduce(0) { $0 + $1.key.count + $1.object.count + 8 })
        w.writeU8(1)
        w.writeVarint(sequence)
        w.writeVarint(entries.count)
        for e in entries {
            w.writeBlob(e.key)
            w.writeBlob(e.object)
        }
        return w.bytes
    }

    static let keepaliveChunk: [UInt8] = [2]

    static func chunk(_ bytes: [UInt8], limits: Limits) throws(DecodeError) -> Chunk {
        var r = ByteReader(bytes)
        switch try r.readU8("chunk kind") {
        case 1:
            let sequence = try r.readVarint("sequence")
            let count = try r.readCount("entries", limit: bytes.count / 2)
            var entries: [(key: [UInt8], object: [UInt8])] = []
            entries.reserveCapacity(count)
            for _ in 0..<count {
                let key = try r.readBlob("key", limit: limits.maxKeyBytes)
                entries.append((key, try r.readBlob("object", limit: limits.maxFrameBytes)))
            }
            try r.expectEnd("handoff batch")
            return .batch(sequence: sequence, entries: entries)
        case 2:
            try r.expectEnd("keepalive")
            return .keepalive
        case let k:
            throw DecodeError("unknown handoff chunk kind \(k)")
        }
    }

    private static func name(_ s: String) throws(DecodeError) -> NodeName {
        do { return try NodeName(s) } catch { throw DecodeError(error.reason) }
    }

    /// The id of `t` in the plan whose target claim has `targetFingerprint`: the same on the
    /// sender and the receiver, different for a later plan moving the same partition again.
    static func id(of t: PartitionTransfer, targetFingerprint: UInt64) -> TransferID {
        var w = ByteWriter(capacity: 48)
        w.writeU64(targetFingerprint)
        w.writeU32(t.partition.index)
        w.writeString(t.from.value)
        w.writeString(t.to.value)
        return TransferID(KeyHash.hash(w.bytes))
    }
}

/// Where a sender keeps each transfer's checkpoint and the keys whose forward failed, so that a
/// restarted sender resumes instead of starting over. Every call is durable on return.
protocol HandoffStore: Sendable {
    func load(_ id: TransferID) throws -> (record: TransferCheckpoint, dirty: Set<[UInt8]>)?
    func save(_ record: TransferCheckpoint) throws
    func setDirty(_ id: TransferID, _ keys: Set<[UInt8]>) throws
    func delete(_ id: TransferID) throws
    /// Every stored checkpoint (with its kept keys), in id order.
    func all() throws -> [(record: TransferCheckpoint, dirty: Set<[UInt8]>)]
}

/// `<data directory>/handoff/<id>.ckpt` and `<id>.dirty`, each replaced atomically.
struct FileHandoffStore: HandoffStore {
    let fs: any FileSystem
    let directory: String

    private func name(_ id: TransferID, _ ext: String) -> String { "\(String(id.value, radix: 16)).\(ext)" }

    func load(_ id: TransferID) throws -> (record: TransferCheckpoint, dirty: Set<[UInt8]>)? {
        guard let bytes = try fs.readWhole(directory + "/" + name(id, "ckpt")) else { return nil }
        let record = try TransferCheckpoint(decoding: bytes)
        var dirty = Set<[UInt8]>()
        if let raw = try fs.readWhole(directory + "/" + name(id, "dirty")) {
            var r = ByteReader(raw)
            let n = try r.readCount("dirty keys", limit: raw.count)
            for _ in 0..<n { dirty.insert(try r.readBlob("dirty key", limit: TransferCheckpoint.maxKeyBytes)) }
            try r.expectEnd("dirty keys")
        }
        return (record, dirty)
    }

    func save(_ record: TransferCheckpoint) throws {
        try fs.replaceAtomically(name(record.id, "ckpt"), in: directory, with: record.encoded())
    }

    func setDirty(_ id: TransferID, _ keys: Set<[UInt8]>) throws {
        var w = ByteWriter()
        w.writeVarint(keys.count)
        for k in keys.sorted(by: { $0.lexicographicallyPrecedes($1) }) { w.writeBlob(k) }
        try fs.replaceAtomically(name(id, "dirty"), in: directory, with: w.bytes)
    }

    func delete(_ id: TransferID) throws {
        let present = ["ckpt", "dirty"].map { directory + "/" + name(id, $0) }.filter { fs.exists($0) }
        for path in present { try fs.remove(path) }
        if !present.isEmpty { try fs.syncDirectory(directory) }
    }

    func all() throws -> [(record: TransferCheckpoint, dirty: Set<[UInt8]>)] {
        guard fs.exists(directory) else { return [] }
        let ids = try fs.list(directory).compactMap { name -> TransferID? in
            guard name.hasSuffix(".ckpt"), let v = UInt64(name.dropLast(5), radix: 16) else { return nil }
            return TransferID(v)
        }
        return try ids.sorted().compactMap { try load($0) }
    }
}

final class MemoryHandoffStore: HandoffStore {
    private let records = Locked<[TransferID: (TransferCheckpoint, Set<[UInt8]>)]>([:])
    func load(_ id: TransferID) throws -> (record: TransferCheckpoint, dirty: Set<[UInt8]>)? { records.value[id].map { ($0.0, $0.1) } }
    func save(_ record: TransferCheckpoint) throws { records.withLock { $0[record.id] = (record, $0[record.id]?.1 ?? []) } }
    func setDirty(_ id: TransferID, _ keys: Set<[UInt8]>) throws { records.withLock { if let r = $0[id] { $0[id] = (r.0, keys) } } }
    func delete(_ id: TransferID) throws { records.withLock { $0[id] = nil } }
    func all() throws -> [(record: TransferCheckpoint, dirty: Set<[UInt8]>)] {
        records.value.sorted { $0.key < $1.key }.map { ($0.value.0, $0.value.1) }
    }
}
