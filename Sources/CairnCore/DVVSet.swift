/// A dotted version vector set (DVVSet): the causal history of one key plus its live values.
///
/// Follows Almeida, Baquero et al., "Scalable and Accurate Causality Tracking for Eventually
/// Consistent Stores" (the structure Riak 2 keeps per object). Each entry says "actor `a` has issued
/// dots 1...`counter`; the newest `values.count` of them are still live, newest first". Values
/// written without a server dot (a client's proposal before a coordinator stamps it) are
/// `anonymous`.
///
/// Invariants (checked on decode, kept by every operation):
/// - `entries` sorted strictly ascending by actor;
/// - `entries[i].values.count <= entries[i].counter`.
///
/// Value semantics; pure; `Sendable` when `Value` is.
public struct DVVSet<Value: Hashable & Sendable>: Hashable, Sendable {
    public struct Entry: Hashable, Sendable {
        public var actor: ActorID
        public var counter: UInt64
        /// Live values, newest first: `values[i]` carries dot `(actor, counter - i)`.
        public var values: [Value]

        public init(actor: ActorID, counter: UInt64, values: [Value]) {
            self.actor = actor
            self.counter = counter
            self.values = values
        }
    }

    public private(set) var entries: [Entry]
    public private(set) var anonymous: [Value]

    public init() {
        entries = []
        anonymous = []
    }

    /// Builds a clock from parts; returns nil when the invariants do not hold.
    public init?(entries: [Entry], anonymous: [Value]) {
        for (i, e) in entries.enumerated() {
            if UInt64(e.values.count) > e.counter { return nil }
            if i > 0 && !(entries[i - 1].actor < e.actor) { return nil }
        }
        self.entries = entries
        self.anonymous = anonymous
    }

    /// A client proposal: `value` written with the causal context `context`, not yet stamped.
    public init(context: VersionVector, value: Value) {
        entries = context.dots.map { Entry(actor: $0.actor, counter: $0.counter, values: []) }
        anonymous = [value]
    }

    // MARK: Reading

    /// Every live value: anonymous ones first, then per actor, newest first.
    ///
    /// The readers and `sync` are `@inlinable` (with the helpers they call): every request reads
    /// or merges clocks from other modules, where an unspecialized generic call went through
    /// runtime metadata look-ups for each step.
    @inlinable
    public var values: [Value] {
        var out: [Value] = []
        out.reserveCapacity(valueCount)
        out.append(contentsOf: anonymous)
        for e in entries { out.append(contentsOf: e.values) }
        return out
    }

    @inlinable
    public var valueCount: Int {
        var n = anonymous.count
        for e in entries { n += e.values.count }
        return n
    }

    @inlinable
    public var isEmpty: Bool { entries.isEmpty && anonymous.isEmpty }

    /// The causal context a reader passes back on its next write: the join of all entries.
    @inlinable
    public var context: VersionVector {
        VersionVector(sortedDots: entries.map { Dot(actor: $0.actor, counter: $0.counter) })
    }

    /// `context[actor]`, without building the context.
    @inlinable
    public func counter(of actor: ActorID) -> UInt64 { entries.first { $0.actor == actor }?.counter ?? 0 }

    /// Parts known to keep the invariants (built by `sync`).
    @usableFromInline
    init(validEntries: [Entry], anonymous: [Value]) {
        self.entries = validEntries
        self.anonymous = anonymous
    }

    /// `a.strictlyPrecedes(b)`: b's history contains all of a's and more.
    public func strictlyPrecedes(_ other: DVVSet) -> Bool {
        Self.greater(other.entries, entries)
    }

    /// Equality that ignores the order of anonymous values.
    public func isEquivalent(to other: DVVSet) -> Bool {
        entries == other.entries && Set(anonymous) == Set(other.anonymous)
    }

    // MARK: Updating

    // `update`, `event` and `prune` (the write path's, called from CairnNode) are compiled for
    // `Sibling` here as well: callers in other modules use that copy instead of the generic one.

    /// The coordinator's update: record `value` as a new event of `actor`, superseding exactly the
    /// values covered by `context` (what the client read). Values the client had not seen survive
    /// as siblings.
    ///
    /// Throws only if the actor's counter would overflow 64 bits.
    ///
    /// `floor`: the new dot's counter is at least this when `actor` has no live value here (see
    /// `event(actor:value:floor:)`).
    @_specialize(exported: true, where Value == Sibling)
    public mutating func update(context: VersionVector, value: Value, actor: ActorID, floor: UInt64 = 0) throws(VersionError) {
        let proposal = DVVSet(entries: context.dots.map { Entry(actor: $0.actor, counter: $0.counter, values: []) },
                              anonymous: []) ?? DVVSet()
        self = Self.sync(proposal, self)
        try event(actor: actor, value: value, floor: floor)
    }

