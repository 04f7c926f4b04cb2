import CSystemd
import CairnCore
import Logging

/// Where service-manager notifications go. Implementations must be thread-safe and must not block.
public protocol NotifySink: Sendable {
    func send(_ message: String)
}

/// libsystemd's `sd_notify`: a datagram to `$NOTIFY_SOCKET`; a no-op when it is unset, so the
/// daemon runs unchanged outside systemd.
public struct SystemdNotifySink: NotifySink {
    public init() {}

    public func send(_ message: String) {
        _ = message.withCString { sd_notify(0, $0) }
    }

    /// The watchdog interval systemd set for this process (`WatchdogSec=`), if any.
    public static func watchdogInterval() -> Duration? {
        var usec: UInt64 = 0
        guard sd_watchdog_enabled(0, &usec) > 0, usec > 0 else { return nil }
        return .microseconds(Int64(clamping: usec))
    }
}

/// The node's lifecycle, kept once: the shell around `ServiceStatus`, whose phase is the node's
/// state (what clients are told: starting, serving, draining, stopped) and whose messages go to
/// the service manager, in order.
///
/// Isolation: a lock-protected class; `report` may be called from any thread and sends while
/// holding the lock so messages leave in the order their events happened.
final class ServiceNotifier: Sendable {
    private let status = Locked(ServiceStatus())
    private let sink: any NotifySink

    init(sink: any NotifySink) { self.sink = sink }

    /// Feeds one event to the machine and sends what it says. Returns whether the phase changed
    /// (so exactly one caller performs a transition's work).
    @discardableResult
    func report(_ event: ServiceStatus.Event) -> Bool {
        status.withLock { s in
            let before = s.phase
            for m in s.on(event) { sink.send(m) }
            return s.phase != before
        }
    }

    var state: NodeState {
        switch status.withLock({ $0.phase }) {
        case .starting: .starting
        case .serving: .serving
        case .draining: .draining
        case .stopped: .stopped
        }
    }

    func ping() { sink.send("WATCHDOG=1") }
}
