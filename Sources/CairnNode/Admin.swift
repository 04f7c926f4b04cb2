import CairnCore
import CairnMembership
import CairnRing
import CairnWire

/// Sends one request to whatever node listens on an address (a join names its seed so).
typealias Dialer = @Sendable (HostPort, Message, UInt32) async throws(ConnectionError) -> Message

/// The administration verbs (`cairn cluster ...`, `transfers`, `preflist`): Docs/wire-protocol.md
/// §10 lists them with their JSON replies. Verbs that change the ring run on the claimant; any
/// other node forwards them there, then pulls the claimant's state so that a `cluster status` on
/// it right after shows the change.
extension NodeCore {
    func admin(_ request: AdminRequest, _ a: Activation) async -> Message {
        guard let agent = membership else { return .error(ErrorReply(code: .notReady, message: "node \(config.name) is starting")) }
        do {
            switch request.verb {
            case "status": return reply(try statusJSON(agent, a))
            case "preflist": return reply(try preflistJSON(request.arguments, a))
            case "transfers": return reply(await transfersJSON(agent))
            case "local-get": return reply(try await localGetJSON(request.arguments, a))
            case "repair": return reply(try await repairJSON(request.arguments))
            case "repair-status": return reply(try repairStatusJSON())
            case "join": return try await join(request.arguments, agent)
            case "join-request": return try await onClaimant(request, agent, a) { r throws(ValidationError) in
                try Self.joinRequest(request.arguments, r)
            } answer: { .clusterState($0.encoded()) }
            case "leave", "remove":
                let name = try Self.member(request.arguments)
                return try await onClaimant(request, agent, a) { r throws(ValidationError) in
                    request.verb == "leave" ? try r.stagingLeave(name) : try r.stagingRemove(name)
                } answer: { self.reply(Self.stagedJSON($0)) }
            case "clear":
                return try await onClaimant(request, agent, a) { $0.clearingStaged() } answer: { self.reply(Self.stagedJSON($0)) }
            case "commit":
                return try await onClaimant(request, agent, a) { r throws(ValidationError) in try r.committing() } answer: { s in
                    self.reply(.object([("ring_version", .int(Int(clamping: s.version))), ("transfers", .int(s.transfers.count)),
                                        ("pending_transfers", .int(s.pendingTransfers.count))]))
                }
            case "plan":
                guard let ring = agent.ring else { throw AdminFailure.notJoined }
                if ring.claimant != config.name { return try await forward(request, to: ring.claimant, a, agent) }
                let down = Set(ring.members.map(\.name).filter { agent.status(of: $0) != .alive })
                return reply(Self.planJSON(try ring.plan(down: down), ring))
            case "complete-transfer":
                let t = try Self.transfer(request.arguments)
                return try await onClaimant(request, agent, a) { $0.completing(t) } answer: { s in
                    self.reply(.object([("ring_version", .int(Int(clamping: s.version))), ("pending_transfers", .int(s.pendingTransfers.count))]))
                }
            default:
                return .error(ErrorReply(code: .unknownMessage, message: "unknown admin verb '\(request.verb)'"))
            }
        } catch let e as ValidationError {
            return .error(ErrorReply(code: .invalidArgument, message: e.reason))
        } catch let e as AdminFailure {
            return .error(ErrorReply(code: .invalidArgument, message: e.description))
        } catch let e as ConnectionError {
            return .error(ErrorReply(code: .unavailable, message: "the claimant could not be reached: \(e)"))
        } catch {
            return .error(ErrorReply(code: .internalError, message: "\(error)"))
        }
    }

    private func reply(_ json: JSON) -> Message { .adminReply(Array(json.text.utf8)) }

    /// Runs `change` if this node is the claimant, else forwards the request to it.
    private func onClaimant(_ request: AdminRequest, _ agent: MembershipAgent, _ a: Activation,
                            _ change: (RingState) throws(ValidationError) -> RingState,
                            answer: (RingState) -> Message) async throws -> Message {
        guard let ring = agent.ring else { throw AdminFailure.notJoined }
        guard ring.claimant == config.name else { return try await forward(request, to: ring.claimant, a, agent) }
        return answer(try agent.asClaimant(change))
    }

