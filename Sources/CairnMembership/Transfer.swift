public import CairnCore

// Ownership handoff: one partition's keys copied from its old owner (the sender) to its new owner
// (the receiver), resumable from a checkpoint per acknowledged batch, with the writes that arrive
// during the copy forwarded by the old owner's vnode and re-sent by the sender when a forward
// failed. The sender's protocol is `TransferSender` (pure: events in, directives out); the
// receiver's bookkeeping is `TransferReceiver`; the durable state is `TransferCheckpoint`.
// The riak_core lessons this answers: a timeout resumes from the checkpoint instead of restarting
// the whole transfer (#994); a long scan over skipped keys keeps the transfer alive (#557/#560);
// writes during the copy are not lost behind it (riak_kv #1754).

// MARK: Identity, positions, settings

/// Identifies one transfer. Assigned by the plan that decided it; the receiver refuses streams and
/// batches of transfers it was not told to expect.
public struct TransferID: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let value: UInt64
    public init(_ value: UInt64) { self.value = value }
    public static func < (a: TransferID, b: TransferID) -> Bool { a.value < b.value }
    public var description: String { "transfer-\(value)" }
}

/// How far the sender's ordered fold of the partition has got. Keys compare bytewise, as the
/// store folds them: `start` < `after(k)` (by `k`) < `end`.
public enum TransferPosition: Hashable, Sendable, Comparable, CustomStringConvertible {
    /// Nothing copied yet: the fold starts at the partition's first key.
    case start
    /// Every key up to and including this one is covered; the fold resumes after it.
    case after([UInt8])
    /// The fold reached the partition's end.
    case end

    public static func < (a: TransferPosition, b: TransferPosition) -> Bool {
        switch (a, b) {
        case (.end, _), (.start, .start): false
        case (.start, _), (_, .end): true
        case (.after, .start): false
        case (.after(let x), .after(let y)): x.lexicographicallyPrecedes(y)
        }
    }

    /// The `after` argument of a fold that starts here (nil: from the first key; also nil at `end`,
    /// where there is nothing left to fold).
    public var foldAfter: [UInt8]? {
        if case .after(let key) = self { key } else { nil }
    }

    /// Whether a fold starting at this position would visit `key`.
    public func precedes(key: [UInt8]) -> Bool {
        switch self {
        case .start: true
        case .after(let k): k.lexicographicallyPrecedes(key)
        case .end: false
        }
    }

    public var description: String {
        switch self {
        case .start: "start"
        case .after(let k): "after " + k.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
        case .end: "end"
        }
    }
}

/// How a transfer is paced and bounded (riak_core's handoff defaults where it has them).
public struct TransferSettings: Hashable, Sendable {
    /// A fold batch stops after the key that brings it to this many bytes (1 MiB); a batch always
    /// holds at least one key, so one large object may exceed it.
    public var batchMaxBytes = 1 << 20
    /// A batch holds at most this many keys (500, as riak_core).
    public var batchMaxKeys = 500
    /// Batches sent (or being read) and not yet acknowledged, at most (2). Bounds what a crash or
    /// a failed stream makes the sender re-send.
    public var maxBatchesInFlight = 2
    /// A stream that is waiting for something (its open, a fold, an acknowledgement) and sees no
    /// progress for this long is closed and re-opened from the checkpoint (120 s).
    public var batchTimeout: Duration = .seconds(120)
    /// While a fold scans without producing a batch (filtered keys), a keepalive goes to the
    /// receiver at most this often, so its own idle timeout does not fire (30 s).
    public var keepaliveInterval: Duration = .seconds(30)
    /// The wait before re-opening a failed stream: `backoffMin`, doubling per consecutive failure,
    /// at most `backoffMax` (1 s … 60 s).
    public var backoffMin: Duration = .seconds(1)
    public var backoffMax: Duration = .seconds(60)
    /// Consecutive failures (no acknowledgement in between) after which the transfer gives up
    /// (10: about five minutes at the default backoff). Its checkpoint stays; a new attempt resumes.
    public var maxConsecutiveFailures = 10
    /// Keys whose forward failed that the sender keeps to re-send (10,000). One more makes it copy
    /// the partition again from the start (counted in `refolds`) instead of growing without bound.
    public var maxDirtyKeys = 10_000

    public init() {}

    /// Every bound at least 1 (0 dirty keys allowed), the backoff ordered.
    var sanitized: TransferSettings {
        var s = self
        s.batchMaxBytes = max(s.batchMaxBytes, 1)
        s.batchMaxKeys = max(s.batchMaxKeys, 1)
        s.maxBatchesInFlight = max(s.maxBatchesInFlight, 1)
        s.maxConsecutiveFailures = max(s.maxConsecutiveFailures, 0)
        s.maxDirtyKeys = max(s.maxDirtyKeys, 0)
        s.backoffMin = max(s.backoffMin, .zero)
        s.backoffMax = max(s.backoffMax, s.backoffMin)
        return s
    }
}

// MARK: The durable record