    /// Adds one event of `actor` carrying `value`: the new dot is the actor's counter + 1, or
    /// `floor` if that is greater and the actor has no live value here (its entry then records
    /// that it issued dots up to `floor`, none of them live but the new one).
    ///
    /// The floor is how a coordinator avoids reissuing a dot after this key's history was dropped
    /// (a collected tombstone): a copy of the dropped history may still exist somewhere, and a
    /// new dot it already covers would be discarded as seen there. With a live value of `actor`
    /// here the history is this one, and counter + 1 is new.
    @_specialize(exported: true, where Value == Sibling)
    public mutating func event(actor: ActorID, value: Value, floor: UInt64 = 0) throws(VersionError) {
        var lo = 0
        var hi = entries.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if entries[mid].actor < actor { lo = mid + 1 } else { hi = mid }
        }
        if lo < entries.count && entries[lo].actor == actor {
            let (next, overflow) = entries[lo].counter.addingReportingOverflow(1)
            if overflow { throw VersionError.counterOverflow(actor) }
            entries[lo].counter = entries[lo].values.isEmpty ? max(next, floor) : next
            entries[lo].values.insert(value, at: 0)
        } else {
            entries.insert(Entry(actor: actor, counter: max(1, floor), values: [value]), at: lo)
        }
    }

    /// The replica merge: the union of both histories, keeping every value neither side has seen
    /// superseded. Commutative, associative and idempotent up to the order of `anonymous` (see
    /// `isEquivalent(to:)`); server-side clocks hold no anonymous values, so there it is exact.
    @inlinable
    public static func sync(_ a: DVVSet, _ b: DVVSet) -> DVVSet {
        let anonymous: [Value]
        if Self.greater(b.entries, a.entries) {
            anonymous = b.anonymous
        } else if Self.greater(a.entries, b.entries) {
            anonymous = a.anonymous
        } else {
            anonymous = Self.union(a.anonymous, b.anonymous)
        }
        var out: [Entry] = []
        out.reserveCapacity(max(a.entries.count, b.entries.count))
        var i = 0
        var j = 0
        while i < a.entries.count || j < b.entries.count {
            if j == b.entries.count || (i < a.entries.count && a.entries[i].actor < b.entries[j].actor) {
                out.append(a.entries[i]); i += 1
            } else if i == a.entries.count || b.entries[j].actor < a.entries[i].actor {
                out.append(b.entries[j]); j += 1
            } else {
                out.append(merge(a.entries[i], b.entries[j])); i += 1; j += 1
            }
        }
        return DVVSet(validEntries: out, anonymous: anonymous)
    }

    /// Merges several replicas' answers into one.
    @inlinable
    public static func sync<S: Sequence>(_ clocks: S) -> DVVSet where S.Element == DVVSet {
        clocks.reduce(DVVSet()) { sync($0, $1) }
    }

    /// `sync([first] + rest)`, without copying `first` when it is the only one (a clock with no
    /// anonymous values is its own sync with the empty clock).
    @inlinable
    public static func sync<S: Sequence>(_ first: DVVSet, _ rest: S) -> DVVSet where S.Element == DVVSet {
        rest.reduce(first.anonymous.isEmpty ? first : sync(DVVSet(), first)) { sync($0, $1) }
    }

    /// Bounds the number of live values to `limit`. Only an entry's oldest value (its tail) can
    /// be dropped without breaking the DVV invariant, so each step drops the tail with the lowest
    /// `rank` (ties: the lowest actor). A value whose dot is in `protected` is never dropped (nor,
    /// therefore, any newer value of its actor), so the values a write acknowledges survive the
    /// cap; when only protected values remain droppable the result stays above `limit`.
    /// Anonymous values are kept. Dropped values are treated as superseded by every replica that
    /// syncs with the result; the choice is deterministic, so replicas pruning the same object
    /// with the same protection agree. Returns how many values were dropped.
    @_specialize(exported: true, where Value == Sibling)
    @discardableResult
    public mutating func prune(toAtMost limit: Int, protecting protected: Set<Dot> = [],
                               rank: (Value) -> UInt64 = { _ in 0 }) -> Int {
        var dropped = 0
        while valueCount > max(limit, 0), dropOldestTail(protecting: protected, rank: rank) { dropped += 1 }
        return dropped
    }

    /// The dots of every live value held in entries (anonymous values have none).
    public var liveDots: Set<Dot> {
        var out = Set<Dot>()
        for e in entries {
            // values.count <= counter (invariant), so no underflow.
            for i in e.values.indices { out.insert(Dot(actor: e.actor, counter: e.counter - UInt64(i))) }
        }
        return out
    }

    /// The dot of `actor`'s newest live value, if it has one.
    public func newestDot(of actor: ActorID) -> Dot? {
        guard let e = entries.first(where: { $0.actor == actor }), !e.values.isEmpty else { return nil }
        return Dot(actor: actor, counter: e.counter)
    }

    /// Drops one tail value (see `prune`); false if none may be dropped.
    mutating func dropOldestTail(protecting protected: Set<Dot>, rank: (Value) -> UInt64) -> Bool {
        var best: (index: Int, rank: UInt64)?
        for (i, e) in entries.enumerated() {
            guard let tail = e.values.last else { continue }
            let tailDot = Dot(actor: e.actor, counter: e.counter - UInt64(e.values.count - 1))
            if protected.contains(tailDot) { continue }
            let r = rank(tail)
            if best == nil || r < (best?.rank ?? 0) { best = (i, r) }
        }
        guard let best else { return false }
        entries[best.index].values.removeLast()
        return true
    }

    // MARK: Internals

    /// Merge of one actor's entry from two replicas: the larger counter wins; values the other
    /// side has already seen superseded are dropped.
    @inlinable
    static func merge(_ x: Entry, _ y: Entry) -> Entry {
        let (hi, lo) = x.counter >= y.counter ? (x, y) : (y, x)
        // First live dot on each side: counter - count + 1. Invariant keeps these non-negative.
        let hiFloor = hi.counter - UInt64(hi.values.count)
        let loFloor = lo.counter - UInt64(lo.values.count)
        if hiFloor >= loFloor { return hi }
        // lo has superseded some of hi's oldest values: keep only hi's dots above lo's floor...
        // ...except those lo has not yet heard of (above lo.counter) plus those lo still holds.
        let keep = Int(hi.counter - lo.counter) + lo.values.count
        return Entry(actor: hi.actor, counter: hi.counter, values: Array(hi.values.prefix(keep)))
    }

    /// `greater(a, b)`: a's join dominates b's and differs.
    @inlinable
    static func greater(_ a: [Entry], _ b: [Entry]) -> Bool {
        var strict = false
        var i = 0
        var j = 0
        while true {
            if i == a.count && j == b.count { return strict }
            if j == b.count { return true }
            if i == a.count { return false }
            if a[i].actor == b[j].actor {
                if a[i].counter < b[j].counter { return false }
                if a[i].counter > b[j].counter { strict = true }
                i += 1; j += 1
            } else if a[i].actor < b[j].actor {
                strict = true
                i += 1
            } else {
                return false
            }
        }
    }

    @inlinable
    static func union(_ a: [Value], _ b: [Value]) -> [Value] {
        var seen = Set<Value>()
        var out: [Value] = []
        for v in a + b where seen.insert(v).inserted { out.append(v) }
        return out
    }
}

