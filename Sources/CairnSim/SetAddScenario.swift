public import CairnNode
public import CairnCore
public import CairnStorage
import CairnWire
import CairnClient
import CairnTorture
import CairnAntiEntropy
import Logging
import Synchronization

/// One simulated run of the set-add workload (the one cairn-torture uses) on real nodes with the
/// real storage engine on fault-injecting in-memory disks: clients read a key at R=quorum, take
/// the union of its siblings, add a unique element and write it back with the read's context at
/// W=quorum, while a nemesis drawn from the seed injects the chosen faults. After the faults heal,
/// every node is up again and a quiet period has passed, every key is read at R=all and checked:
/// no acknowledged element lost, no element of a write that certainly was not applied visible,
/// nothing that was never written. The last two are also checked on every client read while the
/// faults run.
public struct SetAddScenario: Sendable {
    public var nodes = 5
    public var clients = 8
    public var keys = 4
    /// Virtual time the clients run (the quiet period and final reads come after).
    public var duration: Duration = .seconds(30)
    /// Every fault but the ring changes, which are opted into (`Fault.membership`).
    public var faults: Set<Fault> = Fault.standard
    /// Makes one node acknowledge writes it drops (every tenth): the checker must catch it.
    public var selfTest = false

    /// What the nemesis may do.
    public enum Fault: String, Sendable, CaseIterable {
        /// What a run injects unless told otherwise: every fault, ring changes included.
        public static var standard: Set<Fault> { Set(allCases) }

        /// A message (request or reply) is lost (2% each).
        case loss
        /// Every message is delayed 0.1–40 ms (so messages are reordered).
        case delay
        /// A request is delivered twice (2%).
        case dup
        /// A link is cut both ways or one way, a node's connections are refused, the cluster is
        /// split in two, or split with one node bridging both sides.
        case partition
        /// A node loses power: its disk keeps what was synced (and a torn prefix of the rest);
        /// it restarts 0.5–5 s later.
        case crash
        /// A node shuts down gracefully (drains) and starts again.
        case restart
        /// A node crashes and comes back with an empty disk under its name: a lost copy. The
        /// nemesis takes a copy (disk-wipe, corrupt-table, remove) only while every earlier lost
        /// copy is repaired, as a careful operator replaces a disk: a full round of exchanges on
        /// every node since, all of them up, no transfer running, no hint dropped since. Two lost
        /// copies of a write acknowledged at W = 2 lose it for real.
        case diskWipe = "disk-wipe"
        /// A node stops gracefully, two bits flip in one of its tables, and it starts again: it
        /// must find the damage, set the table aside, keep serving, and refill what the damage
        /// hid from the other replicas. A lost copy, as disk-wipe.
        case corruptTable = "corrupt-table"
        /// In half the runs (drawn from the seed) hints expire after 3 s (`hints.max_age`): a
        /// replica down or cut off longer catches up through anti-entropy only, and one down
        /// longer restarts stale (refilling every partition).
        case hintExpiry = "hint-expiry"
        /// A node's wall clock jumps by up to ±10 minutes (write timestamps must decide nothing).
        case clockSkew = "clock-skew"
        /// A node stops (SIGSTOP) for 0.2–4 s: none of its code runs (requests, timers, disk
        /// work); what reached it meanwhile is handled when it continues.
        case pause
        /// A fresh node that knows only `cluster.seeds` starts, stages its join (`cluster join`
        /// on it), and the claimant plans and commits it: partitions hand off to it.
        case join
        /// A valid member's leave is staged, planned and committed: it hands its partitions off
        /// and exits.
        case leave
        /// A member loses power for good and its removal is staged, planned and committed: no
        /// handoff from it; its partitions are rebuilt from the other replicas. A lost copy,
        /// as disk-wipe.
        case remove
    }

    /// The faults that change the ring (one plan at a time; the cluster keeps >= N serving members).
    static let membershipFaults: Set<Fault> = [.join, .leave, .remove]

    public init() {}

    public struct Report: Sendable {
        public var seed: UInt64
        public var trace: [String]
        public var violations: [String]
        public var simulated: Duration
        public var acknowledged: Int
        public var unknown: Int
        public var refused: Int
        /// Faults the nemesis injected, by kind.
        public var injected: [String: Int]

        /// FNV-1a over the trace: the same seed gives the same value in every process.
        public var traceHash: String {
            var h: UInt64 = 0xcbf2_9ce4_8422_2325
            for line in trace {
                for b in line.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
                h = (h ^ 0x0a) &* 0x100_0000_01b3
            }
            let hex = String(h, radix: 16)
            return String(repeating: "0", count: 16 - hex.count) + hex
        }
    }

    /// Runs the scenario for `seed`. A simulation that stopped (stuck: everyone waits for
    /// something that cannot happen; or past its time limit) is a violation too; its report
    /// holds the trace up to there.
    public func run(seed: UInt64) -> Report {
        let clock = ManualClock()
        let executor = SimulationExecutor(seed: seed)
        let network = InMemoryNetwork(clock: clock, seed: seed ^ 0x5eed, faults: networkFaults, executor: executor)
        let scenario = self
        let limit = duration + .seconds(600)
        let log = Recorder(clock: clock)
        do {
            return try simulate(on: executor, clock: clock, limit: limit) {
                await scenario.body(seed: seed, log: log, network: network, executor: executor)
            }
        } catch {
            return log.report(seed: seed, violations: ["the simulation stopped: \(error)"])
        }
    }

    private var networkFaults: InMemoryNetwork.Faults {
        var f = InMemoryNetwork.Faults()
        if faults.contains(.loss) { f.loss = 0.02 }
        if faults.contains(.dup) { f.duplication = 0.02 }
        if faults.contains(.delay) { f.delay = .microseconds(100) ... .milliseconds(40) }
        return f
    }

    struct Log: Sendable {
        var trace: [String] = []
        /// Every add attempted, as its client was told (cairn-torture's record and checker).
        var attempts: [Attempt] = []
        /// The faults in force now, each with when it began (ms of virtual time).
        var active: [String: Int64] = [:]
        /// The faults in force when each attempted element's write began.
        var faultsAt: [UInt64: String] = [:]
        var injected: [String: Int] = [:]
        /// Elements whose write certainly was not applied (never to be seen by anyone).
        var failed: Set<UInt64> = []
        /// Keys written once and then deleted, both acknowledged: they must read as absent at
        /// the end, on every replica (a tombstone collected too early brings them back).
        var deleted: [String] = []
        /// What each delete superseded: the context of the write it followed.
        var deletedContexts: [String: VersionVector] = [:]
        /// Violations seen while the clients ran (at most `maxContinuous`).
        var continuous: [String] = []
        var continuousCount = 0
    }

    /// Violations the continuous check keeps word for (it counts all).
    static let maxContinuous = 20

