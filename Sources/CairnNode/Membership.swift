import CairnCore
import CairnMembership
import CairnRing
import CairnStorage
import CairnWire
import Logging

/// Liveness as this node's failure detector sees it now. Read on every request's path:
/// coordinators send nothing to a replica the detector holds dead (it counts as down at once,
/// instead of costing a timeout). A suspect replica is still asked: suspicion is what a paused
/// or briefly overloaded node meets (and what a node just resumed holds of everyone else), and
/// refusing it would turn a hiccup into failed quorums. Written by the membership agent.
/// Thread-safe.
final class Liveness: Sendable {
    private let table = Locked<[NodeName: MemberStatus]>([:])

    func set(_ node: NodeName, _ status: MemberStatus?) { table.withLock { $0[node] = status } }

    func status(of node: NodeName) -> MemberStatus? { table.withLock { $0[node] } }

    /// Members among `nodes` the detector holds dead, with why.
    func downReasons(_ nodes: [NodeName]) -> [NodeName: String] {
        table.withLock { t in
            var out: [NodeName: String] = [:]
            for n in nodes where t[n] == .dead { out[n] = "dead according to the failure detector" }
            return out
        }
    }
}

/// Where a node keeps the newest ring state it has adopted, so a restart resumes from it.
protocol RingStateStore: Sendable {
    func load() throws -> RingState?
    /// Durable on return (the state a node acts on must survive a power cut).
    func save(_ state: RingState) throws
}

/// The ring state in `<data directory>/cluster-state`: written to a temporary file, synced,
/// renamed over the old one, directory synced.
struct FileRingStateStore: RingStateStore {
    let fs: any FileSystem
    let directory: String
    static let name = "cluster-state"

    func load() throws -> RingState? {
        guard let bytes = try fs.readWhole(directory + "/" + Self.name) else { return nil }
        do {
            return try RingState(decoding: bytes)
        } catch {
            throw ValidationError("\(directory)/\(Self.name) is damaged (\(error.reason)); move it aside to rejoin from the cluster's seeds")
        }
    }

    func save(_ state: RingState) throws { try fs.replaceAtomically(Self.name, in: directory, with: state.encoded()) }
}

/// A node without a data directory keeps its ring state in memory only.
final class MemoryRingStateStore: RingStateStore {
    private let saved = Locked<RingState?>(nil)
    func load() throws -> RingState? { saved.value }
    func save(_ state: RingState) throws { saved.withLock { $0 = state } }
}

/// Failure detection and ring-state gossip for one node, and the claimant's duties.
///
/// - SWIM (`SWIMInstance`) runs over one-way `gossip` frames; every packet carries a summary of
///   the sender's ring state. A receiver holding an older state pulls the sender's
///   (`clusterStatePull`); one holding a newer state pushes its own (`clusterStatePush`).
/// - `adopt` keeps the greatest state seen (`RingState.merged`), persists it, and publishes a new
///   `ClusterView`, which the vnode manager and the transport follow.
/// - Liveness changes go to `Liveness` at once (request routing) and to the log.
/// - As claimant: forgets exiting members once the detector holds them dead. Any member: takes
///   the claimant's role over when the claimant is dead and it is the first valid live member.
///
/// Isolation: the state sits behind a lock; no call holds it across a suspension, and messages
/// are sent after it is released. `run()` is a child of the node's supervisor.
final class MembershipAgent: SupervisedChild {
    let childName = "membership"

    struct Settings: Sendable {
        var swim = SWIMSettings()
        /// How often the claimant's duties run and the loop wakes at most.
        var tick: Duration = .milliseconds(200)
        var requestTimeoutMillis: UInt32 = 2000
    }

    private struct State {
        var swim: SWIMInstance
        var ring: RingState?
        /// `ring?.digest`, computed once per adopted state (every gossip packet carries it).
        var digest: UInt64 = 0
        var published: UInt64
        /// Peers a pull is in flight from (at most one each).
        var pulling: Set<NodeName> = []
        var exitRequested = false
        var notMemberLogged = false
    }

