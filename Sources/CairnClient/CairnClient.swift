public import CairnCore
public import CairnWire
public import NIOCore
import NIOPosix
import Synchronization

/// Errors a Cairn call can end with. Each says whether the operation may have happened.
public enum CairnError: Error, Sendable, Hashable, CustomStringConvertible {
    /// `get`: no live value. The context covers any tombstones, so a following `put` supersedes them.
    case notFound(context: CausalContext)
    /// Too few replicas reachable; nothing was attempted. Certainly did not happen.
    case unavailable(QuorumFailure)
    /// Sent, but too few replicas answered in time. For writes: outcome unknown.
    case quorumNotReached(QuorumFailure)
    /// No answer in time. For writes: outcome unknown.
    case timeout(String)
    case invalidArgument(String)
    /// Every node refused (overloaded, starting or shutting down); nothing was attempted.
    case overloaded(String)
    /// No node could be reached; nothing was attempted.
    case noNodeReachable(String)
    /// Any other server-side error (storage failure, protocol error).
    case server(code: UInt16, message: String)

    public var description: String {
        switch self {
        case .notFound: "not found"
        case .unavailable(let f), .quorumNotReached(let f): f.description
        case .timeout(let s), .invalidArgument(let s), .overloaded(let s), .noNodeReachable(let s): s
        case .server(_, let s): s
        }
    }

    /// True when the operation certainly did not take effect.
    public var certainlyNotApplied: Bool {
        switch self {
        case .unavailable, .invalidArgument, .overloaded, .noNodeReachable, .notFound: true
        case .quorumNotReached, .timeout, .server: false
        }
    }
}

extension CairnError {
    /// The typed error for a node's error reply (the client's one mapping; `certainlyNotApplied`
    /// then says whether a write may have landed).
    public init(_ e: ErrorReply) {
        switch e.code {
        case .unavailable: if let q = e.quorum { self = .unavailable(q); return }
        case .notReached: if let q = e.quorum { self = .quorumNotReached(q); return }
        case .timeout: self = .timeout(e.message); return
        case .invalidArgument, .malformed, .frameTooLarge: self = .invalidArgument(e.message); return
        case .overloaded, .notReady, .shuttingDown: self = .overloaded(e.message); return
        default: break
        }
        self = .server(code: e.code.rawValue, message: e.message)
    }
}

/// What a `get` returns: every sibling (tombstones included, flagged) and the causal context to
/// pass to the next write.
public struct GetResult: Sendable, Hashable {
    public var siblings: [Sibling]
    public var context: CausalContext

    /// The live (non-tombstone) values.
    public var values: [[UInt8]] { siblings.filter { !$0.isTombstone }.map(\.value) }
}

/// What a successful `put` or `delete` returns.
///
/// Contract: `context` covers exactly the values in `siblings` (and what they superseded). The
/// first sibling is the value just written; any others are concurrent values this write did not
/// supersede (it was blind, or based on an older read). Writing again with `context` supersedes
/// all of them, so an application that must keep them merges them into its next value, exactly
/// as after a `get`.
public struct WriteResult: Sendable, Hashable {
    public var context: CausalContext
    public var siblings: [Sibling]
    /// The durability receipt: each replica that had acknowledged the write when the coordinator
    /// answered (at least W of them, the coordinator's own copy first), as a primary or as a
    /// fallback standing in for a named primary, and whether its copy was on stable storage.
    public var acks: [ReplicaAck]

    /// The values the write did not supersede (empty when it is the key's only value).
    public var concurrent: ArraySlice<Sibling> { siblings.dropFirst() }

    init(_ reply: WriteReply, written: Sibling) {
        context = reply.context
        siblings = [written] + reply.concurrent
        acks = reply.acks
    }
}