    /// The run's record, shared by its tasks.
    final class Recorder: Sendable {
        private let log = Mutex(Log())
        let clock: ManualClock
        init(clock: ManualClock) { self.clock = clock }
        func note(_ line: String) {
            let at = clock.elapsed.milliseconds
            log.withLock { $0.trace.append("\(at) \(line)") }
        }
        /// A fault begins (`kind` counts it) or, with `ended`, ends.
        func fault(_ what: String, kind: String? = nil, ended: Bool = false) {
            let at = clock.elapsed.milliseconds
            log.withLock { l in
                l.trace.append("\(at) \(ended ? "end" : "fault") \(what)")
                if ended { l.active[what] = nil } else { l.active[what] = at }
                if let kind { l.injected[kind, default: 0] += 1 }
            }
        }
        func endAll(_ prefix: String) {
            log.withLock { l in l.active = l.active.filter { !$0.key.hasPrefix(prefix) } }
        }
        func starting(_ element: UInt64) {
            log.withLock { l in
                l.faultsAt[element] = l.active.isEmpty ? "none" : l.active.sorted { ($0.value, $0.key) < ($1.value, $1.key) }
                    .map { "\($0.key) (since \($0.value) ms)" }.joined(separator: ", ")
            }
        }
        func update(_ body: (inout Log) -> Void) { log.withLock { body(&$0) } }
        var current: Log { log.withLock { $0 } }

        /// The continuous check, on every client read: each element seen must belong to an add
        /// that started, and none to an add that certainly was not applied.
        func observe(_ elements: Set<UInt64>, key: String) {
            let at = clock.elapsed.milliseconds
            log.withLock { l in
                for e in elements.sorted() {
                    let why: String? = l.faultsAt[e] == nil ? "phantom \(e)" : l.failed.contains(e) ? "\(e) visible though certainly not applied" : nil
                    guard let why else { continue }
                    l.continuousCount += 1
                    if l.continuous.count < SetAddScenario.maxContinuous { l.continuous.append("\(key): \(why) (a client read at \(at) ms)") }
                }
            }
        }

        func report(seed: UInt64, violations: [String]) -> Report {
            let l = current
            func count(_ matches: (AttemptOutcome) -> Bool) -> Int { l.attempts.count { matches($0.outcome) } }
            return Report(seed: seed, trace: l.trace, violations: violations, simulated: clock.elapsed,
                          acknowledged: count { $0 == .ok },
                          unknown: count { if case .unknown = $0 { true } else { false } },
                          refused: count { if case .failed = $0 { true } else { false } },
                          injected: l.injected)
        }
    }

    private func body(seed: UInt64, log: Recorder, network: InMemoryNetwork, executor: SimulationExecutor) async -> Report {
        let clock = log.clock
        let note = log.note
        var violations: [String] = []
        var settings = SimulatedCluster.Settings()
        if selfTest { settings.decorate = { i, b in i == 0 ? AcknowledgesAndDrops(b) : b } }
        var coin = SplitMix64(seed: seed ^ 0x41e7)
        if faults.contains(.hintExpiry), coin.next(below: 2) == 0 {
            settings.hintMaxAge = .seconds(3)
            note("hints expire after 3 s")
        }
        do {
            let cluster = try SimulatedCluster(count: nodes, clock: clock, network: network, executor: executor, seed: seed, settings: settings)
            for i in 0..<cluster.count { try await cluster.start(i) }
            note("serving")
            let end = clock.now().advanced(by: duration)
            try await withThrowingTaskGroup(of: Void.self) { group in
                let nemesis = Nemesis(cluster: cluster, faults: faults, log: log, seed: seed)
                if nemesis.hasWork { group.addTask { try await nemesis.run(until: end) } }
                await withTaskGroup(of: Void.self) { clientsGroup in
                    for c in 0..<clients {
                        clientsGroup.addTask {
                            var rng = SplitMix64(seed: seed &+ UInt64(c) &* 0x9e37)
                            var n: UInt64 = 0
                            while clock.now() < end {
                                let key = Int(rng.next(below: UInt64(keys)))
                                let present = cluster.present
                                let i = present[Int(rng.next(below: UInt64(max(present.count, 1)))) % max(present.count, 1)]
                                n += 1
                                let element = UInt64(c + 1) << 40 | n
                                let start = clock.elapsed.milliseconds
                                log.starting(element)
                                if let node = cluster.node(i), let outcome = await Self.add(element, to: key, via: node, network: network,
                                                                                            observe: { log.observe($0, key: Self.keyName(key)) }) {
                                    let attempt = Attempt(client: c, key: Self.keyName(key), element: element, startMillis: Int(start),
                                                          endMillis: Int(clock.elapsed.milliseconds), outcome: outcome)
                                    log.update { l in
                                        l.attempts.append(attempt)
                                        if case .failed = outcome { l.failed.insert(element) }
                                    }
                                    note("\(node.config.name) add \(element) to \(attempt.key): \(outcome)")
                                }
                                try? await clock.sleep(for: .milliseconds(Int64(rng.next(below: 50))))
                            }
                        }
                    }
                    // One more client writes keys once and deletes them with the write's context,
                    // through one of the key's primaries: a put forwarded to a coordinator could
                    // be duplicated by the network (`dup`), and a late copy is a new write made
                    // without seeing the delete (a sibling, rightly), not a resurrection.
                    clientsGroup.addTask {
                        var rng = SplitMix64(seed: seed ^ 0xde1e7e)
                        var n = 0
                        while clock.now() < end {
                            let present = cluster.present.filter { cluster.isUp($0) }
                            n += 1
                            let key = Array("gone-\(n)".utf8)
                            let any = present.isEmpty ? nil : cluster.node(present[Int(rng.next(below: UInt64(present.count)))])
                            let primaries = any?.replicas(ofKey: key) ?? []
                            let coordinator = present.compactMap { cluster.node($0) }.first { primaries.contains($0.config.name) }
                            if let node = coordinator, let (key, covered) = await Self.writeThenDelete(n, via: node) {
                                log.update {
                                    $0.deleted.append(key)
                                    $0.deletedContexts[key] = covered
                                }
                                note("\(node.config.name) wrote and deleted \(key)")
                            }
                            try? await clock.sleep(for: .milliseconds(Int64(100 + rng.next(below: 200))))
                        }
                    }
                }
                try await group.waitForAll()
                // Quiet period: every fault off, every node up, in-flight work settles.
                try await nemesis.healEverything()
                let membership = !faults.isDisjoint(with: Self.membershipFaults)
                if membership { violations += await Self.settle(cluster, log: log) }
                try await clock.sleep(for: .seconds(5))
                // Before the final reads (which repair): hints and fallback copies alone must have
                // brought every primary every acknowledged add, unless a copy was lost or a hint
                // dropped: then anti-entropy must.
                let dropped = cluster.hintsDropped
                if dropped > 0 {
                    log.update { $0.injected["hint-expiry", default: 0] += dropped }
                    note("\(dropped) hints dropped")
                }
                let lossy = nemesis.lostAny || dropped > 0
                let catchUp = await Self.checkPrimaries(cluster, keys: keys, attempts: log.current.attempts, lossy: lossy)
                violations += catchUp.violations
                for n in catchUp.notes { note(n) }
                // Then anti-entropy: after one round of exchanges every replica of every key
                // holds the same object (a wiped one refilled), and every primary every add.
                let converged = await Self.checkReplicasAgree(cluster, keys: keys, note: note)
                violations += converged
                if lossy, converged.isEmpty {
                    violations += await Self.checkPrimaries(cluster, keys: keys, attempts: log.current.attempts, lossy: false).violations
                }
                var finals: [String: FinalRead] = [:]
                let readers = cluster.present.filter { cluster.isUp($0) }
                for key in 0..<keys where !readers.isEmpty {
                    guard let node = cluster.node(readers[key % readers.count]) else { continue }
                    let read = await Self.readAll(key, via: node)
                    finals[Self.keyName(key)] = read
                    if case .elements(let e) = read { note("final \(Self.keyName(key)): \(e.count) elements") }
                }
                let current = log.current
                violations += await Self.checkDeleted(cluster, keys: current.deleted, covered: current.deletedContexts, note: note)
                violations += current.continuous
                if current.continuousCount > current.continuous.count {
                    violations.append("\(current.continuousCount - current.continuous.count) more violations seen by client reads")
                }
                func faultsWhen(_ element: UInt64) -> String { current.faultsAt[element].map { "; faults when it was written: \($0)" } ?? "" }
                let result = CheckResult.check(attempts: current.attempts, finals: finals)
                violations += result.lost.map { "\($0.key): acknowledged \($0.element) lost\(faultsWhen($0.element))" }
                violations += result.failedButPresent.map { "\($0.key): \($0.element) visible though certainly not applied\(faultsWhen($0.element))" }
                violations += result.phantom.map { "\($0.key): phantom \($0.element)" }
                violations += result.unreadable.sorted { $0.key < $1.key }.map { "\($0.key): the final read at R=all failed: \($0.value)" }
                if membership {
                    // Read repair of the final reads lands first.
                    try await clock.sleep(for: .seconds(2))
                    let placement = await Self.checkPlacement(cluster, bound: settings.transferTimeout, oldest: nemesis.oldestTransfer,
                                                              lostCopy: nemesis.lostAny)
                    violations += placement.violations
                    for n in placement.notes { note(n) }
                }
                // A drain waits on the clock: the simulation moves it.
                await cluster.shutdown()
            }
        } catch {
            violations.append("run failed: \(error)")
        }
        return log.report(seed: seed, violations: violations)
    }