/// What the sender's shell persists (directive `persistCheckpoint`) and a restarted sender resumes
/// from (`TransferSender(resuming:dirtyKeys:settings:)`). The keys whose forward failed are kept
/// beside it, one durable entry per key (`persistDirtyKey` / `forgetDirtyKeys`).
///
/// Byte format (version 1): `u8 version, u64 id, u32 partition, string from, string to,
/// u8 position (0 start, 1 after + blob key, 2 end), varint sequence, varint streams,
/// varint batchesAcked, varint keysAcked, varint bytesAcked, varint refolds`; strings and blobs
/// are `varint length, bytes` (`ByteWriter`). Decoding checks every length and value and throws
/// `DecodeError` on anything else, trailing bytes included.
public struct TransferCheckpoint: Hashable, Sendable {
    public static let formatVersion: UInt8 = 1
    /// The longest resume key a record may hold when decoded.
    public static let maxKeyBytes = 1 << 16

    public var id: TransferID
    public var partition: PartitionID
    public var from: NodeName
    public var to: NodeName
    /// Every key up to here was acknowledged by the receiver.
    public var position: TransferPosition
    /// The last acknowledged batch.
    public var sequence: UInt64
    /// Streams opened over the transfer's life; the next one is numbered `streams + 1`, so stream
    /// numbers stay unique across restarts of the sender (the record is persisted before each open).
    public var streams: UInt64
    public var batchesAcked: UInt64
    public var keysAcked: UInt64
    public var bytesAcked: UInt64
    /// Times the copy started again from the start because the dirty keys overflowed.
    public var refolds: UInt64

    public init(id: TransferID, partition: PartitionID, from: NodeName, to: NodeName,
                position: TransferPosition = .start, sequence: UInt64 = 0, streams: UInt64 = 0,
                batchesAcked: UInt64 = 0, keysAcked: UInt64 = 0, bytesAcked: UInt64 = 0, refolds: UInt64 = 0) {
        self.id = id
        self.partition = partition
        self.from = from
        self.to = to
        self.position = position
        self.sequence = sequence
        self.streams = streams
        self.batchesAcked = batchesAcked
        self.keysAcked = keysAcked
        self.bytesAcked = bytesAcked
        self.refolds = refolds
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: 48 + (position.foldAfter?.count ?? 0))
        w.writeU8(Self.formatVersion)
        w.writeU64(id.value)
        w.writeU32(partition.index)
        w.writeString(from.value)
        w.writeString(to.value)
        switch position {
        case .start: w.writeU8(0)
        case .after(let key):
            w.writeU8(1)
            w.writeBlob(key)
        case .end: w.writeU8(2)
        }
        for n in [sequence, streams, batchesAcked, keysAcked, bytesAcked, refolds] { w.writeVarint(n) }
        return w.bytes
    }

    public init(decoding bytes: [UInt8]) throws(DecodeError) {
        var r = ByteReader(bytes)
        let version = try r.readU8("transfer checkpoint version")
        guard version == Self.formatVersion else {
            throw DecodeError("transfer checkpoint version \(version) is not \(Self.formatVersion)")
        }
        id = TransferID(try r.readU64("transfer id"))
        partition = PartitionID(try r.readU32("partition"))
        from = try Self.readNode(&r, "sending node")
        to = try Self.readNode(&r, "receiving node")
        guard from != to else { throw DecodeError("transfer checkpoint sends \(from) to itself") }
        switch try r.readU8("position") {
        case 0: position = .start
        case 1: position = .after(try r.readBlob("resume key", limit: Self.maxKeyBytes))
        case 2: position = .end
        case let tag: throw DecodeError("position tag \(tag) is not 0, 1 or 2")
        }
        sequence = try r.readVarint("sequence")
        streams = try r.readVarint("streams")
        batchesAcked = try r.readVarint("batches acknowledged")
        keysAcked = try r.readVarint("keys acknowledged")
        bytesAcked = try r.readVarint("bytes acknowledged")
        refolds = try r.readVarint("refolds")
        try r.expectEnd("transfer checkpoint")
    }

    private static func readNode(_ r: inout ByteReader, _ what: String) throws(DecodeError) -> NodeName {
        let s = try r.readString(what, limit: NodeName.maxBytes)
        do { return try NodeName(s) } catch { throw DecodeError("\(what) '\(s)' is not a valid node name") }
    }
}

// MARK: Events, directives, progress

