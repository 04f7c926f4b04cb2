public import CairnAntiEntropy
public import CairnCore
import CairnStorage
public import Logging
import Synchronization

/// The actor that serves one partition on this node: reads, coordinated (stamped) writes and
/// replica merges for the keys of that partition.
///
/// Isolation: actor on the store's executor for its partition (`PartitionStore.executor(for:)`:
/// a thread of the disk store's own, so the store's blocking point calls run there and never on
/// the cooperative pool), or, when the store names none, a default actor's executor. A
/// read-modify-write reads, stamps and `apply`s in one isolated, synchronous step, so writes to
/// one key are serialized; the wait for durability runs outside the actor (on the caller's
/// executor), so a get costs one hop onto the store's executor and one back, and a write the
/// same plus its log sync. Acknowledged only after the store says durable.
/// Supervision: `run()` lives as long as the vnode serves; a store I/O error marks the vnode failed
/// and makes `run()` throw, so its supervisor restarts it with backoff (requests in between get
/// `VnodeError.unavailable`).
public actor Vnode: SupervisedChild {
    public nonisolated let partition: PartitionID
    public nonisolated let role: VnodeRole
    public nonisolated var key: VnodeKey { VnodeKey(partition: partition, role: role) }
    /// The storage partition its data lives in (`VnodeKey.space`).
    public nonisolated let space: PartitionID
    public nonisolated let childName: String
    private nonisolated let backend: any PartitionStore
    /// Where the actor runs: the store's executor for the partition, or a default actor's.
    private nonisolated let home: Home
    /// The store's executor when it also runs closures: the `…Soon` calls hand work to it
    /// without a task, or do it at once when already on it.
    private nonisolated let runner: (any ClosureExecutor)?
    private nonisolated let limits: Limits
    private let metrics: NodeMetrics
    private let logger: Logger
    private var status: Status = .starting {
        didSet { serving.store(status == .serving, ordering: .releasing) }
    }
    /// `status == .serving`, readable without a hop (`getInMemory`).
    private nonisolated let serving = Atomic<Bool>(false)
    private var failureSignal: AsyncStream<String>.Continuation?
    private var servingWaiters: [CheckedContinuation<Void, Never>] = []
    /// The last corruption error logged (reads of one damaged block log it once).
    private var lastCorruptionLogged: StorageError?
    /// The partition's anti-entropy tree (primaries only), kept by every write applied here.
    private var tree: TreeState {
        didSet {
            if case .missing = tree { treeMissing.store(true, ordering: .relaxed) } else { treeMissing.store(false, ordering: .relaxed) }
        }
    }
    private var treeGeneration: UInt64 = 0
    /// Where `versionHash` encodes (kept between writes: no allocation per hash).
    private var hashScratch = ByteWriter(capacity: 256)
    /// Whether the vnode keeps a tree and has none (`needsTreeBuild`), readable without a hop
    /// (the anti-entropy scheduler looks at every vnode once a second).
    private nonisolated let treeMissing = Atomic<Bool>(false)
    /// Whether the vnode keeps an anti-entropy tree at all (a primary, anti-entropy on).
    public nonisolated let keepsTree: Bool

    /// Where the vnode's hash tree stands.
    enum TreeState: Sendable {
        /// No tree: a fallback vnode, or anti-entropy is off.
        case off
        /// None yet: waits for a build from storage (`beginTreeBuild`).
        case missing
        /// Being built from a snapshot; `delta` records every write applied since it was taken,
        /// `live` (a rebuild of a ready tree) keeps serving exchanges meanwhile.
        case building(live: SegmentTree?, delta: SegmentTree, generation: UInt64)
        case ready(SegmentTree)
    }

    enum Status: Equatable { case starting, serving, failed(String) }

    enum Home: Sendable {
        case store(any SerialExecutor)
        /// A stateless default actor lending its executor (the store names none).
        case lane(DefaultLane)
    }

    public nonisolated var unownedExecutor: UnownedSerialExecutor {
        switch home {
        case .store(let executor): executor.asUnownedSerialExecutor()
        case .lane(let lane): lane.unownedExecutor
        }
    }

    /// The actor that stamps writes this vnode coordinates, when it is not the node's (nil).
    ///
    /// - A fallback vnode's own, drawn fresh (a new epoch) for every fallback vnode started. Its
    ///   copy starts empty each time and is dropped once handed home, so it cannot know which
    ///   dots the node's actor issued for a key (through its primary copy, or an earlier fallback
    ///   copy); stamping with the node's actor could issue a dot again for another value, and a
    ///   replica that already holds that dot would discard the new value as seen.
    /// - A primary's, from the first time it replaced a key whose stored copy was damaged (the
    ///   same reason: the lost copy may have held dots of the node's actor that no replica gave
    ///   back). Kept in the store's metadata (`stamp/<partition>`, written before the object), so
    ///   a restart keeps it.
    public nonisolated var stampActor: ActorID? { stamp.withLock { $0 } }
    private nonisolated let stamp: Mutex<ActorID?>
    /// Draws a fresh actor (a new epoch of this node); nil: a damaged key is not replaced.
    private let freshActor: (@Sendable () -> ActorID)?
    /// Whether a read of a key damaged storage hides may drop what this replica holds of it
    /// (`get`): true once the damage is handled (the table set aside, the partition refilling).
    private let mayForgetDamaged: @Sendable (PartitionID) -> Bool
    /// The counter floor of the actor this vnode stamps with, raised past every counter of it
    /// in a tombstone collected here (`collect`); kept in the store's metadata (`gc-floor/<p>`)
    /// before the tombstones are deleted. A new dot of that actor on a key with no live value of
    /// it starts at the floor, so it is never one a dropped history already holds.
    private var counterFloor: (epoch: UInt64, counter: UInt64)?
    /// Tombstones this vnode collected lately, key → the clock collected, oldest first out past
    /// `rememberedLimit` (`tombstones.remembered_per_vnode`). The other replicas collect at their own pace and an exchange copies
    /// theirs back; a copy of history this clock covers (that tombstone, or anything older) is
    /// not stored again. Forgetting one only costs a second collection.
    private var collected: [[UInt8]: VersionVector] = [:]
    private var collectedOrder: [[UInt8]] = []
    private var collectedStart = 0
    /// Collected tombstones this vnode remembers at most (`collected`).
    private let rememberedLimit: Int

    /// `treeShape`: keep an anti-entropy tree of that shape (primaries only; nil: none);
    /// `savedTree`: the tree saved at the last clean shutdown (else one is built from storage);
    /// `freshActor`: draws the actor a primary stamps with once it replaced a damaged key;
    /// `mayForgetDamaged`: whether `get` may drop a damaged key of a partition (see `get`).
    public init(partition: PartitionID, role: VnodeRole = .primary, backend: any PartitionStore, limits: Limits, metrics: NodeMetrics,
                logger: Logger, stampActor: ActorID? = nil, treeShape: TreeShape? = nil, savedTree: SegmentTree? = nil,
                freshActor: (@Sendable () -> ActorID)? = nil, mayForgetDamaged: @escaping @Sendable (PartitionID) -> Bool = { _ in false },
                rememberedLimit: Int = AntiEntropySettings().rememberedPerVnode) {
        if role == .primary, let treeShape {
            let saved = savedTree.flatMap { $0.shape == treeShape ? TreeState.ready($0) : nil }
            tree = saved ?? .missing
            treeMissing.store(saved == nil, ordering: .relaxed)
            keepsTree = true
        } else {
            tree = .off
            keepsTree = false
        }
        self.partition = partition
        self.role = role
        stamp = Mutex(stampActor)
        self.freshActor = freshActor
        self.mayForgetDamaged = mayForgetDamaged
        self.rememberedLimit = max(0, rememberedLimit)
        counterFloor = role == .primary ? Self.savedCounterFloor(in: backend, partition: partition) : nil
        self.childName = VnodeKey(partition: partition, role: role).description
        self.space = VnodeKey(partition: partition, role: role).space
        self.backend = backend
        let executor = backend.executor(for: space)
        self.home = executor.map(Home.store) ?? .lane(DefaultLane())
        self.runner = executor as? any ClosureExecutor
        self.limits = limits
        self.metrics = metrics
        self.logger = logger
    }

    public func run() async throws {
        let (signals, continuation) = AsyncStream.makeStream(of: String.self)
        failureSignal = continuation
        status = .serving
        for w in servingWaiters { w.resume() }
        servingWaiters = []
        for await reason in signals {
            status = .failed(reason)
            throw VnodeError.failed(partition: partition, reason: reason)
        }
        // Cancelled: stop serving.
        status = .starting
    }

    /// True while the vnode accepts requests.
    public var isServing: Bool { status == .serving }

    /// Refuses every request from now on (a retired vnode whose partition is being dropped).
    func stopServing() {
        if status == .serving { status = .starting }
    }

    /// Returns once the vnode has started serving (at once if it is).
    public func untilServing() async {
        if status == .serving { return }
        await withCheckedContinuation { servingWaiters.append($0) }
    }

    deinit { metrics.tombstonesRemembered.adjust(by: -collected.count) }

    // MARK: Operations

    /// The key's object as of the newest durable write: a write still waiting for its log sync
    /// is not visible, so no dot is ever shown to anyone before it is durable (a dot lost to a
    /// power cut could otherwise be reissued for another value under the same epoch).
    ///
    /// A key damaged storage hides fails the read, unless the damage is handled
    /// (`mayForgetDamaged`): then this replica drops what it holds of the key (a delete of it
    /// here, no tombstone; with a fresh stamp actor, as a replaced key takes; counted in
    /// `cairn_damaged_keys_replaced_total`) and answers not found, as a replica that lost the key
    /// does: not authoritative while the partition refills; what the other replicas hold of the
    /// key comes back by exchange. Without this, a key no replica holds any more (a tombstone
    /// the others collected) would stay unreadable here for good.
    public func get(_ key: [UInt8]) throws(VnodeError) -> VersionedObject? {
        try ensureServing()
        do throws(VnodeError) {
            return try load(key, durableOnly: true)
        } catch {
            guard case .storage = error, role == .primary, freshActor != nil, mayForgetDamaged(partition) else { throw error }
            switch try read(key, durableOnly: false) {
            case .damaged: break
            case .absent: return nil   // dropped already, not yet durable
            case .object: throw error  // replaced by a write not yet durable
            }
            _ = try loadReplacingDamage(key)
            do {
                _ = try backend.delete(partition: space, keys: [key])
            } catch {
                throw fail("could not drop a damaged key: \(error)")
            }
            logger.debug("dropped a key damaged storage hid", metadata: ["partition": "\(partition.index)"])
            return nil
        }
    }

    // MARK: Without a task

    /// What `getInMemory` could answer.
    public enum MemoryRead: Sendable {
        /// The key's newest durable object, or nil: absent.
        case answered(VersionedObject?)
        /// Answering needs the store's thread: the disk, or handling something irregular.
        case needsStoreThread
    }

    /// `get` on the caller's thread, for a caller that must not block (an event loop): answered
    /// from memory (memtables, Bloom filters, cached blocks) or not at all. `.needsStoreThread`
    /// when the vnode is not serving, the answer needs a block read, or anything is irregular
    /// (damage, an object that does not decode): `get` or `getSoon` then serves or reports it.
    /// A caller may rely on an answer being what `get` would return at that instant.
    public nonisolated func getInMemory(_ key: [UInt8]) -> MemoryRead {
        guard serving.load(ordering: .acquiring),
              case .answered(let raw) = backend.getDurableInMemory(partition: space, key: key) else { return .needsStoreThread }
        guard let raw else { return .answered(nil) }
        guard let object = try? VersionedObject.decode(raw, limits: limits) else { return .needsStoreThread }
        return .answered(object)
    }

    /// Whether `getSoon` and `mergeSoon` serve here (the store's executor runs closures).
    public nonisolated var servesWithoutTasks: Bool { runner != nil }

    /// Whether the caller already runs on the store's executor (an event loop serving its own
    /// vnodes): the `…Soon` calls then do their work at once, on the caller's stack, instead of
    /// queueing it behind the loop's other tasks (no closure to allocate, no task to run).
    private nonisolated func runsHere(_ runner: any ClosureExecutor) -> Bool { runner.isIsolatingCurrentContext() == true }

    /// `get` for a caller that must not suspend (an event loop): runs on the store's thread and
    /// calls `done` there (at once when the caller runs there). False, `done` never called: the
    /// store's executor runs no closures (`servesWithoutTasks`); use `get`.
    public nonisolated func getSoon(_ key: [UInt8], _ done: @escaping @Sendable (Result<VersionedObject?, VnodeError>) -> Void) -> Bool {
        guard let runner else { return false }
        guard runsHere(runner) else {
            runner.execute { [self] in done(getNow(key)) }
            return true
        }
        done(getNow(key))
        return true
    }

    private nonisolated func getNow(_ key: [UInt8]) -> Result<VersionedObject?, VnodeError> {
        assumeIsolated { v in Result { () throws(VnodeError) in try v.get(key) } }
    }

    /// `merge` for a caller that must not suspend: the read-modify-write runs on the store's
    /// thread; `done` is called once the result is durable (on the thread that ended the wait:
    /// the store's, or the log sync's), or with the error. A failed sync fails the vnode, as
    /// `merge`'s does. The merge runs at once when the caller runs on the store's executor.
    /// False, `done` never called: use `merge` (`servesWithoutTasks`).
    public nonisolated func mergeSoon(key: [UInt8], object: VersionedObject,
                                      _ done: @escaping @Sendable (Result<VersionedObject, VnodeError>) -> Void) -> Bool {
        guard let runner else { return false }
        guard runsHere(runner) else {
            runner.execute { [self] in mergeNow(key: key, object: object, runner, done) }
            return true
        }
        mergeNow(key: key, object: object, runner, done)
        return true
    }

    private nonisolated func mergeNow(key: [UInt8], object: VersionedObject, _ runner: any ClosureExecutor,
                                      _ done: @escaping @Sendable (Result<VersionedObject, VnodeError>) -> Void) {
        let step = assumeIsolated { v in Result { () throws(VnodeError) in try v.mergeLocally(key: key, object: object) } }
        switch step {
        case .failure(let e): done(.failure(e))
        case .success(let (merged, token)):
            whenDurable(token, runner) { error in done(error.map { .failure($0) } ?? .success(merged)) }
        }
    }

    /// A client write stamped and stored by `stampSoon`, not yet durable.
    public struct Stamped: Sendable {
        public let object: VersionedObject
        /// The actor that stamped it (`coordinateStamped`).
        public let writer: ActorID
        public let token: DurabilityToken
    }

    /// `stampWithoutWaiting` for a caller that must not suspend: stamps and stores on the
    /// store's thread and calls `stamped` there (at once when the caller runs there). False,
    /// `stamped` never called: use `stampWithoutWaiting` (`servesWithoutTasks`).
    public nonisolated func stampSoon(key: [UInt8], sibling: Sibling, context: VersionVector, actor: ActorID,
                                      _ stamped: @escaping @Sendable (Result<Stamped, VnodeError>) -> Void) -> Bool {
        guard let runner else { return false }
        guard runsHere(runner) else {
            runner.execute { [self] in stamped(stampNow(key: key, sibling: sibling, context: context, actor: actor)) }
            return true
        }
        stamped(stampNow(key: key, sibling: sibling, context: context, actor: actor))
        return true
    }

    private nonisolated func stampNow(key: [UInt8], sibling: Sibling, context: VersionVector, actor: ActorID) -> Result<Stamped, VnodeError> {
        assumeIsolated { v in
            Result { () throws(VnodeError) in
                let (object, token, writer) = try v.stamp(key: key, sibling: sibling, context: context, actor: actor)
                return Stamped(object: object, writer: writer, token: token)
            }
        }
    }

    /// `untilDurable` for a caller that must not suspend: `done` is called once the write of
    /// `token` is durable (nil; on the thread that ended the wait) or its sync failed (the vnode
    /// fails, as in `untilDurable`; on the store's thread). False, `done` never called: use
    /// `untilDurable` (`servesWithoutTasks`).
    public nonisolated func whenDurable(_ token: DurabilityToken, _ done: @escaping @Sendable (VnodeError?) -> Void) -> Bool {
        guard let runner else { return false }
        whenDurable(token, runner, done)
        return true
    }

    private nonisolated func whenDurable(_ token: DurabilityToken, _ runner: any ClosureExecutor,
                                         _ done: @escaping @Sendable (VnodeError?) -> Void) {
        backend.whenDurable(token) { [self] error in
            guard let error else { return done(nil) }
            runner.execute { [self] in done(assumeIsolated { $0.fail("write failed: \(error)") }) }
        }
    }

    /// Stamps a client write with `actor` as the coordinator: the new value supersedes exactly
    /// what `context` covers. Returns the stored object once durable; its newest value of `actor`
    /// is the one written (pruning never drops it).
    public nonisolated func coordinate(key: [UInt8], sibling: Sibling, context: VersionVector, actor: ActorID) async throws(VnodeError) -> VersionedObject {
        try await coordinateStamped(key: key, sibling: sibling, context: context, actor: actor).object
    }

    /// `coordinate`, also returning the actor that stamped the write: `actor`, unless this vnode
    /// stamps with its own (`stampActor`, which may be taken during this very write).
    public nonisolated func coordinateStamped(key: [UInt8], sibling: Sibling, context: VersionVector, actor: ActorID) async throws(VnodeError)
        -> (object: VersionedObject, writer: ActorID) {
        let (object, token, writer) = try await stamp(key: key, sibling: sibling, context: context, actor: actor)
        try await durable(token)
        return (object, writer)
    }

    /// `coordinateStamped` in two steps, for a coordinator that replicates while its own copy
    /// syncs: stores the stamped write and returns at once (not yet durable: not visible to
    /// `get`, not to be counted), with the token `untilDurable` takes.
    public nonisolated func stampWithoutWaiting(key: [UInt8], sibling: Sibling, context: VersionVector, actor: ActorID) async throws(VnodeError)
        -> (object: VersionedObject, writer: ActorID, token: DurabilityToken) {
        let (object, token, writer) = try await stamp(key: key, sibling: sibling, context: context, actor: actor)
        return (object, writer, token)
    }

    /// Returns once the write of `token` is durable; a failed sync fails the vnode and throws.
    public nonisolated func untilDurable(_ token: DurabilityToken) async throws(VnodeError) {
        try await durable(token)
    }

    /// Merges a replica's object into ours (DVVSet sync). Returns the stored object once it is
    /// durable here, so an acknowledgement always means "what you sent is durable on this
    /// replica": when the merge changes nothing, it still waits until the write that already
    /// holds it is durable (and fails if that write's sync failed). The incoming object's live
    /// values are never pruned here: they are what this merge acknowledges.
    public nonisolated func merge(key: [UInt8], object incoming: VersionedObject) async throws(VnodeError) -> VersionedObject {
        let (object, token) = try await mergeLocally(key: key, object: incoming)
        try await durable(token)
        return object
    }

    /// Merges every entry as `merge` does, then waits once until all of them are durable (a
    /// handoff batch: one sync for the batch, not one per key). Returns once every merge is
    /// durable; on a throw, entries before the failing one may be applied (a re-send merges
    /// them again, harmlessly).
    /// Returns the stored objects, in order.
    @discardableResult
    public nonisolated func mergeAll(_ entries: [(key: [UInt8], object: VersionedObject)]) async throws(VnodeError) -> [VersionedObject] {
        var last: DurabilityToken?
        var merged: [VersionedObject] = []
        merged.reserveCapacity(entries.count)
        for e in entries {
            let (object, token) = try await mergeLocally(key: e.key, object: e.object)
            merged.append(object)
            if last.map({ token.sequence > $0.sequence }) ?? true { last = token }
        }
        if let last { try await durable(last) }
        return merged
    }

    /// The current objects of `keys` (durable only, as `get`), in order; a key whose copy here
    /// cannot be read (corrupt) is nil, so an exchange refills it from the other replica.
    public func getAll(_ keys: [[UInt8]]) throws(VnodeError) -> [VersionedObject?] {
        try ensureServing()
        var out: [VersionedObject?] = []
        out.reserveCapacity(keys.count)
        for k in keys {
            do throws(VnodeError) {
                out.append(try load(k, durableOnly: true))
            } catch {
                guard case .storage = error, status == .serving else { throw error }
                out.append(nil)
            }
        }
        return out
    }

    /// The tree's root (nil: no tree ready).
    public func treeRoot() -> UInt64? { readyTree?.root }

    /// The children's hashes of `parents` at `level` (nil: no tree ready).
    public func treeChildren(level: Int, of parents: [Int]) -> [UInt64]? { readyTree?.children(level: level, of: parents) }

    /// `coordinate`'s read-modify-write: one isolated step that never suspends.
    private func stamp(key: [UInt8], sibling: Sibling, context: VersionVector, actor: ActorID) throws(VnodeError)
        -> (VersionedObject, DurabilityToken, ActorID) {
        try ensureServing()
        let previous = try loadReplacingDamage(key)
        let actor = stampActor ?? actor
        var object = previous ?? VersionedObject()
        // Only this coordinator issues `actor`'s dots, so a context claiming more of them than
        // stored is forged or corrupt; trusting it could push the counter to overflow.
        let issued = object.counter(of: actor)
        // A counter no replica can have reached (each takes one write of this key by one
        // coordinator) is forged: stored, it would push that actor's next dot past what an object
        // may hold (`limits.maxDotCounter`), and every replica would then read the key as corrupt.
        if let forged = context.dots.first(where: { $0.counter > Self.maxContextCounter(limits) }) {
            throw .rejected("context counter \(forged.counter) of \(forged.actor) is beyond any this store issues")
        }
        let clamped = context.dots.contains { $0.actor == actor && $0.counter > issued }
        let sane = clamped ? VersionVector(context.dots.map { ($0.actor, $0.actor == actor ? min($0.counter, issued) : $0.counter) }) : context
        do {
            try object.update(context: sane, value: sibling, actor: actor, floor: floor(of: actor))
        } catch {
            throw .rejected(error.description)
        }
        try checkClock(object)
        let (stored, token) = try store(key, object, previous: previous, protecting: object.newestDot(of: actor).map { [$0] } ?? [])
        return (stored, token, actor)
    }

    /// The counter floor of `actor` here (0: none).
    private func floor(of actor: ActorID) -> UInt64 {
        guard let f = counterFloor, f.epoch == actor.epoch else { return 0 }
        return f.counter
    }

    static func counterFloorMetadataName(_ p: PartitionID) -> String { "gc-floor/\(p.index)" }

    private func remember(_ key: [UInt8], _ clock: VersionVector) {
        let before = collected.count
        if collected.updateValue(clock, forKey: key) == nil { collectedOrder.append(key) }
        while collected.count > rememberedLimit, collectedStart < collectedOrder.count {
            collected[collectedOrder[collectedStart]] = nil
            collectedStart += 1
        }
        metrics.tombstonesRemembered.adjust(by: collected.count - before)
        if collectedStart > 4096, collectedStart * 2 > collectedOrder.count {
            collectedOrder.removeFirst(collectedStart)
            collectedStart = 0
        }
    }

    static func savedCounterFloor(in backend: any PartitionStore, partition p: PartitionID) -> (epoch: UInt64, counter: UInt64)? {
        guard let b = try? backend.metadata(counterFloorMetadataName(p)), let w = BigEndianWords.decode(b, count: 2) else { return nil }
        return (w[0], w[1])
    }

    /// Collects tombstones `TombstoneRule` allows: each key whose stored object is still a pure
    /// tombstone with version hash `hash` (`KeyVersionHash`) is deleted and taken out of the
    /// tree; any other key is left (a write came since). Before deleting, the counter floor of
    /// the actor this vnode stamps with (`stampActor`, else `nodeActor`) is raised past its
    /// counters in the dropped objects and recorded. Returns the number of keys collected, once
    /// durable.
    public nonisolated func collect(_ candidates: [(key: [UInt8], hash: UInt64)], nodeActor: ActorID) async throws(VnodeError) -> Int {
        let (count, token) = try await collectLocally(candidates, nodeActor: nodeActor)
        if let token { try await durable(token) }
        return count
    }

    private func collectLocally(_ candidates: [(key: [UInt8], hash: UInt64)], nodeActor: ActorID) throws(VnodeError) -> (Int, DurabilityToken?) {
        try ensureServing()
        let actor = stampActor ?? nodeActor
        var doomed: [(key: [UInt8], object: VersionedObject)] = []
        var top: UInt64 = 0
        for c in candidates {
            guard case .object(let o) = try read(c.key, durableOnly: false), o.isDeleted,
                  KeyVersionHash.hash(key: c.key, object: o) == c.hash else { continue }
            doomed.append((c.key, o))
            top = max(top, o.context[actor])
        }
        guard !doomed.isEmpty else { return (0, nil) }
        do {
            if top >= floor(of: actor) {
                let (next, overflow) = top.addingReportingOverflow(1)
                if !overflow {
                    _ = try backend.applyMetadata(Self.counterFloorMetadataName(partition), BigEndianWords.encode(actor.epoch, next))
                    counterFloor = (actor.epoch, next)
                }
            }
            let token = try backend.delete(partition: space, keys: doomed.map(\.key))
            for d in doomed {
                recordInTree(d.key, old: d.object, new: nil)
                remember(d.key, d.object.context)
            }
            return (doomed.count, token)
        } catch {
            throw fail("could not collect tombstones: \(error)")
        }
    }

    /// `merge`'s read-modify-write: one isolated step that never suspends. When nothing changes,
    /// the token covers every write applied so far (among them the one holding `current`).
    private func mergeLocally(key: [UInt8], object incoming: VersionedObject) throws(VnodeError) -> (VersionedObject, DurabilityToken) {
        try ensureServing()
        let current = try loadReplacingDamage(key)
        if current == nil, let seen = collected[key], incoming.context.dots.allSatisfy({ $0.counter <= seen[$0.actor] }) {
            metrics.tombstonesReturned.increment()
            return (incoming, backend.lastApplied)
        }
        let merged = current.map { VersionedObject.sync($0, incoming) } ?? incoming
        try checkClock(merged)
        if merged == current, let current { return (current, backend.lastApplied) }
        return try store(key, merged, previous: current, protecting: incoming.liveDots)
    }

    /// Waits, on the caller's executor, until `token` is durable; a failed sync fails the vnode.
    private nonisolated func durable(_ token: DurabilityToken) async throws(VnodeError) {
        do {
            try await backend.waitDurable(token)
        } catch {
            throw await fail("write failed: \(error)")
        }
    }

    // MARK: Internals

    private func ensureServing() throws(VnodeError) {
        switch status {
        case .serving: return
        case .starting: throw .unavailable(partition: partition, reason: "starting")
        case .failed(let why): throw .unavailable(partition: partition, reason: "restarting after: \(why)")
        }
    }

    /// What storage holds for a key.
    private enum Stored {
        case absent
        case object(VersionedObject)
        /// The bytes cannot be read (a block failing its checksum) or decoded.
        case damaged(String)
    }

    /// Reads and decodes the key's object: the newest version, or (`durableOnly`) the newest
    /// durable one. Data errors (a corrupt object, a checksum failure in the block holding the
    /// key) fail this key only: the vnode keeps serving, since restarting cannot fix the bytes
    /// and replicas answer meanwhile. Any other read error fails the vnode (its supervisor
    /// restarts it).
    private func load(_ key: [UInt8], durableOnly: Bool = false) throws(VnodeError) -> VersionedObject? {
        switch try read(key, durableOnly: durableOnly) {
        case .absent: return nil
        case .object(let o): return o
        case .damaged(let why): throw .storage(partition: partition, reason: why)
        }
    }

    /// `load` for a write: a damaged copy reads as absent, so the write (a replica's object, a
    /// client's value) replaces it. The first time, a primary takes a fresh stamp actor (see
    /// `stampActor`), recorded before the write is applied. Without `freshActor` (or on a
    /// fallback vnode) a damaged copy fails the write as `load` does.
    private func loadReplacingDamage(_ key: [UInt8]) throws(VnodeError) -> VersionedObject? {
        switch try read(key, durableOnly: false) {
        case .absent: return nil
        case .object(let o): return o
        case .damaged(let why):
            guard role == .primary, let freshActor else { throw .storage(partition: partition, reason: why) }
            if stampActor == nil {
                let actor = freshActor()
                do {
                    _ = try backend.applyMetadata(Self.stampMetadataName(partition), Self.encodeStamp(actor, backend: backend))
                } catch {
                    throw fail("could not record a new stamp actor: \(error)")
                }
                stamp.withLock { $0 = actor }
                logger.warning("replacing a damaged key; this vnode stamps its writes with a new actor from now on", metadata: [
                    "partition": "\(partition.index)", "actor": "\(actor)",
                ])
            }
            metrics.damagedKeysReplaced.increment()
            return nil
        }
    }

    /// The metadata name holding a primary's stamp actor epoch (`stampActor`).
    static func stampMetadataName(_ p: PartitionID) -> String { "stamp/\(p.index)" }

    /// The stamp actor a primary of `p` recorded in `backend` (`stamp/<p>`), if it is still safe
    /// to stamp with (nil: none, unreadable, or retired): it was recorded under the node's
    /// current actor epoch. A new epoch (drawn after an unclean shutdown, when a dot shown before
    /// its sync may be lost) retires every stamp actor with it: the node's fresh actor has issued
    /// nothing. A record from before epochs were kept with it (8 bytes) counts only after a clean
    /// shutdown.
    public static func savedStampActor(in backend: any PartitionStore, partition p: PartitionID, node: String) -> ActorID? {
        guard let bytes = try? backend.metadata(stampMetadataName(p)) else { return nil }
        if let words = BigEndianWords.decode(bytes, count: 2) {
            guard let nodeEpoch = backend.persistentEpoch, words[1] == nodeEpoch else { return nil }
            return ActorID(node: node, epoch: words[0])
        }
        guard backend.openedAfterCleanShutdown, let epoch = BigEndianWords.decode(bytes, count: 1)?.first else { return nil }
        return ActorID(node: node, epoch: epoch)
    }

    /// `stamp/<p>`'s value: the stamp actor's epoch, then the node epoch it was taken under.
    static func encodeStamp(_ actor: ActorID, backend: any PartitionStore) -> [UInt8] {
        BigEndianWords.encode(actor.epoch, backend.persistentEpoch ?? 0)
    }

    private func read(_ key: [UInt8], durableOnly: Bool) throws(VnodeError) -> Stored {
        let raw: [UInt8]?
        do {
            raw = durableOnly ? try backend.getDurable(partition: space, key: key) : try backend.get(partition: space, key: key)
        } catch let error as StorageError {
            if case .corruption = error {
                metrics.corruptReads.increment()
                // Once per damaged block, not per read: a hot key in it would flood the log.
                if lastCorruptionLogged != error {
                    lastCorruptionLogged = error
                    logger.error("corrupt storage block; this replica cannot serve the keys it holds", metadata: [
                        "partition": "\(partition.index)", "error": "\(error)",
                    ])
                }
                return .damaged("this replica cannot serve the key: \(error)")
            }
            throw fail("read failed: \(error)")
        } catch {
            throw fail("read failed: \(error)")
        }
        guard let raw else { return .absent }
        do {
            return .object(try VersionedObject.decode(raw, limits: limits))
        } catch {
            // A corrupt object is never served or spread. It fails requests for this key only
            // (restarting would not fix it and would take the whole partition down); replicas
            // answer reads meanwhile.
            metrics.corruptObjects.increment()
            logger.error("corrupt stored object", metadata: ["partition": "\(partition.index)", "error": "\(error)"])
            return .damaged("stored object is corrupt: \(error)")
        }
    }

    /// A clock that would make the key unreadable (too many actors, a context too large for the
    /// wire) is refused before anything is stored.
    /// The largest counter a client's context may name: half of what an object may hold, so
    /// every actor keeps 2^47 writes of headroom.
    static func maxContextCounter(_ limits: Limits) -> UInt64 { limits.maxDotCounter / 2 }

    private func checkClock(_ object: VersionedObject) throws(VnodeError) {
        // What is stored must decode: never a counter past `limits.maxDotCounter`.
        if let over = object.entries.first(where: { $0.counter > limits.maxDotCounter }) {
            throw .rejected("the key's clock would reach counter \(over.counter) of \(over.actor), over \(limits.maxDotCounter)")
        }
        guard object.entries.count <= limits.maxActorsPerObject else {
            throw .rejected("the key's clock would hold \(object.entries.count) actors, over limits.max_actors_per_object \(limits.maxActorsPerObject)")
        }
        let contextBytes = object.contextEncodedCount
        guard contextBytes <= limits.maxContextBytes else {
            throw .rejected("the key's context would take \(contextBytes) bytes, over limits.max_context_bytes \(limits.maxContextBytes)")
        }
    }

    /// Prunes and applies `object`; returns it with the write's token (not yet durable).
    /// `protecting` (the dots this write acknowledges) is computed only if a cap is exceeded.
    private func store(_ key: [UInt8], _ object: VersionedObject, previous: VersionedObject?,
                       protecting: @autoclosure () -> Set<Dot>) throws(VnodeError) -> (VersionedObject, DurabilityToken) {
        var object = object
        let pruned = object.prune(maxSiblings: limits.maxSiblings, maxBytes: limits.maxObjectBytes, protecting: protecting())
        if pruned > 0 {
            metrics.siblingsPruned.increment(by: pruned)
            logger.warning("sibling limit reached; oldest siblings pruned", metadata: [
                "partition": "\(partition.index)", "pruned": "\(pruned)", "max_siblings": "\(limits.maxSiblings)",
                "max_object_bytes": "\(limits.maxObjectBytes)",
            ])
        }
        let token: DurabilityToken
        do {
            token = try backend.apply(partition: space, key: key, value: object.encoded())
        } catch {
            throw fail("write failed: \(error)")
        }
        recordInTree(key, old: previous, new: object)
        return (object, token)
    }

    // MARK: Anti-entropy tree

    /// `KeyVersionHash` of a stored version (0: none), through the vnode's scratch buffer.
    private func versionHash(_ key: [UInt8], _ object: VersionedObject?) -> UInt64 {
        guard let object else { return 0 }
        return KeyVersionHash.hash(key: key, object: object, using: &hashScratch)
    }

    /// XORs the key's version change into the tree (or the delta of a build in progress).
    private func recordInTree(_ key: [UInt8], old: VersionedObject?, new: VersionedObject?) {
        switch tree {
        case .off, .missing: return
        case .ready(var t):
            tree = .off  // no copy-on-write of the tree while it changes
            let (o, n) = (versionHash(key, old), versionHash(key, new))
            t.update(key: key, old: o, new: n)
            tree = .ready(t)
        case .building(var live, var delta, let generation):
            tree = .off
            let (o, n) = (versionHash(key, old), versionHash(key, new))
            live?.update(key: key, old: o, new: n)
            delta.update(key: key, old: o, new: n)
            tree = .building(live: live, delta: delta, generation: generation)
        }
    }

    /// The tree exchanges compare against (nil: none ready yet).
    public var readyTree: SegmentTree? {
        switch tree {
        case .ready(let t): t
        case .building(let live, _, _): live
        case .off, .missing: nil
        }
    }

    /// Whether the vnode keeps a tree and has none ready (a build is due).
    public nonisolated var needsTreeBuild: Bool { treeMissing.load(ordering: .relaxed) }

    /// Starts a build of the tree from storage: takes a snapshot and, from this instant, records
    /// every write in a delta. Nil when the vnode keeps no tree or a build is under way.
    /// The caller folds the snapshot into a tree (`KeyVersionHash` of every key) and hands it to
    /// `finishTreeBuild` with the generation returned here.
    public func beginTreeBuild(shape: TreeShape) throws -> (snapshot: PartitionSnapshot, generation: UInt64)? {
        let live: SegmentTree?
        switch tree {
        case .off, .building: return nil
        case .missing: live = nil
        case .ready(let t): live = t
        }
        let snapshot = try backend.snapshot(partition: space)
        treeGeneration &+= 1
        tree = .building(live: live, delta: SegmentTree(shape: shape), generation: treeGeneration)
        return (snapshot, treeGeneration)
    }

    /// Completes a build: the snapshot's tree plus the writes since. Returns whether the tree
    /// that served meanwhile (a rebuild) differed from the result (drift: a missed update or
    /// damaged data), nil when the build is stale (another began since) or the vnode keeps no tree.
    public func finishTreeBuild(_ built: SegmentTree, generation: UInt64) -> Bool? {
        guard case .building(let live, let delta, let g) = tree, g == generation else { return nil }
        var result = built
        result.merge(delta)
        tree = .ready(result)
        return live.map { $0 != result } ?? false
    }

    /// Drops the tree, so one is built from storage again (storage under it lost keys: the new
    /// tree leaves them out, and exchanges bring them back). A build under way is abandoned.
    public func invalidateTree() {
        switch tree {
        case .off, .missing: return
        case .building, .ready: tree = .missing
        }
    }

    /// Abandons a build that failed (its snapshot could not be read): back to the tree that
    /// served before, or to none.
    public func abandonTreeBuild(generation: UInt64) {
        guard case .building(let live, _, let g) = tree, g == generation else { return }
        tree = live.map(TreeState.ready) ?? .missing
    }

    private func fail(_ reason: String) -> VnodeError {
        metrics.storageErrors.increment()
        logger.error("vnode storage failure", metadata: ["partition": "\(partition.index)", "reason": "\(reason)"])
        if status == .serving {
            status = .failed(reason)
            failureSignal?.yield(reason)
        }
        return .storage(partition: partition, reason: reason)
    }
}