    /// Injects the chosen node and link faults at random times (drawn from the seed) until the
    /// clients stop, undoing each after a while; `healEverything` ends them all.
    private final class Nemesis: Sendable {
        private struct State {
            var rng: SplitMix64
            /// Undo actions due at an instant, in order.
            var due: [(at: ContinuousClock.Instant, index: Int, action: Undo)] = []
            /// Whether any node lost a copy (disk-wipe, corrupt-table, remove) in the run.
            var lostAny = false
            /// The node whose lost copy no full repair has restored yet.
            var unrepaired: Int?
            /// Hints dropped cluster-wide when the last full repair began.
            var droppedAtRepair = 0
            var sequence = 0
            /// The oldest transfer age sampled while the faults ran, and where.
            var oldest: (age: Duration, what: String)?
        }
        enum Undo: Sendable {
            case restart(Int)
            case resume(Int)
        }
        let cluster: SimulatedCluster
        let faults: Set<Fault>
        let log: Recorder
        private let state: Mutex<State>
        /// The node faults in play (network faults are the network's).
        private let kinds: [Fault]

        init(cluster: SimulatedCluster, faults: Set<Fault>, log: Recorder, seed: UInt64) {
            self.cluster = cluster
            self.faults = faults
            self.log = log
            state = Mutex(State(rng: SplitMix64(seed: seed ^ 0xfa17)))
            kinds = Fault.allCases.filter { faults.contains($0) && ![.loss, .delay, .dup, .hintExpiry].contains($0) }
        }

        var hasWork: Bool { !kinds.isEmpty }

        private func draw(_ n: UInt64) -> UInt64 { state.withLock { $0.rng.next(below: n) } }

        /// `items` in an order drawn from the seed (Fisher–Yates).
        private func shuffled(_ items: [Int]) -> [Int] {
            var out = items
            for k in stride(from: out.count - 1, to: 0, by: -1) { out.swapAt(k, Int(draw(UInt64(k + 1)))) }
            return out
        }
        private var name: (Int) -> String { { self.cluster.names[$0].value } }

        /// The oldest transfer age seen by `sampleTransfers`.
        var oldestTransfer: (age: Duration, what: String)? { state.withLock { $0.oldest } }
        /// Whether a node lost a copy (disk-wipe, corrupt-table, remove) during the run.
        var lostAny: Bool { state.withLock { $0.lostAny } }

        /// Whether `n(i+1)` may lose its copy now; if so, records that it did. Yes while no other
        /// node's lost copy is unrepaired and no hint was dropped since the last full repair
        /// (a dropped hint may have left one copy of a write); otherwise only after a full repair
        /// (`fullRepair`) succeeds now.
        private func mayLoseCopy(_ i: Int) async -> Bool {
            let dropped = cluster.hintsDropped
            let ready = state.withLock { s in (s.unrepaired == nil || s.unrepaired == i) && s.droppedAtRepair == dropped }
            var allowed = ready
            if !allowed { allowed = await fullRepair() }
            guard allowed else {
                log.note("\(name(i)) keeps its copy: an earlier lost copy or dropped hint is not repaired yet")
                return false
            }
            state.withLock { s in
                s.lostAny = true
                s.unrepaired = i
            }
            return true
        }

        /// A round of exchanges on every node (`repairNow`), as an operator runs `cairn repair`
        /// everywhere before replacing a disk. Counts only if every present node is up and
        /// running, no ring change or transfer is under way, every partition was exchanged with
        /// every other replica without a failure, and no hint was dropped meanwhile: then every
        /// write acknowledged before it began is on every primary again.
        private func fullRepair() async -> Bool {
            let nodes = cluster.present
            if let i = nodes.first(where: { !cluster.isUp($0) || cluster.isPaused($0) }) {
                log.note("no full repair: \(name(i)) is down or paused")
                return false
            }
            for i in nodes {
                guard let p = await cluster.node(i)?.placement(), !p.planInProgress, p.staged == 0, p.pendingTransfers == 0, p.running.isEmpty else {
                    log.note("no full repair: a ring change or transfer is under way (seen on \(name(i)))")
                    return false
                }
            }
            let dropped = cluster.hintsDropped
            var exchanges = 0
            for i in nodes {
                guard let node = cluster.node(i) else { return false }
                // Lost messages fail an exchange now and then: the partitions that failed are
                // repaired again, as an operator reruns `cairn repair --partition`, up to 5 times.
                var r = await node.repairNow()
                exchanges += r.exchanges
                for _ in 0..<5 where !r.failed.isEmpty && r.skipped == 0 {
                    r = await node.repairNow(partitions: r.failed)
                    exchanges += r.exchanges
                }
                guard r.failed.isEmpty, r.skipped == 0, cluster.isUp(i) else {
                    log.note("full repair incomplete on \(name(i)): partitions \(r.failed.map(\.index)) failed, \(r.skipped) skipped")
                    return false
                }
            }
            guard cluster.hintsDropped == dropped else { return false }
            state.withLock { s in
                s.unrepaired = nil
                s.droppedAtRepair = dropped
            }
            log.note("full repair: \(exchanges) exchanges on \(nodes.count) nodes")
            return true
        }

