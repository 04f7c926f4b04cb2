import Testing
import Foundation
import CairnNode
import CairnCore
import CairnStorage
import Logging
import Synchronization

/// A log handler that keeps every record (level, message, metadata) for assertions.
final class CapturedLogs: Sendable {
    struct Entry: Sendable {
        let level: Logger.Level
        let message: String
        let metadata: [String: String]
    }
    let entries = Mutex<[Entry]>([])

    var logger: Logger { Logger(label: "test") { _ in Handler(sink: self) } }

    struct Handler: LogHandler {
        let sink: CapturedLogs
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            var all = metadata
            all.merge(event.metadata ?? [:]) { _, new in new }
            sink.entries.withLock { $0.append(Entry(level: event.level, message: "\(event.message)", metadata: all.mapValues { "\($0)" })) }
        }
    }
}

/// The node's side of storage recovery: a log corrupt before its tail keeps the node down unless
/// the operator asks for salvage, which starts it and logs what was dropped.
@Suite(.serialized) struct StorageRecoveryTests {
    @Test func aNodeWithACorruptLogStartsOnlyWithSalvageAndLogsWhatWasDropped() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-salvage-\(UInt64.random(in: 0...UInt64.max))").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var c = NodeConfig(name: try NodeName("n1"))
        c.listen = HostPort(host: "127.0.0.1", port: 0)
        c.http = nil
        c.dataDirectory = dir
        c.ringSize = 8
        c.nVal = 1
        // A crash leaves the writes in the log; then a record in the middle goes bad.
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let backend = try await DiskBackend.open(directory: dir + "/storage", options: c.storage)
        for i in 0..<5 { try await backend.waitDurable(try backend.apply(partition: PartitionID(1), key: [UInt8(i)], value: [UInt8(i)])) }
        await backend.database.abandon()
        let log = try #require(try FileManager.default.contentsOfDirectory(atPath: dir + "/storage").first { $0.hasSuffix(".log") })
        var bytes = try Data(contentsOf: URL(fileURLWithPath: dir + "/storage/" + log))
        // The middle of the records: the file ends in zeros written ahead of appends.
        let end = (bytes.lastIndex { $0 != 0 } ?? 0) + 1
        bytes[end / 2] ^= 0x10
        try bytes.write(to: URL(fileURLWithPath: dir + "/storage/" + log))

        let refusing = CapturedLogs()
        await #expect(throws: StorageError.self) { try await CairnNode(config: c, logger: refusing.logger).bind() }
        #expect(refusing.entries.withLock { $0 }.contains { $0.level == .error && $0.message.contains("salvage") },
                "the refusal tells the operator about salvage")

        c.storage.salvage = true
        let logs = CapturedLogs()
        let node = CairnNode(config: c, logger: logs.logger)
        let bound = try await node.bind()
        let stats = try #require(node.storageStatistics)
        #expect(stats.salvagedBytes > 0 && stats.salvagedRegions == 1)
        let warning = logs.entries.withLock { $0 }.first { $0.level == .warning && $0.metadata["salvaged_bytes"] != nil }
        #expect(warning?.metadata["salvaged_bytes"] == "\(stats.salvagedBytes)")
        #expect(warning?.metadata["salvaged_regions"] == "1")
        try node.start(members: [MemberAddress(name: c.name, address: bound.client)])
        let run = Task { try await node.run() }
        node.shutdown()
        try await run.value
    }
}
