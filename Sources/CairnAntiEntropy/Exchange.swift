public import CairnCore

/// Bounds of one exchange (config keys under `aae.`).
public struct ExchangeSettings: Hashable, Sendable {
    /// Parents named in one tree query (`aae.max_parents_per_query`); its reply carries 16 hashes
    /// per parent.
    public var maxParentsPerQuery = 1024
    /// Differing segments one exchange repairs (`aae.max_segments_per_exchange`); an exchange that
    /// finds more repairs these and ends `truncated`, and the next exchange goes on with the rest.
    public var maxSegmentsPerExchange = 4096
    /// Keys in one page of a key listing (`aae.keys_per_page`).
    public var keysPerPage = 2048

    public init() {}
}

/// One key as a replica lists it for an exchange: its version hash, and its object when the
/// asker said it holds nothing in the key's segment (so no second trip fetches it).
public struct KeyEntry: Hashable, Sendable {
    public var key: [UInt8]
    public var hash: UInt64
    public var object: VersionedObject?

    public init(key: [UInt8], hash: UInt64, object: VersionedObject? = nil) {
        self.key = key
        self.hash = hash
        self.object = object
    }
}

/// A page of a key listing: the keys of the asked segments after `after`, in key order, up to
/// `through` (nil: to the partition's end). A page covers every key of the asked segments in
/// (after, through], so two pages compare over the range both cover.
public struct KeyPage: Hashable, Sendable {
    public var entries: [KeyEntry]
    public var through: [UInt8]?

    public init(entries: [KeyEntry], through: [UInt8]?) {
        self.entries = entries
        self.through = through
    }
}

/// What a key listing asks a replica for.
public struct KeyQuery: Hashable, Sendable {
    /// Segments to list, ascending.
    public var segments: [Int]
    /// The subset of `segments` whose keys come with their objects.
    public var objectsFor: [Int]
    /// List keys after this one (nil: from the partition's first key).
    public var after: [UInt8]?
    public var limit: Int

    public init(segments: [Int], objectsFor: [Int], after: [UInt8]?, limit: Int) {
        self.segments = segments
        self.objectsFor = objectsFor
        self.after = after
        self.limit = limit
    }
}

/// How one key is brought into agreement. Every repair is a DVV merge: no replica ever stamps
/// a new version for it, so a repair cannot resurrect a deleted value or drop a concurrent one.
public enum KeyRepair: Hashable, Sendable {
    /// Only this replica holds the key: send it the other side.
    case push([UInt8])
    /// Only the other replica holds it, and its listing carried the object: merge it here.
    case take([UInt8], VersionedObject)
    /// Only the other replica holds it: fetch it, merge it here.
    case pull([UInt8])
    /// Both hold different versions: fetch the other's, merge it here, send the merge back.
    case reconcile([UInt8])

    public var key: [UInt8] {
        switch self {
        case .push(let k), .take(let k, _), .pull(let k), .reconcile(let k): k
        }
    }
}

/// What an exchange found and did.
public struct ExchangeSummary: Hashable, Sendable {
    public var segmentsDiffering = 0
    public var keysCompared = 0
    /// Keys the other replica lacked or held older (pushes and reconciles).
    public var keysToRemote = 0
    /// Keys this replica lacked or held older (takes, pulls and reconciles).
    public var keysToLocal = 0
    /// Hashes the tree queries carried (both sides): the tree's share of the traffic.
    public var treeHashes = 0
    /// More segments differed than `maxSegmentsPerExchange`: the next exchange goes on.
    public var truncated = false
    /// The roots matched at the first look: the partitions were in sync.
    public var inSync = false

    public init() {}
}

