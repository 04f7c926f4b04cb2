import Testing
@testable import CairnCore

/// Issue 10 item 1: what a write's reply tells its writer.
///
/// The property: for any interleaving of clients that only ever write with a context they were
/// given (by a read, or by a write's reply), a value is superseded only by a writer whose given
/// context came with that value shown to it.
@Suite struct WriteAcknowledgementTests {
    private static let coordinators = (0..<3).map { ActorID(node: "n\($0)", epoch: 9) }

    /// How a write reply is turned into what its writer knows.
    enum ReplyRule {
        /// The contract: context plus every value it covers (`acknowledgement(of:)`).
        case acknowledgement
        /// The defect: the stored object's whole context, with only the written value shown.
        case contextOnly
    }

    private struct Client {
        var context = VersionVector()
        var shown: Set<UInt32> = []
    }

    private static func id(_ s: Sibling) -> UInt32 {
        s.value.reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
    }

    /// Runs one seeded history over 3 replicas and 3 clients; returns the values that vanished
    /// without any writer having been shown them.
    private static func unlicensedLosses(seed: UInt64, steps: Int, rule: ReplyRule) throws -> Set<UInt32> {
        var rng = SplitMix64(seed: seed)
        var replicas = [VersionedObject](repeating: VersionedObject(), count: 3)
        var clients = [Client](repeating: Client(), count: 3)
        var written: Set<UInt32> = []
        var licensed: Set<UInt32> = []
        var next: UInt32 = 1
        for _ in 0..<steps {
            let c = Int(rng.next(below: 3))
            switch rng.next(below: 3) {
            case 0:  // a write through a random coordinator, with the client's context
                let r = Int(rng.next(below: 3))
                let value = Sibling(value: withUnsafeBytes(of: next.bigEndian, Array.init), timestampMillis: UInt64(next))
                written.insert(next)
                next += 1
                licensed.formUnion(clients[c].shown)
                try replicas[r].update(context: clients[c].context, value: value, actor: coordinators[r])
                let ack = try #require(replicas[r].acknowledgement(of: coordinators[r]))
                #expect(id(ack.written) == id(value))
                switch rule {
                case .acknowledgement:
                    clients[c] = Client(context: ack.context, shown: Set([ack.written] + ack.concurrent).reduce(into: []) { $0.insert(id($1)) })
                case .contextOnly:
                    clients[c] = Client(context: replicas[r].context, shown: [id(value)])
                }
            case 1:  // replication (or anti-entropy) between two replicas
                let from = Int(rng.next(below: 3)), to = Int(rng.next(below: 3))
                replicas[to] = VersionedObject.sync(replicas[to], replicas[from])
            default:  // a read from a random non-empty set of replicas
                let mask = 1 + rng.next(below: 7)
                let merged = VersionedObject.sync((0..<3).filter { mask >> UInt64($0) & 1 == 1 }.map { replicas[$0] })
                clients[c] = Client(context: merged.context, shown: Set(merged.values.map(id)))
            }
        }
        let survivors = Set(VersionedObject.sync(replicas).values.map(id))
        return written.subtracting(survivors).subtracting(licensed)
    }

    @Test func aValueIsSupersededOnlyByAWriterThatWasShownIt() throws {
        for seed in UInt64(1)...400 {
            let lost = try Self.unlicensedLosses(seed: seed, steps: 60, rule: .acknowledgement)
            #expect(lost.isEmpty, "seed \(seed): values \(lost.sorted()) superseded by writers never shown them")
        }
    }

    /// The checker is not vacuous: replies that carry the context alone (the defect) lose values.
    @Test func contextOnlyRepliesAreCaught() throws {
        var caught = 0
        for seed in UInt64(1)...400 where try !Self.unlicensedLosses(seed: seed, steps: 60, rule: .contextOnly).isEmpty { caught += 1 }
        #expect(caught > 0)
    }

    @Test func theReproducedCaseShowsTheConcurrentValue() throws {
        let (n1, n2) = (Self.coordinators[0], Self.coordinators[1])
        var r1 = VersionedObject(), r2 = VersionedObject()
        try r1.update(context: VersionVector(), value: Sibling(value: Array("A".utf8), timestampMillis: 1), actor: n1)
        r2 = VersionedObject.sync(r2, r1)  // W=all
        try r2.update(context: VersionVector(), value: Sibling(value: Array("B".utf8), timestampMillis: 2), actor: n2)
        let ack = try #require(r2.acknowledgement(of: n2))
        #expect(ack.written.value == Array("B".utf8))
        #expect(ack.concurrent.map(\.value) == [Array("A".utf8)])
        #expect(ack.context == r2.context)
    }

    @Test func anActorWithoutALiveValueHasNoAcknowledgement() throws {
        var o = VersionedObject()
        let n1 = Self.coordinators[0]
        try o.update(context: VersionVector(), value: Sibling(value: [1], timestampMillis: 1), actor: n1)
        #expect(o.acknowledgement(of: Self.coordinators[2]) == nil)
        // The writer's own newest value is the one reported, an older concurrent one of the same
        // actor is concurrent.
        try o.update(context: VersionVector(), value: Sibling(value: [2], timestampMillis: 2), actor: n1)
        let ack = try #require(o.acknowledgement(of: n1))
        #expect(ack.written.value == [2])
        #expect(ack.concurrent.map(\.value) == [[1]])
    }
}
