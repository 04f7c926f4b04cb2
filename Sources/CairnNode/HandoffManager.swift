import CairnCore
import CairnMembership
import CairnRing
import CairnWire
import Logging

/// Runs this node's side of the plan's transfers. Follows the cluster views:
/// - as a sender, starts a `TransferShell` for every pending transfer from this node (at most
///   `handoff.max_concurrent` at once; the others wait their turn), resuming from its checkpoint,
///   and tells each shell when the ring flips the partition or drops the transfer;
/// - as a receiver, accepts `handoff` streams of transfers the ring plans into this node and
///   merges each batch into the partition's vnode (durable before the chunk is acknowledged).
///
/// Isolation: the table of shells sits behind a lock; shells are actors. `run()` is a child of
/// the node's supervisor.
final class HandoffManager: SupervisedChild {
    let childName = "handoff"

    /// What shells need from the node.
    struct Environment: Sendable {
        let me: NodeName
        let settings: HandoffSettings
        let transport: any Transport
        let store: any HandoffStore
        let clock: any NodeClock
        let pacer: Pacer
        let metrics: NodeMetrics
        let logger: Logger
        let requestTimeoutMillis: UInt32
        /// Where shells and their timers run (`NodeCore.taskExecutor`).
        let taskExecutor: (any TaskExecutor)?
        let storage: @Sendable () -> (any PartitionStore)?
        let ring: @Sendable () -> RingState?
        /// Tells the claimant the transfer is complete; true once it recorded it.
        let reportComplete: @Sendable (PartitionTransfer) async -> Bool
        /// Returns once no vnode for the partition accepts writes here (false: one still serves).
        let vnodeRetired: @Sendable (PartitionID) async -> Bool

        var backend: (any PartitionStore)? { storage() }
    }

    private struct Running {
        let shell: TransferShell
        let task: Task<Void, Never>
        let startedAt: ContinuousClock.Instant
    }

    let env: Environment
    private let views: ClusterViews
    private let vnodes: VnodeTable
    private let limits: Limits
    private let running = Locked<[PartitionTransfer: Running]>([:])
    /// Set when `run()` ends (the node stops or crashes): no shell starts after that.
    private let stopped = Locked(false)
    private let receiver = Locked(TransferReceiver())

    init(env: Environment, views: ClusterViews, vnodes: VnodeTable, limits: Limits) {
        self.env = env
        self.views = views
        self.vnodes = vnodes
        self.limits = limits
    }

    func run() async throws {
        stopped.withLock { $0 = false }
        defer {
            stopped.withLock { $0 = true }
            for r in running.withLock({ t in defer { t = [:] }; return t.sorted { $0.key < $1.key }.map(\.value) }) { r.task.cancel() }
        }
        for await view in views.updates() { reconcile(view.state) }
    }

    // MARK: Sender side

    /// Starts, notifies and counts shells for `ring`.
    func reconcile(_ ring: RingState?) {
        // A shell that ends after the node stopped (its task cancelled) must not start others:
        // they would run on, copying from storage that is closed and reporting to the claimant.
        guard let ring, !stopped.value else { return }
        let target = ring.target?.fingerprint ?? 0
        let mine = ring.transfers.filter { $0.from == env.me }
        let pending = mine.filter { !ring.completed.contains($0) }
        var toStart: [(PartitionTransfer, TransferID)] = []
        var notify: [(TransferShell, TransferEvent)] = []
        running.withLock { table in
            // In transfer order, not the table's hash order: a simulation replays its seed only
            // if the shells are told in the same order every run.
            for (t, r) in table.sorted(by: { $0.key < $1.key }) {
                if !ring.transfers.contains(t) {
                    // The plan ended (every transfer done: the flip) or changed (cancelled).
                    let flippedTo = ring.replicas(of: t.partition).contains(t.to)
                    notify.append((r.shell, flippedTo ? .ownershipFlipped : .cancelled))
                } else if ring.hasFlipped(t.partition) {
                    // Told again with every view: the machine ignores repeats, and a lost
                    // notice (a full inbox) cannot leave the transfer waiting for ever.
                    notify.append((r.shell, .ownershipFlipped))
                }
            }
            for t in pending where table[t] == nil && table.count + toStart.count < env.settings.maxConcurrent {
                toStart.append((t, HandoffWire.id(of: t, targetFingerprint: target)))
            }
        }
        for (shell, event) in notify { shell.post(event) }
        for (t, id) in toStart { start(t, id: id) }
        env.metrics.handoffActive.record(running.withLock { $0.count })
        env.metrics.handoffPending.record(pending.count)
    }

    private func start(_ t: PartitionTransfer, id: TransferID) {
        let resume: (record: TransferCheckpoint, dirty: Set<[UInt8]>)?
        do { resume = try env.store.load(id) } catch {
            env.logger.warning("a handoff checkpoint is unreadable; the transfer starts over", metadata: ["transfer": "\(t)", "error": "\(error)"])
            resume = nil
        }
        let shell = TransferShell(transfer: t, id: id, resume: resume, env: env)
        let inserted = running.withLock { table -> Bool in
            guard table[t] == nil else { return false }
            let task = Task(executorPreference: env.taskExecutor) { [weak self] in
                _ = await shell.run()
                self?.finished(t)
            }
            table[t] = Running(shell: shell, task: task, startedAt: env.clock.now())
            return true
        }
        guard inserted else { return }
        env.logger.info("handoff started", metadata: ["transfer": "\(t)", "resumed": "\(resume != nil)"])
    }