/// The async Cairn client: a pool of multiplexed connections to the seed nodes.
///
/// Any node coordinates, so requests rotate over the seeds. A request that certainly was not
/// delivered (connection refused, node starting, draining or overloaded) moves on to the next
/// seed; a write whose outcome is unknown is never retried silently — the caller gets
/// `timeout` / `quorumNotReached`. Reads are retried on another seed on connection loss.
/// Thread-safe; share one client.
public final class CairnClient: Sendable {
    public struct Configuration: Sendable {
        public var connectTimeoutMillis: Int64 = 1000
        /// Used when a call does not set `RequestOptions.timeoutMillis`; the server's own
        /// `request.timeout` applies on the server side.
        public var defaultTimeoutMillis: UInt32 = 2000
        /// Extra wait beyond the request timeout for the coordinator's answer.
        public var replyMarginMillis: UInt32 = 1500
        /// Connections to each node, 1...`maxConnectionsPerNode` (values outside are clamped).
        public var connectionsPerNode = 1
        public var maxPendingPerConnection = 4096
        public var limits = Limits()
        public init() {}
    }

    private let seeds: [HostPort]
    private let configuration: Configuration
    private let group: any EventLoopGroup
    /// Seed index → its `connectionsPerNode` slots. A slot holds one connection, or the one
    /// connect under way for it: concurrent requests needing it wait for that connect instead of
    /// each opening their own (no burst of connects when a loaded client starts).
    /// `closed`: set by `close()`; from then on no connect starts and requests fail as unreachable.
    private let pool: Locked<(closed: Bool, slots: [Int: [Slot?]])>
    /// `configuration.connectionsPerNode`, clamped to 1...`maxConnectionsPerNode`.
    private let perNode: Int
    public static let maxConnectionsPerNode = 1024
    private let cursor = Atomic<Int>(0)
    /// Names connect attempts, so a finishing connect fills only the slot it was started for.
    private let attempts = Atomic<UInt64>(0)

    enum Slot {
        case connecting(attempt: UInt64, Task<Connection, any Error>)
        case open(Connection)
    }

    private init(seeds: [HostPort], configuration: Configuration, group: any EventLoopGroup) {
        self.seeds = seeds
        self.configuration = configuration
        self.group = group
        self.pool = Locked((false, [:]))
        self.perNode = min(max(1, configuration.connectionsPerNode), Self.maxConnectionsPerNode)
    }

    /// Creates a client for `seeds` ("host:port" each). Succeeds if at least one seed answers;
    /// dead seeds are retried lazily on later calls.
    public static func connect(seeds: [String], configuration: Configuration = .init(),
                               group: (any EventLoopGroup)? = nil) async throws(CairnError) -> CairnClient {
        var parsed: [HostPort] = []
        for s in seeds {
            guard let hp = parseSeed(s) else { throw .invalidArgument("seed '\(s)' is not host:port with a port 1...65535") }
            parsed.append(hp)
        }
        guard !parsed.isEmpty else { throw .invalidArgument("no seeds given") }
        let client = CairnClient(seeds: parsed, configuration: configuration, group: group ?? MultiThreadedEventLoopGroup.singleton)
        var errors: [String] = []
        for i in parsed.indices {
            do throws(ConnectionError) {
                let c = try await client.connection(i, pick: 0)
                if case .pong = try await c.request(.ping, timeoutMillis: UInt32(clamping: configuration.connectTimeoutMillis)) { return client }
            } catch {
                errors.append("\(parsed[i]): \(error)")
            }
        }
        client.close()
        throw .noNodeReachable("no seed answered: " + errors.joined(separator: "; "))
    }

    /// Closes every connection. Later calls fail with `noNodeReachable` and open nothing; a
    /// connect under way when it is called closes what it opened.
    public func close() {
        // Connects still under way find their slot gone and close what they opened.
        let all = pool.withLock { p in
            defer { p = (true, [:]) }
            return p.slots.values.flatMap { slots in slots.compactMap { slot -> Connection? in
                if case .open(let c)? = slot { return c }
                return nil
            } }
        }
        for c in all { c.close() }
    }

    // MARK: Operations

    public func get(_ key: [UInt8], options: RequestOptions = .init()) async throws(CairnError) -> GetResult {
        try Self.getResult(try await send(.get(GetRequest(key: key, options: options)), options: options, idempotent: true))
    }

