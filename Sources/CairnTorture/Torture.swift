import Foundation
import CairnClient
import CairnCore
import Synchronization
import CairnProcess
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
    /// The fault kinds the nemesis draws from (`--faults`).
    public var kinds: [FaultKind] = FaultKind.standard
    /// How many joins, leaves and removes the `membership` kind makes.
    public var membership = MembershipPlan()
    /// The `cairn` CLI that stages, plans and commits membership changes.
    public var cairn = ""
    /// How long one membership change may take to complete (transfers done, leaver gone).
    public var membershipTimeoutMillis = 180_000
    public init() {}

    public var membershipEnabled: Bool { kinds.contains(.membership) }
}

/// What a run found: the checker's verdict and what the membership nemesis did.
public struct RunResult: Sendable {
    public var check: CheckResult
    public var joins = 0
    public var leaves = 0
    public var removes = 0
    /// Membership changes that did not complete as they must (a leaver that exited non-zero,
    /// transfers that never finished, a refused command): each fails the run.
    public var membershipProblems: [String] = []
    public var membershipEnabled = false
    /// Primaries whose own copy lacked an acknowledged add after the quiet period (hints, fallback
    /// handoff and read repair must have brought every primary every acknowledged add).
    public var primaryGaps: [PrimaryGap] = []
    /// Why the per-primary check could not be made, if it could not (fails the run).
    public var primaryCheckProblem: String?

    public var passed: Bool { check.passed && membershipProblems.isEmpty && primaryGaps.isEmpty && primaryCheckProblem == nil }

    /// The checker's summary, with the membership counts when that nemesis ran. Always the last
    /// line of a run's output.
    public var summary: String {
        check.summary + " primary_gaps=\(primaryGaps.count)" + (membershipEnabled ? " joins=\(joins) leaves=\(leaves) removes=\(removes)" : "")
    }
}

/// Runs the cluster, the workload and the nemesis, then the final reads and the checker.
/// Prints as it goes; the last line printed is always `CheckResult.summary`.
public final class Torture: @unchecked Sendable {
    // Touched only by the nemesis task and, after it ends, by the final phase.
    let config: TortureConfig
    let schedule: NemesisSchedule
    let lab: any Lab
    /// Every node that exists at some point of the run: the first `config.nodes` and the joiners.
    var processes: [ChildProcess?]
    /// The nodes that are members now (and run, but while a fault has killed them).
    var active: Set<Int>
    var paused: Set<Int> = []
    let started = ContinuousClock.now
    /// What the nemesis did and when (elapsed ms): to name the fault active when a lost write began.
    var timeline: [(start: Int, end: Int, what: String)] = []
    var joins = 0, leaves = 0, removes = 0
    var membershipProblems: [String] = []
    /// While a `clientSplit` runs: its two sides and the members it split (client i's home is
    /// `members[i % count]`); clients use only the nodes on their home's side. Read by the
    /// clients' tasks.
    let clientSides = Mutex<(minority: Set<Int>, rest: Set<Int>, members: [Int])?>(nil)

    public init(_ config: TortureConfig) {
        self.config = config
        schedule = NemesisSchedule(seed: config.seed, nodes: config.nodes, durationMillis: config.durationMillis,
                                   kinds: config.kinds, membership: config.membership)
        lab = config.namespaces ? NamespaceLab(nodes: schedule.slots) : LoopbackLab(nodes: schedule.slots)
        processes = Array(repeating: nil, count: schedule.slots)
        active = Set(0..<config.nodes)
    }

    var running: [Int] { active.sorted() }
    var secretFile: String { config.workDir + "/cluster.secret" }

    var elapsedMillis: Int {
        let (s, a) = (ContinuousClock.now - started).components
        return Int(s) * 1000 + Int(a / 1_000_000_000_000_000)
    }

    func say(_ line: String) {
        emit(String(format: "[%7.1fs] ", Double(elapsedMillis) / 1000) + line)
    }

    // MARK: Nodes

