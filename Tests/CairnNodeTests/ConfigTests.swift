import Testing
@testable import CairnNode
import CairnCore

@Suite struct ConfigTests {
    static let sample = """
    # a node
    node.name = n2
    node.listen = 127.0.0.1:7402
    node.http = off
    cluster.name = prod
    cluster.ring_size = 512
    cluster.members = n1@10.0.0.1:7401, n2@10.0.0.2:7401 , n3@[::1]:7403
    request.timeout = 1500ms
    request.default_w = all
    limits.max_value_bytes = 1MiB
    supervisor.restart_window = 1m
    """

    @Test func parsesEveryKindOfValue() throws {
        let c = try NodeConfig.parse(Self.sample)
        #expect(c.name.value == "n2")
        #expect(c.http == nil)
        #expect(c.ringSize == 512)
        #expect(c.members.map(\.address.description) == ["10.0.0.1:7401", "10.0.0.2:7401", "[::1]:7403"])
        #expect(c.advertised == HostPort(host: "10.0.0.2", port: 7401))
        #expect(c.requestTimeoutMillis == 1500)
        #expect(c.defaultW == .all)
        #expect(c.limits.maxValueBytes == 1 << 20)
        #expect(c.restartPolicy.window == .seconds(60))
    }

    @Test func errorsNameTheLine() {
        let cases: [(String, String)] = [
            ("node.name = n1\ncluster.members = n1@h:1\nbogus.key = 1", "line 3"),
            ("node.name = n1\ncluster.members = n1@h:1\ncluster.ring_size = 100", "line 0"),
            ("node.name = n1\ncluster.members = n1@h:1\nrequest.timeout = soon", "line 3"),
            ("node.name = n1\ncluster.members = n1@h:99999", "line 2"),
            ("node.name = n1\ncluster.members = n2@h:1", "does not list this node"),
            ("node.name = bad name\ncluster.members = x@h:1", "line 1"),
            ("cluster.members = n1@h:1", "node.name is required"),
            ("node.name = n1\nthis line has no equals", "line 2"),
        ]
        for (text, fragment) in cases {
            do {
                _ = try NodeConfig.parse(text)
                Issue.record("accepted: \(text)")
            } catch {
                #expect(error.description.contains(fragment), "\(error.description) lacks \(fragment)")
            }
        }
    }
}

@Suite struct ConfigValidationTests {
    private func parse(_ extra: String) throws -> NodeConfig {
        try NodeConfig.parse("node.name = n1\ncluster.members = n1@h:1, n2@h:2, n3@h:3\n" + extra)
    }

    @Test func storageSalvageIsAFlagOffByDefault() throws {
        #expect(try parse("").storage.salvage == false)
        #expect(try parse("storage.salvage = true\n").storage.salvage == true)
        #expect(try parse("storage.salvage = true\nstorage.salvage = false\n").storage.salvage == false)
        #expect(throws: NodeConfig.ParseError.self) { try parse("storage.salvage = yes\n") }
    }

    @Test func tableWriteOutsAreOnAtOneMiBAndCanBeTurnedOff() throws {
        #expect(try parse("").storage.bytesPerSync == 1 << 20)
        #expect(try parse("storage.bytes_per_sync = 256KiB\n").storage.bytesPerSync == 256 << 10)
        #expect(try parse("storage.bytes_per_sync = 0\n").storage.bytesPerSync == 0)
        #expect(throws: NodeConfig.ParseError.self) { try parse("storage.bytes_per_sync = 2GiB\n") }
    }

    @Test func theLogBufferIsSixtyFourKiBByDefaultAndCanBeTurnedOff() throws {
        #expect(try parse("").storage.logBufferBytes == 64 << 10)
        #expect(try parse("storage.log_buffer_bytes = 1MiB\n").storage.logBufferBytes == 1 << 20)
        #expect(try parse("storage.log_buffer_bytes = 0\n").storage.logBufferBytes == 0)
        #expect(throws: NodeConfig.ParseError.self) { try parse("storage.log_buffer_bytes = 65MiB\n") }
    }

    @Test func backgroundThreadsAreNicedTenByDefault() throws {
        #expect(try parse("").storageBackgroundNice == 10)
        #expect(try parse("storage.background_nice = 0\n").storageBackgroundNice == 0)
        #expect(throws: NodeConfig.ParseError.self) { try parse("storage.background_nice = 20\n") }
    }

    @Test func threadCountsDefaultToTheCoresAndCanBeSet() throws {
        #expect(try parse("").eventLoops == nil)
        #expect(try parse("").storageRequestThreads == nil)
        #expect(try parse("node.event_loops = 1\nstorage.request_threads = 2\n").eventLoops == 1)
        #expect(try parse("node.event_loops = 1\nstorage.request_threads = 2\n").storageRequestThreads == 2)
        #expect(throws: NodeConfig.ParseError.self) { try parse("node.event_loops = 0\n") }
        #expect(throws: NodeConfig.ParseError.self) { try parse("storage.request_threads = 65\n") }
    }

    @Test func crlfFilesParse() throws {
        let c = try NodeConfig.parse("node.name = n1\r\ncluster.members = n1@h:1\r\nrequest.timeout = 3s\r\n")
        #expect(c.requestTimeoutMillis == 3000)
    }

    @Test func relationsBetweenKeysAreChecked() {
        let bad = [
            "request.default_w = 4",
            "request.default_r = 2\nrequest.default_pr = 3",
            "transport.reconnect_min = 0",
            "transport.reconnect_min = 5s\ntransport.reconnect_max = 1s",
            "supervisor.backoff_min = 10s\nsupervisor.backoff_max = 1s",
            "limits.max_value_bytes = 16MiB",
            "limits.max_object_bytes = 16MiB",
            "limits.max_siblings = 5000",
            "cluster.name = " + String(repeating: "x", count: 300),
            "node.data_dir = ",
        ]
        for extra in bad {
            #expect(throws: NodeConfig.ParseError.self, "\(extra)") { try parse(extra) }
        }
        #expect(throws: Never.self) { try parse("limits.max_object_bytes = 9MiB\nlimits.max_actors_per_object = 64") }
    }
}
