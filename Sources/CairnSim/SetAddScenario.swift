public import CairnNode
public import CairnCore
import CairnWire
import CairnClient
import CairnTorture
import Logging
import Synchronization

/// One simulated run of the set-add workload (the one cairn-torture uses) on real nodes: clients
/// read a key at R=quorum, take the union of its siblings, add a unique element and write it back
/// with the read's context at W=quorum, while the network loses, delays and duplicates messages
/// and links are cut and healed. After the faults heal and a quiet period, every key is read at
/// R=all and checked: no acknowledged element lost, no element of a write that certainly was not
/// applied visible, nothing that was never written.
public struct SetAddScenario: Sendable {
    public var nodes = 5
    public var clients = 8
    public var keys = 4
    /// Virtual time the clients run (the quiet period and final reads come after).
    public var duration: Duration = .seconds(30)
    public var faults: Set<Fault> = [.loss, .delay, .dup, .partition]
    /// Makes one node acknowledge writes it drops (every tenth): the checker must catch it.
    public var selfTest = false

    public enum Fault: String, Sendable, CaseIterable {
        case loss, delay, dup, partition
    }

    public init() {}

    public struct Report: Sendable {
        public var seed: UInt64
        public var trace: [String]
        public var violations: [String]
        public var simulated: Duration
        public var acknowledged: Int
        public var unknown: Int
        public var refused: Int

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

    /// Runs the scenario for `seed`. Throws only if the simulation itself stopped (stuck or past
    /// its time limit), which is a failure of the seed too.
    public func run(seed: UInt64) throws(SimulationStop) -> Report {
        let clock = ManualClock()
        let executor = SimulationExecutor(seed: seed)
        var netFaults = InMemoryNetwork.Faults()
        if faults.contains(.loss) { netFaults.loss = 0.02 }
        if faults.contains(.dup) { netFaults.duplication = 0.02 }
        if faults.contains(.delay) { netFaults.delay = .microseconds(100) ... .milliseconds(40) }
        let network = InMemoryNetwork(clock: clock, seed: seed ^ 0x5eed, faults: netFaults, executor: executor)
        let scenario = self
        let limit = duration + .seconds(600)
        return try simulate(on: executor, clock: clock, limit: limit) {
            await scenario.body(seed: seed, clock: clock, network: network)
        }
    }

    private struct Log: Sendable {
        var trace: [String] = []
        /// Every add attempted, as its client was told (cairn-torture's record and checker).
        var attempts: [Attempt] = []
    }

    /// The run's record, shared by its tasks.
    private final class Recorder: Sendable {
        private let log = Mutex(Log())
        let clock: ManualClock
        init(clock: ManualClock) { self.clock = clock }
        func note(_ line: String) {
            let at = clock.elapsed.milliseconds
            log.withLock { $0.trace.append("\(at) \(line)") }
        }
        func update(_ body: (inout Log) -> Void) { log.withLock { body(&$0) } }
        var current: Log { log.withLock { $0 } }
    }

