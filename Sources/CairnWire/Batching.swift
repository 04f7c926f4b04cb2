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
    private enum Writer: Sendable {
        /// Writes one item (on the event loop), without flushing; the batch flushes once.
        case each(@Sendable (any Channel, Item) -> Void)
        /// Takes the whole batch (on the event loop), in order, and writes and flushes it.
        case all(@Sendable ([Item]) -> Void)
    }

    private let channel: any Channel
    /// `spare`: the last batch's array, emptied, so the next batch reuses its storage.
    private let pending = Mutex<(items: [Item], spare: [Item], scheduled: Bool)>(([], [], false))
    private let writer: Writer

    init(channel: any Channel, write: @escaping @Sendable (any Channel, Item) -> Void) {
        self.channel = channel
        writer = .each(write)
    }

    /// A batch whose items `writeAll` writes together (replies coalesced into one buffer).
    init(channel: any Channel, writeAll: @escaping @Sendable ([Item]) -> Void) {
        self.channel = channel
        writer = .all(writeAll)
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
        switch writer {
        case .each(let write):
            for item in items { write(channel, item) }
            channel.flush()
        case .all(let writeAll):
            writeAll(items)
        }
        items.removeAll(keepingCapacity: true)
        pending.withLock { p in if p.spare.capacity < items.capacity { p.spare = items } }
    }
}
