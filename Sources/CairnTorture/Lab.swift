import Foundation
import CairnProcess
#if canImport(Glibc)
import Glibc
#endif

/// A harness-side failure: setting up hosts, starting nodes, applying a fault.
public struct TortureError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}

/// `sh` on a dispatch thread: a command that takes a while (the `cairn` CLI, a poll) must not hold
/// one of Swift's cooperative threads (two on a 2-core machine) away from the workload's clients.
@discardableResult
func shAsync(_ args: [String], allowFailure: Bool = false) async throws -> String {
    try await withCheckedThrowingContinuation { (c: CheckedContinuation<String, any Error>) in
        DispatchQueue.global().async { c.resume(with: Result { try sh(args, allowFailure: allowFailure) }) }
    }
}

/// Runs a command to completion; throws with its output if it fails.
@discardableResult
func sh(_ args: [String], input: String? = nil, allowFailure: Bool = false) throws -> String {
    let p = ChildProcess()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = args
    let out = Pipe()
    p.standardOutput = out
    p.standardError = out
    let inPipe = Pipe()
    if input != nil { p.standardInput = inPipe }
    try p.run()
    if let input {
        inPipe.fileHandleForWriting.write(Data(input.utf8))
        try? inPipe.fileHandleForWriting.close()
    }
    let data = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    let text = String(decoding: data, as: UTF8.self)
    if p.terminationStatus != 0 && !allowFailure {
        throw TortureError("`\(args.joined(separator: " "))` failed (\(p.terminationStatus)): \(text.trimmingCharacters(in: .whitespacesAndNewlines))")
    }
    return text
}

/// Where the nodes live and how links between them are cut.
///
/// `NamespaceLab`: each node in its own network namespace on a private bridge, the harness
/// reaching them through a veth of its own; partitions are `nft` rules in the nodes' namespaces
/// (needs root). `LoopbackLab`: every node on its own loopback address; partitions go through each
/// node's fault-injecting transport.
protocol Lab: Sendable {
    var nodeCount: Int { get }
    /// The node's client/internode address (host:port) and its HTTP address.
    func address(_ i: Int) -> String
    func httpAddress(_ i: Int) -> String
    func setUp() throws
    /// The command that runs `cairnd` as node `i` (wrapped for its namespace if any).
    func command(_ i: Int, cairnd: String, config: String) -> [String]
    /// Cuts exactly these links (node → peers it must not reach); an empty map heals all.
    /// `running`: the nodes whose processes run now (the others cannot be told anything).
    func cut(_ blocked: [Int: Set<Int>], running: [Int]) throws
    func tearDown()
}

struct NamespaceLab: Lab {
    let nodeCount: Int
    let tag: String
    let subnet: String

    init(nodes: Int) {
        nodeCount = nodes
        let id = Int(getpid()) % 10_000
        tag = "ct\(id)"
        subnet = "10.98.\(id % 250 + 1)"
    }

    func ns(_ i: Int) -> String { "\(tag)-n\(i + 1)" }
    var bridgeNS: String { "\(tag)-br" }
    func ip(_ i: Int) -> String { "\(subnet).\(i + 1)" }
    func address(_ i: Int) -> String { "\(ip(i)):7401" }
    func httpAddress(_ i: Int) -> String { "\(ip(i)):8401" }

    func setUp() throws {
        tearDown()
        try sh(["ip", "netns", "add", bridgeNS])
        try sh(["ip", "-n", bridgeNS, "link", "add", "br0", "type", "bridge"])
        try sh(["ip", "-n", bridgeNS, "link", "set", "br0", "up"])
        for i in 0..<nodeCount {
            let v = "\(tag)v\(i + 1)"
            try sh(["ip", "netns", "add", ns(i)])
            try sh(["ip", "link", "add", v, "type", "veth", "peer", "name", "eth0", "netns", ns(i)])
            try sh(["ip", "link", "set", v, "netns", bridgeNS])
            try sh(["ip", "-n", bridgeNS, "link", "set", v, "master", "br0"])
            try sh(["ip", "-n", bridgeNS, "link", "set", v, "up"])
            try sh(["ip", "-n", ns(i), "addr", "add", "\(ip(i))/24", "dev", "eth0"])
            try sh(["ip", "-n", ns(i), "link", "set", "eth0", "up"])
            try sh(["ip", "-n", ns(i), "link", "set", "lo", "up"])
            try sh(["ip", "netns", "exec", ns(i), "nft", "-f", "-"], input: """
                table inet cairncut {
                  chain output { type filter hook output priority 0; }
                }
                """)
        }
        // The harness's own leg on the bridge.
        try sh(["ip", "link", "add", "\(tag)h", "type", "veth", "peer", "name", "\(tag)hb", "netns", bridgeNS])
        try sh(["ip", "-n", bridgeNS, "link", "set", "\(tag)hb", "master", "br0"])
        try sh(["ip", "-n", bridgeNS, "link", "set", "\(tag)hb", "up"])
        try sh(["ip", "addr", "add", "\(subnet).254/24", "dev", "\(tag)h"])
        try sh(["ip", "link", "set", "\(tag)h", "up"])
    }

    func command(_ i: Int, cairnd: String, config: String) -> [String] {
        ["ip", "netns", "exec", ns(i), cairnd, "--config", config, "--log-level", "warning", "--test-fault-injection"]
    }

    func cut(_ blocked: [Int: Set<Int>], running: [Int]) throws {
        for i in 0..<nodeCount {
            var script = "flush chain inet cairncut output\n"
            for j in (blocked[i] ?? []).sorted() { script += "add rule inet cairncut output ip daddr \(ip(j)) drop\n" }
            try sh(["ip", "netns", "exec", ns(i), "nft", "-f", "-"], input: script)
        }
    }

    func tearDown() {
        for i in 0..<nodeCount { _ = try? sh(["ip", "netns", "del", ns(i)], allowFailure: true) }
        _ = try? sh(["ip", "netns", "del", bridgeNS], allowFailure: true)
        _ = try? sh(["ip", "link", "del", "\(tag)h"], allowFailure: true)
    }
}

struct LoopbackLab: Lab {
    let nodeCount: Int
    let base: String

    init(nodes: Int) {
        nodeCount = nodes
        base = "127.98.\(Int(getpid()) % 250 + 1)"
    }

    func address(_ i: Int) -> String { "\(base).\(i + 1):7401" }
    func httpAddress(_ i: Int) -> String { "\(base).\(i + 1):8401" }
    func setUp() throws {}
    func command(_ i: Int, cairnd: String, config: String) -> [String] {
        [cairnd, "--config", config, "--log-level", "warning", "--test-fault-injection"]
    }

    /// Partitions through the transport: each node stops sending to the peers it must not reach.
    func cut(_ blocked: [Int: Set<Int>], running: [Int]) throws {
        for i in running {
            let peers = (blocked[i] ?? []).sorted().map { "n\($0 + 1)" }.joined(separator: ",")
            try setTransportFaults(httpAddress(i), peers.isEmpty ? "" : "block=\(peers)")
        }
    }

    func tearDown() {}
}

/// `GET /test/faults?…` on a node started with `--test-fault-injection`.
func setTransportFaults(_ http: String, _ query: String) throws {
    try sh(["curl", "-sf", "--max-time", "3", "http://\(http)/test/faults?\(query)"])
}
