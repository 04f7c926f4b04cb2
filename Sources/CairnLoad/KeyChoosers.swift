import Foundation
public import CairnCore

/// Picks the record a request touches, as YCSB's generators do.
public enum KeyDistribution: String, Sendable, CaseIterable {
    case uniform, zipfian, latest, hotspot
}

/// Zipfian over ranks 0..<n with exponent θ: rank 0 is the most popular. YCSB's
/// `ZipfianGenerator` (Gray et al., "Quickly generating billion-record synthetic databases").
public struct Zipfian: Sendable {
    public let n: UInt64
    public let theta: Double
    let zetan: Double
    let alpha: Double
    let eta: Double
    let zeta2: Double

    public static let ycsbTheta = 0.99

    public init(n: UInt64, theta: Double = Zipfian.ycsbTheta) {
        self.init(n: n, theta: theta, zetan: Self.zeta(n, theta))
    }

    init(n: UInt64, theta: Double, zetan: Double) {
        self.n = max(n, 1)
        self.theta = theta
        self.zetan = zetan
        zeta2 = Self.zeta(2, theta)
        alpha = 1 / (1 - theta)
        eta = (1 - pow(2 / Double(max(n, 2)), 1 - theta)) / (1 - zeta2 / zetan)
    }

    /// ζ(n, θ) = Σ_{i=1..n} 1/i^θ.
    public static func zeta(_ n: UInt64, _ theta: Double) -> Double {
        var sum = 0.0
        var i: UInt64 = 1
        while i <= n {
            sum += 1 / pow(Double(i), theta)
            i += 1
        }
        return sum
    }

    public func next(_ rng: inout SplitMix64) -> UInt64 {
        let u = rng.nextDouble()
        let uz = u * zetan
        if uz < 1 { return 0 }
        if uz < 1 + pow(0.5, theta) { return min(1, n - 1) }
        let r = UInt64(Double(n) * pow(eta * u - eta + 1, alpha))
        return min(r, n - 1)
    }

    /// The probability of rank `k` (0-based): 1 / ((k+1)^θ ζ(n, θ)).
    public func probability(ofRank k: UInt64) -> Double { 1 / (pow(Double(k + 1), theta) * zetan) }
}

/// The choosers a run uses. `next` returns a record index in 0..<records.
public enum KeyChooser: Sendable {
    case uniform(records: UInt64)
    /// YCSB's scrambled zipfian: a zipfian rank over a huge item space, hashed (FNV-1a 64) onto
    /// the records, so popular keys are spread over the key space rather than clustered.
    case scrambledZipfian(records: UInt64, zipf: Zipfian)
    /// Zipfian over recency: the most recently inserted record is the most popular.
    case latest(zipf: Zipfian)
    /// `hotFraction` of the records receive `hotOperationFraction` of the requests.
    case hotspot(records: UInt64, hotFraction: Double, hotOperationFraction: Double)

    /// YCSB's constants for the scrambled zipfian: 10^10 items, ζ precomputed for θ = 0.99.
    static let scrambledItemCount: UInt64 = 10_000_000_000
    static let scrambledZetan = 26.46902820178302

    public static func make(_ d: KeyDistribution, records: UInt64) -> KeyChooser {
        switch d {
        case .uniform: .uniform(records: records)
        case .zipfian: .scrambledZipfian(records: records,
                                         zipf: Zipfian(n: scrambledItemCount, theta: Zipfian.ycsbTheta, zetan: scrambledZetan))
        case .latest: .latest(zipf: Zipfian(n: max(records, 1)))
        case .hotspot: .hotspot(records: records, hotFraction: 0.2, hotOperationFraction: 0.8)
        }
    }

    /// `newest`: the highest record index inserted so far (for `latest`).
    public func next(_ rng: inout SplitMix64, newest: UInt64) -> UInt64 {
        switch self {
        case .uniform(let n):
            return rng.next(below: n)
        case .scrambledZipfian(let n, let zipf):
            return Self.fnv1a64(zipf.next(&rng)) % max(n, 1)
        case .latest(let zipf):
            let span = newest &+ 1   // 0 only if nothing was ever inserted
            return span == 0 ? 0 : newest - zipf.next(&rng) % span
        case .hotspot(let n, let hot, let hotOps):
            let hotCount = max(UInt64(Double(n) * hot), 1)
            if rng.nextDouble() < hotOps || hotCount >= n { return rng.next(below: hotCount) }
            return hotCount + rng.next(below: n - hotCount)
        }
    }

    /// FNV-1a over the 8 little-endian bytes of `v` (YCSB's `Utils.fnvhash64`).
    static func fnv1a64(_ v: UInt64) -> UInt64 {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325
        var x = v
        for _ in 0..<8 {
            h ^= x & 0xFF
            h = h &* 0x0000_0100_0000_01B3
            x >>= 8
        }
        return h
    }
}