/// An anti-entropy exchange between this replica (local) and another (remote) for one
/// partition, as a pure state machine: it names what to ask both sides next, and its shell
/// performs each step and reports both answers back.
///
/// The exchange descends the two trees from the root, only into nodes whose hashes differ; lists
/// the keys of the differing segments on both sides, page by page; and names a repair for each
/// key whose version hashes differ. Traffic grows with the number of differing keys, not with
/// the partition's size: an in-sync partition costs one root hash from each side.
///
/// Bounds: a tree query names at most `maxParentsPerQuery` parents; an exchange repairs at most
/// `maxSegmentsPerExchange` segments (`truncated` otherwise: the next exchange, descending anew,
/// finds the rest); a key page holds at most `keysPerPage` keys.
/// Answers from the remote are untrusted: a malformed one fails the exchange.
public struct ExchangeMachine: Sendable {
    public enum Step: Hashable, Sendable {
        /// Ask both sides for their root hash; answer with `roots`.
        case compareRoots
        /// Ask both sides for the children (level `level + 1`) of these `level` nodes; answer
        /// with `children`.
        case compareChildren(level: Int, parents: [Int])
        /// Ask both sides for a page of keys; answer with `keys`.
        case listKeys(KeyQuery)
        /// Perform these repairs, then call `repaired()`.
        case repair([KeyRepair])
        case finished(ExchangeSummary)
        case failed(String)
    }

    public let shape: TreeShape
    public let settings: ExchangeSettings
    public private(set) var summary = ExchangeSummary()
    private var phase: Phase = .idle

    private enum Phase: Sendable {
        case idle
        case roots
        /// Descending: the parents at `level` still to query, and the differing children found.
        case descending(level: Int, queued: [Int], asked: [Int], differing: [Int], localLeaves: [Int: UInt64])
        case listing(query: KeyQuery)
        case repairing(next: KeyQuery?)
        case done
    }

    public init(shape: TreeShape, settings: ExchangeSettings = .init()) {
        self.shape = shape
        self.settings = settings
    }

    public mutating func start() -> Step {
        phase = .roots
        return .compareRoots
    }

    public mutating func roots(local: UInt64, remote: UInt64) -> Step {
        guard case .roots = phase else { return fail("roots answered out of turn") }
        summary.treeHashes += 2
        if local == remote {
            summary.inSync = true
            return finish()
        }
        return descend(level: 0, parents: [0], differing: [], localLeaves: [:])
    }

    public mutating func children(local: [UInt64], remote: [UInt64]) -> Step {
        guard case .descending(let level, let queued, let asked, var differing, var localLeaves) = phase else {
            return fail("tree hashes answered out of turn")
        }
        let expected = asked.count * TreeShape.fanout
        guard local.count == expected, remote.count == expected else {
            return fail("tree query for \(asked.count) parents answered with \(remote.count) hashes, expected \(expected)")
        }
        summary.treeHashes += 2 * expected
        let childLevel = level + 1
        let cap = settings.maxSegmentsPerExchange
        for (i, parent) in asked.enumerated() {
            for c in 0..<TreeShape.fanout where local[i * TreeShape.fanout + c] != remote[i * TreeShape.fanout + c] {
                guard differing.count < cap else {
                    summary.truncated = true
                    break
                }
                let child = parent << TreeShape.fanoutBits | c
                differing.append(child)
                if childLevel == shape.depth { localLeaves[child] = local[i * TreeShape.fanout + c] }
            }
        }
        if !queued.isEmpty, differing.count < cap {
            return ask(level: level, queued: queued, differing: differing, localLeaves: localLeaves)
        }
        if childLevel < shape.depth {
            // Each differing node has at least one differing segment below it: the cap holds.
            return descend(level: childLevel, parents: differing, differing: [], localLeaves: [:])
        }
        summary.segmentsDiffering = differing.count
        guard !differing.isEmpty else { return finish() }
        let query = KeyQuery(segments: differing, objectsFor: differing.filter { localLeaves[$0] == 0 }, after: nil,
                             limit: settings.keysPerPage)
        phase = .listing(query: query)
        return .listKeys(query)
    }

    public mutating func keys(local: KeyPage, remote: KeyPage) -> Step {
        guard case .listing(let query) = phase else { return fail("keys answered out of turn") }
        guard let problem = Self.check(remote, query: query, shape: shape) else {
            return compare(local: local, remote: remote, query: query)
        }
        return fail(problem)
    }

