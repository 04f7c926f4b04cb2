import CairnCore
import CairnMembership
import CairnRing
import CairnWire
import Logging

/// Runs this node's side of the plan's transfers. Follows the cluster views:
/// - as a sender, starts a `TransferShell` for every pending transfer from this node (at most
///   `handoff.max_concurrent` at once; the others wait their turn), resuming from its checkpoint,
///   and tells each shell when the ring flips the partition or drops the transfer;
/// - as a sender still owing a transfer the ring has finished with (*lingering*): the flip
///   came while writes whose forward failed were kept for a later batch, or before the old copy
///   was dropped (the node crashed in between). Such a shell runs on, before pending ones, until
///   the kept keys are acknowledged and the copy dropped; a restarted node finds them by its
///   stored checkpoints. A leaver exits only once none is left (`drained`).
/// - as a holder of a *leftover* copy: on a settled ring, a partition this node no longer runs
///   that still holds data with no transfer to hand it on (its vnode took writes while the node
///   ran on an older ring: a restart from the configured members, a late view; or a plan left
///   this replica out without making it a source). The copy goes to a current replica as a
///   lingering transfer does, then is dropped (`handOffLeftovers`).
/// - as a receiver, accepts `handoff` streams of transfers the ring plans into this node, and
///   late ones for partitions it now replicates, and merges each batch into the partition's
///   vnode (durable before the chunk is acknowledged; a merge by DVV, so a re-send is harmless).
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
        /// Whether every one of these nodes is alive to the failure detector and linked (a
        /// fallback copy goes to its primaries only then).
        var reachable: @Sendable ([NodeName]) -> Bool = { _ in true }
        /// Stops this node's fallback vnode of the partition (its copy is about to be dropped).
        var retireFallback: @Sendable (PartitionID) async -> Void = { _ in }
        /// For a shell: its fallback copy reached its primary; true when the copy may be dropped
        /// (`HandoffManager.fallbackCopyDelivered`, set by the manager for its shells).
        var fallbackDelivered: @Sendable (PartitionTransfer) async -> Bool = { _ in false }
        /// Draws a fresh 64-bit value (seeded in simulations): a fallback copy's transfers get a
        /// new id every time the copy goes home, so a receiver never takes one for the last.
        var drawID: @Sendable () -> UInt64 = { UInt64.random(in: 0...UInt64.max) }

        var backend: (any PartitionStore)? { storage() }
    }

    private struct Running {
        let shell: TransferShell
        let task: Task<Void, Never>
        let startedAt: ContinuousClock.Instant
        /// Stopped for running past `handoff.transfer_timeout` (its task is ending).
        var timedOut = false
    }

    let env: Environment
    private let views: ClusterViews
    private let vnodes: VnodeTable
    private let limits: Limits
    private let running = Locked<[PartitionTransfer: Running]>([:])
    /// Set when `run()` ends (the node stops or crashes): no shell starts after that.
    private let stopped = Locked(false)
    private let receiver = Locked(TransferReceiver())
    /// Paces the batches this node merges, all inbound transfers together, to
    /// `handoff.bytes_per_second` (a slow acknowledgement holds the senders back).
    private let inbound: Pacer
    /// Lingering transfers (see the type's comment) and their ids; started before pending ones.
    private let lingering = Locked<[PartitionTransfer: TransferID]>([:])
    /// Whether this run has looked at the stored checkpoints for lingering transfers.
    private let checkpointsScanned = Locked(false)
    /// Transfers whose shell gave up, not started again before `at` (the transfer's backoff,
    /// doubling with each give-up in a row): a persist that keeps failing (a full or failing
    /// disk) must not spin.
    private let retry = Locked<[PartitionTransfer: (at: ContinuousClock.Instant, count: Int)]>([:])
    /// For each partition whose fallback copy is being handed to its primaries: those that
    /// acknowledged all of it in this run (the copy is dropped once every primary has).
    private let fallbackDelivered = Locked<[PartitionID: Set<NodeName>]>([:])
    /// The id of each fallback transfer this node started and has not finished (found by its
    /// checkpoint after a restart), so a resumed run keeps its id and checkpoint.
    private let fallbackIDs = Locked<[PartitionTransfer: TransferID]>([:])
    /// The partitions the last settled ring asked this node to run (nil before the first one of
    /// a run), to find those it stopped running.
    private let desiredBefore = Locked<Set<PartitionID>?>(nil)
    /// Partitions to look at for a leftover copy (at most Q), and the wake-up of the task that
    /// looks (`handOffLeftovers`).
    private let leftoverCandidates = Locked<Set<PartitionID>>([])
    private let leftoverWake = Locked<AsyncStream<Void>.Continuation?>(nil)

    init(env: Environment, views: ClusterViews, vnodes: VnodeTable, limits: Limits) {
        self.env = env
        self.views = views
        self.vnodes = vnodes
        self.limits = limits
        inbound = Pacer(bytesPerSecond: env.settings.bytesPerSecond, clock: env.clock)
    }

    func run() async throws {
        stopped.withLock { $0 = false }
        checkpointsScanned.withLock { $0 = false }
        desiredBefore.withLock { $0 = nil }
        let (wakes, wake) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        leftoverWake.withLock { $0 = wake }
        if !leftoverCandidates.value.isEmpty { wake.yield() }
        defer {
            leftoverWake.withLock { $0 = nil }
            wake.finish()
            stopped.withLock { $0 = true }
            for r in running.withLock({ t in defer { t = [:] }; return t.sorted { $0.key < $1.key }.map(\.value) }) { r.task.cancel() }
        }
        await withTaskGroup(of: Void.self) { group in
            group.addTask { for await view in self.views.updates() { self.reconcile(view.state) } }
            group.addTask {
                for await _ in wakes {
                    if Task.isCancelled { return }
                    await self.handOffLeftovers()
                }
            }
            group.addTask {
                // Liveness is not a view: look for primaries that came back every second.
                while !Task.isCancelled {
                    do { try await self.env.clock.sleep(for: Self.fallbackCheckInterval) } catch { return }
                    if Task.isCancelled { return }
                    self.reconcileFallbacks()
                }
            }
            group.addTask {
                let every = min(max(self.env.settings.transferTimeout / 20, .milliseconds(100)), .seconds(5))
                // (A clock's sleep need not end early on cancellation: check it too.)
                while !Task.isCancelled {
                    do { try await self.env.clock.sleep(for: every) } catch { return }
                    if Task.isCancelled { return }
                    self.watch()
                }
            }
            // Either ending (the views finished, or the node stops) ends both.
            await group.next()
            group.cancelAll()
        }
    }

    /// Samples the oldest transfer's age; stops one that ran past `handoff.transfer_timeout`.
    /// It ends like a crashed shell would (no outcome): the next reconcile starts it again from
    /// its checkpoint, with its failures forgotten, in its usual turn.
    private func watch() {
        let now = env.clock.now()
        let limit = env.settings.transferTimeout
        var late: [(PartitionTransfer, Running, Duration)] = []
        let oldest: Duration = running.withLock { table in
            var oldest = Duration.zero
            for t in table.keys.sorted() {
                guard let r = table[t] else { continue }
                let age = r.startedAt.duration(to: now)
                oldest = max(oldest, age)
                if age > limit, !r.timedOut {
                    table[t]?.timedOut = true
                    late.append((t, r, age))
                }
            }
            return oldest
        }
        let busy = running.withLock { Set($0.keys) }
        let due = retry.withLock { r in r.contains { $0.value.at <= now && !busy.contains($0.key) } }
        if due { reconcile(views.current.state) }
        env.metrics.handoffOldestSeconds.record(Double(oldest.components.seconds) + Double(oldest.components.attoseconds) / 1e18)
        for (t, r, age) in late {
            env.metrics.handoffTimeouts.increment()
            env.logger.error("a handoff ran past handoff.transfer_timeout: stopped; it starts again from its checkpoint", metadata: [
                "transfer": "\(t)", "age": "\(age)", "limit": "\(limit)",
            ])
            r.task.cancel()
        }
    }

    // MARK: Sender side

    /// Starts, notifies and counts shells for `ring`.
    func reconcile(_ ring: RingState?) {
        // A shell that ends after the node stopped (its task cancelled) must not start others:
        // they would run on, copying from storage that is closed and reporting to the claimant.
        guard let ring, !stopped.value else { return }
        let scanned = checkpointsScanned.withLock { done in
            defer { done = true }
            return done
        }
        if !scanned { loadCheckpoints() }
        noteStoppedRunning(ring)
        let target = ring.target?.fingerprint ?? 0
        let mine = ring.transfers.filter { $0.from == env.me }
        let pending = mine.filter { !ring.completed.contains($0) }
        var owed: [(PartitionTransfer, TransferID)] = []
        var forget: [TransferID] = []
        var toStart: [(PartitionTransfer, TransferID, lingering: Bool)] = []
        var notify: [(TransferShell, TransferEvent)] = []
        let now = env.clock.now()
        let waiting = retry.withLock { r in Set(r.filter { $0.value.at > now }.keys) }
        running.withLock { table in
            (owed, forget) = reviseLingering(ring, running: table)
            // In transfer order, not the table's hash order: a simulation replays its seed only
            // if the shells are told in the same order every run.
            for (t, r) in table.sorted(by: { $0.key < $1.key }) where !t.partition.isFallbackSpace {
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
            for (t, id) in owed where table[t] == nil && !waiting.contains(t) && table.count + toStart.count < env.settings.maxConcurrent {
                // Told of the flip at once if the partition has flipped (or the plan ended);
                // otherwise later, as the plan's shells are.
                toStart.append((t, id, lingering: !ring.transfers.contains(t) || ring.hasFlipped(t.partition)))
            }
            for t in pending where table[t] == nil && !waiting.contains(t) && !toStart.contains(where: { $0.0 == t })
                && table.count + toStart.count < env.settings.maxConcurrent {
                toStart.append((t, HandoffWire.id(of: t, targetFingerprint: target), lingering: false))
            }
        }
        for id in forget { _ = try? env.store.delete(id) }
        // A transfer neither pending nor owed any more has nothing to wait for.
        let wanted = Set(pending).union(owed.map(\.0))
        retry.withLock { r in r = r.filter { wanted.contains($0.key) } }
        env.logger.trace("handoff reconcile", metadata: ["ring_version": "\(ring.version)", "pending": "\(pending)", "owed": "\(owed.map(\.0))", "starting": "\(toStart.map(\.0))"])
        for (shell, event) in notify { shell.post(event) }
        for (t, id, flipped) in toStart { start(t, id: id, flipped: flipped) }
        env.metrics.handoffActive.record(running.withLock { $0.count })
        env.metrics.handoffPending.record(pending.count + owed.count)
        reconcileFallbacks()
    }

    // MARK: Leftover copies

    /// Queues for a look (`handOffLeftovers`) every partition a settled `ring` (no plan in
    /// progress) does not ask this node to run but the previous settled ring did, and on the
    /// first settled ring of a run every partition it does not ask it to run. Rings with a plan
    /// in progress are passed over: the plan's transfers carry its copies, its flips come one
    /// partition at a time, and a replica it leaves in place for now may still be a source or
    /// a target of the plan (or of the next one), so only the settled end says what is left over.
    private func noteStoppedRunning(_ ring: RingState) {
        guard !ring.isPlanInProgress else { return }
        let desired = ring.vnodePartitions(of: env.me)
        let stopped: Set<PartitionID> = desiredBefore.withLock { before in
            defer { before = desired }
            guard let before else { return Set(ring.ring.partitions).subtracting(desired) }
            return before.subtracting(desired)
        }
        guard !stopped.isEmpty else { return }
        leftoverCandidates.withLock { $0.formUnion(stopped) }
        leftoverWake.withLock { _ = $0?.yield() }
    }

    /// Looks at each queued partition, in order: one this node does not run on the current ring
    /// (settled: no plan in progress, so no transfer of a plan carries it; else it is left for
    /// the next settled ring), with no transfer running or lingering, whose vnode has
    /// stopped serving here, and whose storage still holds a key, is owed to a current replica
    /// as a lingering transfer (a full copy, merged there; the copy here is dropped once it is
    /// acknowledged). A partition whose vnode still serves after the wait is left (the ring gave
    /// it back). One whose storage cannot be read is looked at again with the next change.
    func handOffLeftovers() async {
        let queued = leftoverCandidates.withLock { c in defer { c = [] }; return c.sorted() }
        var owed = 0
        for p in queued {
            guard !stopped.value, let ring = env.ring(), !ring.isPlanInProgress, !ring.runsVnode(of: env.me, for: p) else { continue }
            guard await env.vnodeRetired(p), let store = env.storage() else { continue }
            let holds: Bool
            do {
                holds = try await store.holdsAnyKey(partition: p)
            } catch {
                env.logger.error("could not look for a leftover copy", metadata: ["partition": "\(p.index)", "error": "\(error)"])
                continue
            }
            guard holds, let now = env.ring(), !now.isPlanInProgress, !now.runsVnode(of: env.me, for: p),
                  let to = now.replicas(of: p).first(where: { $0 != env.me }) else { continue }
            let t = PartitionTransfer(partition: p, from: env.me, to: to)
            let added: Bool = running.withLock { table in
                guard !table.keys.contains(where: { $0.partition == p }) else { return false }
                return lingering.withLock { l in
                    guard !l.keys.contains(where: { $0.partition == p }) else { return false }
                    l[t] = HandoffWire.id(of: t, targetFingerprint: env.drawID())
                    return true
                }
            }
            guard added else { continue }
            owed += 1
            env.metrics.handoffLeftovers.increment()
            env.logger.notice("a partition this node no longer replicates still holds data: handing it to a replica", metadata: [
                "partition": "\(p.index)", "to": "\(to)", "ring_version": "\(now.version)",
            ])
        }
        if owed > 0 { reconcile(views.current.state) }
    }

    // MARK: Fallback copies

    /// How often the manager looks for primaries of its fallback copies that came back.
    static let fallbackCheckInterval: Duration = .seconds(1)

    /// Hands each fallback copy this node holds to the partition's primaries once every one of
    /// them is reachable: one transfer per primary (`PartitionTransfer` of the partition's
    /// `fallbackSpace`, told of the flip at once, never reported to the claimant), within
    /// `handoff.max_concurrent` with the plan's transfers, after the plan's. The last primary to
    /// acknowledge its copy retires the fallback vnode and drops the copy
    /// (`fallbackCopyDelivered`). A copy whose primaries include this node itself (the ring moved)
    /// goes to the others; this node's primary copy is left to anti-entropy.
    func reconcileFallbacks() {
        guard let ring = env.ring(), !stopped.value else { return }
        let now = env.clock.now()
        let waiting = retry.withLock { r in Set(r.filter { $0.value.at > now }.keys) }
        var toStart: [PartitionTransfer] = []
        var cancel: [TransferShell] = []
        running.withLock { table in
            // A copy going to a node the ring no longer makes a primary of it: stop (the next
            // look hands it to the current primaries).
            for (t, r) in table.sorted(by: { $0.key < $1.key }) where t.partition.isFallbackSpace {
                if !ring.replicas(of: t.partition.home).contains(t.to) { cancel.append(r.shell) }
            }
            for p in vnodes.fallbackPartitions {
                let targets = ring.replicas(of: p).filter { $0 != env.me }
                guard !targets.isEmpty, env.reachable(targets) else { continue }
                var delivered = fallbackDelivered.withLock { $0[p] ?? [] }
                if Set(targets).isSubset(of: delivered), !table.keys.contains(where: { $0.partition == p.fallbackSpace }), let first = targets.first {
                    // Every current primary has the copy, but the shell that would have dropped
                    // it ended while another primary was still owed (the ring changed since):
                    // send it once more, and that shell drops it.
                    delivered.remove(first)
                    _ = fallbackDelivered.withLock { $0[p]?.remove(first) }
                }
                for to in targets where !delivered.contains(to) {
                    let t = PartitionTransfer(partition: p.fallbackSpace, from: env.me, to: to)
                    guard table[t] == nil, !waiting.contains(t), table.count + toStart.count < env.settings.maxConcurrent else { continue }
                    toStart.append(t)
                }
            }
        }
        for shell in cancel { shell.post(.cancelled) }
        for t in toStart {
            let id = fallbackIDs.withLock { ids in
                if let id = ids[t] { return id }
                let id = HandoffWire.id(of: t, targetFingerprint: env.drawID())
                ids[t] = id
                return id
            }
            start(t, id: id, flipped: true)
        }
    }

    /// A fallback transfer's copy reached its primary. True when every current primary of the
    /// partition (but this node) has one: the fallback vnode is retired, and the caller drops
    /// the copy. False: the caller keeps it for the others.
    func fallbackCopyDelivered(_ t: PartitionTransfer) async -> Bool {
        let p = t.partition.home
        let targets = Set(env.ring()?.replicas(of: p).filter { $0 != env.me } ?? [])
        let complete: Bool = fallbackDelivered.withLock { d in
            d[p, default: []].insert(t.to)
            guard let got = d[p], targets.isSubset(of: got) else { return false }
            d[p] = nil
            return true
        }
        guard complete else { return false }
        await env.retireFallback(p)
        env.logger.info("fallback copy handed to every primary; dropping it", metadata: ["partition": "\(p.index)"])
        return true
    }

    /// Lingering transfers follow the ring: one the plan has pending again is the plan's (its
    /// new run folds the whole partition, kept keys included); one whose receiver no longer
    /// replicates the partition owes nothing if this node replicates it again, and otherwise
    /// becomes a full copy to a current replica (a merge there, so harmless). Returns those
    /// still owed, and the checkpoints no shell will use any more. Called under `running`'s lock.
    private func reviseLingering(_ ring: RingState, running table: [PartitionTransfer: Running]) -> (owed: [(PartitionTransfer, TransferID)], forget: [TransferID]) {
        return lingering.withLock { l in
            var forget: [TransferID] = []
            for (t, id) in l.sorted(by: { $0.key < $1.key }) {
                let replicas = ring.replicas(of: t.partition)
                if ring.transfers.contains(t) && !ring.completed.contains(t) {
                    // Pending in the plan: started as the plan's (same id: resumed from this
                    // checkpoint; kept while it runs). A checkpoint of an older plan is replaced.
                    if HandoffWire.id(of: t, targetFingerprint: ring.target?.fingerprint ?? 0) == id { continue }
                    l[t] = nil
                } else if !ring.transfers.contains(t), !replicas.contains(t.to) {
                    // (A completed transfer of the plan in progress waits for its partition's flip.)
                    l[t] = nil
                    owe(copyOf: t, id: id, on: ring, in: &l)
                } else {
                    continue
                }
                // A running shell keeps (and ends) its own checkpoint.
                if table[t] == nil { forget.append(id) }
            }
            let owed = l.filter { !(ring.transfers.contains($0.key) && !ring.completed.contains($0.key)) }
            return (owed.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }, forget)
        }
    }

    /// What a transfer `t` (id `id`) whose receiver no longer replicates the partition still
    /// owes: if this node is no replica of it on `ring` either, a full copy to a current replica
    /// (a merge there, so harmless) before its copy here is dropped; otherwise nothing.
    private func owe(copyOf t: PartitionTransfer, id: TransferID, on ring: RingState, in l: inout [PartitionTransfer: TransferID]) {
        let replicas = ring.replicas(of: t.partition)
        guard !replicas.contains(env.me), let to = replicas.first(where: { $0 != env.me }) else { return }
        let moved = PartitionTransfer(partition: t.partition, from: env.me, to: to)
        if l[moved] == nil { l[moved] = HandoffWire.id(of: moved, targetFingerprint: id.value) }
    }

    /// Reads the stored checkpoints once per run: each transfer from this node that has one
    /// lingers until the ring says otherwise (`reviseLingering`): a checkpoint is deleted when
    /// its transfer ends, so one that is left is owed, or the plan's own (then resumed as pending).
    private func loadCheckpoints() {
        let stored: [(record: TransferCheckpoint, dirty: Set<[UInt8]>)]
        do { stored = try env.store.all() } catch {
            env.logger.error("handoff checkpoints could not be listed; transfers the ring finished with are not resumed", metadata: ["error": "\(error)"])
            return
        }
        // A fallback copy's checkpoint is resumed by `reconcileFallbacks` (same id), not here.
        for (record, _) in stored where record.from == env.me && record.partition.isFallbackSpace {
            fallbackIDs.withLock { $0[PartitionTransfer(partition: record.partition, from: record.from, to: record.to)] = record.id }
        }
        for (record, dirty) in stored where record.from == env.me && !record.partition.isFallbackSpace {
            let t = PartitionTransfer(partition: record.partition, from: record.from, to: record.to)
            lingering.withLock { $0[t] = record.id }
            env.logger.debug("handoff checkpoint found", metadata: ["transfer": "\(t)", "kept_keys": "\(dirty.count)", "position": "\(record.position)"])
        }
    }

    /// Returns once no transfer from this node runs or lingers (the node stops first: returns then).
    func drained() async {
        while !stopped.value, running.withLock({ !$0.isEmpty }) || lingering.withLock({ !$0.isEmpty }) {
            do { try await env.clock.sleep(for: .milliseconds(200)) } catch { return }
        }
    }

    private func start(_ t: PartitionTransfer, id: TransferID, flipped: Bool) {
        let resume: (record: TransferCheckpoint, dirty: Set<[UInt8]>)?
        do { resume = try env.store.load(id) } catch {
            env.logger.warning("a handoff checkpoint is unreadable; the transfer starts over", metadata: ["transfer": "\(t)", "error": "\(error)"])
            resume = nil
        }
        var shellEnv = env
        shellEnv.fallbackDelivered = { [weak self] t in await self?.fallbackCopyDelivered(t) ?? false }
        let shell = TransferShell(transfer: t, id: id, resume: resume, env: shellEnv)
        let inserted = running.withLock { table -> Bool in
            guard table[t] == nil else { return false }
            let task = Task(executorPreference: env.taskExecutor) { [weak self] in
                let outcome = await shell.run()
                self?.finished(t, id: id, outcome)
            }
            table[t] = Running(shell: shell, task: task, startedAt: env.clock.now())
            return true
        }
        guard inserted else { return }
        if flipped { shell.post(.ownershipFlipped) }
        env.logger.info("handoff started", metadata: ["transfer": "\(t)", "resumed": "\(resume != nil)", "lingering": "\(flipped)"])
    }

    /// A shell ended. One that gave up lingers (it is still owed); one that handed off owes
    /// nothing more; one cancelled by a plan change owes its copy to a current replica if this
    /// node no longer is one.
    private func finished(_ t: PartitionTransfer, id: TransferID, _ outcome: TransferOutcome?) {
        let ring = views.current.state
        running.withLock { _ = $0.removeValue(forKey: t) }
        if case .gaveUp? = outcome {} else { retry.withLock { _ = $0.removeValue(forKey: t) } }
        if t.partition.isFallbackSpace {
            // Not the ring's: a give-up waits its backoff (and keeps its checkpoint and id),
            // anything else is done; the next look at the fallback copies starts what is owed.
            if case .gaveUp? = outcome { backOff(t) } else { fallbackIDs.withLock { _ = $0.removeValue(forKey: t) } }
            reconcile(ring)
            return
        }
        switch outcome {
        case .handedOff?:
            lingering.withLock { _ = $0.removeValue(forKey: t) }
        case .cancelled?:
            // The plan changed under it: its copy still goes somewhere before it is dropped.
            lingering.withLock { l in
                l[t] = nil
                guard let ring, !(ring.transfers.contains(t) && !ring.completed.contains(t)) else { return }
                owe(copyOf: t, id: id, on: ring, in: &l)
            }
        case .gaveUp?:
            // Its checkpoint stays: resumed as the plan's while pending, else as owed
            // (`reviseLingering` decides which on every view). Not before its backoff.
            backOff(t)
            lingering.withLock { $0[t] = id }
        case nil:
            break
        }
        reconcile(ring)
    }

    /// A write reached `p`'s fallback copy: every primary whose copy was acknowledged before it
    /// (its shell has ended; `running` still carry the write) is owed the copy again.
    private func owedAgain(_ p: PartitionID, except running: [TransferShell]) {
        let receiving = Set(running.map(\.transfer.to))
        fallbackDelivered.withLock { d in d[p] = d[p]?.intersection(receiving) }
    }

    /// Delays `t`'s next start: the transfer's backoff, doubling with each give-up in a row.
    private func backOff(_ t: PartitionTransfer) {
        let settings = env.settings.transfer
        retry.withLock { r in
            let count = (r[t]?.count ?? 0) + 1
            var delay = settings.backoffMin
            for _ in 1..<count where delay < settings.backoffMax { delay = delay * 2 }
            r[t] = (env.clock.now() + min(delay, settings.backoffMax), count)
        }
    }

    /// A write applied here to `key` of `partition`, before it is acknowledged: while a transfer
    /// of that partition runs from this node, it reaches the receiver too (or is kept for a later
    /// batch). Once the ring has moved the partition away from this node (the write raced the
    /// flip: its vnode was still in hand, the copy here is being dropped), it is sent to the
    /// partition's new replicas instead. Returns false when that failed: the write must then not
    /// be acknowledged as this node's copy.
    func forward(partition: PartitionID, key: [UInt8], object: VersionedObject) async -> Bool {
        if forwardsNothing(partition: partition) { return true }
        let shells = running.withLock { r in
            r.isEmpty ? [] : r.filter { $0.key.partition == partition }.sorted { $0.key < $1.key }.map(\.value.shell)
        }
        var carried = !shells.isEmpty
        for shell in shells where await !shell.forward(key: key, object: object) { carried = false }
        if partition.isFallbackSpace { owedAgain(partition.home, except: shells) }
        if carried { return true }
        // A fallback copy not being handed off needs nothing more; one being handed off took
        // the write only if every shell carried it. Primaries whose copy was acknowledged before
        // this write (their shell has ended) are owed the copy again.
        if partition.isFallbackSpace { return shells.isEmpty }
        guard let ring = env.ring(), !ring.runsVnode(of: env.me, for: partition) else { return true }
        let known = vnodes.successors(of: partition)
        let targets = (known.isEmpty ? ring.replicas(of: partition) : known).filter { $0 != env.me }
        guard !targets.isEmpty else { return false }
        let message = Message.replicaPut(ReplicaPut(partition: partition, key: key, object: object))
        let answers = await env.transport.sendToAll(targets, message, timeoutMillis: env.requestTimeoutMillis)
        return answers.allSatisfy { if case .success(.replicaPutAck) = $0 { true } else { false } }
    }

    /// Whether `forward` of a write to primary `partition`, applied before this call, has
    /// nothing to do: no transfer of the partition runs from this node and the ring still runs
    /// its vnode here. Synchronous (an event loop's fast path asks it).
    func forwardsNothing(partition: PartitionID) -> Bool {
        guard !partition.isFallbackSpace else { return false }
        guard !running.withLock({ r in r.keys.contains { $0.partition == partition } }) else { return false }
        guard let ring = env.ring() else { return true }
        return ring.runsVnode(of: env.me, for: partition)
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
        // A late stream for a partition this node replicates now (kept keys from the old owner,
        // after the flip) merges like any batch.
        guard let ring = env.ring(),
              ring.pendingTransfers.contains(t) || ring.transfers.contains(t) || ring.replicas(of: t.partition.home).contains(env.me) else {
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
            // A fallback copy merges into this node's primary copy of the partition.
            guard let vnode = vnodes.vnode(for: header.transfer.partition.home) else {
                throw ValidationError("node \(env.me) runs no vnode for \(header.transfer.partition) yet")
            }
            let objects = try entries.map { e in (key: e.key, object: try VersionedObject.decode(e.object, limits: limits)) }
            await inbound.pace(chunk.count)
            try await vnode.mergeAll(objects)
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
