import CairnCore
import CairnRing
import CairnWire
import Logging

/// How hinted handoff is bounded (`hints.*`, Docs/configuration.md).
public struct HintSettings: Sendable {
    /// Whether coordinators keep hints at all (`hints.enabled`).
    public var enabled = true
    /// Bytes of hints kept for one target at most (`hints.max_bytes_per_target`); a hint past it
    /// is not kept (counted `target_full`): that key is left to read repair and anti-entropy.
    public var maxBytesPerTarget = 128 << 20
    /// Bytes of hints kept for every target together (`hints.max_bytes`; `store_full`).
    public var maxBytes = 1 << 30
    /// A hint older than this is dropped, not replayed (`hints.max_age`, 3 h; `expired`).
    public var maxAge: Duration = .seconds(3 * 3600)
    /// Bytes per second all replays together send (`hints.replay_bytes_per_second`).
    public var replayBytesPerSecond = 16 << 20
    /// Hints per second all replays together send (`hints.replay_keys_per_second`): small
    /// objects cost requests, not bytes, so the foreground is protected by this bound too.
    public var replayKeysPerSecond = 100
    /// Hints one replay round sends at once, at most (each a `replica-put`).
    public var replayBatch = 16
    /// A replay round that failed waits this long, doubling per failure in a row, at most `retryMax`.
    public var retryMin: Duration = .milliseconds(500)
    public var retryMax: Duration = .seconds(30)
    public init() {}
}

/// One hint: a write a primary missed, as the coordinator stamped it.
///
/// Stored in the node's store under the hint space (`PartitionID.hintSpace`), keyed
/// `target-length:u8 target sequence:u64be` (so a target's hints are one range, in the order they
/// were kept); the value is `%x01 created-ms:u64be partition:u32be key:blob object:blob`
/// (Docs/storage-format.md, "Hints").
struct HintRecord: Hashable, Sendable {
    static let format: UInt8 = 1

    var createdMillis: UInt64
    var partition: PartitionID
    var key: [UInt8]
    /// The stamped object, encoded (`VersionedObject.encoded()`).
    var object: [UInt8]

    func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: 24 + key.count + object.count)
        w.writeU8(Self.format)
        w.writeU64(createdMillis)
        w.writeU32(partition.index)
        w.writeBlob(key)
        w.writeBlob(object)
        return w.bytes
    }

    init(createdMillis: UInt64, partition: PartitionID, key: [UInt8], object: [UInt8]) {
        self.createdMillis = createdMillis
        self.partition = partition
        self.key = key
        self.object = object
    }

    init(decoding bytes: [UInt8], limits: Limits) throws(DecodeError) {
        var r = ByteReader(bytes)
        let f = try r.readU8("hint format")
        guard f == Self.format else { throw DecodeError("hint format \(f) is not \(Self.format)") }
        createdMillis = try r.readU64("created")
        partition = PartitionID(try r.readU32("partition"))
        key = try r.readBlob("key", limit: limits.maxKeyBytes)
        object = try r.readBlob("object", limit: limits.maxFrameBytes)
        try r.expectEnd("hint")
    }

    /// The first storage key of `target`'s hints (its prefix).
    static func prefix(_ target: NodeName) -> [UInt8] {
        let name = Array(target.value.utf8)
        return [UInt8(truncatingIfNeeded: name.count)] + name
    }

    static func storageKey(_ target: NodeName, _ sequence: UInt64) -> [UInt8] {
        var w = ByteWriter(capacity: 9 + target.value.utf8.count)
        w.writeRaw(prefix(target))
        w.writeU64(sequence)
        return w.bytes
    }

    /// The target and sequence a storage key names (nil: not a hint key).
    static func parse(storageKey k: [UInt8]) -> (target: NodeName, sequence: UInt64)? {
        guard let n = k.first.map(Int.init), k.count == 1 + n + 8,
              let s = String(validating: k[1..<(1 + n)], as: UTF8.self), let target = try? NodeName(s) else { return nil }
        let sequence = k[(1 + n)...].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        return (target, sequence)
    }
}