        /// Records the age of the oldest transfer running on any node now.
        func sampleTransfers() async {
            for i in cluster.present where cluster.isUp(i) {
                guard let node = cluster.node(i) else { continue }
                for t in await node.runningTransfers() {
                    let what = "partition \(t.partition) \(t.from)→\(t.to) (sampled on \(node.config.name))"
                    state.withLock { s in if s.oldest.map({ t.age > $0.age }) ?? true { s.oldest = (t.age, what) } }
                }
            }
        }

        func run(until end: ContinuousClock.Instant) async throws {
            let clock = cluster.clock
            while clock.now() < end {
                try await clock.sleep(for: .milliseconds(300 + Int64(draw(1700))))
                if kinds.contains(where: { SetAddScenario.membershipFaults.contains($0) }) { await sampleTransfers() }
                try await undoDue()
                guard clock.now() < end else { break }
                try await act(kinds[Int(draw(UInt64(kinds.count)))])
            }
            // Clients may wait on a paused node: the faults end when the clients' time does.
            try await healEverything()
        }

        private func schedule(after: Duration, _ undo: Undo) {
            let at = cluster.clock.now().advanced(by: after)
            state.withLock { s in
                s.sequence += 1
                s.due.append((at, s.sequence, undo))
            }
        }

        private func undoDue() async throws {
            let now = cluster.clock.now()
            let ready = state.withLock { s in
                let r = s.due.filter { $0.at <= now }.sorted { ($0.at, $0.index) < ($1.at, $1.index) }
                s.due.removeAll { $0.at <= now }
                return r
            }
            for r in ready { try await undo(r.action) }
        }

        private func undo(_ u: Undo) async throws {
            switch u {
            case .restart(let i):
                guard !cluster.isUp(i) else { return }
                try await cluster.start(i)
                log.fault("down \(name(i))", ended: true)
                log.note("restarted \(name(i)), epoch \(cluster.node(i)?.actorID.map { "\($0.epoch)" } ?? "?")")
            case .resume(let i):
                cluster.resume(i)
                log.fault("pause \(name(i))", ended: true)
            }
        }

        /// At most one node down at a time beyond what the clients can live with: N=3 and
        /// W=quorum tolerate one replica down per key.
        private var anyDown: Bool { cluster.present.contains { !cluster.isUp($0) } }

        private func act(_ fault: Fault) async throws {
            let network = cluster.network
            let i = Int(draw(UInt64(cluster.count)))
            if SetAddScenario.membershipFaults.contains(fault) { return try await change(fault) }
            let n = cluster.names[i]
            switch fault {
            case .partition:
                let j = Int(draw(UInt64(cluster.count)))
                let roll = draw(6)
                if roll >= 4 {
                    // Split the cluster in two halves (drawn); with roll 5 node i bridges them:
                    // it reaches both sides, which do not reach each other.
                    let order = shuffled(Array(0..<cluster.count))
                    let bridge: Int? = roll == 5 ? i : nil
                    let rest = order.filter { $0 != bridge }
                    let cutAt = 1 + Int(draw(UInt64(max(rest.count - 1, 1))))
                    let (left, right) = (Array(rest[..<cutAt]), Array(rest[cutAt...]))
                    for a in left {
                        for b in right {
                            network.cut(from: cluster.names[a], to: cluster.names[b])
                            network.cut(from: cluster.names[b], to: cluster.names[a])
                        }
                    }
                    let names = cluster.names
                    let side = { (g: [Int]) in g.sorted().map { names[$0].value }.joined(separator: ",") }
                    log.fault("split \(side(left)) | \(side(right))\(bridge.map { " bridged by \(cluster.names[$0])" } ?? "")", kind: "partition")
                } else if roll == 0 || i == j {
                    network.heal()
                    log.endAll("cut ")
                    log.endAll("split ")
                    log.endAll("refuse ")
                    log.endAll("pause ")
                    log.note("heal")
                } else if roll == 1 {
                    network.refuse(n)
                    log.fault("refuse \(n)", kind: "partition")
                } else if roll == 2 {
                    network.cut(from: n, to: cluster.names[j])
                    log.fault("cut \(n)->\(cluster.names[j])", kind: "partition")
                } else {
                    network.cut(from: n, to: cluster.names[j])
                    network.cut(from: cluster.names[j], to: n)
                    log.fault("cut \(n)<->\(cluster.names[j])", kind: "partition")
                }
            case .crash, .diskWipe:
                guard !anyDown, cluster.isUp(i) else { return }
                let wipe = fault == .diskWipe
                if wipe { guard await mayLoseCopy(i), cluster.isUp(i), !anyDown else { return } }
                var rng = SplitMix64(seed: draw(UInt64.max))
                if cluster.isPaused(i) { log.fault("pause \(n)", ended: true) }
                await cluster.crash(i, tearing: true, rng: &rng)
                if wipe { cluster.wipe(i) }
                log.fault("down \(n)", kind: fault.rawValue)
                log.note(wipe ? "crashed \(n) and wiped its disk" : "crashed \(n) (power cut)")
                schedule(after: .milliseconds(500 + Int64(draw(4500))), .restart(i))
            case .corruptTable:
                guard !anyDown, cluster.isUp(i), await mayLoseCopy(i), cluster.isUp(i), !anyDown else { return }
                log.fault("corrupt \(n)", kind: fault.rawValue)
                if cluster.isPaused(i) { log.fault("pause \(n)", ended: true) }
                // A clean stop writes the memtable into a table first.
                cluster.node(i)?.shutdown()
                await cluster.stopped(i)
                var rng = SplitMix64(seed: draw(UInt64.max))
                if let t = cluster.corruptTable(i, rng: &rng) {
                    log.note("flipped 2 bits of \(t.path) (\(t.bytes) bytes)")
                } else {
                    log.note("\(n) has no table to corrupt")
                }
                try await cluster.start(i)
                log.fault("corrupt \(n)", ended: true)
            case .restart:
                guard !anyDown, cluster.isUp(i) else { return }
                log.fault("restart \(n)", kind: fault.rawValue)
                if cluster.isPaused(i) { log.fault("pause \(n)", ended: true) }
                cluster.node(i)?.shutdown()
                await cluster.stopped(i)
                try await cluster.start(i)
                log.fault("restart \(n)", ended: true)
            case .clockSkew:
                let millis = Int64(draw(1_200_000)) - 600_000
                cluster.setSkew(i, millis: millis)
                log.fault("skew \(n) \(millis) ms", kind: fault.rawValue)
            case .pause:
                guard cluster.isUp(i), !cluster.isPaused(i) else { return }
                cluster.pause(i)
                log.fault("pause \(n)", kind: fault.rawValue)
                schedule(after: .milliseconds(200 + Int64(draw(3800))), .resume(i))
            case .loss, .delay, .dup, .hintExpiry, .join, .leave, .remove:
                return
            }
        }

        // MARK: Membership changes

        /// Members up and serving with status `valid` in the claimant's ring, and the claimant's
        /// snapshot (nil when no member answers).
        private func ringNow() async -> (claimant: Int, snapshot: PlacementSnapshot)? {
            for i in cluster.present where cluster.isUp(i) && !cluster.isPaused(i) {
                guard let snap = await cluster.node(i)?.placement(), let c = snap.claimant,
                      let ci = cluster.present.first(where: { cluster.names[$0] == c }), cluster.isUp(ci), !cluster.isPaused(ci),
                      let claimantSnap = await cluster.node(ci)?.placement() else { continue }
                return (ci, claimantSnap)
            }
            return nil
        }

