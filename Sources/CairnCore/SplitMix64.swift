/// A small, fast, seedable generator (SplitMix64): reproducible runs from a seed in the load
/// generator, the torture harness and the storage benchmark. Not for anything secret.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    public mutating func nextDouble() -> Double { Double(next() >> 11) * 0x1.0p-53 }

    /// Uniform in [0, n) (0 when n ≤ 1).
    public mutating func next(below n: UInt64) -> UInt64 { n <= 1 ? 0 : next() % n }
}

/// Where a node draws its actor epochs: the system's generator, or (simulations) a seeded one so
/// the same seed gives the same epochs. Thread-safe.
public final class EpochSource: Sendable {
    private let seeded: Locked<SplitMix64?>

    /// `seed`: nil draws from the system generator.
    public init(seed: UInt64? = nil) { seeded = Locked(seed.map { SplitMix64(seed: $0) }) }

    /// A fresh epoch, never 0.
    public func next() -> UInt64 {
        seeded.withLock { rng in
            guard rng != nil else { return UInt64.random(in: 1...UInt64.max) }
            var value: UInt64 = 0
            while value == 0 { value = rng?.next() ?? 1 }
            return value
        }
    }
}