    /// Writes `value`, superseding exactly the siblings `context` covers (pass the context of the
    /// read the value was derived from; `.empty` for a blind write). Returns the new context with
    /// every value it covers: the written value first, then any concurrent siblings the write did
    /// not supersede (see `WriteResult`).
    @discardableResult
    public func put(_ key: [UInt8], value: [UInt8], context: CausalContext = .empty,
                    options: RequestOptions = RequestOptions()) async throws(CairnError) -> WriteResult {
        let reply = try await send(.put(PutRequest(key: key, value: value, context: context, options: options)), options: options, idempotent: false)
        return try Self.writeResult(reply, written: value)
    }

    /// Writes a tombstone superseding what `context` covers. Returns the new context and what it
    /// covers, as `put` does.
    @discardableResult
    public func delete(_ key: [UInt8], context: CausalContext = .empty,
                       options: RequestOptions = RequestOptions()) async throws(CairnError) -> WriteResult {
        let reply = try await send(.delete(DeleteRequest(key: key, context: context, options: options)), options: options, idempotent: false)
        return try Self.writeResult(reply, written: nil)
    }

    // MARK: Operations with a completion handler

    /// `get` for a caller that must not suspend (an event-loop-driven load generator, a server
    /// written with callbacks). `done` is called exactly once with the outcome `get` would have
    /// returned or thrown: on the event loop of the connection that answered, or on the calling
    /// thread when the request fails before it is sent. It must not block. Not cancellable; the
    /// timeout bounds it. Costs no task when a connection to the chosen node is already open.
    public func get(_ key: [UInt8], options: RequestOptions = .init(),
                    then done: @escaping @Sendable (Result<GetResult, CairnError>) -> Void) {
        sendSoon(.get(GetRequest(key: key, options: options)), options: options, idempotent: true) { outcome in
            done(outcome.flatMap { reply in Result { () throws(CairnError) in try Self.getResult(reply) } })
        }
    }

    /// `put` with a completion handler; see `get(_:options:then:)` for when and where `done` runs.
    public func put(_ key: [UInt8], value: [UInt8], context: CausalContext = .empty, options: RequestOptions = RequestOptions(),
                    then done: @escaping @Sendable (Result<WriteResult, CairnError>) -> Void) {
        sendSoon(.put(PutRequest(key: key, value: value, context: context, options: options)), options: options, idempotent: false) { outcome in
            done(outcome.flatMap { reply in Result { () throws(CairnError) in try Self.writeResult(reply, written: value) } })
        }
    }

    /// `delete` with a completion handler; see `get(_:options:then:)` for when and where `done` runs.
    public func delete(_ key: [UInt8], context: CausalContext = .empty, options: RequestOptions = RequestOptions(),
                       then done: @escaping @Sendable (Result<WriteResult, CairnError>) -> Void) {
        sendSoon(.delete(DeleteRequest(key: key, context: context, options: options)), options: options, idempotent: false) { outcome in
            done(outcome.flatMap { reply in Result { () throws(CairnError) in try Self.writeResult(reply, written: nil) } })
        }
    }

    /// A get reply as `get` returns it: the siblings, or `notFound` with the context.
    private static func getResult(_ reply: Message) throws(CairnError) -> GetResult {
        guard case .getReply(let r) = reply else { throw unexpected(reply) }
        guard r.found else { throw .notFound(context: r.context) }
        return GetResult(siblings: r.siblings, context: r.context)
    }

    /// A write reply as `put` (`written` the value) or `delete` (nil: a tombstone) returns it.
    private static func writeResult(_ reply: Message, written value: [UInt8]?) throws(CairnError) -> WriteResult {
        guard case .writeReply(let r) = reply else { throw unexpected(reply) }
        let written = value.map { Sibling(value: $0, timestampMillis: r.writtenTimestampMillis) } ?? .tombstone(timestampMillis: r.writtenTimestampMillis)
        return WriteResult(r, written: written)
    }