        /// Sends an admin verb to `n(i+1)` up to `tries` times (a claimant behind a cut or a lost
        /// reply fails one); the reply's text, or why it failed.
        private func admin(_ i: Int, _ verb: String, _ arguments: [String] = [], tries: Int = 3) async throws -> Result<String, AdminError> {
            var last = AdminError(message: "not sent")
            for attempt in 0..<tries {
                if attempt > 0 { try await cluster.clock.sleep(for: .milliseconds(500)) }
                guard let node = cluster.node(i) else { break }
                switch await SetAddScenario.admin(node, verb, arguments) {
                case .success(let text): return .success(text)
                case .failure(let e): last = e
                }
            }
            return .failure(last)
        }

        /// One ring change (join, leave or remove) through the real admin path, staged, planned
        /// and committed; only while no plan is in progress or staged, and never leaving fewer
        /// than N = 3 valid members (nor more than the scenario's node count + 2).
        private func change(_ fault: Fault) async throws {
            guard let (claimant, snap) = await ringNow(), !snap.planInProgress else { return }
            if snap.staged > 0 {
                // A commit that failed earlier: commit what is staged first.
                return await planAndCommit(via: claimant)
            }
            let valid = snap.members.filter { $0.status == "valid" }.compactMap { m in cluster.present.first { cluster.names[$0] == m.name } }
            let up = valid.filter { cluster.isUp($0) && !cluster.isPaused($0) }
            let via = up.isEmpty ? claimant : up[Int(draw(UInt64(up.count)))]
            switch fault {
            case .join:
                guard valid.count < snap.nVal + 5 else { return }
                let seeds = up.prefix(3).map { cluster.address($0) }
                guard !seeds.isEmpty else { return }
                let j = try cluster.add(seeds: Array(seeds))
                try await cluster.start(j)
                log.fault("join \(name(j))", kind: fault.rawValue)
                log.fault("join \(name(j))", ended: true)
                switch try await admin(j, "join") {
                case .success: log.note("\(name(j)) staged its join through \(seeds.map(\.description).joined(separator: ","))")
                case .failure(let e):
                    // Staged or not, it keeps running: a staged join is committed (later, or at
                    // the end), which it learns by gossip; an unstaged one is retried at the end.
                    log.note("\(name(j)) could not stage its join: \(e.message)")
                }
                await planAndCommit(via: via)
            case .leave:
                guard up.count > snap.nVal else { return }
                let i = up[Int(draw(UInt64(up.count)))]
                log.fault("leave \(name(i))", kind: fault.rawValue)
                log.fault("leave \(name(i))", ended: true)
                switch try await admin(via, "leave", [name(i)]) {
                case .success: await planAndCommit(via: via)
                case .failure(let e): log.note("could not stage \(name(i))'s leave: \(e.message)")
                }
            case .remove:
                guard !anyDown, up.count > snap.nVal else { return }
                let candidates = up.filter { $0 != claimant && $0 != via }
                guard !candidates.isEmpty else { return }
                let i = candidates[Int(draw(UInt64(candidates.count)))]
                guard await mayLoseCopy(i), !anyDown, cluster.isUp(i) else { return }
                var rng = SplitMix64(seed: draw(UInt64.max))
                if cluster.isPaused(i) { log.fault("pause \(name(i))", ended: true) }
                await cluster.crash(i, tearing: true, rng: &rng)
                log.fault("remove \(name(i))", kind: fault.rawValue)
                log.note("crashed \(name(i)) for good (power cut)")
                switch try await admin(via, "remove", [name(i)]) {
                case .success:
                    cluster.retire(i)
                    log.fault("remove \(name(i))", ended: true)
                    await planAndCommit(via: via)
                case .failure(let e):
                    // Not staged: it comes back, as after a crash.
                    log.note("could not stage \(name(i))'s removal: \(e.message); restarting it")
                    try await cluster.start(i)
                    log.fault("remove \(name(i))", ended: true)
                }
            default:
                return
            }
        }

        /// `cluster plan` then `cluster commit` on `n(via+1)` (forwarded to the claimant).
        private func planAndCommit(via: Int) async {
            do {
                switch try await admin(via, "plan") {
                case .success(let plan): log.note("plan: \(plan.prefix(160))")
                case .failure(let e): log.note("plan failed: \(e.message)")
                }
                switch try await admin(via, "commit") {
                case .success(let text): log.note("committed: \(text)")
                case .failure(let e): log.note("commit failed (left staged): \(e.message)")
                }
            } catch {
                log.note("plan and commit interrupted: \(error)")
            }
        }

        /// Ends every fault: heals the network, resumes paused nodes, restarts every node that
        /// is down, takes the network faults off.
        func healEverything() async throws {
            let network = cluster.network
            network.heal()
            network.setFaults(InMemoryNetwork.Faults())
            for i in 0..<cluster.count { cluster.resume(i) }
            state.withLock { $0.due = [] }
            for i in cluster.present where !cluster.isUp(i) {
                try await cluster.start(i)
                log.note("restarted \(name(i)) (end)")
            }
            log.endAll("")
            log.note("healed")
        }
    }

    static func keyName(_ key: Int) -> String { "k\(key)" }

    struct AdminError: Error, Sendable { var message: String }

    /// One admin verb (`cairn cluster ...`) answered by `node` as a client would send it.
    static func admin(_ node: CairnNode, _ verb: String, _ arguments: [String] = []) async -> Result<String, AdminError> {
        switch await node.answer(.admin(AdminRequest(verb: verb, arguments: arguments))) {
        case .adminReply(let bytes): return .success(String(decoding: bytes, as: UTF8.self))
        case .clusterState: return .success("(a ring state)")
        case .error(let e): return .failure(AdminError(message: e.message))
        case let other: return .failure(AdminError(message: "unexpected reply \(other.type)"))
        }
    }

