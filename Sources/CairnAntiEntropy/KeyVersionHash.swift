public import CairnCore
import CairnRing

/// The two hashes anti-entropy is built on, both XXH64 (`KeyHash`) with seeds of their own, so
/// neither correlates with a key's ring position (a partition's keys share their top ring-hash
/// bits; their segments must not).
///
/// Stability: replicas compare these values, so every node of a cluster must compute them alike.
/// Changing either is a wire change (Docs/anti-entropy.md).
public enum KeyVersionHash {
    static let segmentSeed: UInt64 = 0x6361_6972_6e2d_7365   // "cairn-se"
    static let versionSeed: UInt64 = 0x6361_6972_6e2d_7665   // "cairn-ve"

    /// The key's segment in a tree of `shape`: the top `shape.segmentBits` bits of its segment hash.
    public static func segment(of key: [UInt8], shape: TreeShape) -> Int {
        Int(truncatingIfNeeded: KeyHash.hash(key, seed: segmentSeed) >> UInt64(64 - shape.segmentBits))
    }

    /// The hash of a key at a version: XXH64 over the key and the object's causal summary (per
    /// actor: name, epoch, counter, live value count; then the anonymous value count). Two replicas
    /// holding the same history for a key hash alike whatever their bytes on disk; any write,
    /// merge or delete that changes the history changes it. Never 0 (0 stands for "absent").
    public static func hash(key: [UInt8], object: VersionedObject) -> UInt64 {
        var w = ByteWriter(capacity: key.count + 16 + object.entries.count * 24)
        return hash(key: key, object: object, using: &w)
    }

    /// `hash(key:object:)`, written through `scratch` (cleared first, its buffer kept): no
    /// allocation once the buffer has grown to the objects' size.
    public static func hash(key: [UInt8], object: VersionedObject, using w: inout ByteWriter) -> UInt64 {
        w.removeAll()
        w.writeBlob(key)
        w.writeVarint(object.entries.count)
        for e in object.entries {
            w.writeString(e.actor.node)
            w.writeU64(e.actor.epoch)
            w.writeVarint(e.counter)
            w.writeVarint(e.values.count)
        }
        w.writeVarint(object.anonymous.count)
        let h = KeyHash.hash(w.bytes, seed: versionSeed)
        return h == 0 ? 1 : h
    }
}