extension PartitionID {
    /// The storage partition holding the hints this node keeps (bit 30: below the fallback bit,
    /// above every ring index).
    static let hintSpace = PartitionID(1 << 30)
}

/// The hints a node holds, per target: how many, how many bytes, the sequence numbers to use;
/// and the bounds every new hint is checked against. Pure bookkeeping: the shell keeps it in
/// step with the store (rebuilt from it at start).
struct HintBook: Sendable {
    struct Target: Hashable, Sendable {
        var count = 0
        var bytes = 0
        /// When the oldest hint held was kept (wall ms), as last seen by a scan or a keep.
        var oldestMillis: UInt64?
    }

    enum Admission: Hashable, Sendable {
        case keep(sequence: UInt64)
        case refuse(reason: String)
    }

    let maxBytesPerTarget: Int
    let maxBytes: Int
    private(set) var targets: [NodeName: Target] = [:]
    private(set) var bytes = 0
    private(set) var nextSequence: UInt64 = 1

    init(maxBytesPerTarget: Int, maxBytes: Int) {
        self.maxBytesPerTarget = maxBytesPerTarget
        self.maxBytes = maxBytes
    }

    var count: Int { targets.values.reduce(0) { $0 + $1.count } }

    /// A hint found in the store at start.
    mutating func loaded(_ target: NodeName, sequence: UInt64, bytes n: Int, createdMillis: UInt64) {
        targets[target, default: Target()].count += 1
        targets[target, default: Target()].bytes += n
        if targets[target]?.oldestMillis.map({ createdMillis < $0 }) ?? true { targets[target]?.oldestMillis = createdMillis }
        bytes += n
        nextSequence = max(nextSequence, sequence == .max ? .max : sequence + 1)
    }

    /// Whether a hint of `n` bytes for `target` fits the bounds; if so it is counted and gets
    /// the next sequence number.
    mutating func admit(_ target: NodeName, bytes n: Int, createdMillis: UInt64) -> Admission {
        let held = targets[target]?.bytes ?? 0
        if held + n > maxBytesPerTarget { return .refuse(reason: "target_full") }
        if bytes + n > maxBytes { return .refuse(reason: "store_full") }
        let sequence = nextSequence
        if nextSequence < .max { nextSequence += 1 }
        targets[target, default: Target()].count += 1
        targets[target, default: Target()].bytes += n
        if targets[target]?.oldestMillis == nil { targets[target]?.oldestMillis = createdMillis }
        bytes += n
        return .keep(sequence: sequence)
    }

    /// A kept hint that was not written after all (the store failed).
    mutating func unadmit(_ target: NodeName, bytes n: Int) { removed(target, count: 1, bytes: n) }

    /// Hints of `target` removed (replayed, expired or unreadable).
    mutating func removed(_ target: NodeName, count c: Int, bytes n: Int) {
        guard var t = targets[target] else { return }
        t.count = max(t.count - c, 0)
        t.bytes = max(t.bytes - n, 0)
        bytes = max(bytes - min(n, bytes), 0)
        targets[target] = t.count == 0 ? nil : t
    }

    /// The oldest hint `target` holds now was kept at `createdMillis` (a scan saw it).
    mutating func oldest(_ target: NodeName, createdMillis: UInt64?) {
        guard targets[target] != nil else { return }
        targets[target]?.oldestMillis = createdMillis
    }

    /// The oldest hint held for any target (wall ms).
    var oldestMillis: UInt64? { targets.values.compactMap(\.oldestMillis).min() }
}