/// What the shell tells the sender. Every event comes with the time it is handled at.
public enum TransferEvent: Hashable, Sendable {
    /// Begin (or, for a machine made from a checkpoint, resume). Ignored once started.
    case start
    /// The stream asked for by `openStream(stream:)` is open.
    case streamOpened(stream: UInt64)
    /// That stream failed (refused, aborted by the receiver, link lost). The shell has let it go.
    case streamFailed(stream: UInt64, reason: String)
    /// `foldAndSend(sequence:)` is done: `keys` keys of `bytes` bytes went out as one chunk (none
    /// when `keys` is 0), and the fold ended at `resumeAfter` (the store's `PartitionFold`: the
    /// last key visited, nil when the partition ended).
    case foldSent(sequence: UInt64, keys: Int, bytes: Int, resumeAfter: [UInt8]?)
    /// `sendKeys(sequence:)` is done: its first `keys` keys were consumed and went out as one
    /// chunk of `bytes` bytes (sent whenever `keys` > 0, even if none of them was present); the
    /// rest stay kept, for a later batch.
    case keysSent(sequence: UInt64, keys: Int, bytes: Int)
    /// The receiver acknowledged (durably applied) every batch of the current stream up to this
    /// sequence: acknowledgements are cumulative, as the stream's.
    case batchAcked(sequence: UInt64)
    /// A fold is still scanning (e.g. over keys it filters out) without a batch to show.
    case foldProgress
    /// The old owner's vnode applied a write to `key` and its forward to the receiver was not
    /// acknowledged. The vnode acknowledges that write only once the shell has performed every
    /// directive returned up to and including this event's (a barrier: an earlier persist of the
    /// same key, or a reset checkpoint, may still be queued).
    case forwardFailed(key: [UInt8])
    /// The committed ring makes the receiver the owner of the partition.
    case ownershipFlipped
    /// `dropPartition` is done (durably).
    case dropped
    /// The ring no longer wants this transfer (the plan changed).
    case cancelled
    /// A timer armed at `nextDeadline` fired.
    case tick
}

/// What the sender asks its shell to do. The shell performs directives one at a time in the order
/// returned, across calls too, each completing (a persist: durably) before the next starts: the
/// crash bounds rest on it (a fold never overtakes the checkpoint persisted before it, a stream
/// never opens before its number is persisted).
public enum TransferDirective: Hashable, Sendable {
    /// Persist this record, replacing the previous one.
    case persistCheckpoint(TransferCheckpoint)
    /// Persist this key as one whose forward failed.
    case persistDirtyKey([UInt8])
    /// Remove these keys from the persisted ones.
    case forgetDirtyKeys([[UInt8]])
    /// Open stream number `stream` to the receiver (its header: transfer id, partition, stream
    /// number; the copy resumes at `from`). Report `streamOpened` or `streamFailed`.
    case openStream(stream: UInt64, from: TransferPosition)
    /// Fold the partition after `after` (nil: from the first key) up to `maxKeys` keys or until a
    /// key brings the batch to `maxBytes`, send those keys as one chunk numbered `sequence` on
    /// `stream` (nothing when none were found), report `foldSent`; report `foldProgress` while a
    /// long scan finds nothing to send. Pace by the bytes before sending. Nothing if `stream` is
    /// not the shell's open stream.
    case foldAndSend(stream: UInt64, sequence: UInt64, after: [UInt8]?, maxBytes: Int, maxKeys: Int)
    /// Read these keys in order (skipping absent ones, stopping after the one that brings the
    /// batch to `maxBytes`), send what was read as one chunk numbered `sequence` on `stream`, and
    /// report `keysSent` with how many keys were consumed. Nothing if `stream` is not open.
    case sendKeys(stream: UInt64, sequence: UInt64, keys: [[UInt8]], maxBytes: Int)
    /// Tell the receiver the transfer is alive (no data).
    case sendKeepalive(stream: UInt64)
    /// End this stream (finish it if healthy, else cancel it); report nothing more about it.
    case closeStream(stream: UInt64, reason: String)
    /// The receiver holds every key and every write acknowledged so far: tell the claimant.
    case reportComplete
    /// Drop the partition's data (one range deletion); report `dropped`.
    case dropPartition
    /// The machine is done. `handedOff` and `cancelled`: delete the persisted record and dirty
    /// keys. `gaveUp`: keep them, so a later transfer resumes where this one stopped.
    case finished(TransferOutcome)
}

public enum TransferOutcome: Hashable, Sendable, CustomStringConvertible {
    /// Copied, ownership flipped, the old copy dropped.
    case handedOff
    /// The ring cancelled the transfer; the data stays where it was.
    case cancelled
    /// `maxConsecutiveFailures` stream attempts in a row failed; the data stays.
    case gaveUp(reason: String)

    public var description: String {
        switch self {
        case .handedOff: "handed off"
        case .cancelled: "cancelled"
        case .gaveUp(let reason): "gave up: \(reason)"
        }
    }
}

public enum TransferPhase: Hashable, Sendable, CustomStringConvertible {
    /// Made, not started.
    case idle
    /// A stream open is in flight.
    case opening
    /// The fold is not yet acknowledged through the partition's end.
    case copying
    /// The fold is done; keys whose forward failed are being re-sent.
    case catchingUp
    /// A stream failed; it is re-opened at this instant.
    case backingOff(until: ContinuousClock.Instant)
    /// Complete was reported; waiting for the ring to flip ownership.
    case awaitingFlip
    /// `dropPartition` is in flight.
    case dropping
    case finished(TransferOutcome)

    public var description: String {
        switch self {
        case .idle: "idle"
        case .opening: "opening"
        case .copying: "copying"
        case .catchingUp: "catching up"
        case .backingOff: "backing off"
        case .awaitingFlip: "awaiting flip"
        case .dropping: "dropping"
        case .finished(let o): "finished (\(o))"
        }
    }
}