/// A default actor with no state: lends its executor to a vnode whose store names none.
actor DefaultLane {}

public enum VnodeError: Error, Sendable, Hashable, CustomStringConvertible {
    case unavailable(partition: PartitionID, reason: String)
    case storage(partition: PartitionID, reason: String)
    case failed(partition: PartitionID, reason: String)
    case rejected(String)

    public var description: String {
        switch self {
        case .unavailable(let p, let r): "vnode \(p.index) unavailable: \(r)"
        case .storage(let p, let r): "vnode \(p.index) storage error: \(r)"
        case .failed(let p, let r): "vnode \(p.index) failed: \(r)"
        case .rejected(let r): "write rejected: \(r)"
        }
    }
}

/// The table of this node's vnodes, by (partition, role). Thread-safe; lookups do not suspend.
public final class VnodeTable: Sendable {
    private let table = Locked<[VnodeKey: Vnode]>([:])
    /// For each partition whose vnode this node retired because the ring moved it away: the
    /// replicas that took its place. At most one entry per partition (bounded by Q); an entry
    /// goes when the partition's vnode starts here again.
    private let successors = Locked<[PartitionID: [NodeName]]>([:])
    /// The vnode last removed for each key (until one is inserted again): a handoff stops it
    /// before dropping the partition's data, since a request that looked it up just before its
    /// removal may still be on its way to it.
    private let removed = Locked<[VnodeKey: Vnode]>([:])