    let me: NodeName
    let clusterName: String
    private let views: ClusterViews
    private let liveness: Liveness
    private let transport: any Transport
    private let store: any RingStateStore
    private let clock: any NodeClock
    /// Where pulls and the exit run (`NodeCore.taskExecutor`).
    private let taskExecutor: (any TaskExecutor)?
    private let logger: Logger
    private let settings: Settings
    private let metrics: NodeMetrics
    /// Called once when this node's state says it is exiting (its data is handed off).
    private let onExit: @Sendable () -> Void
    /// Awaited before a leaver exits: returns once nothing handed off is still owed from here
    /// (`HandoffManager.drained`).
    private let beforeExit: @Sendable () async -> Void
    private let state: Locked<State>
    /// The ring last written to `store`.
    private let persisted = Locked<RingState?>(nil)
    /// Whether `run()` has ended (the node stopped or crashed): a pending exit gives up.
    private let stopped = Locked(false)

    init(me: NodeName, clusterName: String, initial: RingState?, views: ClusterViews, liveness: Liveness, transport: any Transport,
         store: any RingStateStore, clock: any NodeClock, taskExecutor: (any TaskExecutor)? = nil, seed: UInt64, settings: Settings,
         metrics: NodeMetrics, logger: Logger,
         beforeExit: @escaping @Sendable () async -> Void = {},
         onExit: @escaping @Sendable () -> Void) {
        self.me = me
        self.clusterName = clusterName
        self.views = views
        self.liveness = liveness
        self.transport = transport
        self.store = store
        self.clock = clock
        self.taskExecutor = taskExecutor
        self.logger = logger
        self.settings = settings
        self.metrics = metrics
        self.onExit = onExit
        self.beforeExit = beforeExit
        var swim = SWIMInstance(me: me, settings: settings.swim, seed: seed, now: clock.now())
        for m in initial?.members ?? [] where m.name != me { _ = swim.add(m.name) }
        for name in swim.memberNames { liveness.set(name, swim.status(of: name)) }
        state = Locked(State(swim: swim, ring: initial, digest: initial?.digest ?? 0, published: views.current.version))
    }

    var ring: RingState? { state.withLock { $0.ring } }

    func status(of node: NodeName) -> MemberStatus? { node == me ? .alive : liveness.status(of: node) }

    // MARK: Loop

    func run() async throws {
        stopped.withLock { $0 = false }
        defer { stopped.withLock { $0 = true } }
        perform(state.withLock { $0.swim.announce() })
        // A node restarted from a persisted state that already says it is exiting (it crashed
        // between adopting that state and exiting) must exit now: no later change would tell it.
        // So must one whose persisted state already lists it as departed (it adopted that state
        // while exiting, and was started again).
        if let ring { checkOwnStatus(ring, before: ring.member(me)?.status ?? (ring.departed.contains(me) ? .exiting : nil)) }
        while true {
            try Task.checkCancellation()
            let now = clock.now()
            let directives = state.withLock { $0.swim.tick(now: now) }
            perform(directives)
            claimantDuties()
            // Never a deadline already past (that would spin a thread); at most one tick away.
            let next = state.withLock { $0.swim.nextDeadline }
            let at = clock.now()
            try await clock.sleep(until: min(max(next, at + .milliseconds(10)), at + settings.tick))
        }
    }

    private func perform(_ directives: [SWIMDirective]) {
        guard !directives.isEmpty else { return }
        let (version, claimant, digest) = summary()
        for d in directives {
            switch d {
            case .send(let to, let message):
                let packet = GossipPacket(sender: me, message: message, ringVersion: version, ringClaimant: claimant, ringDigest: digest)
                transport.cast(to: to, .gossip(packet.encoded()))
                metrics.gossipSent.increment()
            case .statusChanged(let node, let from, let to, let incarnation):
                liveness.set(node, to)
                let meta: Logger.Metadata = ["member": "\(node)", "from": "\(from?.description ?? "unknown")", "to": "\(to)",
                                             "incarnation": "\(incarnation)"]
                switch to {
                case .alive where from == nil: logger.debug("member known", metadata: meta)
                case .alive: logger.info("member alive", metadata: meta)
                case .suspect:
                    logger.info("member suspected", metadata: meta)
                    // It may be up and ignoring this node: a member that removed this node
                    // hears no gossip from it. Its ring state says so (and then this node exits).
                    pull(from: node)
                case .dead: logger.warning("member dead", metadata: meta)
                }
                metrics.livenessChanges.increment()
            }
        }
    }