/// One transfer as `cairn transfers` and the `cairn_handoff_*` metrics show it.
public struct TransferProgress: Hashable, Sendable {
    public var id: TransferID
    public var partition: PartitionID
    public var from: NodeName
    public var to: NodeName
    public var phase: TransferPhase
    /// Acknowledged through here (persisted with every acknowledgement).
    public var checkpoint: TransferPosition
    /// Sent by this machine (re-sends included): what the shell paced and the network carried.
    public var keysSent: UInt64
    public var bytesSent: UInt64
    /// Acknowledged over the transfer's life (restored from the checkpoint).
    public var batchesAcked: UInt64
    public var keysAcked: UInt64
    public var bytesAcked: UInt64
    /// Batches sent or being read, not yet acknowledged (≤ `maxBatchesInFlight`).
    public var batchesInFlight: Int
    /// Keys whose forward failed, persisted and not yet acknowledged by the receiver.
    public var dirtyKeys: Int
    /// Streams opened over the transfer's life.
    public var attempts: UInt64
    /// Consecutive failed attempts (0 after an acknowledgement): drives the backoff.
    public var failures: Int
    public var refolds: UInt64
    public var startedAt: ContinuousClock.Instant?
    public var lastProgressAt: ContinuousClock.Instant?
}

// MARK: The sender

/// The sending side of one transfer (partition, from, to, id), as a pure state machine: no I/O, no
/// clock; time comes with every event, timers are `nextDeadline`, everything else is a directive.
///
/// Protocol: open a stream; fold the partition in key order in batches (`foldAndSend`), at most
/// `maxBatchesInFlight` unacknowledged; each acknowledgement moves the checkpoint to the end of the
/// acknowledged prefix and persists it. When the fold is exhausted, the keys whose forward failed
/// are re-sent (`sendKeys`). With the fold acknowledged to the end and no such key left, close the
/// stream and `reportComplete`; after `ownershipFlipped`, `dropPartition`; after `dropped`,
/// `finished(.handedOff)`. A failed or silent stream (`batchTimeout`) is closed and re-opened after
/// a backoff from the checkpoint; `cancelled` stops with the data kept.
///
/// Failed forwards: a key is kept (persisted, bounded by `maxDirtyKeys`) unless a fold still to
/// be started will visit it anyway (no fold outstanding and the key lies after the fold's
/// position); on a rewind the kept keys after the checkpoint are forgotten for the same reason.
/// More than `maxDirtyKeys` restarts the copy from the start (`refolds`).
///
/// What a caller may rely on:
/// - `reportComplete` is returned only when every fold batch through the partition's end and
///   every batch of kept keys was acknowledged, and no kept key remains; `dropPartition` only after
///   that and after `ownershipFlipped` (a flip that comes earlier waits for the copy).
/// - The checkpoint only moves forward, except back to `start` on a dirty-key overflow
///   (`refolds` counts those); it is persisted before the stream that resumes from it is opened.
/// - Unacknowledged batches (sent or being read) ≤ `maxBatchesInFlight`; at most one is being read.
/// - After a crash, a machine made from the last persisted record re-sends at most the keys of the
///   batches that were in flight then (≤ `maxBatchesInFlight` batches).
/// - Events that do not apply are ignored: they change nothing and return nothing. Namely: anything
///   before `start` but `cancelled`, `forwardFailed` and `ownershipFlipped`; a stream event for a
///   stream other than the current one; `foldSent`/`keysSent` for a sequence that is not the batch
///   being read (or a fold that does not move forward); an ack outside the current stream's issued
///   sequences or not above the last ack; `foldProgress` with no fold being read; `tick` before
///   `nextDeadline`; `dropped` before `dropPartition`; after `dropPartition` everything but
///   `dropped`; after `finished`, everything.
/// - A write whose forward failed is safe once the shell has performed every directive returned
///   up to and including that `forwardFailed`'s: its key is then persisted, or after the position
///   of the persisted checkpoint (the next fold reads it). Forwards that fail after
///   `dropPartition` are not the machine's: the vnode must not acknowledge those writes.
///
/// Isolation: a value type; the shell owns it and feeds it one event at a time.
public struct TransferSender: Sendable {
    public let id: TransferID
    public let partition: PartitionID
    public let from: NodeName
    public let to: NodeName
    public let settings: TransferSettings

    enum Life: Hashable, Sendable {
        case idle, running, dropping
        case finished(TransferOutcome)
    }

    enum Link: Hashable, Sendable {
        case closed
        case opening(UInt64)
        case open(UInt64)
        case backingOff(until: ContinuousClock.Instant)
    }

    /// What a batch carries: a stretch of the fold ending at `reached`, or kept keys.
    enum Content: Hashable, Sendable {
        case fold(reached: TransferPosition)
        case keys([[UInt8]])
    }

    /// A batch reported sent and not yet popped off the acknowledged prefix.
    struct Batch: Hashable, Sendable {
        let sequence: UInt64
        let content: Content
        let keys: Int
        let bytes: Int
        var acked: Bool
    }

