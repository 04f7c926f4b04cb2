import Testing
import Foundation
import CairnCore
import Histogram
@testable import CairnLoad

@Suite struct KeyChooserTests {
    /// Zipfian(θ=0.99): rank k is chosen with probability 1/((k+1)^θ ζ(n,θ)). On 1M draws the
    /// shares of rank 0 and of the top 1% match that within a few percent.
    @Test func zipfianSkewMatchesTheory() {
        let n: UInt64 = 10_000
        let z = Zipfian(n: n)
        var rng = SplitMix64(seed: 7)
        var counts = [Int](repeating: 0, count: Int(n))
        let draws = 1_000_000
        for _ in 0..<draws { counts[Int(z.next(&rng))] += 1 }
        let p0 = z.probability(ofRank: 0)
        #expect(abs(Double(counts[0]) / Double(draws) - p0) < p0 * 0.05, "rank 0: \(counts[0]) expected ≈ \(p0 * Double(draws))")
        let top1pct = (0..<100).reduce(0.0) { $0 + z.probability(ofRank: UInt64($1)) }
        let seen = Double(counts[0..<100].reduce(0, +)) / Double(draws)
        #expect(abs(seen - top1pct) < 0.03, "top 1%: \(seen) expected ≈ \(top1pct)")
        #expect(counts[0] > counts[1] && counts[1] > counts[10] && counts[10] > counts[1000])
    }

    /// Scrambled zipfian spreads the popular keys: the hottest key takes ≈ 1/ζ(10^10) ≈ 3.8% of
    /// requests, and it is not key 0.
    @Test func scrambledZipfianIsSkewedButSpread() {
        let chooser = KeyChooser.make(.zipfian, records: 100_000)
        var rng = SplitMix64(seed: 3)
        var counts: [UInt64: Int] = [:]
        for _ in 0..<500_000 { counts[chooser.next(&rng, newest: 99_999), default: 0] += 1 }
        let hottest = counts.max { $0.value < $1.value }
        let share = Double(hottest?.value ?? 0) / 500_000
        #expect(share > 0.03 && share < 0.046, "hottest share \(share)")
        #expect(hottest?.key != 0)
        #expect(counts.keys.allSatisfy { $0 < 100_000 })
    }

    @Test func latestFavoursTheNewestRecords() {
        let chooser = KeyChooser.make(.latest, records: 10_000)
        var rng = SplitMix64(seed: 5)
        var newestHits = 0, olderHalf = 0
        for _ in 0..<200_000 {
            let k = chooser.next(&rng, newest: 9_999)
            #expect(k <= 9_999)
            if k == 9_999 { newestHits += 1 }
            if k < 5_000 { olderHalf += 1 }
        }
        let p0 = Zipfian(n: 10_000).probability(ofRank: 0)
        #expect(abs(Double(newestHits) / 200_000 - p0) < p0 * 0.06)
        #expect(Double(olderHalf) / 200_000 < 0.1)
    }

    @Test func hotspotSendsTheHotShareToTheHotSet() {
        let chooser = KeyChooser.make(.hotspot, records: 10_000)
        var rng = SplitMix64(seed: 9)
        var hot = 0
        for _ in 0..<200_000 where chooser.next(&rng, newest: 9_999) < 2_000 { hot += 1 }
        #expect(abs(Double(hot) / 200_000 - 0.8) < 0.01)
    }

    @Test func uniformCoversEvenly() {
        let chooser = KeyChooser.make(.uniform, records: 100)
        var rng = SplitMix64(seed: 11)
        var counts = [Int](repeating: 0, count: 100)
        for _ in 0..<200_000 { counts[Int(chooser.next(&rng, newest: 99))] += 1 }
        #expect((counts.min() ?? 0) > 1_800 && (counts.max() ?? 0) < 2_200)
    }

    @Test func workloadMixesAndCustomMixes() throws {
        var rng = SplitMix64(seed: 1)
        let b = try #require(Workload.named("b"))
        var reads = 0
        for _ in 0..<100_000 where b.pick(&rng) == .read { reads += 1 }
        #expect(abs(Double(reads) / 100_000 - 0.95) < 0.005)
        let custom = try Workload.custom("read=7, update=2 # comment\nrmw=1")
        #expect(custom.mix[.read] == 0.7 && custom.mix[.readModifyWrite] == 0.1)
        #expect(throws: LoadError.self) { try Workload.custom("scan=1") }
        #expect(throws: LoadError.self) { try Workload.custom("read=0") }
    }
}