    public func members() async throws(CairnError) -> [MemberInfo] {
        let reply = try await send(.members, options: .init(), idempotent: true)
        guard case .membersReply(let m) = reply else { throw Self.unexpected(reply) }
        return m
    }

    /// Runs a cluster administration verb (`status`, `join`, `leave`, `remove`, `plan`,
    /// `commit`, `clear`, `transfers`, `preflist`; Docs/wire-protocol.md §10) on the node the
    /// client reaches, and returns its JSON reply. Verbs that change the ring are not retried on
    /// another node: their outcome could be unknown.
    public func admin(_ verb: String, _ arguments: [String] = [], timeoutMillis: UInt32? = nil) async throws(CairnError) -> String {
        let readOnly = ["status", "plan", "transfers", "preflist"].contains(verb)
        let reply = try await send(.admin(AdminRequest(verb: verb, arguments: arguments)),
                                   options: RequestOptions(timeoutMillis: timeoutMillis), idempotent: readOnly)
        guard case .adminReply(let bytes) = reply else { throw Self.unexpected(reply) }
        return String(decoding: bytes, as: UTF8.self)
    }

    // MARK: Plumbing

    private static func unexpected(_ m: Message) -> CairnError {
        if case .error(let e) = m { return CairnError(e) }
        return .server(code: ErrorCode.internalError.rawValue, message: "unexpected reply \(m.type)")
    }


    /// Validates sizes locally so an oversized request fails before it is sent.
    private func validate(_ m: Message) throws(CairnError) {
        let limits = configuration.limits
        switch m {
        case .get(let g): try check(key: g.key, limits)
        case .put(let p):
            try check(key: p.key, limits)
            guard p.value.count <= limits.maxValueBytes else {
                throw .invalidArgument("value of \(p.value.count) bytes exceeds the \(limits.maxValueBytes)-byte limit")
            }
        case .delete(let d): try check(key: d.key, limits)
        default: break
        }
    }

    private func check(key: [UInt8], _ limits: Limits) throws(CairnError) {
        guard !key.isEmpty else { throw .invalidArgument("key is empty") }
        guard key.count <= limits.maxKeyBytes else { throw .invalidArgument("key of \(key.count) bytes exceeds the \(limits.maxKeyBytes)-byte limit") }
    }

    /// One request on its way: the message as sent, how long to wait for its reply, and where its
    /// candidates start. Candidate k is seed (first + k) % count: requests rotate over the seeds,
    /// and `pick` spreads each seed's share over its connections.
    struct Attempting {
        let message: Message
        let waitMillis: UInt32
        let first: Int
        let seedCount: Int
        func seed(_ k: Int) -> Int { (first % seedCount + k) % seedCount }
        var pick: Int { first / seedCount }
    }

    private func prepare(_ message: Message, options: RequestOptions) throws(CairnError) -> Attempting {
        try validate(message)
        let timeout = (options.timeoutMillis ?? configuration.defaultTimeoutMillis)
        let wait = timeout.addingReportingOverflow(configuration.replyMarginMillis).partialValue
        let sent = options.timeoutMillis == nil ? Self.withTimeout(message, timeout) : message
        return Attempting(message: sent, waitMillis: wait, first: cursor.wrappingAdd(1, ordering: .relaxed).oldValue & Int.max, seedCount: seeds.count)
    }

    private func send(_ message: Message, options: RequestOptions, idempotent: Bool) async throws(CairnError) -> Message {
        let request = try prepare(message, options: options)
        var failover = Failover(candidates: seeds.count, idempotent: idempotent)
        var directive = failover.directive
        while case .tryCandidate(let k) = directive {
            do throws(ConnectionError) {
                let c = try await connection(request.seed(k), pick: request.pick)
                directive = failover.received(try await c.request(request.message, timeoutMillis: request.waitMillis))
            } catch {
                directive = failover.failed(error)
            }
        }
        return try outcome(of: directive, request).get()
    }

