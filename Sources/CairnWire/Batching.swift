import CairnCore
import NIOCore
import Synchronization

/// Outbound items for one channel, handed over from any thread and written on the channel's
/// event loop with one flush for everything handed over before the loop got to them.
///
/// A request or reply sent from a task costs a hop to the event loop and a `write` system call;
/// under concurrency many arrive within one loop tick, and here they share both: the first item
/// of a batch schedules one task on the loop, later ones only join the list, and the task writes
/// each item through the pipeline (handlers still see every item on its own) and flushes once.
/// Order is kept: items are written in the order they were handed over.
///
/// Bound: a batch holds what arrived during one loop tick; what the socket cannot take waits in
/// NIO's pending writes, bounded by the callers' own limits (requests in flight). Thread-safe.
final class OutboundBatch<Item: Sendable>: Sendable {
    private let channel: any Channel
    /// `spare`: the last batch's array, emptied, so the next batch reuses its storage.
    private let pending = Mutex<(items: [Item], spare: [Item], scheduled: Bool)>(([], [], false))
    /// Writes one item (on the event loop), without flushing.
    private let write: @Sendable (any Channel, Item) -> Void

    init(channel: any Channel, write: @escaping @Sendable (any Channel, Item) -> Void) {
        self.channel = channel
        self.write = write
    }

    /// Queues `item`; the first of a batch schedules the write on the event loop.
    func send(_ item: Item) {
        let schedule = pending.withLock { p -> Bool in
            p.items.append(item)
            guard !p.scheduled else { return false }
            p.scheduled = true
            return true
        }
        if schedule { channel.eventLoop.execute { self.drain() } }
    }

    private func drain() {
        var items = pending.withLock { p -> [Item] in
            let batch = p.items
            p.items = p.spare
            p.spare = []
            p.scheduled = false
            return batch
        }
        for item in items { write(channel, item) }
        channel.flush()
        items.removeAll(keepingCapacity: true)
        pending.withLock { p in if p.spare.capacity < items.capacity { p.spare = items } }
    }
}

/// A connection's replies of one event-loop tick, encoded as they are sent into one growing
/// array (no array per reply), handed to `write` on the loop with the number of frames in it.
/// A reply whose frame would exceed `maxFrameBytes` is replaced by an error frame for the same
/// request (`WireCodec.appendFrame`).
///
/// Bound: the frames of one tick on one connection, each at most `maxFrameBytes` (the handler
/// lets at most `max_requests_per_connection` requests be unanswered); the array is kept for the
/// next tick unless one large reply made it large; at most `keptScratch` scratch writers of at
/// most `keptBytes` each are kept. Thread-safe: replies come from any thread; each is encoded
/// outside the lock into a scratch writer and only copied into the tick's array under it, so
/// the loop's drain never waits for an encoding.
final class ReplyBatch: Sendable {
    private struct Pending {
        var writer = ByteWriter(capacity: 0)
        var frames = 0
        var scheduled = false
        /// The last tick's array, emptied, for the next one to write into.
        var spare: [UInt8] = []
        /// Emptied writers for senders to encode into (one per concurrent sender, reused).
        var scratch: [ByteWriter] = []
    }

    private let channel: any Channel
    private let maxFrameBytes: Int
    private let pending = Mutex(Pending())
    private let write: @Sendable (_ bytes: [UInt8], _ frames: Int) -> Void

    /// Arrays above this many bytes are not kept for the next tick.
    static let keptBytes = 1 << 16

    init(channel: any Channel, maxFrameBytes: Int, write: @escaping @Sendable (_ bytes: [UInt8], _ frames: Int) -> Void) {
        self.channel = channel
        self.maxFrameBytes = maxFrameBytes
        self.write = write
    }

    /// Scratch writers kept for reuse (about one per thread that sends replies).
    static let keptScratch = 4

    /// Encodes the reply, then appends it to the tick's array; the first of a tick schedules
    /// the write.
    func send(_ envelope: Envelope) {
        var frame = pending.withLock { p in p.scratch.popLast() } ?? ByteWriter(capacity: WireCodec.frameCapacity)
        WireCodec.appendFrame(envelope, maxFrameBytes: maxFrameBytes, into: &frame)
        let schedule = pending.withLock { p -> Bool in
            p.writer.writeRaw(frame.bytes)
            frame.removeAll()
            if p.scratch.count < Self.keptScratch, frame.bytes.capacity <= Self.keptBytes { p.scratch.append(frame) }
            p.frames += 1
            guard !p.scheduled else { return false }
            p.scheduled = true
            return true
        }
        if schedule { channel.eventLoop.execute { self.drain() } }
    }

    private func drain() {
        var (bytes, frames) = pending.withLock { p -> ([UInt8], Int) in
            var bytes = p.spare
            p.spare = []
            p.writer.swapBytes(with: &bytes)
            defer { p.frames = 0 }
            p.scheduled = false
            return (bytes, p.frames)
        }
        write(bytes, frames)
        guard bytes.capacity <= Self.keptBytes else { return }
        bytes.removeAll(keepingCapacity: true)
        pending.withLock { p in if p.spare.capacity < bytes.capacity { p.spare = bytes } }
    }
}
