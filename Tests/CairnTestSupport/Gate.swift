import CairnCore

/// Lets `receive` calls through one permit at a time (`release`), so a test decides when the
/// receiver consumes.
public final class Gate: Sendable {
    private let state = Locked<(permits: Int, waiters: [CheckedContinuation<Void, Never>])>((0, []))
    public init(open permits: Int = 0) { state.withLock { $0.permits = permits } }

    public func pass() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = state.withLock { s in
                if s.permits > 0 {
                    s.permits -= 1
                    return true
                }
                s.waiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    public func release(_ n: Int = 1) {
        let ready: [CheckedContinuation<Void, Never>] = state.withLock { s in
            s.permits += n
            var out: [CheckedContinuation<Void, Never>] = []
            while s.permits > 0, !s.waiters.isEmpty {
                s.permits -= 1
                out.append(s.waiters.removeFirst())
            }
            return out
        }
        for w in ready { w.resume() }
    }
}