/// Keeps hints for primaries that missed writes and replays them when those primaries are back.
///
/// - `keep` (from a write coordinator): one durable record per target, within `hints.*`'s bounds,
///   written before it returns (a node that crashes after keeps them).
/// - `run()`: once a second, for each target with hints that the failure detector holds alive
///   and the transport reaches, replays its hints oldest first in rounds of at most 16
///   (`replica-put`s in parallel, paced to `hints.replay_bytes_per_second` and
///   `hints.replay_keys_per_second`), removing each one
///   its destination acknowledged; a failed round backs off (`retryMin` doubling to `retryMax`).
///   A hint's destination is its target while the target replicates the partition; otherwise
///   (the ring moved the partition, or removed the target) every current replica but this node.
///   A hint older than `hints.max_age` is dropped instead.
/// - Replaying twice is harmless: the receiver merges by DVV (a re-sent hint changes nothing).
///
/// Isolation: the book sits behind a lock; one replay runs per target at a time (`run` is the
/// only replayer). Supervision: `run()` is a child of the node's supervisor; a restart reloads
/// the book from the store.
final class HintManager: SupervisedChild {
    let childName = "hints"

    /// The node's services (`env.me`, `env.transport`, … read through) and the hint bounds.
    @dynamicMemberLookup
    struct Environment: Sendable {
        let services: NodeServices
        let settings: HintSettings
        subscript<T>(dynamicMember path: KeyPath<NodeServices, T>) -> T { services[keyPath: path] }
    }

    /// One target's state as `cairn transfers` shows it.
    struct TargetStatus: Hashable, Sendable {
        var target: NodeName
        var hints: Int
        var bytes: Int
        var oldestSeconds: Double?
        var state: String
        var replayed: UInt64
    }

    let env: Environment
    private let book: Locked<HintBook>
    private let loaded = Locked(false)
    private let loadedSignal = Condition()
    private let retry = Locked<[NodeName: (at: ContinuousClock.Instant, failures: Int)]>([:])
    private let replaying = Locked<Set<NodeName>>([])
    /// Targets with hints seen unreachable at the last look.
    private let sawUnreachable = Locked<Set<NodeName>>([])
    private let replayed = Locked<[NodeName: UInt64]>([:])
    private let pacer: Pacer
    private let keyPacer: Pacer
    /// Wakes the replay loop early (a keep): `woken` is the flag its wait checks.
    private let wake = Condition()
    private let woken = Locked(false)
    /// Hints dropped since this manager started, whatever the reason (`dropped`).
    private let droppedCount = Locked(0)

    init(env: Environment) {
        self.env = env
        book = Locked(HintBook(maxBytesPerTarget: env.settings.maxBytesPerTarget, maxBytes: env.settings.maxBytes))
        pacer = Pacer(bytesPerSecond: env.settings.replayBytesPerSecond, clock: env.clock)
        keyPacer = Pacer(bytesPerSecond: env.settings.replayKeysPerSecond, clock: env.clock)
    }

    // MARK: Keeping

    /// Keeps a hint of `object` (key `key` of `partition`) for each of `targets`; returns once
    /// they are durable (or refused: counted in `cairn_hints_dropped_total`, logged).
    func keep(for targets: [NodeName], partition: PartitionID, key: [UInt8], object: VersionedObject) async {
        guard env.settings.enabled, let store = env.storage() else { return }
        // The book must know the stored sequences first (a new hint must not reuse one): a write
        // in the first moments after a start waits for the load, briefly.
        if !loaded.value {
            let ready = await loadedSignal.wait(until: { loaded.value }, deadline: env.clock.now() + .seconds(2), clock: env.clock)
            guard ready else {
                dropped("not_ready", targets.count)
                env.logger.warning("hints not kept: the hint store is still loading", metadata: ["targets": "\(targets)"])
                return
            }
        }
        let now = env.clock.wallMillis()
        let value = HintRecord(createdMillis: now, partition: partition, key: key, object: object.encoded()).encoded()
        var batch: [(key: [UInt8], value: [UInt8])] = []
        var admitted: [NodeName] = []
        for target in targets where target != env.me {
            let n = value.count + 16 + target.value.utf8.count
            switch book.withLock({ $0.admit(target, bytes: n, createdMillis: now) }) {
            case .keep(let sequence):
                batch.append((HintRecord.storageKey(target, sequence), value))
                admitted.append(target)
            case .refuse(let reason):
                dropped(reason)
                env.logger.warning("hint not kept: bound reached; the key is left to read repair and anti-entropy", metadata: [
                    "target": "\(target)", "reason": "\(reason)", "partition": "\(partition.index)",
                ])
            }
        }
        guard !batch.isEmpty else { return }
        do {
            let records = batch
            let token = try await store.onExecutor(of: .hintSpace) { try store.apply(partition: .hintSpace, batch: records) }
            try await store.waitDurable(token)
            env.metrics.hintsStored.increment(by: batch.count)
        } catch {
            book.withLock { b in for t in admitted { b.unadmit(t, bytes: value.count + 16 + t.value.utf8.count) } }
            env.logger.error("hint could not be stored", metadata: ["error": "\(error)", "targets": "\(admitted)"])
        }
        publish()
        woken.withLock { $0 = true }
        wake.notifyAll()
    }