    /// After the faults healed: waits (at most 120 s of virtual time) until every member up
    /// holds the same ring with no plan in progress, nothing staged (a change left staged is
    /// committed here), and no member but those up (leavers exited and forgotten). Violations
    /// if it does not get there.
    static func settle(_ cluster: SimulatedCluster, log: Recorder) async -> [String] {
        let clock = cluster.clock
        let deadline = clock.now() + .seconds(120)
        var last = "no member answered"
        while clock.now() < deadline {
            let up = cluster.present.filter { cluster.isUp($0) }
            var snaps: [(Int, PlacementSnapshot)] = []
            for i in up { if let s = await cluster.node(i)?.placement() { snaps.append((i, s)) } }
            for (i, s) in snaps where s.ringVersion == 0 || !s.members.contains(where: { $0.name == cluster.names[i] }) {
                // A node whose join never reached the claimant, or was lost with the losing side
                // of a claimant fork (Docs/cluster-state.md §2): stage it again, as an operator
                // who reads `cluster status` would.
                guard let n = cluster.node(i) else { continue }
                if case .success = await admin(n, "join") { log.note("\(n.config.name) staged its join (end)") }
            }
            let names = Set(up.map { cluster.names[$0] })
            let versions = Set(snaps.map(\.1.ringVersion))
            if let c = snaps.first?.1.claimant, let ci = up.first(where: { cluster.names[$0] == c }), let claimant = cluster.node(ci),
               let cs = await claimant.placement(), cs.staged > 0, !cs.planInProgress {
                if case .failure(let e) = await admin(claimant, "commit") { last = "committing what was left staged failed: \(e.message)" }
                else { log.note("committed the change left staged") }
            }
            let members = Set(snaps.first?.1.members.map(\.name) ?? [])
            if versions.count == 1, let s = snaps.first?.1, !s.planInProgress, s.staged == 0, members == names,
               s.members.allSatisfy({ $0.status == "valid" }) {
                log.note("ring settled: version \(s.ringVersion), members \(members.map(\.value).sorted().joined(separator: ","))")
                return []
            }
            let byVersion = Dictionary(grouping: snaps, by: \.1.ringVersion).sorted { $0.key < $1.key }
                .map { v, ns in "v\(v): \(ns.map { cluster.names[$0.0].value }.joined(separator: ","))" }.joined(separator: "; ")
            last = "ring versions \(byVersion); up \(names.map(\.value).sorted()); ring members "
                + (snaps.first?.1.members.map { "\($0.name)(\($0.status))" }.joined(separator: ",") ?? "none")
                + "; plan in progress \(snaps.first?.1.planInProgress ?? false) with \(snaps.first?.1.pendingTransfers ?? 0) pending transfers"
                + "; staged \(snaps.first?.1.staged ?? 0)"
            try? await clock.sleep(for: .milliseconds(500))
        }
        return ["the ring did not settle within 120 s after the faults healed: \(last)"]
    }

    /// Catch-up without anti-entropy: waits (at most 60 s of virtual time) until no up node holds
    /// a hint or a fallback copy, then reads each key's primaries' own copies
    /// (`CairnNode.localCopy`): each must hold every acknowledged add (`CheckResult.primaryGaps`).
    /// With `lossy` (a copy was lost, or a hint dropped) the gaps are notes: anti-entropy fills them.
    static func checkPrimaries(_ cluster: SimulatedCluster, keys: Int, attempts: [Attempt], lossy: Bool) async -> (violations: [String], notes: [String]) {
        let clock = cluster.clock
        let nodes = cluster.present.filter { cluster.isUp($0) }.compactMap { cluster.node($0) }
        var out: [String] = []
        let deadline = clock.now() + .seconds(60)
        while true {
            let pending = nodes.filter { $0.pendingCatchUp.hints + $0.pendingCatchUp.fallbackCopies > 0 }
            if pending.isEmpty { break }
            guard clock.now() < deadline else {
                out.append("hints or fallback copies still pending 60 s after the quiet period: "
                           + pending.map { "\($0.config.name) \($0.pendingCatchUp)" }.joined(separator: ", "))
                break
            }
            try? await clock.sleep(for: .milliseconds(500))
        }
        guard let view = nodes.first else { return (out, []) }
        var copies: [String: [String: Result<Set<UInt64>, ReadFailure>]] = [:]
        for key in 0..<keys {
            let k = Array(keyName(key).utf8)
            for name in view.replicas(ofKey: k) {
                guard let node = nodes.first(where: { $0.config.name == name }) else { continue }
                let copy: Result<Set<UInt64>, ReadFailure>
                do {
                    var held = Set<UInt64>()
                    for s in try await node.localCopy(of: k)?.values ?? [] where !s.isTombstone { held.formUnion(SetValue.decode(s.value) ?? []) }
                    copy = .success(held)
                } catch {
                    copy = .failure(ReadFailure("\(error)"))
                }
                copies[keyName(key), default: [:]][name.value] = copy
            }
        }
        let gaps = CheckResult.primaryGaps(attempts: attempts, copies: copies).map(\.description)
        if lossy { return (out, gaps.map { $0 + "; a copy was lost or a hint dropped: left to anti-entropy" }) }
        return (out + gaps, [])
    }

    /// Anti-entropy's end state: runs one round of exchanges on every up node (`repairNow`),
    /// then compares, for every key, its primaries' own copies (the whole object: values and
    /// clock) and their trees' roots of its partition. Any difference is a violation.
    /// Trees may differ by tombstones one replica collected and another has not yet (collection
    /// is each replica's own, and a delete whose acknowledgement was lost leaves tombstones as
    /// well): a root is compared with the version hashes of every tombstone its replica still
    /// stores in the partition taken out. Each root is also checked against what its replica's
    /// storage sums to (a tree untrue to its data is a violation of its own).
    static func checkReplicasAgree(_ cluster: SimulatedCluster, keys: Int, note: (String) -> Void) async -> [String] {
        let nodes = cluster.present.filter { cluster.isUp($0) }.compactMap { cluster.node($0) }
        var failed = 0
        for node in nodes {
            let r = await node.repairNow()
            failed += r.failed.count
            note("\(node.config.name) anti-entropy round: \(r.exchanges) exchanges, \(r.failed.count) partitions failed")
        }
        guard let view = nodes.first else { return [] }
        var out: [String] = []
        if failed > 0 { out.append("\(failed) anti-entropy exchanges failed in the quiet period") }
        for key in 0..<keys {
            let k = Array(keyName(key).utf8)
            var copies: [(NodeName, VersionedObject?)] = []
            var roots: [(NodeName, UInt64?)] = []
            var stored: [NodeName: [[UInt8]: UInt64]] = [:]
            for name in view.replicas(ofKey: k) {
                guard let node = nodes.first(where: { $0.config.name == name }) else { continue }
                copies.append((name, try? await node.localCopy(of: k)))
                let kept = await node.treeRoot(ofKey: k)
                let versions: [[UInt8]: (hash: UInt64, deleted: Bool)]
                do {
                    guard let v = try await node.storedVersions(ofKey: k) else {
                        roots.append((name, kept))
                        continue
                    }
                    versions = v
                } catch {
                    out.append("\(keyName(key)): \(name)'s storage of its partition could not be read: \(error)")
                    continue
                }
                let fromStorage = versions.values.reduce(0) { $0 ^ $1.hash }
                if let kept, kept != fromStorage {
                    out.append("\(keyName(key)): \(name)'s tree of its partition is untrue to its storage: root \(String(kept, radix: 16)), "
                               + "storage sums to \(String(fromStorage, radix: 16))")
                }
                let tombstones = versions.values.reduce(0) { $0 ^ ($1.deleted ? $1.hash : 0) }
                roots.append((name, kept.map { $0 ^ tombstones }))
                stored[name] = versions.filter { !$0.value.deleted }.mapValues(\.hash)
            }
            if let first = copies.first, copies.contains(where: { $0.1 != first.1 }) {
                out.append("\(keyName(key)): replicas differ after anti-entropy: "
                           + copies.map { "\($0.0) \($0.1.map { "\($0.values.count) values, clock \($0.context)" } ?? "none")" }.joined(separator: "; "))
            }
            if let first = roots.first, roots.contains(where: { $0.1 != first.1 }) {
                out.append("\(keyName(key)): its partition's trees differ after anti-entropy (tombstones aside): "
                           + roots.map { "\($0.0) \($0.1.map { String($0, radix: 16) } ?? "none")" }.joined(separator: "; ")
                           + (await Self.storedDifferences(stored, nodes: nodes)))
            }
        }
        return out
    }

