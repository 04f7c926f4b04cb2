import CairnCore
public import CairnMembership
import CairnRing
import CairnWire
import Logging

/// How handoff is bounded (`handoff.*`, Docs/configuration.md).
public struct HandoffSettings: Sendable {
    /// Outbound transfers this node runs at once (`handoff.max_concurrent`); the rest wait.
    public var maxConcurrent = 2
    /// Bytes per second all of this node's outbound transfers send together, and all its inbound
    /// ones merge together (`handoff.bytes_per_second`): a node several senders fill at once
    /// takes no more than one sender's rate.
    public var bytesPerSecond = 32 << 20
    /// The machine's bounds: batch bytes (`handoff.batch_bytes`) and keys, batch timeout
    /// (`handoff.batch_timeout`), backoff, batches in flight, kept keys.
    public var transfer = TransferSettings()
    /// How long one transfer may take from its start to its end (`handoff.transfer_timeout`):
    /// the bound `cairn transfers` ages and the simulator's end-of-run check are held to. A
    /// transfer past it is stuck (or the rate is far too low for the data), not merely slow.
    public var transferTimeout: Duration = .seconds(1800)
    public init() {}
}

/// Paces bytes to a rate shared by every caller. Thread-safe.
final class Pacer: Sendable {
    private let next: Locked<ContinuousClock.Instant?> = Locked(nil)
    let bytesPerSecond: Int
    let clock: any NodeClock

    init(bytesPerSecond: Int, clock: any NodeClock) {
        self.bytesPerSecond = max(bytesPerSecond, 1)
        self.clock = clock
    }

    /// Waits until `bytes` more fit in the rate.
    func pace(_ bytes: Int) async {
        let now = clock.now()
        let cost = Duration.nanoseconds(Int64(min(Double(bytes) / Double(bytesPerSecond) * 1e9, 1e15)))
        let start: ContinuousClock.Instant = next.withLock { n in
            let s = max(n ?? now, now)
            n = s + cost
            return s
        }
        if start > now { try? await clock.sleep(until: start) }
    }
}