    // MARK: Replaying

    func run() async throws {
        try await load()
        var lastSweep: ContinuousClock.Instant?
        while !Task.isCancelled {
            let now = env.clock.now()
            if lastSweep.map({ $0.duration(to: now) >= .seconds(10) }) ?? true {
                lastSweep = now
                await sweep()
            }
            for target in dueTargets() { await replay(target) }
            publish()
            _ = await wake.wait(until: { woken.withLock { w in defer { w = false }; return w } },
                                deadline: env.clock.now() + .seconds(1), clock: env.clock)
        }
    }

    /// Targets with hints whose turn it is: reachable (or no longer members: their hints go to
    /// the partitions' replicas), and not backing off.
    /// A target that comes back (unreachable at the last look, reachable now) is due at once,
    /// whatever backoff its failures while it was away built up.
    private func dueTargets() -> [NodeName] {
        let now = env.clock.now()
        let ring = env.ring()
        let held = book.withLock { $0.targets.keys.sorted() }
        return held.filter { t in
            let reachable = env.reachable(t)
            let cameBack = reachable && sawUnreachable.withLock { $0.remove(t) != nil }
            if !reachable { sawUnreachable.withLock { _ = $0.insert(t) } }
            if cameBack { retry.withLock { _ = $0.removeValue(forKey: t) } }
            if let r = retry.value[t], r.at > now { return false }
            return reachable || ring?.member(t) == nil
        }
    }

    /// Rebuilds the book from the store (every hint key, its size and age).
    private func load() async throws {
        guard let store = env.storage() else { return }
        loaded.withLock { $0 = false }
        let limits = env.limits
        let found = try await store.foldReadable(partition: .hintSpace, after: nil, into: [(NodeName, UInt64, Int, UInt64)]()) { acc, key, value in
            guard let (target, sequence) = HintRecord.parse(storageKey: key) else { return .continue }
            let created = (try? HintRecord(decoding: value, limits: limits))?.createdMillis ?? 0
            acc.append((target, sequence, key.count + value.count, created))
            return .continue
        }.accumulator
        book.withLock { b in
            b = HintBook(maxBytesPerTarget: env.settings.maxBytesPerTarget, maxBytes: env.settings.maxBytes)
            for (t, s, n, c) in found { b.loaded(t, sequence: s, bytes: n, createdMillis: c) }
        }
        loaded.withLock { $0 = true }
        loadedSignal.notifyAll()
        if !found.isEmpty { env.logger.info("hints found at start", metadata: ["hints": "\(found.count)"]) }
        publish()
    }

    /// Drops every hint past `hints.max_age` (oldest first per target, so each scan stops at
    /// the first young one) and notes each target's oldest.
    private func sweep() async {
        let cutoff = Self.minus(env.clock.wallMillis(), env.settings.maxAge.wholeMilliseconds)
        for target in book.withLock({ $0.targets.keys.sorted() }) {
            _ = await pass(target) { record in record.createdMillis < cutoff ? .expire : .stop }
        }
    }