    /// The keys whose stored versions (tombstones aside) differ between replicas (at most
    /// five), each with what every replica's own copy reads as, for a report.
    static func storedDifferences(_ stored: [NodeName: [[UInt8]: UInt64]], nodes: [CairnNode]) async -> String {
        let keys = Set(stored.values.flatMap(\.keys))
        let differing = keys.filter { k in Set(stored.values.map { $0[k] }).count > 1 }.sorted { $0.lexicographicallyPrecedes($1) }
        guard !differing.isEmpty else { return "" }
        var parts: [String] = []
        for k in differing.prefix(5) {
            var copies: [String] = []
            for name in stored.keys.sorted() {
                guard let node = nodes.first(where: { $0.config.name == name }) else { continue }
                let copy: String
                do {
                    if let o = try await node.localCopy(of: k) {
                        copy = "\(o.isDeleted ? "tombstone" : "live") \(o.context)"
                    } else {
                        copy = stored[name]?[k] == nil ? "absent" : "stored, not durable"
                    }
                } catch {
                    copy = "unreadable: \(error)"
                }
                copies.append("\(name) \(copy)")
            }
            parts.append(String(decoding: k, as: UTF8.self) + " (" + copies.joined(separator: ", ") + ")")
        }
        return "; keys stored differently: " + parts.joined(separator: "; ")
    }

    /// Every partition on exactly N replicas, the ring's owners: each owner runs its vnode and
    /// holds its keys (as many as the other owners, after the final reads' repair), no node
    /// that is not an owner still holds any of them; no transfer running, none ever older than
    /// `bound`.
    ///
    /// After a lost copy the owners' key counts are notes, not violations: a wiped replica (or
    /// one a wiped leaver handed its empty copy to) is refilled only by anti-entropy or read
    /// repair, which these runs do not wait for. Nothing acknowledged is lost that way (the
    /// final reads check that); the partition is under-replicated until then.
    static func checkPlacement(_ cluster: SimulatedCluster, bound: Duration, oldest: (age: Duration, what: String)?,
                               lostCopy: Bool) async -> (violations: [String], notes: [String]) {
        var out: [String] = []
        var notes: [String] = []
        let up = cluster.present.filter { cluster.isUp($0) }
        var snaps: [NodeName: PlacementSnapshot] = [:]
        for i in up { if let s = await cluster.node(i)?.placement() { snaps[cluster.names[i]] = s } }
        guard let claimant = snaps.values.first?.claimant, let ring = snaps[claimant] else {
            return (["no claimant's ring to check placement against"], [])
        }
        for p in 0..<UInt32(ring.partitionCount) {
            let owners = ring.replicas[p] ?? []
            if owners.count != ring.nVal {
                out.append("partition \(p) has \(owners.count) replicas in the committed ring (\(owners)), not N = \(ring.nVal)")
            }
            let holders = snaps.filter { ($0.value.stored[p] ?? 0) > 0 }
            for o in owners {
                guard let s = snaps[o] else { out.append("partition \(p): owner \(o) is not up"); continue }
                if !s.vnodes.contains(p) { out.append("partition \(p): owner \(o) runs no vnode for it") }
                if !holders.isEmpty, (s.stored[p] ?? 0) == 0 {
                    let problem = "partition \(p): owner \(o) holds none of its keys (held by \(holders.keys.map(\.value).sorted()))"
                    if lostCopy { notes.append(problem + "; a copy was lost: left to anti-entropy") } else { out.append(problem) }
                }
            }
            let counts = Set(owners.compactMap { snaps[$0]?.stored[p] ?? 0 })
            if counts.count > 1 {
                let problem = "partition \(p): its owners hold different key counts \(owners.map { "\($0)=\(snaps[$0]?.stored[p] ?? 0)" })"
                if lostCopy { notes.append(problem + "; a copy was lost: left to anti-entropy") } else { out.append(problem) }
            }
            for (n, s) in snaps.sorted(by: { $0.key < $1.key }) where !owners.contains(n) && (s.stored[p] ?? 0) > 0 {
                out.append("partition \(p): \(n) still holds \(s.stored[p] ?? 0) keys of it but is no owner (owners \(owners.map(\.value)))")
            }
        }
        for (n, s) in snaps.sorted(by: { $0.key < $1.key }) {
            if s.ringVersion != ring.ringVersion { out.append("\(n) holds ring version \(s.ringVersion), the claimant \(ring.ringVersion)") }
            for t in s.running { out.append("a transfer still runs at the end: partition \(t.partition) \(t.from)→\(t.to), age \(t.age)") }
        }
        if let oldest, oldest.age > bound { out.append("a transfer ran \(oldest.age), past its bound \(bound): \(oldest.what)") }
        return (out, notes)
    }

    /// One read-modify-write adding `element`, as cairn-torture's clients do: nil when the read
    /// failed (nothing was attempted); otherwise how the write ended, classified by the client's
    /// own rule (`CairnError.certainlyNotApplied`).
    /// `observe` gets the union the read found (the continuous check).
    static func add(_ element: UInt64, to key: Int, via node: CairnNode, network: InMemoryNetwork,
                    observe: (Set<UInt64>) -> Void = { _ in }) async -> AttemptOutcome? {
        let k = Array(keyName(key).utf8)
        var set = Set<UInt64>()
        let context: CausalContext
        switch await node.answer(.get(GetRequest(key: k))) {
        case .getReply(let r):
            for s in r.siblings where !s.isTombstone { set.formUnion(SetValue.decode(s.value) ?? []) }
            context = r.context
        default:
            return nil
        }
        observe(set)
        set.insert(element)
        switch await node.answer(.put(PutRequest(key: k, value: SetValue.encode(set), context: context))) {
        case .writeReply:
            return .ok
        case .error(let e):
            let error = CairnError(e)
            return error.certainlyNotApplied ? .failed(error.description) : .unknown(error.description)
        case let other:
            return .unknown("unexpected reply \(other.type)")
        }
    }

    /// Writes `gone-n` once and deletes it with the write's own context; the key when both
    /// were acknowledged (nil otherwise: nothing to check).
    /// Returns the key and the context the delete was sent with (what it supersedes).
    static func writeThenDelete(_ n: Int, via node: CairnNode) async -> (String, VersionVector)? {
        let key = "gone-\(n)"
        guard case .writeReply(let written) = await node.answer(.put(PutRequest(key: Array(key.utf8), value: [1, 2, 3]))) else { return nil }
        guard case .writeReply = await node.answer(.delete(DeleteRequest(key: Array(key.utf8), context: written.context))) else { return nil }
        return (key, written.context.vector)
    }

    /// The dots of `object`'s live (not tombstone) values: `values[i]` of an entry carries
    /// `(actor, counter - i)`.
    static func liveValueDots(_ object: VersionedObject) -> [Dot] {
        object.entries.flatMap { e in
            e.values.enumerated().compactMap { i, v in v.isTombstone ? nil : Dot(actor: e.actor, counter: e.counter - UInt64(i)) }
        }
    }