@Suite struct MeasurementTests {
    /// An open-loop run at 1000/s whose server stalls for 1 s: operations scheduled during the
    /// stall count the time they waited, measured from when they should have started.
    @Test func coordinatedOmissionIsCorrected() {
        let s = OpenLoopSchedule(rate: 1000)
        #expect(s.intendedStartNanos(0) == 0)
        #expect(s.intendedStartNanos(1500) == 1_500_000_000)
        // Ops 100..<1100 were scheduled during a stall from 0.1 s to 1.1 s and all completed at 1.1 s.
        let stalledEnd: UInt64 = 1_100_000_000
        let latencies = (100..<1100).map { s.correctedLatencyMicros(UInt64($0), completedNanos: stalledEnd) }
        #expect(latencies.first == 1_000_000)   // waited the whole second
        #expect(latencies.last == 1_000)        // scheduled just before the stall ended
        // The uncorrected view (from the moment a connection freed up) would have seen ~0 for all.
        let mean = latencies.reduce(0, +) / UInt64(latencies.count)
        #expect(mean > 400_000 && mean < 600_000)
    }

    @Test func valuesCheckThemselves() {
        let key = recordKey(42)
        #expect(key == Array("k000000000042".utf8))
        let v = ValueFormat.make(key: key, seq: 77, size: 100)
        #expect(v.count == 100)
        #expect(ValueFormat.check(v, key: key) == .ok(seq: 77))
        #expect(ValueFormat.check(v, key: recordKey(43)) == .wrongKey)
        for i in [0, 5, 13, 27, 31, 60, 99] {
            var flipped = v
            flipped[i] ^= 0x10
            if case .ok = ValueFormat.check(flipped, key: key) { Issue.record("bit flip at \(i) not detected") }
        }
        if case .ok = ValueFormat.check(Array(v.prefix(60)), key: key) { Issue.record("truncation not detected") }
        #expect(ValueFormat.make(key: key, seq: 1, size: 10).count == ValueFormat.headerBytes)
    }

    @Test func verifierFindsLostWritesAndAcceptsConcurrentOnes() {
        let key = recordKey(1)
        let v = Verifier(depth: 8)
        func val(_ seq: UInt64) -> [UInt8] { ValueFormat.make(key: key, seq: seq, size: 40) }
        v.issued(key: 1, seq: 1, at: 10); v.acknowledged(key: 1, seq: 1, at: 20)
        v.issued(key: 1, seq: 2, at: 30); v.acknowledged(key: 1, seq: 2, at: 40)
        v.checkRead(key: 1, keyBytes: key, started: 50, values: [val(2)])          // newest: fine
        #expect(v.result.lost == 0)
        v.checkRead(key: 1, keyBytes: key, started: 50, values: [val(1)])          // 1 was acked before 2 was issued: lost
        #expect(v.result.lost == 1)
        v.issued(key: 1, seq: 3, at: 60)                                           // in flight
        v.issued(key: 1, seq: 4, at: 61); v.acknowledged(key: 1, seq: 4, at: 70)
        v.checkRead(key: 1, keyBytes: key, started: 80, values: [val(3)])          // concurrent with 4: fine
        v.checkRead(key: 1, keyBytes: key, started: 80, values: [val(2), val(4)])  // siblings incl. newest: fine
        #expect(v.result.lost == 1)
        v.checkRead(key: 1, keyBytes: key, started: 80, values: [])                // not found after an ack: lost
        #expect(v.result.lost == 2)
        var bad = val(4)
        bad[35] ^= 1
        v.checkRead(key: 1, keyBytes: key, started: 80, values: [bad, val(4)])
        #expect(v.result.corrupt == 1 && v.result.lost == 2 && v.result.readsChecked == 6)
        // An acknowledged delete: empty is right, an older value coming back is not.
        v.issued(key: 1, seq: 5, at: 90, isDelete: true); v.acknowledged(key: 1, seq: 5, at: 95)
        v.checkRead(key: 1, keyBytes: key, started: 100, values: [])
        #expect(v.result.lost == 2)
        v.checkRead(key: 1, keyBytes: key, started: 100, values: [val(4)])
        #expect(v.result.lost == 3)
        // A write after the delete is the newest again.
        v.issued(key: 1, seq: 6, at: 110); v.acknowledged(key: 1, seq: 6, at: 120)
        v.checkRead(key: 1, keyBytes: key, started: 130, values: [val(6)])
        #expect(v.result.lost == 3)
    }