    private func summary() -> (UInt64, NodeName?, UInt64) {
        state.withLock { s in (s.ring?.version ?? 0, s.ring?.claimant, s.digest) }
    }

    // MARK: Gossip in

    /// A `gossip` frame from a peer. Malformed packets are counted and dropped.
    func receiveGossip(_ bytes: [UInt8]) {
        let packet: GossipPacket
        do { packet = try GossipPacket(decoding: bytes) } catch {
            metrics.protocolErrors.increment()
            logger.debug("malformed gossip dropped", metadata: ["error": "\(error)"])
            return
        }
        metrics.gossipReceived.increment()
        let now = clock.now()
        let directives = state.withLock { s -> [SWIMDirective] in
            var out: [SWIMDirective] = []
            // A sender this node does not know as a member is heard (so it can be answered)
            // only if the ring lists it; strangers are ignored.
            if s.ring?.member(packet.sender) == nil { return [] }
            out += s.swim.received(packet.message, from: packet.sender, now: now)
            return out
        }
        perform(directives)
        compare(packet)
    }

    /// Pulls the sender's ring state if it may be greater; pushes ours if ours is.
    private func compare(_ packet: GossipPacket) {
        enum Action { case none, pull, push([UInt8]) }
        let action: Action = state.withLock { s in
            let mine = (s.ring?.version ?? 0, s.ring?.claimant, s.digest)
            guard packet.ringDigest != mine.2 || packet.ringVersion != mine.0 else { return .none }
            let theirsGreater = packet.ringVersion > mine.0
                || (packet.ringVersion == mine.0 && (packet.ringClaimant?.value ?? "") >= (mine.1?.value ?? ""))
            if theirsGreater { return .pull }
            guard let ring = s.ring else { return .none }
            return .push(ring.encoded())
        }
        switch action {
        case .none: break
        case .push(let bytes): transport.cast(to: packet.sender, .clusterStatePush(bytes))
        case .pull: pull(from: packet.sender)
        }
    }

    /// Pulls the claimant's ring state (a peer's request suggests this node is behind).
    func catchUp() {
        guard let claimant = ring?.claimant, claimant != me else { return }
        pull(from: claimant)
    }

    /// Asks `peer` for its ring state and merges it in (at most one pull per peer in flight).
    private func pull(from peer: NodeName) {
        guard state.withLock({ s in s.pulling.insert(peer).inserted }) else { return }
        let (transport, timeout) = (transport, settings.requestTimeoutMillis)
        Task(executorPreference: taskExecutor) {
            defer { self.state.withLock { _ = $0.pulling.remove(peer) } }
            guard case .clusterState(let bytes)? = try? await transport.send(to: peer, .clusterStatePull, timeoutMillis: timeout) else { return }
            self.receiveState(bytes, from: "pulled from \(peer)")
        }
    }

    /// A ring state from a peer (pushed, pulled, or in a reply).
    @discardableResult
    func receiveState(_ bytes: [UInt8], from source: String) -> Bool {
        do {
            return adopt(try RingState(decoding: bytes), source: source)
        } catch {
            metrics.protocolErrors.increment()
            logger.warning("malformed ring state dropped", metadata: ["source": "\(source)", "error": "\(error)"])
            return false
        }
    }

    /// This node's ring state, encoded (nil before it joined a cluster).
    var encodedState: [UInt8]? { ring?.encoded() }

    // MARK: Adopting states

    /// Merges `incoming` into this node's state; when that changes it, persists and publishes
    /// it. Returns whether it changed. A state of another cluster is refused; so is, for a node
    /// that has not joined, a state that does not list it.
    @discardableResult
    func adopt(_ incoming: RingState, source: String) -> Bool {
        guard incoming.cluster == clusterName else {
            logger.warning("ring state of another cluster ignored", metadata: ["cluster": "\(incoming.cluster)", "source": "\(source)"])
            return false
        }
        return changeRing(source: source) { current in
            guard let current else { return incoming.member(me) != nil ? incoming : nil }
            guard incoming.partitionCount == current.partitionCount, incoming.nVal == current.nVal else { return nil }
            return RingState.merged(current, incoming)
        } != nil
    }

