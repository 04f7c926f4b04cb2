import Foundation
import CairnClient
import CairnCore
#if canImport(Glibc)
import Glibc
#endif

/// Writes a line to standard output at once (unbuffered, so a long run can be followed live and
/// lines never reorder).
func emit(_ line: String) { FileHandle.standardOutput.write(Data((line + "\n").utf8)) }

/// One torture run's settings (`cairn-torture --help`).
public struct TortureConfig: Sendable {
    public var nodes = 3
    public var durationMillis = 60_000
    public var seed: UInt64 = 1
    public var clients = 5
    public var keys = 4
    public var namespaces = true
    public var cairnd = ""
    public var workDir = ""
    /// Quiet time after healing, before the final reads.
    public var settleMillis = 5_000
    public init() {}
}

/// Runs the cluster, the workload and the nemesis, then the final reads and the checker.
/// Prints as it goes; the last line printed is always `CheckResult.summary`.
public final class Torture: @unchecked Sendable {
    // Touched only by the nemesis task and, after it ends, by the final phase.
    let config: TortureConfig
    let lab: any Lab
    var processes: [Process?]
    var paused: Set<Int> = []
    let started = ContinuousClock.now

    public init(_ config: TortureConfig) {
        self.config = config
        lab = config.namespaces ? NamespaceLab(nodes: config.nodes) : LoopbackLab(nodes: config.nodes)
        processes = Array(repeating: nil, count: config.nodes)
    }

    var elapsedMillis: Int {
        let (s, a) = (ContinuousClock.now - started).components
        return Int(s) * 1000 + Int(a / 1_000_000_000_000_000)
    }

    func say(_ line: String) {
        emit(String(format: "[%7.1fs] ", Double(elapsedMillis) / 1000) + line)
    }

    // MARK: Nodes

    func writeConfig(_ i: Int) throws -> String {
        let members = (0..<config.nodes).map { "n\($0 + 1)@\(lab.address($0))" }.joined(separator: ",")
        let path = config.workDir + "/n\(i + 1).conf"
        try """
        node.name = n\(i + 1)
        node.listen = \(lab.address(i))
        node.http = \(lab.httpAddress(i))
        node.data_dir = \(config.workDir)/n\(i + 1)
        cluster.name = torture
        cluster.ring_size = 64
        cluster.n_val = \(min(3, config.nodes))
        cluster.members = \(members)
        request.timeout = 1000ms
        transport.connect_timeout = 300ms
        transport.reconnect_min = 50ms
        transport.reconnect_max = 500ms
        storage.sync = always
        """.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    func start(_ i: Int) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = lab.command(i, cairnd: config.cairnd, config: try writeConfig(i))
        let logFile = config.workDir + "/n\(i + 1).log"
        if !FileManager.default.fileExists(atPath: logFile) { _ = FileManager.default.createFile(atPath: logFile, contents: nil) }
        let handle = FileHandle(forWritingAtPath: logFile)
        handle?.seekToEndOfFile()
        p.standardOutput = handle ?? FileHandle.nullDevice
        p.standardError = handle ?? FileHandle.nullDevice
        try p.run()
        processes[i] = p
    }

    func signal(_ i: Int, _ sig: Int32) {
        if let p = processes[i], p.isRunning { kill(p.processIdentifier, sig) }
    }

    func killNode(_ i: Int) {
        signal(i, SIGKILL)
        processes[i]?.waitUntilExit()
        processes[i] = nil
    }

    /// Waits (bounded) until every node answers `/health` with 200.
    func waitServing(_ nodes: [Int], seconds: Int = 30) throws {
        let deadline = Date().addingTimeInterval(Double(seconds))
        for i in nodes {
            while (try? sh(["curl", "-sf", "--max-time", "1", "http://\(lab.httpAddress(i))/health"])) == nil {
                guard Date() < deadline else { throw TortureError("n\(i + 1) did not serve within \(seconds) s (see \(config.workDir)/n\(i + 1).log)") }
                usleep(100_000)
            }
        }
    }

    func stopAll() {
        for i in 0..<config.nodes {
            signal(i, SIGCONT)
            signal(i, SIGKILL)
            processes[i]?.waitUntilExit()
            processes[i] = nil
        }
    }

    // MARK: Nemesis