    /// The batch asked for and not yet reported sent: a fold from `frontier`, or these keys.
    struct Reading: Hashable, Sendable {
        let sequence: UInt64
        let keys: [[UInt8]]?
    }

    private(set) var life: Life = .idle
    private(set) var link: Link = .closed
    /// Acknowledged through here (the durable record's position).
    private(set) var checkpoint: TransferPosition
    /// Where the next fold starts: the end of the last batch read on this stream, or the checkpoint.
    private(set) var frontier: TransferPosition
    private(set) var reading: Reading?
    private(set) var inFlight: [Batch] = []
    /// Kept keys not in any batch; those in `reading` and `inFlight` are persisted too.
    private(set) var dirty: Set<[UInt8]>
    private(set) var nextSequence: UInt64
    private var streamFirstSequence: UInt64
    private var ackedThrough: UInt64?
    private var lastAckedSequence: UInt64
    private var streams: UInt64
    private(set) var failures = 0
    private(set) var reported = false
    private(set) var flipped = false
    private var keysSent: UInt64 = 0
    private var bytesSent: UInt64 = 0
    private var batchesAcked: UInt64
    private var keysAcked: UInt64
    private var bytesAcked: UInt64
    private var refolds: UInt64
    private var startedAt: ContinuousClock.Instant?
    private var lastProgressAt: ContinuousClock.Instant?
    private var lastSendAt: ContinuousClock.Instant?

    /// A new transfer, from the partition's first key.
    public init(id: TransferID, partition: PartitionID, from: NodeName, to: NodeName, settings: TransferSettings = TransferSettings()) {
        self.init(resuming: TransferCheckpoint(id: id, partition: partition, from: from, to: to), settings: settings)
    }

    /// A sender restarted from its persisted record and kept keys: it resumes after the record's
    /// position (never from zero, unless the kept keys overflow `maxDirtyKeys`).
    public init(resuming record: TransferCheckpoint, dirtyKeys: Set<[UInt8]> = [], settings: TransferSettings = TransferSettings()) {
        id = record.id
        partition = record.partition
        from = record.from
        to = record.to
        self.settings = settings.sanitized
        checkpoint = record.position
        frontier = record.position
        dirty = dirtyKeys
        lastAckedSequence = record.sequence
        nextSequence = record.sequence.saturatingPlus(1)
        streamFirstSequence = nextSequence
        streams = record.streams
        batchesAcked = record.batchesAcked
        keysAcked = record.keysAcked
        bytesAcked = record.bytesAcked
        refolds = record.refolds
    }

    // MARK: Queries

    /// The record a `persistCheckpoint` now would carry.
    public var record: TransferCheckpoint {
        TransferCheckpoint(id: id, partition: partition, from: from, to: to, position: checkpoint, sequence: lastAckedSequence,
                           streams: streams, batchesAcked: batchesAcked, keysAcked: keysAcked, bytesAcked: bytesAcked, refolds: refolds)
    }

    public var isFinished: Bool { if case .finished = life { true } else { false } }

    public var phase: TransferPhase {
        switch life {
        case .idle: return .idle
        case .dropping: return .dropping
        case .finished(let outcome): return .finished(outcome)
        case .running: break
        }
        switch link {
        case .backingOff(let until): return .backingOff(until: until)
        case .opening: return .opening
        case .open, .closed:
            if checkpoint != .end { return .copying }
            return hasWork ? .catchingUp : .awaitingFlip
        }
    }

    public var progress: TransferProgress {
        TransferProgress(id: id, partition: partition, from: from, to: to, phase: phase, checkpoint: checkpoint,
                         keysSent: keysSent, bytesSent: bytesSent, batchesAcked: batchesAcked, keysAcked: keysAcked,
                         bytesAcked: bytesAcked, batchesInFlight: unacknowledged, dirtyKeys: keptKeys,
                         attempts: streams, failures: failures, refolds: refolds, startedAt: startedAt, lastProgressAt: lastProgressAt)
    }

    /// When to deliver `tick` (nil: no timer needed). Read it after every call and re-arm the one
    /// timer; an early or extra `tick` is harmless.
    public var nextDeadline: ContinuousClock.Instant? {
        guard life == .running, let last = lastProgressAt else { return nil }
        switch link {
        case .closed: return nil
        case .backingOff(let until): return until
        case .opening: return last + settings.batchTimeout
        case .open: return unacknowledged > 0 ? last + settings.batchTimeout : nil
        }
    }

    // MARK: Events