/// One outbound transfer's shell: performs the `TransferSender`'s directives one at a time, in
/// order (persisting before going on, as the machine requires), and feeds it what happens:
/// stream opens and failures, acknowledgements (cumulative, from the stream), timer ticks, the
/// ring's flip or cancellation, and failed forwards of writes applied here meanwhile.
///
/// Isolation: an actor. `drain` is the only place directives run; a caller that feeds an event
/// while another drain runs waits until the queue is empty, so `forwardFailed` returns only once
/// every directive up to its own has been performed (the vnode's barrier).
actor TransferShell {
    enum Input: Sendable {
        case machine(TransferEvent)
        case acked(stream: UInt64, chunks: UInt64)
        case lost(stream: UInt64, reason: String)
    }

    struct Stream {
        let number: UInt64
        let out: any OutboundStream
        /// Chunk i carries batch `batches[i]` (nil: a keepalive).
        var batches: [UInt64?] = []
        var watcher: Task<Void, Never>?
    }

    nonisolated let transfer: PartitionTransfer
    nonisolated let id: TransferID
    private var machine: TransferSender
    private var queue: [TransferDirective] = []
    private var draining = false
    private var drained: [CheckedContinuation<Void, Never>] = []
    private var stream: Stream?
    private var timer: Task<Void, Never>?
    private var timerAt: ContinuousClock.Instant?
    private var reporter: Task<Void, Never>?
    private(set) var outcome: TransferOutcome?
    /// Whether the machine is past its copy (it asked for the drop, or finished): from then on
    /// a forward is not the machine's (it ignores `forwardFailed`).
    private var dropping: Bool {
        switch machine.phase {
        case .dropping, .finished: true
        default: false
        }
    }
    /// The kept keys as persisted (the machine's `persistDirtyKey` / `forgetDirtyKeys`, applied in order).
    private var kept: Set<[UInt8]> = []
    private let inbox: AsyncStream<Input>
    private let sink: AsyncStream<Input>.Continuation
    private let env: HandoffManager.Environment

    init(transfer: PartitionTransfer, id: TransferID, resume: (record: TransferCheckpoint, dirty: Set<[UInt8]>)?, env: HandoffManager.Environment) {
        self.transfer = transfer
        self.id = id
        self.env = env
        if let resume, resume.record.partition == transfer.partition, resume.record.to == transfer.to {
            machine = TransferSender(resuming: resume.record, dirtyKeys: resume.dirty, settings: env.settings.transfer)
            kept = resume.dirty
        } else {
            machine = TransferSender(id: id, partition: transfer.partition, from: transfer.from, to: transfer.to, settings: env.settings.transfer)
        }
        (inbox, sink) = AsyncStream.makeStream(of: Input.self, bufferingPolicy: .bufferingNewest(4096))
    }

    var progress: TransferProgress { machine.progress }
    /// The directive being performed now (its kind) and since when; nil between directives.
    /// A long one names where a stalled transfer waits (`cairn transfers`).
    private(set) var performing: (kind: String, since: ContinuousClock.Instant)?

    /// Runs the transfer until the machine finishes or the task is cancelled.
    func run() async -> TransferOutcome? {
        await feed(.start)
        for await input in inbox {
            if Task.isCancelled || outcome != nil { break }
            switch input {
            case .machine(let e): await feed(e)
            case .acked(let n, let chunks):
                env.logger.trace("handoff acked", metadata: ["transfer": "\(transfer)", "stream": "\(n)", "chunks": "\(chunks)"])
                guard let s = stream, s.number == n else { continue }
                let done = s.batches.prefix(Int(clamping: chunks)).compactMap { $0 }
                if let last = done.last { await feed(.batchAcked(sequence: last)) }
            case .lost(let n, let reason):
                guard stream?.number == n else { continue }
                release(reason)
                await feed(.streamFailed(stream: n, reason: reason))
            }
            if outcome != nil { break }
        }
        release("the transfer ended")
        timer?.cancel()
        reporter?.cancel()
        sink.finish()
        return outcome
    }

    /// Tells the machine something from outside (the ring's flip or cancellation).
    nonisolated func post(_ event: TransferEvent) { sink.yield(.machine(event)) }

    /// A write applied here to `key` (in this transfer's partition) reaches the receiver too.
    /// Returns true once it did, or once the key is kept durably for a later batch; false when
    /// the transfer is past its copy (dropping the partition, or finished): the write is then
    /// not the machine's to carry, and the caller must see it to the new replicas itself.
    func forward(key: [UInt8], object: VersionedObject) async -> Bool {
        guard outcome == nil, !dropping else { return false }
        let message = Message.replicaPut(ReplicaPut(partition: transfer.partition, key: key, object: object))
        if case .replicaPutAck? = try? await env.transport.send(to: transfer.to, message, timeoutMillis: env.requestTimeoutMillis) { return true }
        guard outcome == nil, !dropping else { return false }
        await feed(.forwardFailed(key: key))
        return true
    }

    // MARK: Driving the machine

    private func feed(_ event: TransferEvent) async {
        queue += handle(event)
        await drain()
    }

    /// Feeds the machine one event; a failed stream is logged with its reason (the receiver's,
    /// when it aborted the stream), since the backoff that follows is all `cairn transfers` shows.
    private func handle(_ event: TransferEvent) -> [TransferDirective] {
        if case .streamFailed(let n, let reason) = event {
            env.logger.warning("handoff stream failed; the transfer backs off and resumes from its checkpoint", metadata: [
                "transfer": "\(transfer)", "stream": "\(n)", "reason": "\(reason)", "failures": "\(machine.progress.failures + 1)",
            ])
        }
        return machine.handle(event, now: env.clock.now())
    }

    private func drain() async {
        if draining {
            await withCheckedContinuation { drained.append($0) }
            return
        }
        draining = true
        while !queue.isEmpty {
            let d = queue.removeFirst()
            env.logger.trace("handoff directive", metadata: ["transfer": "\(transfer)", "directive": "\(String(describing: d).prefix(120))"])
            performing = (Self.kind(of: d), env.clock.now())
            let events = await perform(d)
            performing = nil
            env.logger.trace("handoff events", metadata: ["transfer": "\(transfer)", "events": "\(String(describing: events).prefix(160))"])
            for e in events { queue += handle(e) }
        }
        draining = false
        let waiting = drained
        drained = []
        for w in waiting { w.resume() }
        armTimer()
    }

    private static func kind(of d: TransferDirective) -> String {
        switch d {
        case .persistCheckpoint: "persist-checkpoint"
        case .persistDirtyKey: "persist-kept-key"
        case .forgetDirtyKeys: "forget-kept-keys"
        case .openStream: "open-stream"
        case .foldAndSend: "fold-and-send"
        case .sendKeys: "send-kept-keys"
        case .sendKeepalive: "send-keepalive"
        case .closeStream: "close-stream"
        case .reportComplete: "report-complete"
        case .dropPartition: "drop-partition"
        case .finished: "finish"
        }
    }

    private func armTimer() {
        guard let at = machine.nextDeadline, at != timerAt else { return }
        timer?.cancel()
        timerAt = at
        let (clock, sink) = (env.clock, sink)
        timer = Task(executorPreference: env.taskExecutor) {
            do { try await clock.sleep(until: at) } catch { return }
            sink.yield(.machine(.tick))
        }
    }

    private func perform(_ d: TransferDirective) async -> [TransferEvent] {
        switch d {
        case .persistCheckpoint(let record):
            return attempt("persist the checkpoint") { try self.env.store.save(record) }
        case .persistDirtyKey(let key):
            kept.insert(key)
            let keys = kept
            return attempt("persist the kept keys") { try self.env.store.setDirty(self.id, keys) }
        case .forgetDirtyKeys(let keys):
            kept.subtract(keys)
            let remaining = kept
            return attempt("persist the kept keys") { try self.env.store.setDirty(self.id, remaining) }
        case .openStream(let n, let from):
            release("superseded")
            let header = HandoffWire.encode(HandoffWire.Header(id: id, stream: n, transfer: transfer))
            do throws(StreamError) {
                let out = try await env.transport.openStream(to: transfer.to, kind: .handoff, header: header, timeoutMillis: env.requestTimeoutMillis)
                var s = Stream(number: n, out: out)
                let sink = sink
                s.watcher = Task(executorPreference: env.taskExecutor) {
                    var seen: UInt64 = 0
                    while true {
                        do throws(StreamError) { try await out.waitAcknowledged(atLeast: seen + 1) } catch {
                            if !Task.isCancelled { sink.yield(.lost(stream: n, reason: error.description)) }
                            return
                        }
                        seen = out.acknowledgedChunks
                        sink.yield(.acked(stream: n, chunks: seen))
                    }
                }
                stream = s
                env.logger.debug("handoff stream open", metadata: ["transfer": "\(transfer)", "stream": "\(n)", "from": "\(from)"])
                return [.streamOpened(stream: n)]
            } catch {
                return [.streamFailed(stream: n, reason: error.description)]
            }
        case .foldAndSend(let n, let sequence, let after, let maxBytes, let maxKeys):
            guard stream?.number == n else { return [] }
            guard let backend = env.backend else { return [.streamFailed(stream: n, reason: "storage is not open")] }
            let fold: PartitionFold<[(key: [UInt8], object: [UInt8])]>
            do {
                fold = try await backend.foldReadable(partition: transfer.partition, after: after, into: []) { acc, key, value in
                    acc.append((key, value))
                    let bytes = acc.reduce(0) { $0 + $1.key.count + $1.object.count }
                    return bytes >= maxBytes || acc.count >= maxKeys ? .stop : .continue
                }
            } catch {
                return [.streamFailed(stream: n, reason: "the fold failed: \(error)")]
            }
            let entries = fold.accumulator
            let bytes = entries.reduce(0) { $0 + $1.key.count + $1.object.count }
            if !entries.isEmpty, let failure = await send(HandoffWire.encode(sequence: sequence, entries: entries), batch: sequence, bytes: bytes) {
                return [.streamFailed(stream: n, reason: failure)]
            }
            env.metrics.handoffKeys.increment(by: entries.count)
            return [.foldSent(sequence: sequence, keys: entries.count, bytes: bytes, resumeAfter: fold.resumeAfter)]
        case .sendKeys(let n, let sequence, let keys, let maxBytes):
            guard stream?.number == n else { return [] }
            guard let backend = env.backend else { return [.streamFailed(stream: n, reason: "storage is not open")] }
            var entries: [(key: [UInt8], object: [UInt8])] = []
            var bytes = 0
            var consumed = 0
            for key in keys {
                consumed += 1
                let value: [UInt8]?
                do { value = try await backend.onExecutor(of: transfer.partition) { try backend.get(partition: self.transfer.partition, key: key) } } catch {
                    return [.streamFailed(stream: n, reason: "reading a kept key failed: \(error)")]
                }
                if let value {
                    entries.append((key, value))
                    bytes += key.count + value.count
                }
                if bytes >= maxBytes { break }
            }
            if consumed > 0, let failure = await send(HandoffWire.encode(sequence: sequence, entries: entries), batch: sequence, bytes: bytes) {
                return [.streamFailed(stream: n, reason: failure)]
            }
            return [.keysSent(sequence: sequence, keys: consumed, bytes: bytes)]
        case .sendKeepalive(let n):
            guard stream?.number == n else { return [] }
            if let failure = await send(HandoffWire.keepaliveChunk, batch: nil, bytes: 0) { return [.streamFailed(stream: n, reason: failure)] }
            return []
        case .closeStream(let n, let reason):
            if stream?.number == n { release(reason) }
            return []
        case .reportComplete:
            // A fallback copy is not the ring's: nobody to tell.
            if !transfer.partition.isFallbackSpace { startReporting() }
            return []
        case .dropPartition:
            return await drop()
        case .finished(let result):
            outcome = result
            switch result {
            case .handedOff, .cancelled: _ = attempt("delete the checkpoint") { try self.env.store.delete(self.id) }
            case .gaveUp: break
            }
            env.logger.info("handoff finished", metadata: ["transfer": "\(transfer)", "outcome": "\(result)",
                                                          "keys": "\(machine.progress.keysAcked)", "bytes": "\(machine.progress.bytesAcked)"])
            return []
        }
    }

    /// Sends one chunk on the open stream after pacing; nil, or why it failed.
    private func send(_ chunk: [UInt8], batch: UInt64?, bytes: Int) async -> String? {
        guard let out = stream?.out else { return "no stream" }
        await env.pacer.pace(chunk.count)
        stream?.batches.append(batch)
        do throws(StreamError) {
            try await out.send(chunk)
        } catch {
            return error.description
        }
        env.metrics.handoffBytes.increment(by: chunk.count)
        return nil
    }

    private func release(_ reason: String) {
        guard let s = stream else { return }
        s.watcher?.cancel()
        s.out.cancel(reason)
        stream = nil
    }

    /// A persist that fails stops the transfer where it is (the machine's record stays what it
    /// was): it gives up, to be resumed by a later attempt.
    private func attempt(_ what: String, _ body: () throws -> Void) -> [TransferEvent] {
        do {
            try body()
            return []
        } catch {
            env.logger.error("handoff could not \(what); the transfer stops and resumes later", metadata: [
                "transfer": "\(transfer)", "error": "\(error)",
            ])
            outcome = .gaveUp(reason: "could not \(what): \(error)")
            return []
        }
    }

    /// Tells the claimant, and tells it again (every second after a failure, every 5 s after a
    /// success) until the shell ends with the flip: a recorded completion can still be lost
    /// (the claimant changed before gossiping it), and reporting twice changes nothing.
    private func startReporting() {
        guard reporter == nil else { return }
        let (env, transfer) = (env, transfer)
        reporter = Task(executorPreference: env.taskExecutor) {
            while !Task.isCancelled {
                let recorded = await env.reportComplete(transfer)
                do { try await env.clock.sleep(for: .seconds(recorded ? 5 : 1)) } catch { return }
            }
        }
    }

    /// Drops the partition's data unless this node still replicates it (a staying replica that
    /// only copied to a new one).
    private func drop() async -> [TransferEvent] {
        if transfer.partition.isFallbackSpace {
            // Dropped once every primary has its copy (the last transfer to finish drops it).
            guard await env.fallbackDelivered(transfer) else { return [.dropped] }
            do {
                try await env.backend?.drop(partition: transfer.partition)
            } catch {
                env.logger.error("handoff could not drop a fallback copy it handed off; it is handed off again later",
                                 metadata: ["transfer": "\(transfer)", "error": "\(error)"])
            }
            return [.dropped]
        }
        if let ring = env.ring(), ring.vnodePartitions(of: transfer.from).contains(transfer.partition) {
            return [.dropped]
        }
        // The flip retires this node's vnode of the partition too (the vnode manager follows the
        // same view): a write or read repair from a coordinator still on the older ring can reach
        // that vnode until then, and would land after the drop, a copy no owner knows of. Drop
        // once the vnode is gone and stopped.
        guard await env.vnodeRetired(transfer.partition) else { return [.dropped] }
        do {
            try await env.backend?.drop(partition: transfer.partition)
        } catch {
            env.logger.error("handoff could not drop the partition it handed off; its data stays here until the next drop",
                             metadata: ["transfer": "\(transfer)", "error": "\(error)"])
        }
        return [.dropped]
    }
}