    func apply(_ f: Fault) throws {
        switch f {
        case .isolate, .split, .bridge, .oneWay:
            try lab.cut(f.blocked(nodes: config.nodes))
        case .kill(let n): killNode(n)
        case .pause(let n):
            signal(n, SIGSTOP)
            paused.insert(n)
        case .delay(let n, let ms): try setTransportFaults(lab.httpAddress(n), "delay=\(ms)")
        case .drop(let n, let p): try setTransportFaults(lab.httpAddress(n), "drop=\(p)")
        }
    }

    /// Heals everything: links, transport faults, paused and killed nodes.
    func healAll() throws {
        try lab.cut([:])
        for n in paused { signal(n, SIGCONT) }
        paused = []
        for i in 0..<config.nodes where processes[i] == nil { try start(i) }
        try waitServing(Array(0..<config.nodes))
        for i in 0..<config.nodes { try setTransportFaults(lab.httpAddress(i), "") }
    }

    func runNemesis(_ schedule: NemesisSchedule) async throws {
        for f in schedule.faults {
            let wait = f.atMillis - elapsedMillis
            if wait > 0 { try await Task.sleep(for: .milliseconds(wait)) }
            say("nemesis: \(f.fault)")
            try apply(f.fault)
            try await Task.sleep(for: .milliseconds(f.durationMillis))
            say("nemesis: heal (\(f.fault))")
            try healAll()
        }
    }

    // MARK: Workload

    static func keyName(_ k: Int) -> [UInt8] { Array("torture-set-\(k)".utf8) }

    func clientConfig(timeout: UInt32) -> CairnClient.Configuration {
        var c = CairnClient.Configuration()
        c.defaultTimeoutMillis = timeout
        c.connectTimeoutMillis = 300
        return c
    }

    /// One client: read (R = quorum), union the siblings, add a fresh element, write back with
    /// the context (W = quorum). Every write attempt is recorded.
    func runClient(_ id: Int, until deadlineMillis: Int) async -> [Attempt] {
        var out: [Attempt] = []
        var rng = SplitMix64(seed: config.seed &* 1_000_003 &+ UInt64(id))
        var counter: UInt64 = 0
        let seeds = (0..<config.nodes).map(lab.address)
        guard let client = try? await CairnClient.connect(seeds: seeds, configuration: clientConfig(timeout: 1000)) else { return [] }
        defer { client.close() }
        while elapsedMillis < deadlineMillis {
            let k = Int(rng.next(below: UInt64(config.keys)))
            let key = Self.keyName(k)
            var set = Set<UInt64>()
            let context: CausalContext
            do {
                let r = try await client.get(key)
                for v in r.values { set.formUnion(SetValue.decode(v) ?? []) }
                context = r.context
            } catch .notFound(let c) {
                context = c
            } catch {
                try? await Task.sleep(for: .milliseconds(20))
                continue
            }
            counter += 1
            let element = UInt64(id + 1) << 40 | counter
            set.insert(element)
            let start = elapsedMillis
            let outcome: AttemptOutcome
            do {
                _ = try await client.put(key, value: SetValue.encode(set), context: context)
                outcome = .ok
            } catch {
                outcome = error.certainlyNotApplied ? .failed(error.description) : .unknown(error.description)
            }
            out.append(Attempt(client: id, key: String(decoding: key, as: UTF8.self), element: element, startMillis: start,
                               endMillis: elapsedMillis, outcome: outcome))
            if case .ok = outcome {} else { try? await Task.sleep(for: .milliseconds(10)) }
        }
        return out
    }

    // MARK: Final read

    func finalReads() async -> [String: FinalRead] {
        var finals: [String: FinalRead] = [:]
        let seeds = (0..<config.nodes).map(lab.address)
        guard let client = try? await CairnClient.connect(seeds: seeds, configuration: clientConfig(timeout: 5000)) else {
            for k in 0..<config.keys { finals[String(decoding: Self.keyName(k), as: UTF8.self)] = .unreadable("no node reachable") }
            return finals
        }
        defer { client.close() }
        let all = RequestOptions(r: .count(min(3, config.nodes)))
        for k in 0..<config.keys {
            let key = Self.keyName(k)
            let name = String(decoding: key, as: UTF8.self)
            var last = "not tried"
            for _ in 0..<30 {
                do throws(CairnError) {
                    let r = try await client.get(key, options: all)
                    var set = Set<UInt64>()
                    var bad: String?
                    for v in r.values {
                        if let s = SetValue.decode(v) { set.formUnion(s) } else { bad = String(decoding: v.prefix(40), as: UTF8.self) }
                    }
                    finals[name] = bad.map { .garbage($0) } ?? .elements(set)
                    last = ""
                    break
                } catch .notFound {
                    finals[name] = .elements([])
                    last = ""
                    break
                } catch {
                    last = error.description
                    try? await Task.sleep(for: .seconds(1))
                }
            }
            if !last.isEmpty { finals[name] = .unreadable(last) }
        }
        return finals
    }

