import NIOCore
import NIOHTTP1
import CairnStorage

/// `GET /health` (200 only while serving) and `GET /metrics` (Prometheus text format).
///
/// Isolation: a channel handler on its connection's event loop; reads the node state and the
/// metrics registry, both thread-safe. Bound: request heads are capped by NIOHTTP1's parser;
/// bodies are ignored.
final class HTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let core: NodeCore
    private var head: HTTPRequestHead?

    init(core: NodeCore) { self.core = core }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let h = head else { return }
            head = nil
            let (status, type, body) = respond(h)
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: type)
            headers.add(name: "Content-Length", value: "\(body.utf8.count)")
            headers.add(name: "Connection", value: h.isKeepAlive ? "keep-alive" : "close")
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: status, headers: headers))), promise: nil)
            var buf = context.channel.allocator.buffer(capacity: body.utf8.count)
            buf.writeString(body)
            context.write(wrapOutboundOut(.body(.byteBuffer(buf))), promise: nil)
            let keepAlive = h.isKeepAlive
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
                if !keepAlive { channel.close(promise: nil) }
            }
        }
    }

    /// Detail lines for `/health` when storage holds corrupt tables: the node serves (keys in bad
    /// blocks fail on this replica only, others answer), but an operator must know.
    private func storageDamage() -> String {
        guard let s = core.backend?.storageStatistics, !s.corruptTables.isEmpty else { return "" }
        let names = s.corruptTables.map(Database.tableName)
        let refilling = core.antiEntropyState.damagedPartitions
        return "storage: corrupt tables \(names.joined(separator: ", "))" +
            (s.quarantinedTables.isEmpty ? "" : " (\(s.quarantinedTables.count) set aside from compaction)") +
            "; reads of keys in bad blocks fail on this node and are answered by replicas\n" +
            (refilling.isEmpty ? "" : "storage: partitions refilling from replicas after the damage: \(refilling.map(\.index))\n") +
            (s.lastCorruption.map { "storage: last corruption: \($0)\n" } ?? "")
    }

    private func respond(_ h: HTTPRequestHead) -> (HTTPResponseStatus, String, String) {
        guard h.method == .GET || h.method == .HEAD else { return (.methodNotAllowed, "text/plain", "only GET\n") }
        let path = h.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? h.uri
        switch path {
        case "/health":
            let state = core.state
            // A node that is not a member (seeds only, before `cluster join`; or left) refuses
            // key requests: not ready for traffic, though its process is fine.
            let member = core.current?.view.isMember ?? false
            let detail = state == .serving && !member
                ? "membership: not a member of a cluster; stage its join: cairn --node \(core.advertised) cluster join SEED\n" : ""
            return (state == .serving && member ? .ok : .serviceUnavailable, "text/plain", "\(state.rawValue)\n" + detail + storageDamage())
        case "/test/faults":
            // Exists only when the node was started with --test-fault-injection.
            guard let faults = core.faults else { return (.notFound, "text/plain", "not found: try /health or /metrics\n") }
            let query = h.uri.split(separator: "?", maxSplits: 1).dropFirst().first.map(String.init) ?? ""
            do {
                let rules = try TransportFaults.Rules(query: query)
                faults.set(rules)
                core.logger.warning("transport faults set", metadata: ["rules": "\(rules.description)"])
                return (.ok, "text/plain", rules.description + "\n")
            } catch {
                return (.badRequest, "text/plain", "\(error.reason)\n")
            }
        case "/metrics":
            if let stats = core.backend?.storageStatistics { core.metrics.recordStorage(stats) }
            return (.ok, "text/plain; version=0.0.4", core.metrics.exposition())
        default:
            return (.notFound, "text/plain", "not found: try /health or /metrics\n")
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