    private func forward(_ request: AdminRequest, to claimant: NodeName, _ a: Activation, _ agent: MembershipAgent) async throws -> Message {
        let timeout = config.requestTimeoutMillis
        let answer = try await a.transport.send(to: claimant, .admin(request), timeoutMillis: timeout)
        if case .clusterState(let bytes) = answer {
            agent.receiveState(bytes, from: "claimant \(claimant)")
        } else if case .clusterState(let bytes)? = try? await a.transport.send(to: claimant, .clusterStatePull, timeoutMillis: timeout) {
            agent.receiveState(bytes, from: "claimant \(claimant)")
        }
        return answer
    }

    /// `cluster join [SEED...]` on the joining node: asks a seed (default `cluster.seeds`) to
    /// have the claimant add this node, then adopts the state it answers with.
    private func join(_ arguments: [String], _ agent: MembershipAgent) async throws -> Message {
        if let ring = agent.ring, let m = ring.member(config.name) {
            return reply(.object([("cluster", .string(ring.cluster)), ("status", .string(m.status.description)),
                                  ("ring_version", .int(Int(clamping: ring.version))), ("claimant", .string(ring.claimant.value))]))
        }
        var seeds: [HostPort] = []
        for text in arguments { seeds.append(try HostPort(parsing: text)) }
        if seeds.isEmpty { seeds = config.seeds }
        guard !seeds.isEmpty else { throw ValidationError("no seed given and cluster.seeds is empty: cluster join HOST:PORT") }
        guard let dial = dialer.value else { throw ValidationError("node \(config.name) cannot dial seeds") }
        let request = Message.admin(AdminRequest(verb: "join-request", arguments: [config.name.value, advertised.description, config.clusterName]))
        var failures: [String] = []
        for seed in seeds {
            do throws(ConnectionError) {
                switch try await dial(seed, request, config.requestTimeoutMillis) {
                case .clusterState(let bytes):
                    guard agent.receiveState(bytes, from: "join via \(seed)"), let ring = agent.ring else {
                        failures.append("\(seed): its answer was not a state of cluster \(config.clusterName) listing \(config.name)")
                        continue
                    }
                    return reply(.object([("cluster", .string(ring.cluster)), ("status", .string("joining")),
                                          ("ring_version", .int(Int(clamping: ring.version))), ("claimant", .string(ring.claimant.value))]))
                case .error(let e):
                    failures.append("\(seed): \(e.message)")
                default:
                    failures.append("\(seed): unexpected answer")
                }
            } catch {
                failures.append("\(seed): \(error)")
            }
        }
        throw ValidationError("could not join through any seed: " + failures.joined(separator: "; "))
    }

    private static func joinRequest(_ arguments: [String], _ ring: RingState) throws(ValidationError) -> RingState {
        guard arguments.count == 3 else { throw ValidationError("join-request takes NAME ADDRESS CLUSTER") }
        guard arguments[2] == ring.cluster else {
            throw ValidationError("this is cluster '\(ring.cluster)', not '\(arguments[2])'; check cluster.name")
        }
        return try ring.joining(try NodeName(arguments[0]), at: try HostPort(parsing: arguments[1]))
    }

    private static func member(_ arguments: [String]) throws(ValidationError) -> NodeName {
        guard arguments.count == 1 else { throw ValidationError("give one member name") }
        return try NodeName(arguments[0])
    }

    private static func transfer(_ arguments: [String]) throws(ValidationError) -> PartitionTransfer {
        guard arguments.count == 3, let p = UInt32(arguments[0]) else { throw ValidationError("complete-transfer takes PARTITION FROM TO") }
        return PartitionTransfer(partition: PartitionID(p), from: try NodeName(arguments[1]), to: try NodeName(arguments[2]))
    }

    // MARK: JSON