    /// `send` without a task while the chosen connections are open: each attempt's reply
    /// callback runs the failover machine's next directive. Opening a connection takes a task.
    private func sendSoon(_ message: Message, options: RequestOptions, idempotent: Bool,
                          _ done: @escaping @Sendable (Result<Message, CairnError>) -> Void) {
        let request: Attempting
        do { request = try prepare(message, options: options) } catch { return done(.failure(error)) }
        // The failover machine; its callbacks run one after another, on whichever thread ends each attempt.
        let machine = Locked(Failover(candidates: seeds.count, idempotent: idempotent))
        @Sendable func perform(_ directive: Failover.Directive) {
            guard case .tryCandidate(let k) = directive else { return done(outcome(of: directive, request)) }
            let reported: @Sendable (Result<Message, ConnectionError>) -> Void = { result in
                perform(machine.withLock { m in
                    switch result {
                    case .success(let reply): m.received(reply)
                    case .failure(let error): m.failed(error)
                    }
                })
            }
            switch slotConnection(request.seed(k), pick: request.pick) {
            case .ready(let c):
                c.requestSoon(request.message, timeoutMillis: request.waitMillis, reported)
            case .pending(let connecting):
                Task {
                    do throws(ConnectionError) {
                        try await Self.connected(connecting).requestSoon(request.message, timeoutMillis: request.waitMillis, reported)
                    } catch {
                        reported(.failure(error))
                    }
                }
            case .closed:
                reported(.failure(Self.closedError))
            }
        }
        perform(machine.withLock { $0.directive })
    }

    /// What a final directive means for the caller (`.tryCandidate` is not final: passed one, it
    /// answers an internal error).
    private func outcome(of directive: Failover.Directive, _ request: Attempting) -> Result<Message, CairnError> {
        switch directive {
        case .tryCandidate:
            return .failure(.server(code: ErrorCode.internalError.rawValue, message: "request ended before a final outcome"))
        case .deliver(let reply):
            return .success(reply)
        case .giveUp(.undecodableReply(let k, let why)):
            return .failure(.server(code: ErrorCode.malformed.rawValue, message: "\(seeds[request.seed(k)]) sent a reply this client cannot decode: \(why)"))
        case .giveUp(.maybeApplied(let k, let error)):
            return .failure(.timeout("\(seeds[request.seed(k)]): \(error); the write may have been applied"))
        case .exhausted(let summary):
            let detail = summary.attempts.map { a in
                switch a.outcome {
                case .refused(let e): "\(seeds[request.seed(a.candidate)]): \(e.message)"
                case .notDelivered(let error), .maybeDelivered(let error): "\(seeds[request.seed(a.candidate)]): \(error)"
                }
            }.joined(separator: "; ")
            switch summary.kind {
            case .timedOut: return .failure(.timeout("no node answered in time: \(detail)"))
            case .overloaded: return .failure(.overloaded("every node refused the request: \(detail)"))
            case .unreachable: return .failure(.noNodeReachable("no node reachable: \(detail)"))
            }
        }
    }

    private static func withTimeout(_ m: Message, _ ms: UInt32) -> Message {
        switch m {
        case .get(var g): g.options.timeoutMillis = ms; return .get(g)
        case .put(var p): p.options.timeoutMillis = ms; return .put(p)
        case .delete(var d): d.options.timeoutMillis = ms; return .delete(d)
        default: return m
        }
    }

    /// A live connection to seed `i`, connecting if needed; `pick` (the request's own number)
    /// chooses among the node's connections, so consecutive requests use different ones however
    /// the callers' tasks interleave.
    private func connection(_ i: Int, pick: Int) async throws(ConnectionError) -> Connection {
        switch slotConnection(i, pick: pick) {
        case .ready(let c): return c
        case .pending(let connecting): return try await Self.connected(connecting)
        case .closed: throw Self.closedError
        }
    }

    enum SlotChoice {
        case ready(Connection)
        case pending(Task<Connection, any Error>)
        /// The client was closed: nothing connects.
        case closed
    }

    static let closedError = ConnectionError.connectFailed("the client was closed")