    private func body(seed: UInt64, clock: ManualClock, network: InMemoryNetwork) async -> Report {
        let log = Recorder(clock: clock)
        let note = log.note
        var violations: [String] = []
        do {
            let selfTest = selfTest
            let cluster = try await SimulatedNodes.make(count: nodes, clock: clock, network: network, ringSize: 32, requestTimeoutMillis: 300) { i in
                selfTest && i == 0 ? AcknowledgesAndDrops(MemoryBackend()) : nil
            }
            let names = cluster.map(\.config.name)
            try await withThrowingTaskGroup(of: Void.self) { group in
                for n in cluster { group.addTask { try await n.run() } }
                while cluster.contains(where: { $0.state != .serving }) { await Task.yield() }
                note("serving")
                let end = clock.now().advanced(by: duration)
                // The nemesis: cut and heal random links while the clients run.
                if faults.contains(.partition) {
                    group.addTask {
                        var rng = SplitMix64(seed: seed ^ 0xfa17)
                        while clock.now() < end {
                            try await clock.sleep(for: .milliseconds(500 + Int64(rng.next(below: 2000))))
                            let a = Int(rng.next(below: UInt64(names.count))), b = Int(rng.next(below: UInt64(names.count)))
                            let roll = rng.next(below: 4)
                            if roll == 0 || a == b {
                                network.heal()
                                note("heal")
                            } else if roll == 1 {
                                // Refused rather than silent: peers see the node down at once,
                                // so writes it would need are refused (certainly not applied).
                                network.refuse(names[a])
                                note("refuse \(names[a])")
                            } else {
                                network.cut(from: names[a], to: names[b])
                                network.cut(from: names[b], to: names[a])
                                note("cut \(names[a])-\(names[b])")
                            }
                        }
                        network.heal()
                        note("heal (end)")
                    }
                }
                await withTaskGroup(of: Void.self) { clientsGroup in
                    for c in 0..<clients {
                        clientsGroup.addTask {
                            var rng = SplitMix64(seed: seed &+ UInt64(c) &* 0x9e37)
                            var n: UInt64 = 0
                            while clock.now() < end {
                                let key = Int(rng.next(below: UInt64(keys)))
                                let node = cluster[Int(rng.next(below: UInt64(cluster.count)))]
                                n += 1
                                let element = UInt64(c + 1) << 40 | n
                                let start = clock.elapsed.milliseconds
                                if let outcome = await Self.add(element, to: key, via: node) {
                                    let attempt = Attempt(client: c, key: Self.keyName(key), element: element, startMillis: Int(start),
                                                          endMillis: Int(clock.elapsed.milliseconds), outcome: outcome)
                                    log.update { $0.attempts.append(attempt) }
                                    note("\(node.config.name) add \(element) to \(attempt.key): \(outcome)")
                                }
                                try? await clock.sleep(for: .milliseconds(Int64(rng.next(below: 50))))
                            }
                        }
                    }
                }
                // Quiet period: faults off, in-flight work settles.
                network.heal()
                network.setFaults(InMemoryNetwork.Faults())
                try await clock.sleep(for: .seconds(5))
                var finals: [String: FinalRead] = [:]
                for key in 0..<keys {
                    let read = await Self.readAll(key, via: cluster[key % cluster.count])
                    finals[Self.keyName(key)] = read
                    if case .elements(let e) = read { note("final \(Self.keyName(key)): \(e.count) elements") }
                }
                let result = CheckResult.check(attempts: log.current.attempts, finals: finals)
                violations += result.lost.map { "\($0.key): acknowledged \($0.element) lost" }
                violations += result.failedButPresent.map { "\($0.key): \($0.element) visible though certainly not applied" }
                violations += result.phantom.map { "\($0.key): phantom \($0.element)" }
                violations += result.unreadable.sorted { $0.key < $1.key }.map { "\($0.key): the final read at R=all failed: \($0.value)" }
                for n in cluster { n.shutdown() }
                // A drain waits on the clock: the simulation moves it.
                try await group.waitForAll()
            }
        } catch {
            violations.append("run failed: \(error)")
        }
        let l = log.current
        func count(_ matches: (AttemptOutcome) -> Bool) -> Int { l.attempts.count { matches($0.outcome) } }
        return Report(seed: seed, trace: l.trace, violations: violations, simulated: clock.elapsed,
                      acknowledged: count { $0 == .ok },
                      unknown: count { if case .unknown = $0 { true } else { false } },
                      refused: count { if case .failed = $0 { true } else { false } })
    }

    static func keyName(_ key: Int) -> String { "k\(key)" }

    /// One read-modify-write adding `element`, as cairn-torture's clients do: nil when the read
    /// failed (nothing was attempted); otherwise how the write ended, classified by the client's
    /// own rule (`CairnError.certainlyNotApplied`).
    static func add(_ element: UInt64, to key: Int, via node: CairnNode) async -> AttemptOutcome? {
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

/// A deliberately broken backend: acknowledges every tenth write without storing it (the
/// self-tests of cairn-sim and cairn-torture). Thread-safe.
public final class AcknowledgesAndDrops: StorageBackend {
    let inner: any StorageBackend
    let writes = Mutex(0)
    public init(_ inner: any StorageBackend) { self.inner = inner }

    public func get(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? { try inner.get(partition: partition, key: key) }
    public func getDurable(partition: PartitionID, key: [UInt8]) throws -> [UInt8]? { try inner.getDurable(partition: partition, key: key) }
    public var lastApplied: DurabilityToken { inner.lastApplied }
    public func apply(partition: PartitionID, key: [UInt8], value: [UInt8]) throws -> DurabilityToken {
        let n = writes.withLock { w in
            w += 1
            return w
        }
        if n % 10 == 0 { return DurabilityToken(sequence: 0) }
        return try inner.apply(partition: partition, key: key, value: value)
    }
    public func waitDurable(_ token: DurabilityToken) async throws { try await inner.waitDurable(token) }
    public func count(partition: PartitionID) throws -> Int { try inner.count(partition: partition) }
    public func close() async throws { try await inner.close() }
    public var isPersistent: Bool { inner.isPersistent }
    public var persistentEpoch: UInt64? { inner.persistentEpoch }
}

extension Duration {
    var milliseconds: Int64 {
        let c = components
        return c.seconds * 1000 + c.attoseconds / 1_000_000_000_000_000
    }
}