    // MARK: The run

    /// Runs everything; returns the checker's verdict (nil if the harness itself failed).
    public func run() async -> CheckResult? {
        let schedule = NemesisSchedule(seed: config.seed, nodes: config.nodes, durationMillis: config.durationMillis)
        emit("cairn-torture: \(config.nodes) nodes (\(config.namespaces ? "network namespaces, nft partitions" : "loopback, transport partitions")), "
              + "\(config.durationMillis / 1000) s, seed \(config.seed), \(config.clients) clients, \(config.keys) keys, N=\(min(3, config.nodes)) R=W=quorum")
        emit("cairnd: \(config.cairnd)\nwork directory: \(config.workDir)\nfault schedule:\n\(schedule.text)")
        do {
            try FileManager.default.createDirectory(atPath: config.workDir, withIntermediateDirectories: true)
            try lab.setUp()
            for i in 0..<config.nodes { try start(i) }
            try waitServing(Array(0..<config.nodes))
            say("cluster serving")
        } catch {
            say("harness error: \(error)")
            stopAll()
            lab.tearDown()
            return nil
        }
        defer {
            stopAll()
            lab.tearDown()
        }
        let deadline = config.durationMillis
        async let nemesis: Void = runNemesis(schedule)
        let attempts = await withTaskGroup(of: [Attempt].self) { group in
            for c in 0..<config.clients { group.addTask { await self.runClient(c, until: deadline) } }
            var all: [Attempt] = []
            for await a in group { all += a }
            return all
        }
        do {
            try await nemesis
            try healAll()
        } catch {
            say("harness error during the nemesis: \(error)")
            return nil
        }
        say("workload done: \(attempts.count) attempts; healed; settling \(config.settleMillis / 1000) s")
        try? await Task.sleep(for: .milliseconds(config.settleMillis))
        let finals = await finalReads()
        let result = CheckResult.check(attempts: attempts, finals: finals)
        report(result, attempts: attempts, schedule: schedule)
        return result
    }

    func report(_ r: CheckResult, attempts: [Attempt], schedule: NemesisSchedule) {
        let ok = attempts.count { $0.outcome == .ok }
        let failed = attempts.count { if case .failed = $0.outcome { true } else { false } }
        let unknown = attempts.count - ok - failed
        emit("\nattempts: \(attempts.count) (ok \(ok), failed \(failed), unknown \(unknown))")
        emit("acknowledged and present: \(r.acknowledgedPresent); failed and absent: \(r.failedAbsent)")
        for (key, why) in r.unreadable.sorted(by: { $0.key < $1.key }) { emit("UNREADABLE \(key): \(why)") }
        func active(_ ms: Int) -> String {
            schedule.faults.first { $0.atMillis <= ms && ms <= $0.atMillis + $0.durationMillis }.map { "during '\($0.fault)'" } ?? "no fault active"
        }
        for a in r.lost.prefix(10) {
            emit("LOST \(a.key) element \(a.element): client \(a.client) acknowledged at \(a.startMillis)-\(a.endMillis) ms, \(active(a.startMillis))")
        }
        for a in r.failedButPresent.prefix(10) {
            emit("FAILED BUT PRESENT \(a.key) element \(a.element): client \(a.client) told \(a.outcome) at \(a.startMillis) ms, \(active(a.startMillis))")
        }
        for p in r.phantom.prefix(10) { emit("PHANTOM \(p.key) element \(p.element): never written") }
        emit("fault schedule (seed \(config.seed)):\n\(schedule.text)")
        emit(r.passed ? "PASS" : "FAIL")
        emit(r.summary)
    }
}