    private func statusJSON(_ agent: MembershipAgent, _ a: Activation) throws -> JSON {
        guard let ring = agent.ring else {
            return .object([("cluster", .string(config.clusterName)), ("ring_version", .int(0)), ("pending_transfers", .int(0)),
                            ("joined", .bool(false)), ("members", .array([]))])
        }
        let members: [JSON] = ring.members.map { m in
            .object([
                ("name", .string(m.name.value)), ("address", .string(m.address.description)), ("status", .string(m.status.description)),
                ("liveness", .string(agent.status(of: m.name)?.description ?? "unknown")),
                ("owned", .int(ring.owned(by: m.name))), ("replicated", .int(ring.vnodePartitions(of: m.name).count)),
                ("claimant", .bool(m.name == ring.claimant)), ("this", .bool(m.name == config.name)),
            ])
        }
        return .object([
            ("cluster", .string(ring.cluster)), ("ring_version", .int(Int(clamping: ring.version))), ("ring_size", .int(ring.partitionCount)),
            ("n_val", .int(ring.nVal)), ("claimant", .string(ring.claimant.value)), ("joined", .bool(ring.member(config.name) != nil)),
            ("pending_transfers", .int(ring.pendingTransfers.count)), ("transfers", .int(ring.transfers.count)),
            ("staged", .array(ring.staged.map { .string($0.description) })), ("members", .array(members)),
        ])
    }

    private func preflistJSON(_ arguments: [String], _ a: Activation) throws -> JSON {
        guard arguments.count == 1 else { throw ValidationError("preflist takes one KEY") }
        guard let ring = a.view.state else { throw AdminFailure.notJoined }
        let p = ring.partition(forKey: Array(arguments[0].utf8))
        let primaries = ring.replicas(of: p)
        let (me, agent) = (config.name, membership)
        let node = { (n: NodeName) -> JSON in
            .object([("node", .string(n.value)), ("address", .string(a.view.address(n))),
                     ("liveness", .string((n == me ? MemberStatus.alive : agent?.status(of: n))?.description ?? "unknown"))])
        }
        return .object([
            ("key", .string(arguments[0])), ("partition", .int(Int(p.index))), ("ring_version", .int(Int(clamping: ring.version))),
            ("primaries", .array(primaries.map(node))),
            // Sloppy quorum's candidates, in the order they stand in for primaries that are down.
            ("fallbacks", .array(ring.fallbacks(of: p, count: ring.nVal).map(node))),
            ("pending", .array(ring.pendingTransfers.filter { $0.partition == p }.map { .string("\($0.from)→\($0.to)") })),
        ])
    }

    /// `local-get KEY`: this node's own copies of the key, no quorum and no other replica — its
    /// primary copy (if it replicates the key) and its fallback copy (if it holds one): what a
    /// replica would answer, for checking that replicas converged.
    private func localGetJSON(_ arguments: [String], _ a: Activation) async throws -> JSON {
        guard arguments.count == 1 else { throw ValidationError("local-get takes one KEY") }
        guard let ring = a.view.state else { throw AdminFailure.notJoined }
        let key = Array(arguments[0].utf8)
        let p = ring.partition(forKey: key)
        func copy(_ v: Vnode?) async throws -> JSON {
            guard let v else { return .null }
            let o = try await v.get(key)
            return .object([("found", .bool(!(o?.isDeleted ?? true))), ("siblings", .array((o?.values ?? []).map(JSON.sibling))),
                            ("context", .string(CausalContext(o?.context ?? VersionVector()).token))])
        }
        do {
            return .object([("key", .string(arguments[0])), ("partition", .int(Int(p.index))), ("node", .string(config.name.value)),
                            ("replica", .bool(ring.replicas(of: p).contains(config.name))),
                            ("primary", try await copy(vnodes.vnode(for: p))), ("fallback", try await copy(vnodes.fallback(for: p)))])
        } catch let e as VnodeError {
            throw ValidationError("node \(config.name) could not read its copy: \(e.description)")
        }
    }

