/// What the node tells its service manager (systemd's notify protocol), as a pure state machine:
/// lifecycle events in, `sd_notify` messages out.
///
/// Guarantees a caller may rely on: `READY=1` is emitted once, only on `.serving` (which the node
/// reports after storage is recovered, listeners are bound and every peer was tried);
/// `STOPPING=1` once, on `.draining`; `EXTEND_TIMEOUT_USEC` only while recovery progresses,
/// at most once per `recoveryReportEvery`; a `STATUS=` line is never repeated unchanged.
public struct ServiceStatus: Sendable {
    public enum Event: Sendable, Hashable {
        /// Storage recovery progress (e.g. log bytes replayed of total).
        case recovering(done: UInt64, total: UInt64, at: ContinuousClock.Instant)
        case listening(address: String)
        case serving(peersUp: Int, peers: Int)
        case peersChanged(up: Int, of: Int)
        case unhealthy(String)
        case healthy
        case draining(inflight: Int)
        case stopped
    }

    public enum Phase: Sendable { case starting, serving, draining, stopped }

    public private(set) var phase: Phase = .starting
    public let recoveryReportEvery: Duration
    /// How far each recovery report pushes systemd's start timeout out.
    public let recoveryExtension: Duration
    private var lastStatus = ""
    private var lastRecoveryReport: ContinuousClock.Instant?
    private var lastRecoveryPercent = -1
    private var peers = (up: 0, of: 0)
    private var unhealthyReason: String?

    public init(recoveryReportEvery: Duration = .seconds(1), recoveryExtension: Duration = .seconds(10)) {
        self.recoveryReportEvery = recoveryReportEvery
        self.recoveryExtension = recoveryExtension
    }

    public mutating func on(_ event: Event) -> [String] {
        switch event {
        case .recovering(let done, let total, let now):
            guard phase == .starting else { return [] }
            let percent = total == 0 ? 100 : Int(Double(min(done, total)) / Double(total) * 100)
            if let last = lastRecoveryReport, now - last < recoveryReportEvery { return [] }
            guard percent > lastRecoveryPercent else { return [] }
            lastRecoveryReport = now
            lastRecoveryPercent = percent
            let usec = recoveryExtension.components.seconds * 1_000_000 + recoveryExtension.components.attoseconds / 1_000_000_000_000
            return [status("recovering storage: \(percent)%") + "\nEXTEND_TIMEOUT_USEC=\(usec)"]
        case .listening(let address):
            guard phase == .starting else { return [] }
            return statusIfChanged("starting: listening on \(address); connecting to peers")
        case .serving(let up, let of):
            guard phase == .starting else { return [] }
            phase = .serving
            peers = (up, of)
            return ["READY=1\n" + status(servingText)]
        case .peersChanged(let up, let of):
            peers = (up, of)
            guard phase == .serving else { return [] }
            return statusIfChanged(servingText)
        case .unhealthy(let why):
            unhealthyReason = why
            guard phase == .serving else { return [] }
            return statusIfChanged(servingText)
        case .healthy:
            unhealthyReason = nil
            guard phase == .serving else { return [] }
            return statusIfChanged(servingText)
        case .draining(let inflight):
            guard phase == .starting || phase == .serving else { return [] }
            phase = .draining
            return ["STOPPING=1\n" + status("shutting down: draining \(inflight) in-flight requests")]
        case .stopped:
            guard phase != .stopped else { return [] }
            phase = .stopped
            return statusIfChanged("stopped")
        }
    }

    private var servingText: String {
        var s = "serving; peers up \(peers.up) of \(peers.of)"
        if let why = unhealthyReason { s += "; unhealthy: \(why) (watchdog pings withheld)" }
        return s
    }

    private mutating func status(_ text: String) -> String {
        lastStatus = text
        return "STATUS=" + text
    }

    private mutating func statusIfChanged(_ text: String) -> [String] {
        text == lastStatus ? [] : [status(text)]
    }
}

/// When to run the health check and whether to ping systemd's watchdog, as a pure state machine
/// over a caller-supplied clock.
///
/// Pings (`WATCHDOG=1`) are sent at half the watchdog interval, and only after a health check
/// that passed within `checkBound` (a quarter of the interval). A failed or slow check withholds
/// the ping; two withheld pings in a row let systemd's timer expire and restart the node.
public struct WatchdogTimer: Sendable {
    public enum Decision: Sendable, Hashable {
        case ping
        case withhold(String)
    }

    public let interval: Duration
    public var pingEvery: Duration { interval / 2 }
    public var checkBound: Duration { interval / 4 }
    private var nextCheck: ContinuousClock.Instant

    public init(interval: Duration, now: ContinuousClock.Instant) {
        self.interval = interval
        self.nextCheck = now
    }

    /// True when a health check is due; the next one is then due `pingEvery` later.
    public mutating func checkDue(at now: ContinuousClock.Instant) -> Bool {
        guard now >= nextCheck else { return false }
        nextCheck = now + pingEvery
        return true
    }

    /// How long the shell may sleep before the next check is due.
    public func sleepTime(from now: ContinuousClock.Instant) -> Duration { max(nextCheck - now, .zero) }

    /// The decision after a check that started at `started` and finished at `finished`;
    /// `failure` is nil when every probe answered.
    public func decide(failure: String?, started: ContinuousClock.Instant, finished: ContinuousClock.Instant) -> Decision {
        if let failure { return .withhold(failure) }
        let took = finished - started
        if took > checkBound { return .withhold("health check took \(took), over its \(checkBound) bound") }
        return .ping
    }
}