    @Test func reportMathAndJSON() throws {
        var h = LatencyStats()
        for us in 1...600 { h.record(UInt64(us)) }
        // The progress interval is taken and restarted; the total keeps every sample.
        #expect(h.takeInterval().totalCount == 600)
        for us in 601...1000 { h.record(UInt64(us)) }
        #expect(h.interval.totalCount == 400)
        let summary = OperationSummary(h.total)
        #expect(summary.count == 1000)
        #expect(abs(Int(summary.p50) - 500) <= 1 && abs(Int(summary.p99) - 990) <= 1 && summary.max == 1000)
        let config = RunConfig(phase: .run, target: "redis://x:1", records: 10, operations: 2000)
        let report = RunReport(config: config, elapsed: .seconds(4), operations: ["read": summary, "update": summary],
                               errors: ["timeout": 3], verification: nil, firstFailures: [], siblingReads: 0)
        #expect(report.totalOperations == 2000)
        #expect(report.throughput == 500)
        let json = try #require(try JSONSerialization.jsonObject(with: Data(report.json.utf8)) as? [String: Any])
        #expect(json["throughput_ops_per_s"] as? Double == 500)
        #expect((json["errors"] as? [String: Int])?["timeout"] == 3)
        let read = try #require((json["operations"] as? [String: [String: Any]])?["read"])
        for field in ["count", "p50_us", "p90_us", "p99_us", "p999_us", "max_us"] { #expect(read[field] != nil, "\(field)") }
        #expect(report.text.contains("ops/s"))
    }

    @Test func errorMessagesAreSampledDistinctAndBoundedPerKind() throws {
        let a = WorkerStats(), b = WorkerStats()
        for i in 0..<10 { a.error("server", "node n\(i % 4) refused") }
        b.error("server", "node n0 refused")
        b.error("timeout", "after 2000 ms")
        var totals: [String: Histogram<UInt64>] = [:], errors: [String: Int] = [:], samples: [String: [String]] = [:]
        for w in [a, b] { w.totals(into: &totals, errors: &errors, samples: &samples) }
        #expect(errors == ["server": 11, "timeout": 1])
        #expect(samples["server"] == ["node n0 refused", "node n1 refused", "node n2 refused"], "the first three distinct")
        #expect(samples["timeout"] == ["after 2000 ms"])
        var report = RunReport(config: RunConfig(phase: .run, target: "cairn://x:1", records: 1), elapsed: .seconds(1), operations: [:],
                               errors: errors, verification: nil, firstFailures: [], siblingReads: 0)
        report.errorSamples = samples
        let json = try #require(try JSONSerialization.jsonObject(with: Data(report.json.utf8)) as? [String: Any])
        #expect((json["error_samples"] as? [String: [String]])?["timeout"] == ["after 2000 ms"])
        #expect(report.text.contains("server error: node n1 refused"))
    }

    /// A run's sessions share a few stats, each with every operation's histograms made before
    /// the run: nothing is allocated at the first counted sample (256 sessions once zeroed ~100 MB
    /// there, on the generator's loop). Operations that saw no sample stay out of the totals and
    /// the progress intervals.
    @Test func sessionsShareAFewPreallocatedStats() {
        let shards = Runner.statShards(concurrency: 256)
        #expect(shards >= 8 && shards <= 32)
        #expect(Runner.statShards(concurrency: 3) == 3 && Runner.statShards(concurrency: 0) == 1)
        let stats = WorkerStats(preallocated: true)
        #expect(stats.allocatedOperations == WorkerStats.names.count)
        #expect(WorkerStats().allocatedOperations == 0)
        stats.record(0, micros: 250)
        var interval: [String: Histogram<UInt64>] = [:], errors = 0
        stats.drainInterval(into: &interval, errors: &errors)
        #expect(Array(interval.keys) == ["read"] && interval["read"]?.totalCount == 1)
        var totals: [String: Histogram<UInt64>] = [:], kinds: [String: Int] = [:], samples: [String: [String]] = [:]
        stats.totals(into: &totals, errors: &kinds, samples: &samples)
        #expect(Array(totals.keys) == ["read"])
        let runner = Runner(config: RunConfig(phase: .run, target: "cairn://x:1", records: 1, concurrency: 256), target: LoopPacerTests.RefusingTarget()) { _ in }
        #expect(runner.workers.count == shards && runner.stats(for: 300) === runner.workers[300 % shards])
    }
}