    public mutating func handle(_ event: TransferEvent, now: ContinuousClock.Instant) -> [TransferDirective] {
        switch life {
        case .finished:
            return []
        case .dropping:
            guard event == .dropped else { return [] }
            return finish(.handedOff)
        case .idle:
            switch event {
            case .start: return start(now: now)
            case .cancelled: return finish(.cancelled)
            case .forwardFailed(let key): return forwardFailed(key, now: now)
            case .ownershipFlipped:
                flipped = true
                return []
            default: return []
            }
        case .running:
            break
        }

        var out: [TransferDirective] = []
        switch event {
        case .start, .dropped:
            return []

        case .cancelled:
            return finish(.cancelled)

        case .ownershipFlipped:
            guard !flipped else { return [] }
            flipped = true

        case .forwardFailed(let key):
            return forwardFailed(key, now: now)

        case .streamOpened(let stream):
            guard link == .opening(stream) else { return [] }
            link = .open(stream)
            lastProgressAt = now
            lastSendAt = now

        case .streamFailed(let stream, let reason):
            guard link == .opening(stream) || link == .open(stream) else { return [] }
            out += fail("stream \(stream) failed: \(reason)", closing: nil, now: now)

        case .foldSent(let sequence, let keys, let bytes, let resumeAfter):
            let reached: TransferPosition = resumeAfter.map { .after($0) } ?? .end
            guard case .open = link, let r = reading, r.sequence == sequence, r.keys == nil, frontier < reached else { return [] }
            reading = nil
            frontier = reached
            out += sent(Batch(sequence: sequence, content: .fold(reached: reached), keys: max(keys, 0), bytes: max(bytes, 0), acked: false), now: now)
            out += pruneCovered()

        case .keysSent(let sequence, let keys, let bytes):
            guard case .open = link, let r = reading, r.sequence == sequence, let list = r.keys else { return [] }
            reading = nil
            let n = min(max(keys, 0), list.count)
            dirty.formUnion(list.dropFirst(n))
            out += sent(Batch(sequence: sequence, content: .keys(Array(list.prefix(n))), keys: n, bytes: max(bytes, 0), acked: false), now: now)

        case .batchAcked(let sequence):
            guard case .open = link, sequence >= streamFirstSequence, sequence < nextSequence,
                  ackedThrough.map({ sequence > $0 }) ?? true else { return [] }
            ackedThrough = sequence
            failures = 0
            lastProgressAt = now
            for i in inFlight.indices where inFlight[i].sequence <= sequence { inFlight[i].acked = true }
            out += popAcknowledged()

        case .foldProgress:
            guard case .open(let stream) = link, let r = reading, r.keys == nil else { return [] }
            lastProgressAt = now
            if let last = lastSendAt, last.duration(to: now) >= settings.keepaliveInterval {
                lastSendAt = now
                return [.sendKeepalive(stream: stream)]
            }
            return []

        case .tick:
            guard let deadline = nextDeadline, now >= deadline else { return [] }
            switch link {
            case .closed: return []
            case .backingOff: link = .closed
            case .opening(let stream):
                out += fail("stream \(stream) not opened within \(settings.batchTimeout)", closing: stream, now: now)
            case .open(let stream):
                out += fail("no progress on stream \(stream) within \(settings.batchTimeout)", closing: stream, now: now)
            }
        }
        out += settle(now: now)
        return out
    }

    // MARK: Internals

    /// Batches in flight and not acknowledged, the one being read included.
    private var unacknowledged: Int { inFlight.reduce(reading == nil ? 0 : 1) { $0 + ($1.acked ? 0 : 1) } }

    /// Kept keys, in batches or not (each once): what the shell has persisted.
    private var keptKeys: Int {
        var sending = Set(reading?.keys ?? [])
        for b in inFlight { if case .keys(let keys) = b.content { sending.formUnion(keys) } }
        return dirty.count + sending.subtracting(dirty).count
    }

    /// Something is left to copy or to be acknowledged.
    private var hasWork: Bool { frontier != .end || reading != nil || !inFlight.isEmpty || !dirty.isEmpty }

    private func inBatches(_ key: [UInt8]) -> Bool {
        if reading?.keys?.contains(key) == true { return true }
        return inFlight.contains { b in
            if case .keys(let ks) = b.content { ks.contains(key) } else { false }
        }
    }

    private mutating func start(now: ContinuousClock.Instant) -> [TransferDirective] {
        life = .running
        startedAt = now
        lastProgressAt = now
        if keptKeys > settings.maxDirtyKeys { return overflow(now: now) }
        return pruneCovered() + settle(now: now)
    }

    /// Opens, fills, reports or drops: whatever the state asks for next.
    private mutating func settle(now: ContinuousClock.Instant) -> [TransferDirective] {
        guard life == .running else { return [] }
        if !hasWork {
            var out: [TransferDirective] = []
            switch link {
            case .opening(let stream), .open(let stream): out.append(.closeStream(stream: stream, reason: "copy complete"))
            case .closed, .backingOff: break
            }
            link = .closed
            if !reported {
                reported = true
                out.append(.reportComplete)
            }
            if flipped {
                life = .dropping
                out.append(.dropPartition)
            }
            return out
        }
        switch link {
        case .closed: return open(now: now)
        case .open(let stream): return fill(stream: stream)
        case .opening, .backingOff: return []
        }
    }

    private mutating func open(now: ContinuousClock.Instant) -> [TransferDirective] {
        streams = streams.saturatingPlus(1)
        link = .opening(streams)
        streamFirstSequence = nextSequence
        ackedThrough = nil
        lastProgressAt = now
        return [.persistCheckpoint(record), .openStream(stream: streams, from: frontier)]
    }