    /// Replays `target`'s hints until none is left or a round fails.
    private func replay(_ target: NodeName) async {
        replaying.withLock { _ = $0.insert(target) }
        defer { replaying.withLock { _ = $0.remove(target) } }
        let cutoff = Self.minus(env.clock.wallMillis(), env.settings.maxAge.wholeMilliseconds)
        while !Task.isCancelled, (book.withLock { $0.targets[target]?.count ?? 0 }) > 0 {
            let outcome = await pass(target) { record in record.createdMillis < cutoff ? .expire : .send }
            if outcome == .failed {
                retry.withLock { r in
                    let failures = (r[target]?.failures ?? 0) + 1
                    var delay = env.settings.retryMin
                    for _ in 1..<failures where delay < env.settings.retryMax { delay = delay * 2 }
                    r[target] = (env.clock.now() + min(delay, env.settings.retryMax), failures)
                }
                return
            }
            retry.withLock { _ = $0.removeValue(forKey: target) }
            if outcome == .empty { return }
        }
    }

    private enum Action { case send, expire, stop }
    private enum PassOutcome { case progressed, empty, failed }

    /// One round over the first `replay_batch` hints of `target`: each is sent, expired, or ends
    /// the round (`stop`). Removes what was delivered or expired.
    private func pass(_ target: NodeName, _ decide: @escaping @Sendable (HintRecord) -> Action) async -> PassOutcome {
        guard let store = env.storage() else { return .failed }
        let prefix = HintRecord.prefix(target)
        let (limit, limits) = (max(env.settings.replayBatch, 1), env.limits)
        let entries: [(key: [UInt8], value: [UInt8])]
        do {
            entries = try await store.foldReadable(partition: .hintSpace, after: prefix, into: []) { acc, key, value in
                guard key.starts(with: prefix) else { return .stop }
                acc.append((key, value))
                return acc.count >= limit ? .stop : .continue
            }.accumulator.filter { $0.key.starts(with: prefix) }
        } catch {
            env.logger.error("hints could not be read", metadata: ["target": "\(target)", "error": "\(error)"])
            return .failed
        }
        if entries.isEmpty {
            // The book said there were some: it was ahead of the store (a failed write). Resync.
            book.withLock { b in b.removed(target, count: b.targets[target]?.count ?? 0, bytes: b.targets[target]?.bytes ?? 0) }
            return .empty
        }
        var remove: [(key: [UInt8], bytes: Int)] = []
        var sends: [(key: [UInt8], bytes: Int, record: HintRecord)] = []
        var expired = 0
        var unreadable = 0
        var oldestLeft: UInt64?
        scan: for e in entries {
            let record: HintRecord
            do { record = try HintRecord(decoding: e.value, limits: limits) } catch {
                unreadable += 1
                remove.append((e.key, e.key.count + e.value.count))
                continue
            }
            switch decide(record) {
            case .expire:
                expired += 1
                remove.append((e.key, e.key.count + e.value.count))
            case .send:
                sends.append((e.key, e.key.count + e.value.count, record))
            case .stop:
                oldestLeft = record.createdMillis
                break scan
            }
        }
        var failed = false
        if !sends.isEmpty {
            let delivered = await deliver(target, sends.map(\.record))
            for (i, s) in sends.enumerated() {
                if delivered[i] { remove.append((s.key, s.bytes)) } else {
                    failed = true
                    oldestLeft = min(oldestLeft ?? s.record.createdMillis, s.record.createdMillis)
                }
            }
            env.metrics.hintsReplayed.increment(by: delivered.count { $0 })
            replayed.withLock { $0[target, default: 0] += UInt64(delivered.count { $0 }) }
        }
        dropped("expired", expired)
        dropped("unreadable", unreadable)
        if !remove.isEmpty {
            do {
                let keys = remove.map(\.key)
                let token = try await store.onExecutor(of: .hintSpace) { try store.delete(partition: .hintSpace, keys: keys) }
                try await store.waitDurable(token)
                book.withLock { $0.removed(target, count: remove.count, bytes: remove.reduce(0) { $0 + $1.bytes }) }
            } catch {
                env.logger.error("replayed hints could not be removed; they are sent again later", metadata: ["error": "\(error)"])
                return .failed
            }
        }
        book.withLock { $0.oldest(target, createdMillis: oldestLeft) }
        if failed { return .failed }
        return entries.count < limit && oldestLeft == nil ? .empty : .progressed
    }

