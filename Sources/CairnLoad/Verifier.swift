import Synchronization

/// `--verify`: checks every value read (integrity, right key) and finds acknowledged writes that a
/// later read did not see.
///
/// For each key it keeps the recent writes as intervals [issued, acknowledged]. A read that
/// started at `t` must return, among its values, the newest write acknowledged before `t` (W) or
/// a write not known to be older than W (concurrent with it or later — a sibling, or a write still
/// in flight). If every value it returns was acknowledged before W was even issued, or it returns
/// nothing, W was lost. Values the history no longer holds (older than `depth` writes, or written
/// by an earlier `load`) count as older. Failed writes never count as acknowledged.
public final class Verifier: Sendable {
    public struct Summary: Sendable, Hashable {
        public var readsChecked = 0
        public var lost = 0
        public var corrupt = 0
        public var wrongKey = 0
        public var errors: Int { lost + corrupt + wrongKey }
    }

    struct Write {
        var seq: UInt64
        var issued: UInt64
        var acked: UInt64?
        var isDelete = false
    }

    final class Shard: Sendable {
        let histories = Mutex<[UInt64: [Write]]>([:])
    }

    private let shards: [Shard]
    private let summary = Mutex(Summary())
    let depth: Int
    /// First examples of failures, for the report.
    private let examples = Mutex<[String]>([])

    public init(depth: Int) {
        self.depth = max(depth, 8)
        shards = (0..<64).map { _ in Shard() }
    }

    private func shard(_ key: UInt64) -> Shard { shards[Int(key % 64)] }

    func issued(key: UInt64, seq: UInt64, at: UInt64, isDelete: Bool = false) {
        shard(key).histories.withLock { m in
            var h = m[key] ?? []
            h.append(Write(seq: seq, issued: at, acked: nil, isDelete: isDelete))
            if h.count > depth { h.removeFirst(h.count - depth) }
            m[key] = h
        }
    }

    func acknowledged(key: UInt64, seq: UInt64, at: UInt64) {
        shard(key).histories.withLock { m in
            guard var h = m[key], let i = h.lastIndex(where: { $0.seq == seq }) else { return }
            h[i].acked = at
            m[key] = h
        }
    }

    /// Checks a read of `key` (bytes `keyBytes`) that started at `started` and returned `values`.
    func checkRead(key: UInt64, keyBytes: [UInt8], started: UInt64, values: [[UInt8]]) {
        var seqs: [UInt64] = []
        var corrupt = 0
        var wrong = 0
        for v in values {
            switch ValueFormat.check(v, key: keyBytes) {
            case .ok(let seq): seqs.append(seq)
            case .corrupt(let why): corrupt += 1; note("corrupt value for key \(key): \(why)")
            case .wrongKey: wrong += 1; note("value of another key returned for key \(key)")
            }
        }
        let lost: Bool = shard(key).histories.withLock { m in
            guard let h = m[key] else { return false }
            guard let newest = h.filter({ ($0.acked ?? .max) < started }).max(by: { $0.issued < $1.issued }) else { return false }
            // A write or delete not known to be older than `newest` (concurrent or later).
            let notOlder = { (w: Write) in w.seq == newest.seq || (w.acked ?? .max) >= newest.issued }
            if seqs.isEmpty {
                if corrupt > 0 || wrong > 0 { return false }
                // Empty is right after a delete, or when a delete raced the newest write.
                return !(newest.isDelete || h.contains { $0.isDelete && notOlder($0) })
            }
            let fresh = seqs.contains { seq in
                guard let w = h.first(where: { $0.seq == seq }) else { return false }
                return !w.isDelete && notOlder(w)
            }
            // After a delete, an older value coming back is a lost delete (a resurrection).
            return !fresh
        }
        if lost { note("key \(key): acknowledged write \(String(describing: lostSeq(key, started))) not seen by a later read (saw \(seqs))") }
        summary.withLock { s in
            s.readsChecked += 1
            s.corrupt += corrupt
            s.wrongKey += wrong
            if lost { s.lost += 1 }
        }
    }

    private func lostSeq(_ key: UInt64, _ started: UInt64) -> UInt64? {
        shard(key).histories.withLock { m in m[key]?.filter { ($0.acked ?? .max) < started }.max { $0.issued < $1.issued }?.seq }
    }

    private func note(_ s: String) {
        examples.withLock { e in if e.count < 10 { e.append(s) } }
    }

    public var result: Summary { summary.withLock { $0 } }
    public var firstFailures: [String] { examples.withLock { $0 } }
}
