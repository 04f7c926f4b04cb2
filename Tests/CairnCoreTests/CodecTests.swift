import Testing
import PropertyBased
@testable import CairnCore

@Suite struct ByteCodecTests {
    @Test func varintRoundTrip() async {
        await propertyCheck(count: 500, input: Gen.uint64()) { v throws in
            var w = ByteWriter()
            w.writeVarint(v)
            var r = ByteReader(w.bytes)
            #expect(try r.readVarint() == v)
            #expect(r.isAtEnd)
        }
    }

    @Test func varintRejectsOverlongAndOverflowingEncodings() {
        var r = ByteReader(Array(repeating: 0xFF, count: 11))
        #expect(throws: DecodeError.self) { try r.readVarint() }
        var r2 = ByteReader([0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02])
        #expect(throws: DecodeError.self) { try r2.readVarint() }
    }

    /// ASCII (the fast path), other valid UTF-8, and invalid sequences: the last are errors,
    /// never repaired; the reader moves past exactly the string.
    @Test func stringsAreValidatedUTF8() throws {
        for text in ["n1", "", "nœud-ü", "ノード", "a\u{10FFFF}b"] {
            var w = ByteWriter()
            w.writeString(text)
            w.writeU8(7)
            var r = ByteReader(w.bytes)
            #expect(try r.readString("name", limit: 64) == text)
            #expect(try r.readU8() == 7)
        }
        for bad: [UInt8] in [[0x80], [0x61, 0xFF], [0xC3], [0xED, 0xA0, 0x80], [0xF8, 0x88, 0x80, 0x80, 0x80], [0xC0, 0xAF]] {
            var w = ByteWriter()
            w.writeBlob(bad)
            var r = ByteReader(w.bytes)
            #expect(throws: DecodeError.self, "\(bad)") { try r.readString("name", limit: 64) }
        }
        var long = ByteWriter()
        long.writeString("abcdef")
        var r = ByteReader(long.bytes)
        #expect(throws: DecodeError.self) { try r.readString("name", limit: 5) }
    }

    @Test func blobLengthIsCheckedBeforeAllocating() {
        var w = ByteWriter()
        w.writeVarint(UInt64(1) << 40)   // claims a terabyte
        var r = ByteReader(w.bytes)
        #expect(throws: DecodeError.self) { try r.readBlob("value", limit: 1 << 20) }
        var w2 = ByteWriter()
        w2.writeVarint(100)              // within the limit, but only 3 bytes follow
        w2.writeRaw([1, 2, 3])
        var r2 = ByteReader(w2.bytes)
        #expect(throws: DecodeError.self) { try r2.readBlob("value", limit: 1 << 20) }
    }

    @Test func objectDecodeNeverTrapsOnRandomBytes() async {
        await propertyCheck(count: 2000, input: Gen.uint8().array(of: 0...64)) { bytes in
            _ = try? VersionedObject.decode(bytes, limits: Limits())
            _ = try? CausalContext(bytes: bytes)
        }
    }

    @Test func objectDecodeRejectsMutatedEncodings() throws {
        var s = VersionedObject()
        try s.update(context: VersionVector(), value: Sibling(value: Array("hello".utf8), timestampMillis: 5), actor: ActorID(node: "n1", epoch: 9))
        try s.update(context: VersionVector(), value: .tombstone(timestampMillis: 6), actor: ActorID(node: "n2", epoch: 3))
        let good = s.encoded()
        #expect(try VersionedObject.decode(good, limits: Limits()) == s)
        // Every truncation is an error, never a trap and never a different object.
        for n in 0..<good.count {
            #expect(throws: DecodeError.self) { try VersionedObject.decode(Array(good.prefix(n)), limits: Limits()) }
        }
        #expect(throws: DecodeError.self) { try VersionedObject.decode(good + [0], limits: Limits()) }
        var badVersion = good
        badVersion[0] = 9
        #expect(throws: DecodeError.self) { try VersionedObject.decode(badVersion, limits: Limits()) }
    }

    @Test func objectDecodeRejectsBrokenInvariants() {
        // One entry whose value count exceeds its counter.
        var w = ByteWriter()
        w.writeU8(1)
        w.writeVarint(1)
        ActorID(node: "n1", epoch: 1).encode(into: &w)
        w.writeVarint(1)   // counter 1
        w.writeVarint(2)   // two values
        for _ in 0..<2 { w.writeU8(0); w.writeVarint(0); w.writeBlob([1]) }
        w.writeVarint(0)
        #expect(throws: DecodeError.self) { try VersionedObject.decode(w.bytes, limits: Limits()) }
        // Entries out of order.
        var w2 = ByteWriter()
        w2.writeU8(1)
        w2.writeVarint(2)
        for name in ["b", "a"] {
            ActorID(node: name, epoch: 1).encode(into: &w2)
            w2.writeVarint(1)
            w2.writeVarint(0)
        }
        w2.writeVarint(0)
        #expect(throws: DecodeError.self) { try VersionedObject.decode(w2.bytes, limits: Limits()) }
    }
}