    /// Replaces the ring with what `update` makes of it (nil: no change), atomically: the read and
    /// the write happen under the state lock, so concurrent changes (two claimant verbs, a merge
    /// and a verb) never compute from the same base and overwrite each other. SWIM follows the
    /// member list. Then, outside the lock, the newest ring is persisted and published: both take
    /// the ring current at that moment, so a slow caller never regresses them to an older one.
    /// Returns the new ring, or nil when nothing changed.
    @discardableResult
    private func changeRing(source: String, _ update: (RingState?) throws -> RingState?) rethrows -> RingState? {
        let outcome: (RingState, [SWIMDirective], [NodeName], MembershipStatus?)? = try state.withLock { s in
            let before = s.ring?.member(me)?.status
            guard let ring = try update(s.ring), ring != s.ring else { return nil }
            s.ring = ring
            s.digest = ring.digest
            var directives: [SWIMDirective] = []
            for m in ring.members where m.name != me { directives += s.swim.add(m.name) }
            let names = Set(ring.members.map(\.name))
            let removed = s.swim.memberNames.filter { !names.contains($0) }
            for n in removed { s.swim.remove(n) }
            return (ring, directives, removed, before)
        }
        guard let (ring, directives, removed, before) = outcome else { return nil }
        for n in removed { liveness.set(n, nil) }
        perform(directives)
        persistNewest()
        publishNewest()
        logger.info("ring state adopted", metadata: [
            "ring_version": "\(ring.version)", "claimant": "\(ring.claimant)", "members": "\(ring.members.count)",
            "pending_transfers": "\(ring.pendingTransfers.count)", "source": "\(source)",
        ])
        checkOwnStatus(ring, before: before)
        return ring
    }

    /// Writes the current ring unless a state at least as new is on disk already. Serialized by
    /// `persisted`, so writes land in order.
    private func persistNewest() {
        persisted.withLock { last in
            guard let ring = self.ring, last.map({ RingState.merged($0, ring) != $0 }) ?? true else { return }
            do {
                try store.save(ring)
                last = ring
            } catch {
                // Keep serving on the adopted state; peers hold it too, and the next change retries.
                logger.error("could not persist the ring state", metadata: ["error": "\(error)"])
            }
        }
    }

    /// Publishes the current ring as the next view.
    private func publishNewest() {
        let view: ClusterView? = state.withLock { s in
            guard let ring = s.ring else { return nil }
            s.published = max(s.published, views.current.version) + 1
            return ClusterView(state: ring, me: me, clusterName: clusterName, version: s.published)
        }
        guard let view else { return }
        views.publish(view)
        metrics.ringVersion.record(Int(clamping: view.state?.version ?? 0))
    }

    /// Acts on what `ring` says of this node, which was `before` in the state it replaces: an
    /// exiting node exits once the state is known; a member the ring lists as departed exits at
    /// once: a leaver is forgotten only after its last transfer completed (it waits for what it
    /// still owes, `beforeExit`), and a removed node's data was rebuilt elsewhere, so it has
    /// nothing left to serve. A node the ring does not list otherwise (one waiting for its join,
    /// or missing from the winning side of a claimant fork) only refuses key requests.
    private func checkOwnStatus(_ ring: RingState, before: MembershipStatus?) {
        let member = ring.member(me)
        enum Action { case none, exitWhenKnown, exitNow(was: MembershipStatus) }
        let action: Action = state.withLock { s in
            if member == nil, !s.notMemberLogged, before == nil {
                s.notMemberLogged = true
                logger.warning("this node is not a member of the cluster; it refuses key requests", metadata: ["cluster": "\(clusterName)"])
            }
            guard !s.exitRequested else { return .none }
            if member == nil, let before, ring.departed.contains(me) {
                s.exitRequested = true
                return .exitNow(was: before)
            }
            guard member?.status == .exiting else { return .none }
            s.exitRequested = true
            return .exitWhenKnown
        }
        switch action {
        case .none: break
        case .exitWhenKnown:
            Task(executorPreference: taskExecutor) { await self.exitOnceKnown(ring) }
        case .exitNow(let was) where was == .leaving || was == .exiting:
            Task(executorPreference: taskExecutor) {
                await self.beforeExit()
                if self.stopped.value { return }
                self.logger.notice("this node has left the cluster: its data is handed off; exiting", metadata: ["ring_version": "\(ring.version)"])
                self.perform(self.state.withLock { $0.swim.leave() })
                self.onExit()
            }
        case .exitNow:
            logger.warning("this node was removed from the cluster (its partitions are rebuilt from the other replicas); exiting. To bring it back, empty its data directory and join it again",
                           metadata: ["ring_version": "\(ring.version)", "claimant": "\(ring.claimant)"])
            perform(state.withLock { $0.swim.leave() })
            onExit()
        }
    }