    /// `repair [PARTITION]`: runs exchanges of every partition this node holds (or one) with each
    /// of its other reachable primaries, and reports them (Docs/wire-protocol.md §10).
    private func repairJSON(_ arguments: [String]) async throws -> JSON {
        guard let manager = antiEntropy else { throw AdminFailure.notJoined }
        guard config.antiEntropy.enabled else { throw ValidationError("anti-entropy is off on node \(config.name) (aae.enabled = false)") }
        guard arguments.count <= 1 else { throw ValidationError("repair takes at most one PARTITION") }
        let only = try arguments.first.map { a throws(ValidationError) -> [PartitionID] in
            guard let i = UInt32(a) else { throw ValidationError("partition '\(a)' is not a partition index") }
            return [PartitionID(i)]
        }
        let started = clock.now()
        let (records, skipped) = await manager.repair(only)
        let compared = Set(records.filter { $0.outcome != "failed" }.map(\.partition))
        let failed = records.filter { $0.outcome == "failed" }
        return .object([
            ("node", .string(config.name.value)),
            ("partitions", .int(compared.count)),
            ("exchanges", .int(records.count)),
            ("failed", .int(failed.count)),
            ("keys_to_local", .int(records.reduce(0) { $0 + $1.summary.keysToLocal })),
            ("keys_to_remote", .int(records.reduce(0) { $0 + $1.summary.keysToRemote })),
            ("bytes_sent", .int(records.reduce(0) { $0 + $1.bytesSent })),
            ("bytes_received", .int(records.reduce(0) { $0 + $1.bytesReceived })),
            ("took_ms", .int(Int(started.duration(to: clock.now()) / .milliseconds(1)))),
            ("refilling", .int(vnodes.partitions.count { antiEntropyState.isRefilling($0) })),
            ("skipped", .array(skipped.map { .object([("partition", .int(Int($0.0.index))), ("reason", .string($0.1))]) })),
            // Exchanges that found the replicas in sync are counted above, not listed.
            ("details", .array(records.filter { $0.outcome != "in_sync" }.sorted { ($0.partition, $0.peer.value) < ($1.partition, $1.peer.value) }
                .map(Self.exchangeJSON))),
        ])
    }

    private static func exchangeJSON(_ r: ExchangeRecord) -> JSON {
        var fields: [(String, JSON)] = [
            ("partition", .int(Int(r.partition.index))), ("peer", .string(r.peer.value)), ("outcome", .string(r.outcome)),
            ("segments_differing", .int(r.summary.segmentsDiffering)), ("keys_compared", .int(r.summary.keysCompared)),
            ("keys_to_local", .int(r.summary.keysToLocal)), ("keys_to_remote", .int(r.summary.keysToRemote)),
            ("tree_hashes", .int(r.summary.treeHashes)), ("bytes_sent", .int(r.bytesSent)), ("bytes_received", .int(r.bytesReceived)),
            ("took_ms", .int(r.tookMillis)),
        ]
        if let e = r.error { fields.append(("error", .string(e))) }
        return .object(fields)
    }

    /// `repair-status`: the last exchange of every partition this node holds, and its age.
    private func repairStatusJSON() throws -> JSON {
        guard let manager = antiEntropy else { throw AdminFailure.notJoined }
        let now = clock.now()
        let rows = manager.status()
        let ages = rows.compactMap { $0.1.map { Int($0.finishedAt.duration(to: now) / .seconds(1)) } }
        return .object([
            ("node", .string(config.name.value)),
            ("enabled", .bool(config.antiEntropy.enabled)),
            ("tree_segments", .int(config.antiEntropy.shape.segments)),
            ("exchange_interval_s", .int(Int(config.antiEntropy.exchangeInterval / .seconds(1)))),
            ("never_exchanged", .int(rows.count { $0.1 == nil })),
            ("oldest_age_s", ages.max().map { .int($0) } ?? .null),
            ("refilling", .int(rows.count { $0.refilling })),
            ("partitions", .array(rows.map { p, last, refilling in
                var fields: [(String, JSON)] = [("partition", .int(Int(p.index))), ("refilling", .bool(refilling))]
                if let last {
                    fields += [("peer", .string(last.peer.value)), ("outcome", .string(last.outcome)),
                               ("age_s", .int(Int(last.finishedAt.duration(to: now) / .seconds(1)))), ("at_ms", .int(Int(clamping: last.wallMillis))),
                               ("keys_to_local", .int(last.summary.keysToLocal)), ("keys_to_remote", .int(last.summary.keysToRemote)),
                               ("bytes_sent", .int(last.bytesSent))]
                    if let e = last.error { fields.append(("error", .string(e))) }
                }
                return .object(fields)
            })),
        ])
    }