    /// Sends each hint to its destinations (in parallel, paced); true for those every
    /// destination acknowledged.
    private func deliver(_ target: NodeName, _ records: [HintRecord]) async -> [Bool] {
        let ring = env.ring()
        let (transport, ms, limits, me) = (env.transport, env.requestTimeoutMillis, env.limits, env.me)
        return await withTaskGroup(of: (Int, Bool).self) { group in
            for (i, record) in records.enumerated() {
                await pacer.pace(record.object.count + record.key.count)
                await keyPacer.pace(1)
                let replicas = ring?.replicas(of: record.partition) ?? [target]
                let destinations = replicas.contains(target) ? [target] : replicas.filter { $0 != me }
                group.addTask {
                    guard !destinations.isEmpty, let object = try? VersionedObject.decode(record.object, limits: limits) else { return (i, false) }
                    let message = Message.replicaPut(ReplicaPut(partition: record.partition, key: record.key, object: object))
                    let answers = await transport.sendToAll(destinations, message, timeoutMillis: ms)
                    return (i, answers.allSatisfy { if case .success(.replicaPutAck) = $0 { true } else { false } })
                }
            }
            var out = Array(repeating: false, count: records.count)
            for await (i, ok) in group { out[i] = ok }
            return out
        }
    }

    // MARK: Reading

    /// Hints held for `target` now (0 once replayed).
    func pending(for target: NodeName) -> Int { book.withLock { $0.targets[target]?.count ?? 0 } }

    /// Hints held for every target.
    var total: Int { book.withLock { $0.count } }

    /// Hints dropped (not kept, expired or unreadable) since this node started: each is a copy
    /// of a write that only read repair and anti-entropy can now bring to its target.
    var droppedTotal: Int { droppedCount.value }

    /// Counts `n` hints dropped for `reason` (`cairn_hints_dropped_total`).
    private func dropped(_ reason: String, _ n: Int = 1) {
        guard n > 0 else { return }
        droppedCount.withLock { $0 += n }
        env.metrics.hintsDropped.increment(outcome: reason, by: n)
    }

    /// Per target, for `cairn transfers`.
    func status() -> [TargetStatus] {
        let now = env.clock.wallMillis()
        let clockNow = env.clock.now()
        let (targets, busy, done, waits) = (book.withLock { $0.targets }, replaying.value, replayed.value, retry.value)
        return targets.keys.sorted().compactMap { t in
            guard let s = targets[t] else { return nil }
            let state: String
            if busy.contains(t) {
                state = "replaying"
            } else if let w = waits[t], w.at > clockNow {
                state = "backing off"
            } else if env.reachable(t) {
                state = "due"
            } else {
                state = "waiting for the target"
            }
            return TargetStatus(target: t, hints: s.count, bytes: s.bytes,
                                oldestSeconds: s.oldestMillis.map { Double(Self.minus(now, $0)) / 1000 }, state: state,
                                replayed: done[t] ?? 0)
        }
    }

    private static func minus(_ a: UInt64, _ b: UInt64) -> UInt64 { a > b ? a - b : 0 }

    private func publish() {
        let (count, bytes, oldest) = book.withLock { ($0.count, $0.bytes, $0.oldestMillis) }
        env.metrics.hintsHeld.record(count)
        env.metrics.hintsBytes.record(bytes)
        let age = oldest.map { Double(Self.minus(env.clock.wallMillis(), $0)) / 1000 } ?? 0
        env.metrics.hintsOldestSeconds.record(age)
    }
}
