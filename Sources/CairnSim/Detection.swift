public import CairnCore
public import CairnMembership
#if canImport(Glibc)
import Glibc
#endif

/// Failure-detection figures for `cairn-sim --detection`: many instances of the real SWIM state
/// machine (`SWIMInstance`, the one every node's membership agent drives) exchanging their
/// messages over a seeded simulated network (0.5–5 ms latency, optional loss) on virtual time.
/// A discrete-event loop, single-threaded: the same seed gives the same figures. What it leaves
/// out of a real node is the shell around the machine (encoding, the transport, the ring
/// summary each packet carries), so it can run 64 members for simulated hours in seconds.
public final class SWIMNetwork {
    private enum Kind {
        case deliver(from: Int, to: Int, SWIMMessage)
        case wake(Int)
    }

    private struct Event {
        let at: Duration
        let sequence: UInt64
        let kind: Kind
        func before(_ other: Event) -> Bool { (at, sequence) < (other.at, other.sequence) }
    }

    private struct Member {
        var swim: SWIMInstance
        var up = true
        var paused = false
        /// Messages that reached it while paused, handled in order on resume.
        var held: [(from: Int, message: SWIMMessage)] = []
        var wakeAt: Duration?
    }

    public let settings: SWIMSettings
    public let loss: Double
    private var rng: SplitMix64
    private var members: [Member] = []
    private var names: [NodeName] = []
    private var index: [NodeName: Int] = [:]
    private var heap: [Event] = []
    private var sequence: UInt64 = 0
    private let base = ContinuousClock.now
    /// Virtual time since the start.
    public private(set) var now: Duration = .zero
    /// Called for every status change a member's machine reports: (observer, subject, new status).
    public var onStatus: ((Int, Int, MemberStatus) -> Void)?

    /// `count` members that all know each other from the start (as `cluster.members` gives).
    public init(count: Int, seed: UInt64, settings: SWIMSettings = SWIMSettings(), loss: Double = 0) throws {
        self.settings = settings
        self.loss = loss
        rng = SplitMix64(seed: seed)
        for _ in 0..<count { _ = try addInstance() }
        for i in 0..<count {
            for j in 0..<count where j != i { _ = members[i].swim.add(names[j]) }
            schedule(wake: i, at: .zero)
        }
    }

    public var count: Int { members.count }

    public func name(_ i: Int) -> NodeName { names[i] }

    public func status(of subject: Int, at observer: Int) -> MemberStatus? { members[observer].swim.status(of: names[subject]) }

    public func isUp(_ i: Int) -> Bool { members[i].up }

    private func addInstance() throws -> Int {
        let i = members.count
        let name = try NodeName("m\(i + 1)")
        names.append(name)
        index[name] = i
        members.append(Member(swim: SWIMInstance(me: name, settings: settings, seed: rng.next(), now: base)))
        return i
    }

    /// A new member that knows only `seed` joins now; `seed` learns of it as a join adds it
    /// (the ring names it), everyone else through gossip.
    public func join(through seed: Int) throws -> Int {
        let j = try addInstance()
        members[j].swim = SWIMInstance(me: names[j], settings: settings, seed: rng.next(), now: base + now)
        perform(j, members[j].swim.add(names[seed]))
        perform(seed, members[seed].swim.add(names[j]))
        perform(j, members[j].swim.announce())
        schedule(wake: j, at: now)
        schedule(wake: seed, at: now)
        return j
    }

    /// `i` stops for good: it sends nothing and what is sent to it is lost.
    public func crash(_ i: Int) {
        members[i].up = false
        members[i].held = []
    }

    /// `i` stops as SIGSTOP does: no timer of its runs; messages to it wait.
    public func pause(_ i: Int) { members[i].paused = true }

    /// `i` continues: its timers catch up, then it handles what reached it, in order.
    public func resume(_ i: Int) {
        guard members[i].paused else { return }
        members[i].paused = false
        tick(i)
        let held = members[i].held
        members[i].held = []
        for h in held where members[i].up { receive(h.message, from: h.from, at: i) }
        reschedule(i)
    }

    /// Runs every event up to `end` (virtual time since the start).
    public func run(until end: Duration) {
        while let first = heap.first, first.at <= end {
            let e = pop()
            now = e.at
            switch e.kind {
            case .wake(let i):
                guard members[i].up, !members[i].paused, members[i].wakeAt == e.at else { continue }
                members[i].wakeAt = nil
                tick(i)
                reschedule(i)
            case .deliver(let from, let to, let message):
                guard members[to].up else { continue }
                if members[to].paused {
                    members[to].held.append((from, message))
                    continue
                }
                receive(message, from: from, at: to)
                reschedule(to)
            }
        }
        now = max(now, end)
    }