    public mutating func repaired() -> Step {
        guard case .repairing(let next) = phase else { return fail("repairs reported out of turn") }
        guard let next else { return finish() }
        phase = .listing(query: next)
        return .listKeys(next)
    }

    // MARK: Internals

    private mutating func descend(level: Int, parents: [Int], differing: [Int], localLeaves: [Int: UInt64]) -> Step {
        ask(level: level, queued: parents, differing: differing, localLeaves: localLeaves)
    }

    private mutating func ask(level: Int, queued: [Int], differing: [Int], localLeaves: [Int: UInt64]) -> Step {
        let n = min(queued.count, max(1, settings.maxParentsPerQuery))
        let asked = Array(queued.prefix(n))
        phase = .descending(level: level, queued: Array(queued.dropFirst(n)), asked: asked, differing: differing, localLeaves: localLeaves)
        return .compareChildren(level: level, parents: asked)
    }

    private mutating func compare(local: KeyPage, remote: KeyPage, query: KeyQuery) -> Step {
        // Both pages cover the asked segments from `after` to their `through`: compare up to the
        // smaller bound, and go on after it.
        let bound: [UInt8]? = switch (local.through, remote.through) {
        case (nil, nil): nil
        case (let l?, nil): l
        case (nil, let r?): r
        case (let l?, let r?): l.lexicographicallyPrecedes(r) ? l : r
        }
        func within(_ k: [UInt8]) -> Bool { bound.map { !$0.lexicographicallyPrecedes(k) } ?? true }
        let mine = local.entries.prefix(while: { within($0.key) })
        let theirs = remote.entries.prefix(while: { within($0.key) })
        var repairs: [KeyRepair] = []
        var i = mine.startIndex, j = theirs.startIndex
        while i < mine.endIndex || j < theirs.endIndex {
            summary.keysCompared += 1
            if j == theirs.endIndex || (i < mine.endIndex && mine[i].key.lexicographicallyPrecedes(theirs[j].key)) {
                repairs.append(.push(mine[i].key))
                summary.keysToRemote += 1
                i += 1
            } else if i == mine.endIndex || theirs[j].key.lexicographicallyPrecedes(mine[i].key) {
                repairs.append(theirs[j].object.map { .take(theirs[j].key, $0) } ?? .pull(theirs[j].key))
                summary.keysToLocal += 1
                j += 1
            } else {
                if mine[i].hash != theirs[j].hash {
                    repairs.append(.reconcile(mine[i].key))
                    summary.keysToLocal += 1
                    summary.keysToRemote += 1
                }
                i += 1
                j += 1
            }
        }
        var next: KeyQuery?
        if let bound {
            var q = query
            q.after = bound
            next = q
        }
        if repairs.isEmpty {
            guard let next else { return finish() }
            phase = .listing(query: next)
            return .listKeys(next)
        }
        phase = .repairing(next: next)
        return .repair(repairs)
    }

    /// Why a remote page cannot be trusted (nil: it can): keys out of order, outside the query's
    /// range or segments, over its limit, or a bound before its own keys.
    static func check(_ page: KeyPage, query: KeyQuery, shape: TreeShape) -> String? {
        guard page.entries.count <= query.limit else { return "key page of \(page.entries.count) keys exceeds the limit \(query.limit)" }
        let segments = Set(query.segments)
        var previous = query.after
        for e in page.entries {
            if let p = previous, !p.lexicographicallyPrecedes(e.key) { return "key page out of order" }
            guard segments.contains(KeyVersionHash.segment(of: e.key, shape: shape)) else { return "key page holds a key outside the asked segments" }
            previous = e.key
        }
        if let through = page.through, let last = page.entries.last, through.lexicographicallyPrecedes(last.key) {
            return "key page ends before its last key"
        }
        if let through = page.through, let after = query.after, !after.lexicographicallyPrecedes(through) {
            return "key page does not advance"
        }
        return nil
    }

    private mutating func finish() -> Step {
        phase = .done
        return .finished(summary)
    }

    private mutating func fail(_ reason: String) -> Step {
        phase = .done
        return .failed(reason)
    }
}
