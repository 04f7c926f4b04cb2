import CairnClient
public import CairnCore
import Foundation
import Synchronization
import NIOCore
import NIOPosix

/// What a read returned: every live value (several for Cairn siblings; empty when not found).
public struct ReadResult: Sendable {
    public var values: [[UInt8]]
    public init(values: [[UInt8]]) { self.values = values }
}

/// Why an operation failed, by the kind the report counts.
public struct TargetError: Error, Sendable, CustomStringConvertible {
    /// `unavailable`, `not_reached`, `timeout`, `connection`, `server`, `invalid`.
    public var kind: String
    public var message: String
    public init(_ kind: String, _ message: String) {
        self.kind = kind
        self.message = message
    }
    public var description: String { "\(kind): \(message)" }
}

/// One worker's connection to the system under test. Owned by one worker at a time.
public protocol TargetSession: Sendable {
    func read(_ key: [UInt8]) async throws(TargetError) -> ReadResult
    func write(_ key: [UInt8], _ value: [UInt8]) async throws(TargetError)
    func delete(_ key: [UInt8]) async throws(TargetError)
    func close() async
}

/// A session that can run a closed loop on its connection's event loop: each reply's completion
/// issues the worker's next request directly, with no task switch per request (what a C load
/// generator does). The driver decides what to send and records what came back.
public protocol EventLoopDrivenSession: TargetSession {
    func runClosedLoop(_ driver: ClosedLoopDriver) async
    /// Sends one request (callable from any thread); `finish` gets the values read (nil for a
    /// write) or the error, on the connection's event loop, as soon as the reply is decoded.
    func start(_ plan: ClosedLoopDriver.Plan, then finish: @escaping @Sendable ([[UInt8]]?, TargetError?) -> Void)
}

/// A system under test: `cairn://`, `redis://` or `etcd://`.
public protocol LoadTarget: Sendable {
    var description: String { get }
    /// A session for worker `index` (targets spread workers over their endpoints).
    func session(index: Int) async throws(TargetError) -> any TargetSession
    func close() async
    /// Reads that returned more than one live value (targets with siblings).
    var siblingReads: Int { get }
}

extension LoadTarget {
    public var siblingReads: Int { 0 }
}

public struct ConsistencyOptions: Sendable {
    public var r: Quorum?
    public var w: Quorum?
    public var pr: Quorum?
    public var pw: Quorum?
    public init(r: Quorum? = nil, w: Quorum? = nil, pr: Quorum? = nil, pw: Quorum? = nil) {
        self.r = r
        self.w = w
        self.pr = pr
        self.pw = pw
    }
}

/// Parses `cairn://h:p,h:p`, `redis://h:p`, `etcd://h:p,h:p`.
///
/// `connectionsPerNode` (Cairn only): the client's connections to each node; nil derives it from
/// `concurrency` (one per 16 workers per node, 1...8).
public func makeTarget(_ url: String, consistency: ConsistencyOptions, concurrency: Int, timeoutMillis: UInt32,
                       connectionsPerNode: Int? = nil) async throws(TargetError) -> any LoadTarget {
    guard let sep = url.range(of: "://") else { throw TargetError("invalid", "target '\(url)' is not scheme://host:port[,host:port]") }
    let scheme = url[..<sep.lowerBound].lowercased()
    let endpoints = url[sep.upperBound...].split(separator: ",").map { String($0).trimmingCharacters(in: CharacterSet(charactersIn: "/ ")) }
    guard !endpoints.isEmpty else { throw TargetError("invalid", "target '\(url)' names no host:port") }
    switch scheme {
    case "cairn":
        return try await CairnTarget.connect(endpoints, consistency: consistency, concurrency: concurrency, timeoutMillis: timeoutMillis,
                                             connectionsPerNode: connectionsPerNode)
    case "redis": return try RedisTarget(endpoints: endpoints)
    case "etcd": return try EtcdTarget(endpoints: endpoints)
    default: throw TargetError("invalid", "unknown target scheme '\(scheme)' (cairn, redis or etcd)")
    }
}

/// The endpoints of a target reached over one connection per worker; worker `i` uses endpoint
/// `i % count`, spreading workers evenly.
struct Endpoints: Sendable, CustomStringConvertible {
    let scheme: String
    let hosts: [HostPort]
    let group: any EventLoopGroup

