import Testing
@testable import CairnNode
import CairnCore

private func name(_ s: String) -> NodeName { (try? NodeName(s)) ?? { fatalError("bad test name") }() }

/// Hint bookkeeping and the hint record (issue 13): bounds, sequence order, resume from the store.
@Suite struct HintBookTests {
    @Test func hintsAreKeptWithinTheBoundsOfTheirTargetAndOfTheNode() {
        var b = HintBook(maxBytesPerTarget: 100, maxBytes: 150)
        #expect(b.admit(name("n2"), bytes: 60, createdMillis: 10) == .keep(sequence: 1))
        #expect(b.admit(name("n2"), bytes: 60, createdMillis: 11) == .refuse(reason: "target_full"))
        #expect(b.admit(name("n3"), bytes: 80, createdMillis: 12) == .keep(sequence: 2))
        #expect(b.admit(name("n4"), bytes: 20, createdMillis: 13) == .refuse(reason: "store_full"))
        #expect(b.count == 2 && b.bytes == 140)
        #expect(b.oldestMillis == 10)
        // Replaying frees the room again.
        b.removed(name("n2"), count: 1, bytes: 60)
        #expect(b.targets[name("n2")] == nil && b.bytes == 80)
        #expect(b.admit(name("n2"), bytes: 60, createdMillis: 20) == .keep(sequence: 3))
        #expect(b.oldestMillis == 12)
    }

    @Test func sequencesGrowAcrossARestartFromWhatTheStoreHolds() {
        var b = HintBook(maxBytesPerTarget: 1 << 20, maxBytes: 1 << 20)
        b.loaded(name("n3"), sequence: 41, bytes: 10, createdMillis: 500)
        b.loaded(name("n3"), sequence: 7, bytes: 10, createdMillis: 300)
        b.loaded(name("n2"), sequence: 9, bytes: 10, createdMillis: 400)
        #expect(b.targets[name("n3")] == HintBook.Target(count: 2, bytes: 20, oldestMillis: 300))
        // A new hint never reuses a stored sequence (its key would overwrite another hint).
        #expect(b.admit(name("n2"), bytes: 10, createdMillis: 600) == .keep(sequence: 42))
    }

    @Test func aFailedStoreWriteGivesItsRoomBack() {
        var b = HintBook(maxBytesPerTarget: 100, maxBytes: 100)
        #expect(b.admit(name("n2"), bytes: 100, createdMillis: 1) == .keep(sequence: 1))
        b.unadmit(name("n2"), bytes: 100)
        #expect(b.count == 0 && b.bytes == 0)
        #expect(b.admit(name("n2"), bytes: 100, createdMillis: 2) == .keep(sequence: 2))
    }

    @Test func storageKeysOrderATargetsHintsByTheSequenceTheyWereKeptIn() throws {
        let n2 = name("n2"), n10 = name("n10")
        let keys = [HintRecord.storageKey(n2, 3), HintRecord.storageKey(n2, 256), HintRecord.storageKey(n2, 1)]
        let sorted = keys.sorted { $0.lexicographicallyPrecedes($1) }
        #expect(sorted.map { HintRecord.parse(storageKey: $0)?.sequence } == [1, 3, 256])
        // One target's hints are one range: every key of n2 starts with its prefix, n10's do not.
        #expect(keys.allSatisfy { $0.starts(with: HintRecord.prefix(n2)) })
        #expect(!HintRecord.storageKey(n10, 1).starts(with: HintRecord.prefix(n2)))
        #expect(HintRecord.parse(storageKey: HintRecord.storageKey(n10, 77)).map { ($0.target, $0.sequence) }! == (n10, 77))
        #expect(HintRecord.parse(storageKey: [3, 0x6E, 0x32]) == nil)
    }

    @Test func recordsRoundTripAndDamagedOnesThrow() throws {
        let r = HintRecord(createdMillis: 1_700_000_000_000, partition: PartitionID(17), key: [1, 2, 3], object: [9, 9])
        #expect(try HintRecord(decoding: r.encoded(), limits: Limits()) == r)
        let bytes = r.encoded()
        for n in 0..<bytes.count {
            #expect(throws: DecodeError.self) { try HintRecord(decoding: Array(bytes.prefix(n)), limits: Limits()) }
        }
        #expect(throws: DecodeError.self) { try HintRecord(decoding: bytes + [0], limits: Limits()) }
        var wrongFormat = bytes
        wrongFormat[0] = 2
        #expect(throws: DecodeError.self) { try HintRecord(decoding: wrongFormat, limits: Limits()) }
    }

    @Test func fallbackAndHintSpacesAreApartFromEveryRingPartition() {
        let p = PartitionID(1 << 20 - 1)
        #expect(p.fallbackSpace != p && p.fallbackSpace.isFallbackSpace && p.fallbackSpace.home == p)
        #expect(!p.isFallbackSpace && !PartitionID.hintSpace.isFallbackSpace)
        #expect(PartitionID.hintSpace.index > p.index && PartitionID.hintSpace.index < PartitionID(0).fallbackSpace.index)
    }
}