@Suite struct CausalContextTests {
    @Test func tokenRoundTrip() throws {
        let v = VersionVector([(ActorID(node: "n1", epoch: 0x4b06_1803_bad5_54ec), 1), (ActorID(node: "n2", epoch: 2), 300)])
        let ctx = CausalContext(v)
        let again = try CausalContext(token: ctx.token)
        #expect(again == ctx)
        #expect(!ctx.token.contains("="))
        #expect(CausalContext.empty.token == "")
        #expect(try CausalContext(token: "") == .empty)
    }

    /// The size and the blob written without an intermediate array are those of `bytes`, for
    /// counters and names across varint boundaries.
    @Test func encodedCountAndBlobMatchTheBytes() throws {
        let name = String(repeating: "n", count: 130)
        let vectors = [VersionVector(), VersionVector([(ActorID(node: "a", epoch: 1), 1)]),
                       VersionVector([(ActorID(node: "n1", epoch: 9), 127), (ActorID(node: name, epoch: .max), 128),
                                      (ActorID(node: "z", epoch: 0), 1 << 35)])]
        for v in vectors {
            let ctx = CausalContext(v)
            #expect(ctx.encodedCount == ctx.bytes.count)
            var direct = ByteWriter()
            ctx.writeBlob(into: &direct)
            var viaBytes = ByteWriter()
            viaBytes.writeBlob(v.isEmpty ? [] : ctx.bytes)
            #expect(direct.bytes == viaBytes.bytes)
        }
        for v: UInt64 in [0, 1, 127, 128, 16_383, 16_384, .max] {
            var w = ByteWriter()
            w.writeVarint(v)
            #expect(ByteWriter.varintCount(v) == w.bytes.count)
        }
        // A clock's context, sized and read per actor without building it.
        let a = ActorID(node: "n1", epoch: 1), b = ActorID(node: name, epoch: 2)
        var clock = VersionedObject()
        #expect(clock.contextEncodedCount == CausalContext(clock.context).encodedCount)
        try clock.update(context: VersionVector(), value: Sibling(value: [1], timestampMillis: 1), actor: a)
        try clock.update(context: clock.context, value: Sibling(value: [2], timestampMillis: 2), actor: b)
        try clock.update(context: VersionVector(), value: Sibling(value: [3], timestampMillis: 3), actor: a)
        #expect(clock.entries.count == 2)
        #expect(clock.contextEncodedCount == CausalContext(clock.context).encodedCount)
        for actor in [a, b, ActorID(node: "absent", epoch: 1)] { #expect(clock.counter(of: actor) == clock.context[actor]) }
    }

    @Test func malformedTokensAreErrors() {
        #expect(throws: DecodeError.self) { try CausalContext(token: "not base64!") }
        #expect(throws: DecodeError.self) { try CausalContext(token: "AgE") }  // format 2
        #expect(throws: DecodeError.self) { try CausalContext(bytes: Array(repeating: 1, count: 70_000)) }
    }

    @Test func base64MatchesRFC4648Vectors() {
        let vectors = ["": "", "f": "Zg==", "fo": "Zm8=", "foo": "Zm9v", "foob": "Zm9vYg==", "fooba": "Zm9vYmE=", "foobar": "Zm9vYmFy"]
        for (plain, encoded) in vectors {
            #expect(Base64URL.encodeStandard(Array(plain.utf8)) == encoded)
            #expect(Base64URL.decode(encoded) == Array(plain.utf8))
        }
        #expect(Base64URL.encode([0xFB, 0xFF]) == "-_8")
        #expect(Base64URL.decode("-_8") == [0xFB, 0xFF])
    }
}

@Suite struct QuorumTests {
    @Test func parsingAndResolving() throws {
        #expect(try Quorum(parsing: "quorum").resolve(n: 3) == 2)
        #expect(try Quorum(parsing: "quorum").resolve(n: 5) == 3)
        #expect(try Quorum(parsing: "all").resolve(n: 3) == 3)
        #expect(try Quorum(parsing: "one").resolve(n: 3) == 1)
        #expect(try Quorum(parsing: "2").resolve(n: 3) == 2)
        #expect(throws: ValidationError.self) { try Quorum(parsing: "most") }
        #expect(throws: ValidationError.self) { try Quorum(parsing: "-1") }
    }