    init(scheme: String, _ endpoints: [String], group: (any EventLoopGroup)?) throws(TargetError) {
        var parsed: [HostPort] = []
        for e in endpoints { parsed.append(try splitHostPort(e)) }
        self.scheme = scheme
        self.hosts = parsed
        self.group = group ?? MultiThreadedEventLoopGroup.singleton
    }

    func pick(_ index: Int) -> (String, Int) {
        let hp = hosts[index % hosts.count]
        return (hp.host, hp.port)
    }

    var description: String { scheme + "://" + hosts.map(\.description).joined(separator: ",") }
}

func splitHostPort(_ s: String) throws(TargetError) -> HostPort {
    guard let hp = try? HostPort(parsing: s), hp.port >= 1 else { throw TargetError("invalid", "'\(s)' is not host:port") }
    return hp
}

/// Cairn through `CairnClient`. Like an application, it writes with the context of the last
/// read or write it saw for the key (shared by all workers, bounded), so updates supersede what
/// was read and only truly concurrent writes become siblings. A write's context comes with the
/// values it covers (`WriteResult`): the generator was shown them, as after a read, and its next
/// write replaces them by choice (its values are synthetic).
public final class CairnTarget: LoadTarget {
    let client: CairnClient
    let options: RequestOptions
    let contexts = Mutex<[ContextKey: CausalContext]>([:])
    let endpoints: [String]
    /// Bound of the context cache (entries); past it the cache starts over.
    static let maxCachedContexts = 4_000_000
    let siblingReadCount = Atomic<Int>(0)
    public var siblingReads: Int { siblingReadCount.load(ordering: .relaxed) }

    init(client: CairnClient, options: RequestOptions, endpoints: [String]) {
        self.client = client
        self.options = options
        self.endpoints = endpoints
    }

    static func connect(_ endpoints: [String], consistency c: ConsistencyOptions, concurrency: Int, timeoutMillis: UInt32,
                        connectionsPerNode: Int? = nil) async throws(TargetError) -> CairnTarget {
        var config = CairnClient.Configuration()
        config.defaultTimeoutMillis = timeoutMillis
        config.connectionsPerNode = connectionsPerNode ?? max(1, min(8, concurrency / max(endpoints.count, 1) / 16))
        do {
            let client = try await CairnClient.connect(seeds: endpoints, configuration: config)
            // Every reachable node's connections open before the first request: connecting is not
            // charged to it.
            await client.openAllConnections()
            return CairnTarget(client: client, options: RequestOptions(r: c.r, w: c.w, pr: c.pr, pw: c.pw, timeoutMillis: timeoutMillis),
                               endpoints: endpoints)
        } catch {
            throw Self.map(error)
        }
    }

    public var description: String { "cairn://" + endpoints.joined(separator: ",") }

    public func session(index: Int) async throws(TargetError) -> any TargetSession { CairnSession(target: self) }

    public func close() async { client.close() }

    func remember(_ key: [UInt8], _ ctx: CausalContext) {
        contexts.withLock { c in
            if c.count >= Self.maxCachedContexts { c.removeAll(keepingCapacity: true) }
            c[ContextKey(bytes: key)] = ctx
        }
    }

    func context(of key: [UInt8]) -> CausalContext { contexts.withLock { $0[ContextKey(bytes: key)] } ?? .empty }

    /// A key of the context cache, hashed as one run of bytes (an array's own hashing feeds the
    /// hasher a byte at a time, which cost 3-4 % of the generator's CPU).
    struct ContextKey: Hashable {
        let bytes: [UInt8]
        func hash(into h: inout Hasher) { bytes.withUnsafeBytes { h.combine(bytes: $0) } }
    }

    static func map(_ e: CairnError) -> TargetError {
        switch e {
        case .unavailable(let f): TargetError("unavailable", f.description)
        case .quorumNotReached(let f): TargetError("not_reached", f.description)
        case .timeout(let s): TargetError("timeout", s)
        case .invalidArgument(let s): TargetError("invalid", s)
        case .overloaded(let s): TargetError("overloaded", s)
        case .noNodeReachable(let s): TargetError("connection", s)
        case .server(_, let s): TargetError("server", s)
        case .notFound: TargetError("not_found", "not found")
        }
    }
}