    private func tick(_ i: Int) {
        perform(i, members[i].swim.tick(now: base + now))
    }

    private func receive(_ message: SWIMMessage, from: Int, at i: Int) {
        perform(i, members[i].swim.received(message, from: names[from], now: base + now))
    }

    private func perform(_ i: Int, _ directives: [SWIMDirective]) {
        for d in directives {
            switch d {
            case .send(let to, let message):
                guard members[i].up, let j = index[to] else { continue }
                if loss > 0, rng.nextDouble() < loss { continue }
                let latency = Duration.microseconds(500 + Int64(rng.next(below: 4500)))
                push(Event(at: now + latency, sequence: nextSequence(), kind: .deliver(from: i, to: j, message)))
            case .statusChanged(let node, _, let to, _):
                if let j = index[node] { onStatus?(i, j, to) }
            }
        }
    }

    private func reschedule(_ i: Int) {
        guard members[i].up, !members[i].paused else { return }
        let at = max(members[i].swim.nextDeadline - base, now)
        schedule(wake: i, at: at)
    }

    private func schedule(wake i: Int, at: Duration) {
        if let w = members[i].wakeAt, w <= at, w >= now { return }
        members[i].wakeAt = at
        push(Event(at: at, sequence: nextSequence(), kind: .wake(i)))
    }

    private func nextSequence() -> UInt64 {
        sequence += 1
        return sequence
    }

    // A binary min-heap on (at, sequence).
    private func push(_ e: Event) {
        heap.append(e)
        var c = heap.count - 1
        while c > 0 {
            let p = (c - 1) / 2
            guard heap[c].before(heap[p]) else { break }
            heap.swapAt(c, p)
            c = p
        }
    }

    private func pop() -> Event {
        let top = heap[0]
        let last = heap.removeLast()
        if !heap.isEmpty {
            heap[0] = last
            var p = 0
            while true {
                let l = 2 * p + 1, r = l + 1
                var m = p
                if l < heap.count, heap[l].before(heap[m]) { m = l }
                if r < heap.count, heap[r].before(heap[m]) { m = r }
                guard m != p else { break }
                heap.swapAt(m, p)
                p = m
            }
        }
        return top
    }
}

/// The failure-detection figures at one cluster size over seeds, and whether they meet the goals.
public struct DetectionFigures: Sendable {
    public var members: Int
    public var seeds: Int
    /// Crash to every live member holding the crashed one `dead`, one sample per trial (s).
    public var crashDetection: [Double] = []
    /// Crashes not detected by every live member within the trial's 60 s.
    public var undetected = 0
    /// `dead` verdicts while one member paused for 3 s (any observer, any subject).
    public var pauseDeads = 0
    /// False `dead` verdicts with 5% message loss, over `memberDays` of exposure.
    public var lossDeads = 0
    public var memberDays = 0.0
    /// Probe rounds until a new member is known to every member, one sample per trial.
    public var changeRounds: [Double] = []

    /// The nearest-rank percentile (`q` in 0...1).
    public static func percentile(_ xs: [Double], _ q: Double) -> Double {
        guard !xs.isEmpty else { return .nan }
        let s = xs.sorted()
        let rank = Int((Double(s.count) * q).rounded(.up))
        return s[min(max(rank - 1, 0), s.count - 1)]
    }

    public var crashP50: Double { Self.percentile(crashDetection, 0.50) }
    public var crashP99: Double { Self.percentile(crashDetection, 0.99) }
    public var falseDeadPerMemberDay: Double { memberDays > 0 ? Double(lossDeads) / memberDays : .nan }
    public var log2n: Double { log2(Double(members)) }
    public var roundsMax: Double { changeRounds.max() ?? .nan }
    public var roundsP50: Double { Self.percentile(changeRounds, 0.5) }
    /// The dissemination bound: an update is piggybacked λ·⌈log2(n + 1)⌉ times by each member
    /// that has it (λ = `retransmitMultiplier`), so every member should have it within that many rounds.
    public func roundsBound(_ settings: SWIMSettings) -> Double {
        Double(settings.retransmitMultiplier) * log2(Double(members + 1)).rounded(.up)
    }

