/// Size and count bounds applied to every request, frame and stored object.
///
/// Every field has a config key (`limits.*` in cairn.conf, see Docs/configuration.md) and the
/// defaults below. Limits are checked before any allocation sized by untrusted input.
public struct Limits: Hashable, Sendable {
    /// `limits.max_frame_bytes`: largest frame body accepted on a connection.
    public var maxFrameBytes: Int = 16 << 20
    /// `limits.max_key_bytes`.
    public var maxKeyBytes: Int = 1 << 10
    /// `limits.max_value_bytes`.
    public var maxValueBytes: Int = 8 << 20
    /// `limits.max_siblings`: live values kept per key; beyond it the oldest are pruned and counted
    /// (`cairn_siblings_pruned_total`). Writes never fail because of it.
    public var maxSiblings: Int = 64
    /// `limits.max_object_bytes`: encoded size of one key's object (all siblings and the clock).
    /// Beyond it the oldest siblings are pruned like `max_siblings`; it keeps every object and
    /// every reply inside one frame. Must be at least `max_value_bytes` + `max_key_bytes` + 64 KiB and at most
    /// `max_frame_bytes` − 64 KiB.
    public var maxObjectBytes: Int = 12 << 20
    /// `limits.max_siblings_on_decode`: values accepted when decoding an object from a peer or
    /// disk (a peer may be configured with a higher `max_siblings`; this guards memory, not policy).
    public var maxSiblingsOnDecode: Int = 4096
    /// `limits.max_actors_per_object`: entries in one object's clock or one context. A write that
    /// would exceed it is refused (it would make the key unreadable).
    public var maxActorsPerObject: Int = 1024
    /// `limits.max_context_bytes`.
    public var maxContextBytes: Int = 64 << 10
    /// `limits.max_unflushed_reply_bytes`: reply bytes a server connection may hold unsent (the
    /// peer is not reading them); above it the server stops reading that connection until they
    /// drain to half (`cairn_connection_read_pauses_total`).
    public var maxUnflushedReplyBytes: Int = 4 << 20
    /// `limits.max_requests_per_connection`: requests of one connection dispatched and not yet
    /// answered; above it the server stops reading that connection until one is answered. With
    /// `max_unflushed_reply_bytes` this bounds what one connection can make the node buffer.
    public var maxRequestsPerConnection: Int = 1024
    /// Largest dot counter accepted from a context, a peer or disk (2^48: far beyond any real
    /// key's history). A forged counter near 2^64 would otherwise make the key unwritable for
    /// that actor once its next dot overflowed. Not configurable.
    public var maxDotCounter: UInt64 = 1 << 48

    public init() {}
}