    private func finished(_ t: PartitionTransfer) {
        running.withLock { _ = $0.removeValue(forKey: t) }
        reconcile(views.current.state)
    }

    /// A write applied here to `key` of `partition`, before it is acknowledged: while a transfer
    /// of that partition runs from this node, it reaches the receiver too (or is kept for a later
    /// batch). Once the ring has moved the partition away from this node (the write raced the
    /// flip: its vnode was still in hand, the copy here is being dropped), it is sent to the
    /// partition's new replicas instead. Returns false when that failed: the write must then not
    /// be acknowledged as this node's copy.
    func forward(partition: PartitionID, key: [UInt8], object: VersionedObject) async -> Bool {
        let shells = running.withLock { $0.filter { $0.key.partition == partition }.sorted { $0.key < $1.key }.map(\.value.shell) }
        var carried = !shells.isEmpty
        for shell in shells where await !shell.forward(key: key, object: object) { carried = false }
        if carried { return true }
        guard let ring = env.ring(), !ring.vnodePartitions(of: env.me).contains(partition) else { return true }
        let known = vnodes.successors(of: partition)
        let targets = (known.isEmpty ? ring.replicas(of: partition) : known).filter { $0 != env.me }
        guard !targets.isEmpty else { return false }
        let message = Message.replicaPut(ReplicaPut(partition: partition, key: key, object: object))
        let answers = await env.transport.sendToAll(targets, message, timeoutMillis: env.requestTimeoutMillis)
        return answers.allSatisfy { if case .success(.replicaPutAck) = $0 { true } else { false } }
    }

    /// Transfers running from this node now, for `cairn transfers` and metrics.
    func progress() async -> [RunningTransfer] {
        let shells = running.withLock { $0.sorted { $0.key < $1.key }.map { ($0.value.shell, $0.value.startedAt) } }
        var out: [RunningTransfer] = []
        for (s, at) in shells {
            out.append(RunningTransfer(progress: await s.progress, startedAt: at, performing: await s.performing))
        }
        return out
    }

    /// One running transfer as `cairn transfers` shows it.
    struct RunningTransfer {
        let progress: TransferProgress
        let startedAt: ContinuousClock.Instant
        let performing: (kind: String, since: ContinuousClock.Instant)?
    }

    // MARK: Receiver side

    /// The acceptor for `handoff` streams.
    func accept(_ request: InboundStreamRequest) -> Result<any StreamSink, ErrorReply> {
        let header: HandoffWire.Header
        do { header = try HandoffWire.header(request.header) } catch {
            return .failure(ErrorReply(code: .invalidArgument, message: "bad handoff header: \(error.reason)"))
        }
        let t = header.transfer
        guard t.to == env.me, t.from == request.from else {
            return .failure(ErrorReply(code: .invalidArgument, message: "handoff \(t) is not from \(request.from) to \(env.me)"))
        }
        guard let ring = env.ring(), ring.pendingTransfers.contains(t) || ring.transfers.contains(t) else {
            return .failure(ErrorReply(code: .notReady, message: "node \(env.me) knows of no transfer \(t) yet; retry"))
        }
        let decision: TransferReceiver.Decision = receiver.withLock { r in
            r.expect(header.id, partition: t.partition, from: t.from)
            return r.streamOpened(header.id, partition: t.partition, from: t.from, stream: header.stream)
        }
        if case .refuse(let why) = decision { return .failure(ErrorReply(code: .invalidArgument, message: why)) }
        return .success(HandoffSink(manager: self, header: header))
    }

    fileprivate func apply(_ chunk: [UInt8], header: HandoffWire.Header) async throws {
        switch try HandoffWire.chunk(chunk, limits: limits) {
        case .keepalive: return
        case .batch(let sequence, let entries):
            let decision = receiver.withLock { $0.batch(header.id, stream: header.stream, sequence: sequence) }
            switch decision {
            case .duplicate: return
            case .refuse(let why): throw ValidationError("handoff batch refused: \(why)")
            case .accept: break
            }
            guard let vnode = vnodes.vnode(for: header.transfer.partition) else {
                throw ValidationError("node \(env.me) runs no vnode for \(header.transfer.partition) yet")
            }
            for e in entries {
                let object = try VersionedObject.decode(e.object, limits: limits)
                _ = try await vnode.merge(key: e.key, object: object)
            }
            env.metrics.handoffReceivedKeys.increment(by: entries.count)
        }
    }
}

/// Merges one handoff stream's batches; returning from `receive` acknowledges the chunk, and a
/// vnode merge is durable when it returns.
private struct HandoffSink: StreamSink {
    let manager: HandoffManager
    let header: HandoffWire.Header

    func receive(_ chunk: [UInt8]) async throws { try await manager.apply(chunk, header: header) }
    func finish() async throws {}
    func cancelled(_ reason: String) async {}
}
