extension Duration {
    /// Whole milliseconds, for comparing with wall-clock stamps: 0 for a negative duration,
    /// `UInt64.max` past it; the sub-millisecond rest is dropped.
    public var wholeMilliseconds: UInt64 {
        let (seconds, atto) = components
        guard seconds >= 0 else { return 0 }
        let (ms, overflow) = UInt64(seconds).multipliedReportingOverflow(by: 1000)
        guard !overflow else { return .max }
        let (sum, over) = ms.addingReportingOverflow(UInt64(max(atto, 0) / 1_000_000_000_000_000))
        return over ? .max : sum
    }

    /// Whole nanoseconds, for timed waits: 0 for a negative duration, `Int64.max` past it.
    public var wholeNanoseconds: Int64 {
        let (seconds, atto) = components
        guard seconds >= 0 else { return 0 }
        let (ns, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        guard !overflow else { return .max }
        let (sum, over) = ns.addingReportingOverflow(max(atto, 0) / 1_000_000_000)
        return over ? .max : sum
    }
}