    @Test func requirementsAreValidatedAgainstN() throws {
        #expect(throws: ValidationError.self) { try QuorumRequirement(name: "W", quorum: .count(4), primary: .count(0), n: 3) }
        #expect(throws: ValidationError.self) { try QuorumRequirement(name: "W", quorum: .count(0), primary: .count(0), n: 3) }
        #expect(throws: ValidationError.self) { try QuorumRequirement(name: "R", quorum: .count(1), primary: .count(2), n: 3) }
        let r = try QuorumRequirement(name: "R", quorum: .quorum, primary: .count(1), n: 3)
        #expect(r.required == 2 && r.primaryRequired == 1)
    }

    @Test func failureMessagesSayWhatHappenedToTheData() {
        let notReached = QuorumFailure(kind: .notReached, operation: .put, requirement: "W", required: 3, achieved: 2, candidates: 3, replicas: [
            ReplicaReport(node: "n1", address: "127.0.0.1:7401", isPrimary: true, outcome: .acknowledged),
            ReplicaReport(node: "n3", address: "127.0.0.1:7403", isPrimary: true, outcome: .timedOut(afterMillis: 1000)),
        ])
        #expect(notReached.description ==
            "W=3 not reached: 2 of 3 replicas acknowledged; 127.0.0.1:7403 timed out after 1000 ms; the write may have been applied on the replicas that acknowledged")
        let unavailable = QuorumFailure(kind: .unavailable, operation: .delete, requirement: "W", required: 2, achieved: 1, candidates: 3, replicas: [
            ReplicaReport(node: "n3", address: "127.0.0.1:7403", isPrimary: true, outcome: .notSent("connection refused")),
        ])
        #expect(unavailable.description.hasSuffix("nothing was written"))
        #expect(unavailable.description.contains("127.0.0.1:7403 is down (connection refused)"))
    }
}

@Suite struct StrictnessTests {
    @Test func overlongVarintsAndBadBooleansAreRejected() throws {
        var r = ByteReader([0x81, 0x00])   // 1, encoded in two bytes
        #expect(throws: DecodeError.self) { try r.readVarint() }
        var z = ByteReader([0x00])
        #expect(try z.readVarint() == 0)
        var b = ByteReader([2])
        #expect(throws: DecodeError.self) { try b.readBool("flag") }
    }

    @Test func actorNamesMustBeNodeNames() {
        var w = ByteWriter()
        w.writeU8(1)
        w.writeVarint(1)
        w.writeString("bad name\n")
        w.writeU64(1)
        w.writeVarint(1)
        #expect(throws: DecodeError.self) { try CausalContext(bytes: w.bytes) }
    }

    @Test func pruningByBytesKeepsTheObjectUnderTheBoundAndTheSizeIsExact() throws {
        var o = VersionedObject()
        for i in 0..<20 {
            try o.update(context: VersionVector(), value: Sibling(value: Array(repeating: UInt8(i), count: 1000), timestampMillis: UInt64(i)),
                         actor: ActorID(node: "n\(i % 3)", epoch: 1))
        }
        #expect(o.encodedSize == o.encoded().count)
        let dropped = o.prune(maxSiblings: 1000, maxBytes: 5000)
        #expect(dropped > 0)
        #expect(o.encoded().count <= 5000)
        #expect(o.encodedSize == o.encoded().count)
        #expect(o.valueCount == 20 - dropped)
        // The oldest writes (lowest timestamps) went first.
        let kept: Set<UInt64> = Set(o.values.map(\.timestampMillis))
        let newest: Set<UInt64> = Set((UInt64(20 - o.valueCount))..<20)
        #expect(kept == newest)
    }

    @Test func theProtectedNewValueSurvivesEvenWhenItIsTheOldestTail() throws {
        var o = VersionedObject()
        let a = ActorID(node: "a", epoch: 1), z = ActorID(node: "z", epoch: 1)
        try o.update(context: VersionVector(), value: Sibling(value: [1], timestampMillis: 500), actor: z)
        // A write whose clock skewed into the past: still the value being acknowledged.
        try o.update(context: VersionVector(), value: Sibling(value: [2], timestampMillis: 100), actor: a)
        let acknowledged: Set<Dot> = o.newestDot(of: a).map { [$0] } ?? []
        #expect(o.prune(maxSiblings: 1, maxBytes: 1 << 20, protecting: acknowledged) == 1)
        #expect(o.values.map(\.value) == [[2]])
    }
}