    public init() {}

    /// The nodes that replaced this one as replicas of `p` (empty if this node never retired
    /// `p`'s vnode, or runs it now). A replica request from a coordinator whose ring is older
    /// than the move goes to them.
    public func successors(of p: PartitionID) -> [NodeName] { successors.withLock { $0[p] ?? [] } }

    /// Records the nodes that replaced this one for `p` (called on retiring `p`'s vnode).
    func movedAway(_ p: PartitionID, to nodes: [NodeName]) {
        successors.withLock { $0[p] = nodes.isEmpty ? nil : nodes }
    }

    /// The primary vnode of `p`, if this node runs one.
    public func vnode(for p: PartitionID) -> Vnode? { vnode(for: VnodeKey(partition: p, role: .primary)) }

    public func vnode(for key: VnodeKey) -> Vnode? { table.withLock { $0[key] } }

    /// Adds `v`. A primary makes this node a replica of its partition again (its successors are
    /// forgotten); a fallback does not: requests for the primary copy still go to the successors.
    public func insert(_ v: Vnode) {
        removed.withLock { _ = $0.removeValue(forKey: v.key) }
        table.withLock { $0[v.key] = v }
        if v.role == .primary { successors.withLock { _ = $0.removeValue(forKey: v.key.partition) } }
    }