/// A worker's view of `CairnTarget`. Closed-loop and open-loop runs of single-request mixes drive
/// it from the client's completion handlers (no task per request, as the Redis target's sessions
/// are driven); read-modify-write and delete use the async calls.
struct CairnSession: EventLoopDrivenSession {
    let target: CairnTarget

    func read(_ key: [UInt8]) async throws(TargetError) -> ReadResult {
        let outcome: Result<GetResult, CairnError>
        do { outcome = .success(try await target.client.get(key, options: target.options)) } catch { outcome = .failure(error) }
        return try target.read(key, outcome).get()
    }

    func write(_ key: [UInt8], _ value: [UInt8]) async throws(TargetError) {
        let ctx = target.context(of: key)
        let outcome: Result<WriteResult, CairnError>
        do { outcome = .success(try await target.client.put(key, value: value, context: ctx, options: target.options)) } catch { outcome = .failure(error) }
        try target.wrote(key, outcome).get()
    }

    /// Deletes what it has just read, as an application does: a tombstone supersedes exactly what
    /// its context covers, so one written with a stale or empty context would leave newer values
    /// readable (by design). The recorded latency covers the read and the delete.
    func delete(_ key: [UInt8]) async throws(TargetError) {
        _ = try await read(key)
        let ctx = target.context(of: key)
        let outcome: Result<WriteResult, CairnError>
        do { outcome = .success(try await target.client.delete(key, context: ctx, options: target.options)) } catch { outcome = .failure(error) }
        try target.wrote(key, outcome).get()
    }

    func close() async {}

    /// One worker's closed loop: each completion plans and sends the next request.
    func runClosedLoop(_ driver: ClosedLoopDriver) async {
        await withCheckedContinuation { (finished: CheckedContinuation<Void, Never>) in
            @Sendable func issue() {
                guard let plan = driver.next() else { return finished.resume() }
                start(plan) { values, error in
                    driver.finish(plan, values: values, error: error)
                    // A request that failed before it was sent completes on this stack: the next
                    // one starts from an event loop, so repeated failures cannot nest.
                    if error != nil { MultiThreadedEventLoopGroup.singleton.any().execute { issue() } } else { issue() }
                }
            }
            issue()
        }
    }

    /// Sends a read (`plan.value` nil) or a write with the key's last seen context.
    func start(_ plan: ClosedLoopDriver.Plan, then finish: @escaping @Sendable ([[UInt8]]?, TargetError?) -> Void) {
        let (target, key) = (self.target, plan.key)
        if let value = plan.value {
            let ctx = target.context(of: key)
            target.client.put(key, value: value, context: ctx, options: target.options) { outcome in
                switch target.wrote(key, outcome) {
                case .success: finish(nil, nil)
                case .failure(let e): finish(nil, e)
                }
            }
        } else {
            target.client.get(key, options: target.options) { outcome in
                switch target.read(key, outcome) {
                case .success(let r): finish(r.values, nil)
                case .failure(let e): finish(nil, e)
                }
            }
        }
    }
}

extension CairnTarget {
    /// A get's outcome as the generator counts it; remembers the context (a miss's too).
    func read(_ key: [UInt8], _ outcome: Result<GetResult, CairnError>) -> Result<ReadResult, TargetError> {
        switch outcome {
        case .success(let r):
            remember(key, r.context)
            let values = r.values
            if values.count > 1 { siblingReadCount.wrappingAdd(1, ordering: .relaxed) }
            return .success(ReadResult(values: values))
        case .failure(.notFound(let ctx)):
            remember(key, ctx)
            return .success(ReadResult(values: []))
        case .failure(let e):
            return .failure(Self.map(e))
        }
    }

    /// A put's or delete's outcome as the generator counts it; remembers the new context.
    func wrote(_ key: [UInt8], _ outcome: Result<WriteResult, CairnError>) -> Result<Void, TargetError> {
        switch outcome {
        case .success(let w):
            remember(key, w.context)
            return .success(())
        case .failure(let e):
            return .failure(Self.map(e))
        }
    }
}