    /// Every deleted key reads as absent at R=all, and no primary holds a live value of it.
    ///
    /// A live value is a violation when its dot is one the delete superseded (`covered`: the
    /// context the delete was sent with), i.e. the deleted write came back. A live value with a
    /// dot the delete never saw is a later write: the network's `dup` can deliver a forwarded
    /// put twice (the client routes through a primary, but during a ring change that node may
    /// forward), and the copy is stamped as a new write, concurrent with the delete: a sibling,
    /// rightly. Those are noted, not counted.
    static func checkDeleted(_ cluster: SimulatedCluster, keys: [String], covered: [String: VersionVector] = [:],
                             note: (String) -> Void) async -> [String] {
        var out: [String] = []
        let readers = cluster.present.filter { cluster.isUp($0) }
        guard !readers.isEmpty else { return [] }
        for (i, key) in keys.enumerated() {
            guard let node = cluster.node(readers[i % readers.count]) else { continue }
            let options = RequestOptions(r: .all, timeoutMillis: 5000)
            switch await node.answer(.get(GetRequest(key: Array(key.utf8), options: options))) {
            case .getReply(let r) where r.siblings.contains { !$0.isTombstone }:
                var holders: [String] = []
                var liveDots = Set<Dot>()
                for j in readers {
                    guard let n = cluster.node(j), let o = try? await n.localCopy(of: Array(key.utf8)) else { continue }
                    holders.append("\(n.config.name): \(o.isDeleted ? "tombstone" : "live") \(o.context)")
                    liveDots.formUnion(liveValueDots(o))
                }
                let superseded = covered[key].map { c in liveDots.filter { $0.counter <= c[$0.actor] } } ?? Array(liveDots)
                if !liveDots.isEmpty && superseded.isEmpty, let c = covered[key] {
                    note("\(key): a later write lives beside the delete (dots \(liveDots.map { "\($0.actor):\($0.counter)" }.sorted()) "
                         + "not in the delete's context \(c.dots.map { "\($0.actor):\($0.counter)" })): a duplicated put, a sibling")
                    continue
                }
                out.append("\(key): deleted (acknowledged) but read back with \(r.siblings.count { !$0.isTombstone }) live values; "
                           + "partition \(node.partition(ofKey: Array(key.utf8))?.index ?? 0); copies: \(holders.joined(separator: ", "))")
            case .getReply:
                break
            case .error(let e):
                out.append("\(key): the final read of a deleted key at R=all failed: \(e.message)")
            case let other:
                out.append("\(key): unexpected reply \(other.type)")
            }
        }
        var collected = 0
        for i in readers {
            guard let node = cluster.node(i) else { continue }
            for key in keys where (try? await node.localCopy(of: Array(key.utf8))) == nil { collected += 1 }
        }
        note("deleted keys checked: \(keys.count); copies collected \(collected) of \(keys.count * readers.count) (any replica)")
        return out
    }

    static func readAll(_ key: Int, via node: CairnNode) async -> FinalRead {
        let options = RequestOptions(r: .all, timeoutMillis: 5000)
        switch await node.answer(.get(GetRequest(key: Array(keyName(key).utf8), options: options))) {
        case .getReply(let r):
            var all = Set<UInt64>()
            for s in r.siblings where !s.isTombstone {
                guard let e = SetValue.decode(s.value) else { return .garbage("\(s.value.count) bytes that are no element list") }
                all.formUnion(e)
            }
            return .elements(all)
        case .error(let e):
            return .unreadable(e.message)
        case let other:
            return .unreadable("unexpected reply \(other.type)")
        }
    }
}

/// A deliberately broken store: acknowledges every tenth write (a single key or a batch)
/// without storing it (the self-tests of cairn-sim and cairn-torture). Everything else, the
/// executors included, is the inner store's. Thread-safe.
public final class AcknowledgesAndDrops: PartitionStore {
    let inner: any PartitionStore
    let writes = Mutex(0)
    public init(_ inner: any PartitionStore) { self.inner = inner }

    /// Whether this write is the one in ten that is dropped.
    private func drops() -> Bool {
        writes.withLock { w in
            w += 1
            return w % 10 == 0
        }
    }

    public func executor(for partition: PartitionID) -> (any SerialExecutor)? { inner.executor(for: partition) }
    public func get(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? { try inner.get(partition: partition, key: key) }
    public func getDurable(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? { try inner.getDurable(partition: partition, key: key) }
    public var lastApplied: DurabilityToken { inner.lastApplied }
    public func apply(partition: PartitionID, key: [UInt8], value: [UInt8]) throws -> DurabilityToken {
        if drops() { return DurabilityToken(sequence: 0) }
        return try inner.apply(partition: partition, key: key, value: value)
    }
    public func apply(partition: PartitionID, batch: [(key: [UInt8], value: [UInt8])]) throws -> DurabilityToken {
        if drops() { return DurabilityToken(sequence: 0) }
        return try inner.apply(partition: partition, batch: batch)
    }
    public func delete(partition: PartitionID, keys: [[UInt8]]) throws -> DurabilityToken { try inner.delete(partition: partition, keys: keys) }
    public func waitDurable(_ token: DurabilityToken) async throws { try await inner.waitDurable(token) }
    public var acknowledgesDurably: Bool { inner.acknowledgesDurably }
    public func fold<Accumulator: Sendable>(partition: PartitionID, after: [UInt8]?, into initial: Accumulator,
                                            _ visit: @Sendable (inout Accumulator, _ key: [UInt8], _ value: [UInt8]) throws -> FoldStep)
        async throws -> PartitionFold<Accumulator> {
        try await inner.fold(partition: partition, after: after, into: initial, visit)
    }
    public func count(partition: PartitionID) async throws -> Int { try await inner.count(partition: partition) }
    public func drop(partition: PartitionID) async throws { try await inner.drop(partition: partition) }
    public func close() async throws { try await inner.close() }
    public func abandon() async { await inner.abandon() }
    public var isPersistent: Bool { inner.isPersistent }
    public var persistentEpoch: UInt64? { inner.persistentEpoch }
    public var storageStatistics: Database.Statistics? { inner.storageStatistics }
    public func snapshot(partition: PartitionID) throws -> PartitionSnapshot { try inner.snapshot(partition: partition) }
    public func metadata(_ name: String) throws -> [UInt8]? { try inner.metadata(name) }
    public func setMetadata(_ values: [(name: String, value: [UInt8]?)]) async throws { try await inner.setMetadata(values) }
    public func saveSideFile(_ name: String, _ bytes: [UInt8]) async throws { try await inner.saveSideFile(name, bytes) }
    public func takeSideFile(_ name: String) async throws -> [UInt8]? { try await inner.takeSideFile(name) }
    public var createdFresh: Bool { inner.createdFresh }
    public var openedAfterCleanShutdown: Bool { inner.openedAfterCleanShutdown }
    public var openedEmpty: Bool { inner.openedEmpty }
}

extension Duration {
    var milliseconds: Int64 {
        let c = components
        return c.seconds * 1000 + c.attoseconds / 1_000_000_000_000_000
    }
}