    /// The connection for a request to seed `i`: slot `pick` (modulo `connectionsPerNode`) when
    /// it is open, else another open one of the seed's while that slot connects, else the slot's
    /// connect to wait for.
    private func slotConnection(_ i: Int, pick: Int) -> SlotChoice {
        let s = (pick & Int.max) % perNode
        return pool.withLock { p -> SlotChoice in
            let own = slot(i, s, in: &p)
            guard case .pending = own else { return own }
            for case .open(let c)? in p.slots[i] ?? [] where c.isActive { return .ready(c) }
            return own
        }
    }

    /// Slot `s` of seed `i`: its open connection, or the connect under way for it — started here
    /// when the slot is empty or its connection closed, so a slot has one connect at a time.
    private func slot(_ i: Int, _ s: Int, in p: inout (closed: Bool, slots: [Int: [Slot?]])) -> SlotChoice {
        if p.closed { return .closed }
        var slots = p.slots[i] ?? Array(repeating: nil, count: perNode)
        switch slots[s] {
        case .open(let c) where c.isActive: return .ready(c)
        case .connecting(_, let task): return .pending(task)
        case .open, nil:
            let attempt = attempts.wrappingAdd(1, ordering: .relaxed).oldValue
            let task = startConnect(seed: i, slot: s, attempt: attempt)
            slots[s] = .connecting(attempt: attempt, task)
            p.slots[i] = slots
            return .pending(task)
        }
    }

    /// Connects seed `i`'s slot `s`. On success the connection takes the slot if the slot still
    /// waits for this attempt (else the client was closed: the connection is closed and the
    /// attempt fails); on failure the slot is emptied, so a later request tries again.
    private func startConnect(seed i: Int, slot s: Int, attempt: UInt64) -> Task<Connection, any Error> {
        let seed = seeds[i]
        return Task { [self] in
            let result: Result<Connection, ConnectionError>
            do throws(ConnectionError) {
                result = .success(try await Connection.connect(host: seed.host, port: seed.port, group: group, limits: configuration.limits,
                                                               maxPending: configuration.maxPendingPerConnection,
                                                               connectTimeout: .milliseconds(configuration.connectTimeoutMillis)))
            } catch {
                result = .failure(error)
            }
            let kept: Bool = pool.withLock { p in
                guard !p.closed, var slots = p.slots[i], s < slots.count, case .connecting(attempt, _)? = slots[s] else { return false }
                switch result {
                case .success(let c): slots[s] = .open(c)
                case .failure: slots[s] = nil
                }
                p.slots[i] = slots
                return true
            }
            let c = try result.get()
            guard kept else {
                c.close()
                throw Self.closedError
            }
            return c
        }
    }

    /// The outcome of a slot's connect, as the connection's own error.
    private static func connected(_ connecting: Task<Connection, any Error>) async throws(ConnectionError) -> Connection {
        do {
            return try await connecting.value
        } catch let e as ConnectionError {
            throw e
        } catch {
            throw .connectFailed("\(error)")
        }
    }

    /// Opens every connection to every seed (`connectionsPerNode` each) and returns once each
    /// has connected or failed; returns how many are open. Optional: requests open connections
    /// as they need them. For callers that must not charge connecting to their first requests
    /// (a load generator's timetable). A seed that failed is tried again by later requests.
    @discardableResult
    public func openAllConnections() async -> Int {
        var open = 0
        var pending: [Task<Connection, any Error>] = []
        for i in seeds.indices {
            for s in 0..<perNode {
                switch pool.withLock({ slot(i, s, in: &$0) }) {
                case .ready: open += 1
                case .pending(let task): pending.append(task)
                case .closed: return 0
                }
            }
        }
        for task in pending where (try? await task.value) != nil { open += 1 }
        return open
    }

    /// A seed: `host:port` (IPv6 in brackets) with a port that can be connected to.
    static func parseSeed(_ s: String) -> HostPort? {
        guard let hp = try? HostPort(parsing: s), hp.port >= 1 else { return nil }
        return hp
    }
}