    /// The next batch, if the window has room: the fold while it lasts, then kept keys.
    private mutating func fill(stream: UInt64) -> [TransferDirective] {
        guard reading == nil, unacknowledged < settings.maxBatchesInFlight else { return [] }
        if frontier != .end {
            let sequence = takeSequence()
            reading = Reading(sequence: sequence, keys: nil)
            return [.foldAndSend(stream: stream, sequence: sequence, after: frontier.foldAfter,
                                 maxBytes: settings.batchMaxBytes, maxKeys: settings.batchMaxKeys)]
        }
        guard !dirty.isEmpty else { return [] }
        let keys = Array(dirty.sorted { $0.lexicographicallyPrecedes($1) }.prefix(settings.batchMaxKeys))
        dirty.subtract(keys)
        let sequence = takeSequence()
        reading = Reading(sequence: sequence, keys: keys)
        return [.sendKeys(stream: stream, sequence: sequence, keys: keys, maxBytes: settings.batchMaxBytes)]
    }

    private mutating func takeSequence() -> UInt64 {
        defer { nextSequence = nextSequence.saturatingPlus(1) }
        return nextSequence
    }

    /// A batch reported sent: counted, queued for its acknowledgement (an empty one needs none).
    private mutating func sent(_ batch: Batch, now: ContinuousClock.Instant) -> [TransferDirective] {
        var b = batch
        b.acked = b.keys == 0 || ackedThrough.map { b.sequence <= $0 } ?? false
        keysSent = keysSent.saturatingPlus(UInt64(b.keys))
        bytesSent = bytesSent.saturatingPlus(UInt64(b.bytes))
        lastProgressAt = now
        if b.keys > 0 { lastSendAt = now }
        inFlight.append(b)
        return popAcknowledged()
    }

    /// Pops the acknowledged prefix: moves the checkpoint, persists it, forgets re-sent keys.
    private mutating func popAcknowledged() -> [TransferDirective] {
        var popped = false
        var forget: [[UInt8]] = []
        while let first = inFlight.first, first.acked {
            inFlight.removeFirst()
            popped = true
            lastAckedSequence = max(lastAckedSequence, first.sequence)
            if first.keys > 0 { batchesAcked = batchesAcked.saturatingPlus(1) }
            keysAcked = keysAcked.saturatingPlus(UInt64(first.keys))
            bytesAcked = bytesAcked.saturatingPlus(UInt64(first.bytes))
            switch first.content {
            case .fold(let reached): checkpoint = max(checkpoint, reached)
            case .keys(let keys): forget += keys.filter { !dirty.contains($0) && !inBatches($0) }
            }
        }
        guard popped else { return [] }
        var out: [TransferDirective] = [.persistCheckpoint(record)]
        if !forget.isEmpty { out.append(.forgetDirtyKeys(forget.sorted { $0.lexicographicallyPrecedes($1) })) }
        return out
    }

    /// Ends the stream attempt: rewinds to the checkpoint and backs off, or gives up.
    private mutating func fail(_ reason: String, closing stream: UInt64?, now: ContinuousClock.Instant) -> [TransferDirective] {
        var out: [TransferDirective] = []
        if let stream { out.append(.closeStream(stream: stream, reason: reason)) }
        link = .closed
        out += rewind()
        failures += 1
        if failures > settings.maxConsecutiveFailures {
            return out + finish(.gaveUp(reason: "\(failures) attempts failed in a row; last: \(reason)"))
        }
        link = .backingOff(until: now + backoff(failures))
        return out
    }

    /// `backoffMin × 2^(failures − 1)`, at most `backoffMax`.
    private func backoff(_ failures: Int) -> Duration {
        var delay = settings.backoffMin
        var n = 1
        while n < failures, delay < settings.backoffMax {
            delay = delay * 2
            n += 1
        }
        return min(delay, settings.backoffMax)
    }

    /// Forgets everything unacknowledged: the next stream resumes at the checkpoint, kept keys in
    /// lost batches are kept again.
    private mutating func rewind() -> [TransferDirective] {
        if let keys = reading?.keys { dirty.formUnion(keys) }
        for b in inFlight { if case .keys(let keys) = b.content { dirty.formUnion(keys) } }
        reading = nil
        inFlight = []
        frontier = checkpoint
        return pruneCovered()
    }

    /// With no fold outstanding, kept keys after the fold's position are covered by a fold still
    /// to be started (its snapshot is later than their writes): forget them.
    private mutating func pruneCovered() -> [TransferDirective] {
        guard reading == nil, frontier != .end else { return [] }
        let covered = dirty.filter { frontier.precedes(key: $0) }
        guard !covered.isEmpty else { return [] }
        dirty.subtract(covered)
        return [.forgetDirtyKeys(covered.sorted { $0.lexicographicallyPrecedes($1) })]
    }