    @discardableResult
    public func remove(_ key: VnodeKey) -> Vnode? {
        let v = table.withLock { $0.removeValue(forKey: key) }
        if let v { removed.withLock { $0[key] = v } }
        return v
    }

    /// Waits (at most `limit`) until this node runs no primary vnode for `p` (the view that
    /// retired it was applied), then stops the one retired, so no write applies here from then
    /// on. False if one still runs after `limit` (the node replicates `p` again: keep its data).
    func retired(_ p: PartitionID, clock: any NodeClock, limit: Duration) async -> Bool {
        let key = VnodeKey(partition: p, role: .primary)
        let deadline = clock.now() + limit
        while vnode(for: key) != nil {
            guard clock.now() < deadline else { return false }
            do { try await clock.sleep(for: .milliseconds(10)) } catch { return false }
        }
        await removed.withLock { $0[key] }?.stopServing()
        return true
    }

    /// This node's fallback vnode of `p`, if it runs one.
    public func fallback(for p: PartitionID) -> Vnode? { vnode(for: VnodeKey(partition: p, role: .fallback)) }

    /// Partitions this node runs a fallback vnode for, in order.
    public var fallbackPartitions: [PartitionID] { table.withLock { $0.keys.filter { $0.role == .fallback }.map(\.partition).sorted() } }

    /// Partitions this node runs a primary vnode for, in order.
    public var partitions: [PartitionID] { table.withLock { $0.keys.filter { $0.role == .primary }.map(\.partition).sorted() } }

    public var keys: Set<VnodeKey> { table.withLock { Set($0.keys) } }

    public var count: Int { table.withLock { $0.count } }
}