    /// The goals that failed (empty: all met).
    public func failures(_ settings: SWIMSettings) -> [String] {
        var out: [String] = []
        if undetected > 0 { out.append("\(undetected) crashes not detected within 60 s") }
        if !(crashP50 <= 5) { out.append("crash detection p50 \(crashP50) s > 5 s") }
        if !(crashP99 <= 10) { out.append("crash detection p99 \(crashP99) s > 10 s") }
        if pauseDeads > 0 { out.append("\(pauseDeads) dead verdicts during a 3 s pause") }
        if !(falseDeadPerMemberDay < 1) { out.append("\(falseDeadPerMemberDay) false dead per member-day with 5% loss (goal < 1)") }
        if !(roundsMax <= roundsBound(settings)) { out.append("a new member took \(roundsMax) rounds to reach everyone (bound \(roundsBound(settings)))") }
        return out
    }
}

/// Runs the detection experiments at one cluster size.
public struct DetectionExperiment: Sendable {
    public var members: Int
    public var settings = SWIMSettings()
    /// Crash and join trials per seed.
    public var trials = 10
    /// Exposure of the 5%-loss run per seed, in member-days (its virtual length is this × 1 day / members).
    public var lossMemberDays = 1.0

    public init(members: Int) { self.members = members }

    private static let warmUp = Duration.seconds(10)

    public func run(seeds: ClosedRange<UInt64>) throws -> DetectionFigures {
        var f = DetectionFigures(members: members, seeds: seeds.count)
        let interval = Double(settings.probeInterval.components.seconds) + Double(settings.probeInterval.components.attoseconds) / 1e18
        for seed in seeds {
            var rng = SplitMix64(seed: seed ^ 0xde7e_c7)
            for t in 0..<trials {
                // Crash: from the crash until every live member holds the victim dead.
                let net = try SWIMNetwork(count: members, seed: rng.next(), settings: settings)
                net.run(until: Self.warmUp + .milliseconds(Int64(rng.next(below: 1000))))
                let victim = Int(rng.next(below: UInt64(members)))
                let crashedAt = net.now
                net.crash(victim)
                var deadAt: [Int: Duration] = [:]
                net.onStatus = { [unowned net] observer, subject, status in
                    if subject == victim, status == .dead, deadAt[observer] == nil { deadAt[observer] = net.now }
                }
                let live = (0..<members).filter { $0 != victim }
                var end = crashedAt
                while deadAt.count < live.count, end < crashedAt + .seconds(60) {
                    end += .milliseconds(100)
                    net.run(until: end)
                }
                if deadAt.count < live.count { f.undetected += 1 } else {
                    let last = deadAt.values.max() ?? crashedAt
                    f.crashDetection.append(Self.seconds(last - crashedAt))
                }
                // A new member: rounds until every member knows it.
                let grow = try SWIMNetwork(count: members, seed: rng.next(), settings: settings)
                grow.run(until: Self.warmUp)
                let seedMember = Int(rng.next(below: UInt64(members)))
                let joinedAt = grow.now
                let newcomer = try grow.join(through: seedMember)
                var stop = joinedAt
                while (0..<members).contains(where: { grow.status(of: newcomer, at: $0) == nil }), stop < joinedAt + .seconds(120) {
                    stop += .milliseconds(50)
                    grow.run(until: stop)
                }
                f.changeRounds.append(Self.seconds(stop - joinedAt) / interval)
                _ = t
            }
            // A 3 s pause of one member: no one may be declared dead.
            let paused = try SWIMNetwork(count: members, seed: rng.next(), settings: settings)
            paused.onStatus = { _, _, status in if status == .dead { f.pauseDeads += 1 } }
            paused.run(until: Self.warmUp)
            let p = Int(rng.next(below: UInt64(members)))
            paused.pause(p)
            paused.run(until: Self.warmUp + .seconds(3))
            paused.resume(p)
            paused.run(until: Self.warmUp + .seconds(63))
            // 5% loss: every dead verdict is false (no one fails).
            let lossy = try SWIMNetwork(count: members, seed: rng.next(), settings: settings, loss: 0.05)
            var deads = 0
            lossy.onStatus = { _, _, status in if status == .dead { deads += 1 } }
            let length = Duration.seconds(86_400) * (lossMemberDays / Double(members))
            lossy.run(until: length)
            f.lossDeads += deads
            f.memberDays += Self.seconds(length) / 86_400 * Double(members)
        }
        return f
    }

    static func seconds(_ d: Duration) -> Double {
        Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }
}