    private mutating func forwardFailed(_ key: [UInt8], now: ContinuousClock.Instant) -> [TransferDirective] {
        if dirty.contains(key) { return [] }
        // A fold not yet asked for will read this key, and with it the write.
        if reading == nil, frontier.precedes(key: key) { return [] }
        if inBatches(key) {
            // Already persisted; it may have been read before the write: send it again.
            dirty.insert(key)
            return settle(now: now)
        }
        if keptKeys >= settings.maxDirtyKeys { return overflow(now: now) }
        dirty.insert(key)
        return [.persistDirtyKey(key)] + settle(now: now)
    }

    /// Too many kept keys: copy everything again from the start on a fresh stream instead. The
    /// reset record is persisted before the kept keys are forgotten.
    private mutating func overflow(now: ContinuousClock.Instant) -> [TransferDirective] {
        var out: [TransferDirective] = []
        switch link {
        case .opening(let stream), .open(let stream):
            out.append(.closeStream(stream: stream, reason: "more than \(settings.maxDirtyKeys) failed forwards: copying again from the start"))
            link = .closed
        case .closed, .backingOff: break
        }
        var forget = dirty
        if let keys = reading?.keys { forget.formUnion(keys) }
        for b in inFlight { if case .keys(let keys) = b.content { forget.formUnion(keys) } }
        reading = nil
        inFlight = []
        dirty = []
        checkpoint = .start
        frontier = .start
        refolds = refolds.saturatingPlus(1)
        out.append(.persistCheckpoint(record))
        if !forget.isEmpty { out.append(.forgetDirtyKeys(forget.sorted { $0.lexicographicallyPrecedes($1) })) }
        return out + settle(now: now)
    }

    private mutating func finish(_ outcome: TransferOutcome) -> [TransferDirective] {
        var out: [TransferDirective] = []
        switch link {
        case .opening(let stream), .open(let stream): out.append(.closeStream(stream: stream, reason: "\(outcome)"))
        case .closed, .backingOff: break
        }
        link = .closed
        life = .finished(outcome)
        out.append(.finished(outcome))
        return out
    }
}

// MARK: The receiver

/// The receiving node's bookkeeping of its inbound transfers: which it expects (told by the ring),
/// which stream of each is current, and which batches of it were applied.
///
/// - A stream is accepted only for an expected transfer from its sender, and only if its number is
///   above every earlier stream's of that transfer (a stale or duplicate open is refused).
/// - A batch is accepted only on the current stream and with a sequence above the last accepted
///   (sequences may skip: an empty fold sends nothing); a repeated or lower one is a duplicate (ack
///   it, do not apply it); anything else is refused (abort that stream).
/// - The shell acknowledges an accepted batch only after applying it durably (merge by DVV, so a
///   batch re-sent on a later stream is harmless).
///
/// Isolation: a value type owned by the receiver's shell. Not persisted: after a restart every
/// stream number is new to it, and the sender's numbers keep growing.
public struct TransferReceiver: Sendable {
    public enum Decision: Hashable, Sendable {
        case accept
        case duplicate
        case refuse(String)
    }

    struct Inbound: Hashable, Sendable {
        let partition: PartitionID
        let from: NodeName
        var stream: UInt64?
        var lastSequence: UInt64?
    }

    private var inbound: [TransferID: Inbound] = [:]

    public init() {}

    /// Transfers expected, in id order.
    public var expected: [TransferID] { inbound.keys.sorted() }

    /// The ring planned transfer `id` of `partition` from `from` to this node. Idempotent; a
    /// different partition or sender replaces the old expectation.
    public mutating func expect(_ id: TransferID, partition: PartitionID, from: NodeName) {
        if let i = inbound[id], i.partition == partition, i.from == from { return }
        inbound[id] = Inbound(partition: partition, from: from)
    }

    /// The transfer finished or was cancelled: its streams and batches are refused from now on.
    public mutating func forget(_ id: TransferID) { inbound[id] = nil }

    public mutating func streamOpened(_ id: TransferID, partition: PartitionID, from: NodeName, stream: UInt64) -> Decision {
        guard var i = inbound[id] else { return .refuse("\(id) is not expected here") }
        guard i.partition == partition, i.from == from else {
            return .refuse("\(id) is expected for \(i.partition) from \(i.from), not \(partition) from \(from)")
        }
        if let current = i.stream, stream <= current { return .refuse("stream \(stream) of \(id) is not after stream \(current)") }
        i.stream = stream
        i.lastSequence = nil
        inbound[id] = i
        return .accept
    }

    public mutating func batch(_ id: TransferID, stream: UInt64, sequence: UInt64) -> Decision {
        guard var i = inbound[id] else { return .refuse("\(id) is not expected here") }
        guard i.stream == stream else { return .refuse("stream \(stream) of \(id) is not its current stream") }
        if let last = i.lastSequence, sequence <= last { return .duplicate }
        i.lastSequence = sequence
        inbound[id] = i
        return .accept
    }
}

extension UInt64 {
    fileprivate func saturatingPlus(_ n: UInt64) -> UInt64 {
        let (sum, overflow) = addingReportingOverflow(n)
        return overflow ? .max : sum
    }
}