    /// Exits once a valid member holds a ring state at least as new as `ring`. A leaving
    /// claimant makes the state that says it is exiting itself (its last transfer completed):
    /// exiting before anyone else has it would leave every other member on an older state,
    /// with that plan's transfers pending for ever from a node that is gone.
    private func exitOnceKnown(_ ring: RingState) async {
        var attempt = 0
        while !Task.isCancelled {
            if stopped.value { return }
            let current = self.ring ?? ring
            let peers = current.members.filter { $0.status == .valid && $0.name != me }
                .sorted { ($0.name != current.claimant ? 1 : 0, $0.name) < ($1.name != current.claimant ? 1 : 0, $1.name) }
            guard !peers.isEmpty else { break }
            let peer = peers[attempt % peers.count].name
            attempt += 1
            if case .clusterState(let bytes)? = try? await transport.send(to: peer, .clusterStatePull, timeoutMillis: settings.requestTimeoutMillis),
               let theirs = try? RingState(decoding: bytes), RingState.merged(theirs, current) == theirs {
                break
            }
            transport.cast(to: peer, .clusterStatePush(current.encoded()))
            if attempt == 1 {
                logger.info("leaving: waiting until a member holds this node's final ring state", metadata: ["ring_version": "\(current.version)"])
            }
            do { try await clock.sleep(for: .milliseconds(500)) } catch { return }
        }
        await beforeExit()
        if stopped.value { return }
        logger.notice("this node has left the cluster: its data is handed off; exiting", metadata: ["ring_version": "\(ring.version)"])
        perform(state.withLock { $0.swim.leave() })
        onExit()
    }

    // MARK: Claimant

    /// Applies `change` to this node's state if it is the claimant (else throws `notClaimant`).
    func asClaimant(_ change: (RingState) throws(ValidationError) -> RingState) throws -> RingState {
        var result: RingState?
        try changeRing(source: "claimant") { current in
            guard let current else { throw AdminFailure.notJoined }
            guard current.claimant == me else { throw AdminFailure.notClaimant(current.claimant) }
            let next = try change(current)
            result = next
            return next
        }
        guard let result else { throw AdminFailure.notJoined }
        return result
    }

    private func claimantDuties() {
        guard let ring else { return }
        if ring.claimant == me {
            for m in ring.members where m.status == .exiting && m.name != me {
                guard liveness.status(of: m.name) == .dead || liveness.status(of: m.name) == nil else { continue }
                _ = try? asClaimant { r throws(ValidationError) in try r.forgetting(m.name) }
            }
            return
        }
        guard liveness.status(of: ring.claimant) == .dead else { return }
        // The first valid member not held suspect or dead takes over.
        let heir = ring.members.first { m in
            m.status == .valid && (m.name == me || liveness.status(of: m.name) == .alive)
        }
        guard heir?.name == me else { return }
        let taken = changeRing(source: "takeover") { current in
            guard let current, current.claimant == ring.claimant else { return nil }
            return try? current.takingOver(by: me)
        }
        if taken != nil {
            logger.notice("the claimant is dead; this node took the role over", metadata: ["old_claimant": "\(ring.claimant)"])
        }
    }
}

/// Why an administration verb could not be served here.
enum AdminFailure: Error, CustomStringConvertible {
    case notJoined
    case notClaimant(NodeName)

    var description: String {
        switch self {
        case .notJoined: "this node is not a member of a cluster yet; run cluster join on it first"
        case .notClaimant(let c): "\(c) is the claimant"
        }
    }
}