/// A version vector: for each actor, the highest dot seen. What a causal context carries.
public struct VersionVector: Hashable, Sendable {
    public private(set) var dots: [Dot]

    public init() { dots = [] }

    /// `sortedDots` must be sorted strictly by actor.
    @usableFromInline
    init(sortedDots: [Dot]) { dots = sortedDots }

    public init(_ pairs: [(ActorID, UInt64)]) {
        var merged: [ActorID: UInt64] = [:]
        for (a, c) in pairs { merged[a] = max(merged[a] ?? 0, c) }
        dots = merged.map { Dot(actor: $0.key, counter: $0.value) }.sorted { $0.actor < $1.actor }
    }

    public var isEmpty: Bool { dots.isEmpty }

    public subscript(actor: ActorID) -> UInt64 {
        dots.first { $0.actor == actor }?.counter ?? 0
    }

    /// Pointwise maximum.
    public func merged(with other: VersionVector) -> VersionVector {
        VersionVector(dots.map { ($0.actor, $0.counter) } + other.dots.map { ($0.actor, $0.counter) })
    }
}

/// One event: the `counter`-th write stamped by `actor`.
public struct Dot: Hashable, Sendable {
    public var actor: ActorID
    public var counter: UInt64
    public init(actor: ActorID, counter: UInt64) {
        self.actor = actor
        self.counter = counter
    }
}

public enum VersionError: Error, Sendable, Hashable, CustomStringConvertible {
    case counterOverflow(ActorID)

    public var description: String {
        switch self {
        case .counterOverflow(let a): "version counter of \(a) would overflow"
        }
    }
}