    /// The cluster's shared secret (`cluster.secret_file`), as `Deploy/local-cluster.sh` makes it:
    /// 32 random bytes in hex, mode 0600; every node, first or joining, reads the same file.
    func writeSecret() throws {
        var rng = SystemRandomNumberGenerator()
        let hex = (0..<32).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &rng)) }.joined()
        guard FileManager.default.createFile(atPath: secretFile, contents: Data(hex.utf8), attributes: [.posixPermissions: 0o600]) else {
            throw TortureError("cannot write \(secretFile)")
        }
    }

    /// The node's configuration file: the first nodes bootstrap from `cluster.members`; a joiner
    /// (`seeds`) knows only the members it may ask, as `Deploy/local-cluster.sh add` starts one.
    /// Written once: a restarted node reads the file it started with.
    func configPath(_ i: Int, seeds: [Int]? = nil) throws -> String {
        let path = config.workDir + "/n\(i + 1).conf"
        if FileManager.default.fileExists(atPath: path) { return path }
        let cluster = seeds.map { "cluster.seeds = " + $0.map(lab.address).joined(separator: ",") }
            ?? "cluster.members = " + (0..<config.nodes).map { "n\($0 + 1)@\(lab.address($0))" }.joined(separator: ",")
        try """
        node.name = n\(i + 1)
        node.listen = \(lab.address(i))
        node.http = \(lab.httpAddress(i))
        node.data_dir = \(config.workDir)/n\(i + 1)
        cluster.name = torture
        cluster.ring_size = 64
        cluster.n_val = \(min(3, config.nodes))
        \(cluster)
        cluster.secret_file = \(secretFile)
        request.timeout = 1000ms
        transport.connect_timeout = 300ms
        transport.reconnect_min = 50ms
        transport.reconnect_max = 500ms
        storage.sync = always
        """.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    func start(_ i: Int, seeds: [Int]? = nil) throws {
        let p = ChildProcess()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = lab.command(i, cairnd: config.cairnd, config: try configPath(i, seeds: seeds))
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

    /// Waits (bounded) until every node answers `/health` with 200 (with `unjoined`: or serves
    /// but is not a member yet, the 503 a node started with seeds only answers until its join).
    func waitServing(_ nodes: [Int], seconds: Int = 30, unjoined: Bool = false) throws {
        let deadline = Date().addingTimeInterval(Double(seconds))
        func serving(_ i: Int) -> Bool {
            if (try? sh(["curl", "-sf", "--max-time", "1", "http://\(lab.httpAddress(i))/health"])) != nil { return true }
            guard unjoined, let body = try? sh(["curl", "-s", "--max-time", "1", "http://\(lab.httpAddress(i))/health"]) else { return false }
            return body.contains("membership: not a member")
        }
        for i in nodes {
            while !serving(i) {
                guard Date() < deadline else { throw TortureError("n\(i + 1) did not serve within \(seconds) s (see \(config.workDir)/n\(i + 1).log)") }
                usleep(100_000)
            }
        }
    }

    func stopAll() {
        for i in processes.indices {
            signal(i, SIGCONT)
            signal(i, SIGKILL)
            processes[i]?.waitUntilExit()
            processes[i] = nil
        }
    }

    // MARK: Nemesis

    func apply(_ f: ScheduledFault) throws {
        switch f.fault {
        case .isolate, .split, .bridge, .oneWay:
            try lab.cut(f.fault.blocked(members: f.members), running: running)
        case .clientSplit(let minority):
            try lab.cut(f.fault.blocked(members: f.members), running: running)
            clientSides.withLock { $0 = (Set(minority), Set(f.members).subtracting(minority), f.members) }
        case .kill(let n): killNode(n)
        case .wipeDisk(let n):
            killNode(n)
            try FileManager.default.removeItem(atPath: config.workDir + "/n\(n + 1)")
        case .corruptTable(let n):
            signal(n, SIGTERM)   // a clean stop writes the memtable into a table
            processes[n]?.waitUntilExit()
            processes[n] = nil
            try corruptLargestTable(of: n)
        case .pause(let n):
            signal(n, SIGSTOP)
            paused.insert(n)
        case .delay(let n, let ms): try setTransportFaults(lab.httpAddress(n), "delay=\(ms)")
        case .drop(let n, let p): try setTransportFaults(lab.httpAddress(n), "drop=\(p)")
        case .join, .leave, .remove: break   // changeMembership
        }
    }

    /// Flips two bytes inside the data blocks of node `n`'s largest table (a third and half way
    /// in: tables hold their filter and index at the end).
    func corruptLargestTable(of n: Int) throws {
        let dir = config.workDir + "/n\(n + 1)/storage"
        let tables = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".sst") }.map { dir + "/" + $0 }
        let sizes = tables.map { ($0, (try? FileManager.default.attributesOfItem(atPath: $0)[.size] as? Int) ?? 0) }
        guard let (path, size) = sizes.max(by: { $0.1 < $1.1 }), size >= 4096,
              let file = FileHandle(forUpdatingAtPath: path) else { return say("nemesis: n\(n + 1) has no table large enough to corrupt") }
        defer { try? file.close() }
        for offset in [size / 3, size / 2] {
            try file.seek(toOffset: UInt64(offset))
            let byte = try file.read(upToCount: 1)?.first ?? 0
            try file.seek(toOffset: UInt64(offset))
            try file.write(contentsOf: Data([byte ^ 0x5A]))
        }
        try file.synchronize()
        say("nemesis: flipped 2 bytes of \(path) (\(size) bytes)")
    }

    /// After a lost disk or a corrupt table is healed (the node restarted): the wiped node is
    /// repaired as an operator would (`cairn repair`); the corrupted one is left to itself. Either
    /// way the nemesis goes on only once the node refilled (`cairn repair --status`), so two
    /// faults never take two copies of a key at once.
    func awaitRefill(_ fault: Fault) async throws {
        let n: Int
        switch fault {
        case .wipeDisk(let node):
            n = node
            let out = try await shAsync([config.cairn, "--node", lab.address(n), "--timeout", "300000", "repair", "--json"], allowFailure: true)
            say("nemesis: cairn repair on n\(n + 1): \(out.replacingOccurrences(of: "\n", with: " ").prefix(300))")
        case .corruptTable(let node):
            n = node
            // First the node must find the damage (its scrub reads every table at start).
            let found = Date().addingTimeInterval(60)
            var seen = false
            while !seen && Date() < found {
                let metrics = (try? await shAsync(["curl", "-s", "--max-time", "2", "http://\(lab.httpAddress(n))/metrics"])) ?? ""
                seen = metrics.split(separator: "\n").contains { $0.hasPrefix("cairn_aae_damaged_tables_total ") && !$0.hasSuffix(" 0") }
                if !seen { try await Task.sleep(for: .milliseconds(500)) }
            }
            say(seen ? "nemesis: n\(n + 1) found and set aside the damaged table" : "nemesis: n\(n + 1) reported no damaged table within 60 s")
        default: return
        }
        let deadline = Date().addingTimeInterval(300)
        var last = ""
        while Date() < deadline {
            if let out = try? await cairn(n, ["repair", "--status"]) {
                last = out
                if let o = (try? JSONSerialization.jsonObject(with: Data(out.utf8))) as? [String: Any],
                   (o["refilling"] as? NSNumber)?.intValue == 0 {
                    say("nemesis: n\(n + 1) refilled")
                    return
                }
            }
            try await Task.sleep(for: .milliseconds(500))
        }
        throw TortureError("n\(n + 1) did not refill within 300 s after \(fault); last status: \(last.prefix(300))")
    }

    /// Heals everything: links, transport faults, paused and killed members.
    func healAll() throws {
        try lab.cut([:], running: running)
        clientSides.withLock { $0 = nil }
        for n in paused { signal(n, SIGCONT) }
        paused = []
        for i in running where processes[i] == nil { try start(i) }
        try waitServing(running)
        for i in running { try setTransportFaults(lab.httpAddress(i), "") }
    }

    func runNemesis() async throws {
        for f in schedule.faults {
            let wait = f.atMillis - elapsedMillis
            if wait > 0 { try await Task.sleep(for: .milliseconds(wait)) }
            let begin = elapsedMillis
            if f.fault.isMembershipChange {
                await changeMembership(f.fault)
                continue
            }
            // A membership change that took longer than planned delays what follows; the end of
            // the run stays quiet all the same.
            guard begin + f.durationMillis <= config.durationMillis - 3000 else {
                say("nemesis: skipped (\(f.fault)): too late in the run")
                continue
            }
            say("nemesis: \(f.fault)" + (inFlight.map { " (while \($0.change) completes)" } ?? ""))
            try apply(f)
            try await Task.sleep(for: .milliseconds(f.durationMillis))
            say("nemesis: heal (\(f.fault))")
            try healAll()
            try await awaitRefill(f.fault)
            timeline.append((begin, elapsedMillis, "\(f.fault)"))
        }
        await finishInFlight()
    }

    // MARK: Membership

    /// What `cairn cluster status --json` says, as far as the nemesis cares.
    struct ClusterStatus: Sendable {
        var ringVersion = 0
        var pendingTransfers = 0
        /// Name → joining, valid, leaving or exiting.
        var members: [String: String] = [:]
        var staged: [String] = []

        init(json: String) throws {
            guard let o = (try? JSONSerialization.jsonObject(with: Data(json.utf8))) as? [String: Any] else {
                throw TortureError("cluster status --json printed no JSON object: \(json.prefix(200))")
            }
            ringVersion = (o["ring_version"] as? NSNumber)?.intValue ?? 0
            pendingTransfers = (o["pending_transfers"] as? NSNumber)?.intValue ?? 0
            for m in o["members"] as? [[String: Any]] ?? [] {
                if let name = m["name"] as? String { members[name] = m["status"] as? String ?? "" }
            }
            staged = o["staged"] as? [String] ?? []
        }

        var text: String {
            "ring version \(ringVersion), \(pendingTransfers) transfers pending, members "
                + members.sorted { $0.key < $1.key }.map { "\($0.key):\($0.value)" }.joined(separator: " ")
                + (staged.isEmpty ? "" : ", staged: " + staged.joined(separator: ", "))
        }
    }

    /// `cairn --node <node> ARGS --json` (off the cooperative threads); its standard output.
    func cairn(_ node: Int, _ args: [String]) async throws -> String {
        try await shAsync([config.cairn, "--node", lab.address(node), "--timeout", "5000"] + args + ["--json"])
    }

    func status(_ node: Int) async throws -> ClusterStatus { try ClusterStatus(json: try await cairn(node, ["cluster", "status"])) }

    /// Runs `body` until it succeeds, at most `attempts` times a second apart (a command can meet a
    /// node still reconnecting after the last fault's heal).
    @discardableResult
    func retrying<T>(_ attempts: Int = 10, _ body: () async throws -> T) async throws -> T {
        var last: any Error = TortureError("not tried")
        for attempt in 1...attempts {
            do { return try await body() } catch { last = error }
            if attempt < attempts { try? await Task.sleep(for: .seconds(1)) }
        }
        throw last
    }

    /// Polls `cluster status` on `via` every half second until `done` holds; false after
    /// `millis` (the last status it saw in `last`).
    func waitStatus(via node: Int, millis: Int, last: inout String, _ done: (ClusterStatus) -> Bool) async -> Bool {
        let deadline = elapsedMillis + millis
        while elapsedMillis < deadline {
            do {
                let s = try await status(node)
                last = s.text
                if done(s) { return true }
            } catch {
                last = "\(error)"
            }
            try? await Task.sleep(for: .milliseconds(500))
        }
        return false
    }

    /// The committed membership change whose transfers may still run, while the faults after
    /// it go on: at most one (the next change first waits for it to complete).
    var inFlight: (change: Fault, via: Int, began: Int)?

    /// One join, leave or remove, through the `cairn` CLI as an operator does it: first the
    /// change in flight must complete, then this one is staged, planned and committed. Its
    /// transfers then run under the next faults; `finishInFlight` waits for them. A change that
    /// cannot complete is recorded as a problem and fails the run; the run goes on.
    func changeMembership(_ change: Fault) async {
        await finishInFlight()
        say("nemesis: \(change)")
        let begin = elapsedMillis
        do {
            let via = try await commitChange(change)
            inFlight = (change, via, begin)
        } catch {
            membershipProblems.append("\(change): \(error)")
            say("nemesis: \(change): PROBLEM: \(error)")
            timeline.append((begin, elapsedMillis, "\(change)"))
        }
    }

    /// Waits (bounded) until the change in flight is complete: transfers done and the joiner
    /// valid, or the leaver and the removed node no longer listed (and the leaver's cairnd
    /// exited 0).
    func finishInFlight() async {
        guard let (change, via, began) = inFlight else { return }
        inFlight = nil
        do {
            try await awaitChange(change, via: via)
            // Checked only when the next change is due (or at the end): an upper bound on how
            // long the change took, not its duration.
            say("nemesis: \(change): done (confirmed \(String(format: "%.1f", Double(elapsedMillis - began) / 1000)) s after it began)")
        } catch {
            membershipProblems.append("\(change): \(error)")
            say("nemesis: \(change): PROBLEM: \(error)")
        }
        timeline.append((began, elapsedMillis, "\(change)"))
    }

    /// Stages, plans and commits `change`; returns the member the commands went through.
    func commitChange(_ change: Fault) async throws -> Int {
        guard let target = change.membershipNode else { throw TortureError("\(change) is not a membership change") }
        let name = "n\(target + 1)"
        // Where commands run: n1 (the claimant) while it is a member, the lowest member otherwise.
        guard let via = running.first(where: { $0 != target }) else { throw TortureError("no other member to ask") }
        let timeout = config.membershipTimeoutMillis

        // One change in flight at a time: nothing pending, nothing staged.
        var last = ""
        guard await waitStatus(via: via, millis: timeout, last: &last, { $0.pendingTransfers == 0 && $0.staged.isEmpty }) else {
            throw TortureError("the cluster still had transfers pending or changes staged after \(timeout / 1000) s: \(last)")
        }
        switch change {
        case .join:
            try start(target, seeds: running)
            active.insert(target)
            try waitServing([target], unjoined: true)
            try await retrying { try await self.cairn(target, ["cluster", "join", self.lab.address(via)]) }
        case .leave:
            try await retrying { try await self.cairn(via, ["cluster", "leave", name]) }
        case .remove:
            killNode(target)
            active.remove(target)
            try await retrying { try await self.cairn(via, ["cluster", "remove", name]) }
        default: break
        }
        let staged = try await retrying { try await self.status(via) }.staged
        let expected = change.membershipVerb + " " + name
        guard staged == [expected] else {
            _ = try? await cairn(via, ["cluster", "clear"])
            throw TortureError("expected only '\(expected)' staged, found \(staged); cleared, not committed")
        }
        let plan = try await retrying { try await self.cairn(via, ["cluster", "plan"]) }
        let commit = try await retrying { try await self.cairn(via, ["cluster", "commit"]) }
        say("nemesis: \(change): committed: plan \(Self.compact(plan)); commit \(Self.compact(commit))")
        if case .leave = change {
            // A member no more: no fault touches it, no heal restarts it; it exits on its own.
            active.remove(target)
            leaving.insert(target)
        }
        return via
    }

    /// Nodes whose leave is committed and whose cairnd has not yet been seen to exit.
    var leaving: Set<Int> = []

    func awaitChange(_ change: Fault, via: Int) async throws {
        guard let target = change.membershipNode else { return }
        let name = "n\(target + 1)"
        let timeout = config.membershipTimeoutMillis
        var last = ""
        switch change {
        case .join:
            guard await waitStatus(via: via, millis: timeout, last: &last, { $0.pendingTransfers == 0 && $0.members[name] == "valid" }) else {
                throw TortureError("\(name) not valid with every transfer done after \(timeout / 1000) s: \(last)")
            }
            joins += 1
        case .leave:
            guard await waitStatus(via: via, millis: timeout, last: &last, { $0.pendingTransfers == 0 && $0.members[name] == nil }) else {
                throw TortureError("\(name) still listed or transfers pending after \(timeout / 1000) s: \(last)")
            }
            // Its cairnd exits on its own, with 0, once its data is handed off.
            leaving.remove(target)
            let exitDeadline = elapsedMillis + 60_000
            while processes[target]?.isRunning == true && elapsedMillis < exitDeadline { try await Task.sleep(for: .milliseconds(200)) }
            guard let p = processes[target] else { throw TortureError("\(name) was not running") }
            guard !p.isRunning else {
                killNode(target)
                throw TortureError("\(name) left the ring but its cairnd did not exit within 60 s (killed)")
            }
            processes[target] = nil
            guard p.terminationReason == .exit && p.terminationStatus == 0 else {
                throw TortureError("\(name)'s cairnd exited with \(p.terminationReason == .exit ? "status" : "signal") \(p.terminationStatus) after leaving, not 0")
            }
            leaves += 1
        case .remove:
            guard await waitStatus(via: via, millis: timeout, last: &last, { $0.pendingTransfers == 0 && $0.members[name] == nil }) else {
                throw TortureError("\(name) still listed or transfers pending after \(timeout / 1000) s: \(last)")
            }
            removes += 1
        default: return
        }
    }

    /// A JSON answer on one line, shortened.
    static func compact(_ json: String) -> String {
        let one = json.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }.joined(separator: " ")
        return one.count > 300 ? String(one.prefix(300)) + "..." : one
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
        guard let everywhere = try? await CairnClient.connect(seeds: seeds, configuration: clientConfig(timeout: 1000)) else { return [] }
        var sideClients: [[Int]: CairnClient] = [:]
        defer {
            everywhere.close()
            for c in sideClients.values { c.close() }
        }
        while elapsedMillis < deadlineMillis {
            // During a client split, only the nodes on this client's side.
            var client = everywhere
            if let sides = clientSides.withLock({ $0 }), !sides.members.isEmpty {
                let home = sides.members[id % sides.members.count]
                let side = (sides.minority.contains(home) ? sides.minority : sides.rest).sorted()
                if let c = sideClients[side] {
                    client = c
                } else if let c = try? await CairnClient.connect(seeds: side.map(lab.address), configuration: clientConfig(timeout: 1000)) {
                    sideClients[side] = c
                    client = c
                } else {
                    try? await Task.sleep(for: .milliseconds(20))
                    continue
                }
            }
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
        let seeds = running.map(lab.address)
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

    // MARK: Each primary on its own

    /// One node's admin verb, through a client that talks to that node only.
    func adminJSON(_ node: Int, _ verb: String, _ args: [String] = []) async -> [String: Any]? {
        guard let c = try? await CairnClient.connect(seeds: [lab.address(node)], configuration: clientConfig(timeout: 5000)) else { return nil }
        defer { c.close() }
        guard let text = try? await c.admin(verb, args) else { return nil }
        return (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any]
    }

    /// Waits (at most 60 s) until no running node holds a hint or a fallback copy, then reads
    /// every key's primaries' own copies (`local-get`). Returns them, and why the wait or a read
    /// failed, if it did.
    func primaryCopies() async -> ([String: [String: Result<Set<UInt64>, ReadFailure>]], String?) {
        var problem: String?
        let deadline = elapsedMillis + 60_000
        while true {
            var pending: [String] = []
            for i in running {
                guard let t = await adminJSON(i, "transfers") else { pending.append("n\(i + 1) (no answer)"); continue }
                let hints = (t["hints"] as? [[String: Any]] ?? []).reduce(0) { $0 + (($1["hints"] as? NSNumber)?.intValue ?? 0) }
                let fallbacks = (t["transfers"] as? [[String: Any]] ?? []).count { $0["kind"] as? String == "fallback" }
                if hints + fallbacks > 0 { pending.append("n\(i + 1) (\(hints) hints, \(fallbacks) fallback copies)") }
            }
            if pending.isEmpty { break }
            if elapsedMillis > deadline {
                problem = "still catching up 60 s after the quiet period: " + pending.joined(separator: ", ")
                break
            }
            try? await Task.sleep(for: .milliseconds(500))
        }
        var copies: [String: [String: Result<Set<UInt64>, ReadFailure>]] = [:]
        guard let via = running.first else { return (copies, problem ?? "no node runs") }
        for k in 0..<config.keys {
            let name = String(decoding: Self.keyName(k), as: UTF8.self)
            guard let pre = await adminJSON(via, "preflist", [name]) else { problem = problem ?? "preflist of \(name) failed"; continue }
            for p in pre["primaries"] as? [[String: Any]] ?? [] {
                guard let node = p["node"] as? String, let n = Int(node.dropFirst()), n >= 1 else { continue }
                let copy: Result<Set<UInt64>, ReadFailure>
                if let local = await adminJSON(n - 1, "local-get", [name]) {
                    var held = Set<UInt64>()
                    let primary = local["primary"] as? [String: Any]
                    for s in primary?["siblings"] as? [[String: Any]] ?? [] where s["deleted"] as? Bool != true {
                        held.formUnion(SetValue.decode(Array((s["value"] as? String ?? "").utf8)) ?? [])
                    }
                    copy = primary == nil ? .failure(ReadFailure("it runs no vnode for the key's partition")) : .success(held)
                } else {
                    copy = .failure(ReadFailure("local-get failed"))
                }
                copies[name, default: [:]][node] = copy
            }
        }
        return (copies, problem)
    }

    // MARK: The run

    /// Runs everything; returns the verdict (nil if the harness itself failed).
    public func run() async -> RunResult? {
        emit("cairn-torture: \(config.nodes) nodes (\(config.namespaces ? "network namespaces, nft partitions" : "loopback, transport partitions")), "
              + "\(config.durationMillis / 1000) s, seed \(config.seed), \(config.clients) clients, \(config.keys) keys, N=\(min(3, config.nodes)) R=W=quorum")
        emit("faults: " + config.kinds.map(\.rawValue).joined(separator: ",")
              + (config.membershipEnabled ? " (membership: \(schedule.joins) joins, \(schedule.leaves) leaves, \(schedule.removes) removes)" : ""))
        emit("cairnd: \(config.cairnd)\nwork directory: \(config.workDir)\nfault schedule:\n\(schedule.text)")
        do {
            try FileManager.default.createDirectory(atPath: config.workDir, withIntermediateDirectories: true)
            try writeSecret()
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
        async let nemesis: Void = runNemesis()
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
        // Before the final reads (R=N reads repair): every primary on its own.
        let (copies, copyProblem) = await primaryCopies()
        let finals = await finalReads()
        var result = RunResult(check: CheckResult.check(attempts: attempts, finals: finals))
        result.primaryGaps = CheckResult.primaryGaps(attempts: attempts, copies: copies)
        result.primaryCheckProblem = copyProblem
        (result.joins, result.leaves, result.removes) = (joins, leaves, removes)
        result.membershipProblems = membershipProblems
        result.membershipEnabled = config.membershipEnabled
        report(result, attempts: attempts)
        return result
    }

    func report(_ result: RunResult, attempts: [Attempt]) {
        let r = result.check
        let ok = attempts.count { $0.outcome == .ok }
        let failed = attempts.count { if case .failed = $0.outcome { true } else { false } }
        let unknown = attempts.count - ok - failed
        emit("\nattempts: \(attempts.count) (ok \(ok), failed \(failed), unknown \(unknown))")
        emit("acknowledged and present: \(r.acknowledgedPresent); failed and absent: \(r.failedAbsent)")
        for (key, why) in r.unreadable.sorted(by: { $0.key < $1.key }) { emit("UNREADABLE \(key): \(why)") }
        let timeline = self.timeline
        func active(_ ms: Int) -> String {
            timeline.first { $0.start <= ms && ms <= $0.end }.map { "during '\($0.what)'" } ?? "no fault active"
        }
        for a in r.lost.prefix(10) {
            emit("LOST \(a.key) element \(a.element): client \(a.client) acknowledged at \(a.startMillis)-\(a.endMillis) ms, \(active(a.startMillis))")
        }
        for a in r.failedButPresent.prefix(10) {
            emit("FAILED BUT PRESENT \(a.key) element \(a.element): client \(a.client) told \(a.outcome) at \(a.startMillis) ms, \(active(a.startMillis))")
        }
        for p in r.phantom.prefix(10) { emit("PHANTOM \(p.key) element \(p.element): never written") }
        for g in result.primaryGaps.prefix(10) { emit("PRIMARY GAP \(g)") }
        if let problem = result.primaryCheckProblem { emit("PRIMARY CHECK \(problem)") }
        emit("fault schedule (seed \(config.seed)):\n\(schedule.text)")
        if config.membershipEnabled {
            emit("membership: \(joins) of \(schedule.joins) joins, \(leaves) of \(schedule.leaves) leaves, \(removes) of \(schedule.removes) removes done; members at the end: "
                 + running.map { "n\($0 + 1)" }.joined(separator: ","))
            for p in result.membershipProblems { emit("MEMBERSHIP PROBLEM \(p)") }
        }
        emit(result.passed ? "PASS" : "FAIL")
        emit(result.summary)
    }
}
