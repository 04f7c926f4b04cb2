public import NIOCore
public import CairnCore

/// Splits the byte stream into frame bodies (`length:u32be body`), checking the length against
/// `maxFrameBytes` before buffering the body, so a hostile length cannot make us allocate.
///
/// Isolation: a channel handler; runs on its channel's event loop.
public struct FrameDecoder: ByteToMessageDecoder {
    public typealias InboundOut = ByteBuffer
    public let maxFrameBytes: Int

    public init(maxFrameBytes: Int) { self.maxFrameBytes = maxFrameBytes }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return .needMoreData }
        if UInt64(length) > UInt64(maxFrameBytes) { throw WireError.frameTooLarge(length: UInt64(length), limit: maxFrameBytes) }
        let n = Int(length)
        if n < WireCodec.headerBytes { throw WireError.frameTooShort(length: n) }
        guard buffer.readableBytes >= WireCodec.lengthBytes + n else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: WireCodec.lengthBytes)
        guard let body = buffer.readSlice(length: n) else { return .needMoreData }
        context.fireChannelRead(wrapInboundOut(body))
        return .continue
    }

    public mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue {}
        if buffer.readableBytes > 0 { throw WireError.truncatedFrame(buffered: buffer.readableBytes) }
        return .needMoreData
    }

    /// The decoder wrapped in its handler, with the buffer bounded to one maximal frame.
    public static func handler(limits: Limits) -> ByteToMessageHandler<FrameDecoder> {
        ByteToMessageHandler(FrameDecoder(maxFrameBytes: limits.maxFrameBytes),
                             maximumBufferSize: limits.maxFrameBytes + WireCodec.lengthBytes + 64 * 1024)
    }
}

extension ByteBufferAllocator {
    func frame(_ envelope: Envelope) -> ByteBuffer {
        buffer(WireCodec.encodeFrame(envelope))
    }

    func buffer(_ bytes: [UInt8]) -> ByteBuffer {
        var buf = buffer(capacity: bytes.count)
        buf.writeBytes(bytes)
        return buf
    }
}