    private func transfersJSON(_ agent: MembershipAgent) async -> JSON {
        let ring = agent.ring
        let active = await handoff?.progress() ?? []
        let now = clock.now()
        var rows: [JSON] = active.map { t in
            let p = t.progress
            let age = (now - t.startedAt) / .seconds(1)
            let rate = age > 0 ? Int(Double(p.bytesAcked) / age) : 0
            var fields: [(String, JSON)] = [
                ("partition", .int(Int(p.partition.home.index))), ("kind", .string(p.partition.isFallbackSpace ? "fallback" : "ownership")),
                ("from", .string(p.from.value)), ("to", .string(p.to.value)),
                ("state", .string(p.phase.description)), ("keys", .int(Int(clamping: p.keysAcked))), ("bytes", .int(Int(clamping: p.bytesAcked))),
                ("bytes_per_second", .int(rate)), ("age_s", .int(Int(age))), ("attempts", .int(Int(clamping: p.attempts))),
            ]
            if let (kind, since) = t.performing {
                fields.append(("performing", .string(kind)))
                fields.append(("performing_ms", .int(Int(((now - since) / .milliseconds(1)).rounded()))))
            }
            return .object(fields)
        }
        let running = Set(active.map { PartitionTransfer(partition: $0.progress.partition, from: $0.progress.from, to: $0.progress.to) })
        for t in ring?.pendingTransfers ?? [] where !running.contains(t) {
            rows.append(.object([("partition", .int(Int(t.partition.index))), ("kind", .string("ownership")), ("from", .string(t.from.value)),
                                 ("to", .string(t.to.value)), ("state", .string("waiting"))]))
        }
        // Fallback copies waiting for their primaries to come back.
        let handing = Set(active.filter { $0.progress.partition.isFallbackSpace }.map(\.progress.partition.home))
        for p in vnodes.fallbackPartitions where !handing.contains(p) {
            rows.append(.object([("partition", .int(Int(p.index))), ("kind", .string("fallback")), ("from", .string(config.name.value)),
                                 ("to", .string(ring?.replicas(of: p).filter { $0 != config.name }.map(\.value).joined(separator: ",") ?? "")),
                                 ("state", .string("waiting for the primaries"))]))
        }
        let hintRows: [JSON] = (hints?.status() ?? []).map { h in
            var fields: [(String, JSON)] = [("target", .string(h.target.value)), ("hints", .int(h.hints)), ("bytes", .int(h.bytes)),
                                            ("state", .string(h.state)), ("replayed", .int(Int(clamping: h.replayed)))]
            if let age = h.oldestSeconds { fields.append(("oldest_age_s", .int(Int(age)))) }
            return .object(fields)
        }
        return .object([("ring_version", .int(Int(clamping: ring?.version ?? 0))),
                        ("pending_transfers", .int(ring?.pendingTransfers.count ?? 0)), ("transfers", .array(rows)),
                        ("hints", .array(hintRows))])
    }

    /// Tells the claimant that `t` is complete (forwarding to it if needed); true once recorded.
    func reportTransferComplete(_ t: PartitionTransfer) async -> Bool {
        guard let a = current else { return false }
        let request = AdminRequest(verb: "complete-transfer", arguments: ["\(t.partition.index)", t.from.value, t.to.value])
        guard case .adminReply = await admin(request, a) else { return false }
        return true
    }

    private static func stagedJSON(_ ring: RingState) -> JSON {
        .object([("ring_version", .int(Int(clamping: ring.version))), ("staged", .array(ring.staged.map { .string($0.description) }))])
    }

    private static func planJSON(_ plan: RingPlan, _ ring: RingState) -> JSON {
        let names = Set(plan.ownedBefore.keys).union(plan.ownedAfter.keys).sorted()
        return .object([
            ("ring_version", .int(Int(clamping: ring.version))),
            ("changes", .array(plan.changes.map { .string($0.description) })),
            ("ownership", .array(names.map { n in
                .object([("name", .string(n.value)), ("before", .int(plan.ownedBefore[n] ?? 0)), ("after", .int(plan.ownedAfter[n] ?? 0))])
            })),
            ("transfers", .int(plan.transfers.count)),
            ("transfers_by_pair", .array(Dictionary(grouping: plan.transfers) { "\($0.from)→\($0.to)" }.sorted { $0.key < $1.key }.map {
                .object([("pair", .string($0.key)), ("partitions", .int($0.value.count))])
            })),
            ("at_risk", .array(plan.atRisk.sorted { $0.key < $1.key }.map {
                .object([("partition", .int(Int($0.key.index))), ("live_replicas", .int($0.value))])
            })),
            ("lost", .array(plan.lost.map { .int(Int($0.index)) })),
        ])
    }
}
