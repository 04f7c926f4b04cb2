import Testing
@testable import CairnMembership
import CairnCore

private let t0 = ContinuousClock.now
private func ms(_ n: Int64) -> ContinuousClock.Instant { t0 + .milliseconds(n) }
private func sec(_ n: Int64) -> ContinuousClock.Instant { t0 + .seconds(n) }

/// `k000`, `k001`, …: bytewise order is numeric order.
private func key(_ i: Int) -> [UInt8] {
    let digits = String(i)
    return Array(("k" + String(repeating: "0", count: max(0, 3 - digits.count)) + digits).utf8)
}

private func precedes(_ a: [UInt8], _ b: [UInt8]) -> Bool { a.lexicographicallyPrecedes(b) }

private struct Names {
    let s: NodeName
    let r: NodeName
    init() throws {
        s = try NodeName("n1")
        r = try NodeName("n2")
    }
}

private let tid = TransferID(7)
private let part = PartitionID(3)

private func settings(keys: Int = 2, inFlight: Int = 2, _ adjust: (inout TransferSettings) -> Void = { _ in }) -> TransferSettings {
    var s = TransferSettings()
    s.batchMaxKeys = keys
    s.maxBatchesInFlight = inFlight
    adjust(&s)
    return s
}

private func sender(_ settings: TransferSettings = settings()) throws -> TransferSender {
    let n = try Names()
    return TransferSender(id: tid, partition: part, from: n.s, to: n.r, settings: settings)
}

private func record(_ position: TransferPosition = .start, sequence: UInt64 = 0, streams: UInt64 = 1, batches: UInt64 = 0,
                    keys: UInt64 = 0, bytes: UInt64 = 0, refolds: UInt64 = 0) throws -> TransferCheckpoint {
    let n = try Names()
    return TransferCheckpoint(id: tid, partition: part, from: n.s, to: n.r, position: position, sequence: sequence, streams: streams,
                              batchesAcked: batches, keysAcked: keys, bytesAcked: bytes, refolds: refolds)
}

private let mib = 1 << 20

/// A sender started and streaming on stream 1, with nothing sent yet (its first fold asked for).
private func streaming(_ settings: TransferSettings = settings()) throws -> TransferSender {
    var s = try sender(settings)
    _ = s.handle(.start, now: t0)
    _ = s.handle(.streamOpened(stream: 1), now: t0)
    return s
}

@Suite struct TransferTests {

    // MARK: The happy path

    /// Open, fold in batches with at most two unacknowledged, a persisted checkpoint per
    /// acknowledgement, completion, the flip, the drop, finished.
    @Test func theHappyPathInExactDirectives() throws {
        var s = try sender()
        #expect(s.phase == .idle && s.nextDeadline == nil)
        #expect(s.handle(.start, now: t0) == [.persistCheckpoint(try record()), .openStream(stream: 1, from: .start)])
        #expect(s.phase == .opening && s.nextDeadline == t0 + .seconds(120))
        #expect(s.handle(.streamOpened(stream: 1), now: ms(1)) == [.foldAndSend(stream: 1, sequence: 1, after: nil, maxBytes: mib, maxKeys: 2)])
        #expect(s.phase == .copying)
        // One batch is read at a time; the second is asked for as soon as the first went out.
        #expect(s.handle(.foldSent(sequence: 1, keys: 2, bytes: 200, resumeAfter: key(1)), now: ms(2))
            == [.foldAndSend(stream: 1, sequence: 2, after: key(1), maxBytes: mib, maxKeys: 2)])
        // Two unacknowledged: the window is full.
        #expect(s.handle(.foldSent(sequence: 2, keys: 2, bytes: 200, resumeAfter: key(3)), now: ms(3)).isEmpty)
        #expect(s.progress.batchesInFlight == 2 && s.progress.keysSent == 4 && s.progress.bytesSent == 400)
        #expect(s.handle(.batchAcked(sequence: 1), now: ms(4)) == [
            .persistCheckpoint(try record(.after(key(1)), sequence: 1, batches: 1, keys: 2, bytes: 200)),
            .foldAndSend(stream: 1, sequence: 3, after: key(3), maxBytes: mib, maxKeys: 2),
        ])
        // The partition ends: key 4 is the last.
        #expect(s.handle(.foldSent(sequence: 3, keys: 1, bytes: 100, resumeAfter: nil), now: ms(5)).isEmpty)
        #expect(s.progress.checkpoint == .after(key(1)))
        // A cumulative acknowledgement of 2 and 3: the end is acknowledged, complete.
        #expect(s.handle(.batchAcked(sequence: 3), now: ms(6)) == [
            .persistCheckpoint(try record(.end, sequence: 3, batches: 3, keys: 5, bytes: 500)),
            .closeStream(stream: 1, reason: "copy complete"),
            .reportComplete,
        ])
        #expect(s.phase == .awaitingFlip && s.nextDeadline == nil)
        #expect(s.handle(.tick, now: sec(1000)).isEmpty, "no timer while waiting for the ring")
        #expect(s.handle(.ownershipFlipped, now: ms(7)) == [.dropPartition])
        #expect(s.phase == .dropping)
        #expect(s.handle(.cancelled, now: ms(8)).isEmpty, "the flip is committed: too late to cancel")
        #expect(s.handle(.dropped, now: ms(9)) == [.finished(.handedOff)])
        #expect(s.isFinished && s.phase == .finished(.handedOff))
        for e: TransferEvent in [.start, .tick, .dropped, .cancelled, .forwardFailed(key: key(1)), .batchAcked(sequence: 4)] {
            #expect(s.handle(e, now: ms(10)).isEmpty)
        }
        let p = s.progress
        #expect(p.batchesAcked == 3 && p.keysAcked == 5 && p.bytesAcked == 500 && p.attempts == 1 && p.failures == 0)
        #expect(p.startedAt == t0 && p.lastProgressAt == ms(6))
    }

    /// The fold's own bounds are the shell's; the machine only hands them over, and an empty last
    /// fold (the previous batch stopped on the partition's last key) needs no acknowledgement.
    @Test func anEmptyLastFoldNeedsNoAcknowledgement() throws {
        var s = try streaming(settings(keys: 2, inFlight: 1) { $0.batchMaxBytes = 250 })
        _ = s.handle(.foldSent(sequence: 1, keys: 2, bytes: 260, resumeAfter: key(1)), now: ms(1))
        #expect(s.handle(.batchAcked(sequence: 1), now: ms(2)).last == .foldAndSend(stream: 1, sequence: 2, after: key(1), maxBytes: 250, maxKeys: 2))
        #expect(s.handle(.foldSent(sequence: 2, keys: 0, bytes: 0, resumeAfter: nil), now: ms(3)) == [
            .persistCheckpoint(try record(.end, sequence: 2, batches: 1, keys: 2, bytes: 260)),
            .closeStream(stream: 1, reason: "copy complete"),
            .reportComplete,
        ])
    }

    /// The ring may flip before the sender reported: the drop still waits for the copy.
    @Test func anEarlyFlipWaitsForTheCopy() throws {
        var s = try streaming()
        #expect(s.handle(.ownershipFlipped, now: ms(1)).isEmpty)
        _ = s.handle(.foldSent(sequence: 1, keys: 1, bytes: 10, resumeAfter: nil), now: ms(2))
        #expect(s.handle(.batchAcked(sequence: 1), now: ms(3)) == [
            .persistCheckpoint(try record(.end, sequence: 1, batches: 1, keys: 1, bytes: 10)),
            .closeStream(stream: 1, reason: "copy complete"),
            .reportComplete,
            .dropPartition,
        ])
    }

    /// Cancelled by the ring: the stream closes, the data stays, nothing more happens.
    @Test func aCancelledTransferStopsAndKeepsTheData() throws {
        var s = try streaming()
        #expect(s.handle(.cancelled, now: ms(1)) == [.closeStream(stream: 1, reason: "cancelled"), .finished(.cancelled)])
        #expect(s.phase == .finished(.cancelled) && s.nextDeadline == nil)
        #expect(s.handle(.foldSent(sequence: 1, keys: 1, bytes: 1, resumeAfter: nil), now: ms(2)).isEmpty)
        var idle = try sender()
        #expect(idle.handle(.cancelled, now: t0) == [.finished(.cancelled)])
    }

    // MARK: Restarts

    /// A sender made from its persisted record resumes after the record's position, on a stream
    /// numbered after every earlier one, with its sequences after the last acknowledged batch.
    @Test func aRestartedSenderResumesFromItsCheckpoint() throws {
        let persisted = try record(.after(key(5)), sequence: 3, streams: 4, batches: 3, keys: 6, bytes: 600)
        let decoded = try TransferCheckpoint(decoding: persisted.encoded())
        var s = TransferSender(resuming: decoded, settings: settings())
        #expect(s.progress.checkpoint == .after(key(5)) && s.progress.batchesAcked == 3)
        #expect(s.handle(.start, now: t0) == [
            .persistCheckpoint(try record(.after(key(5)), sequence: 3, streams: 5, batches: 3, keys: 6, bytes: 600)),
            .openStream(stream: 5, from: .after(key(5))),
        ])
        #expect(s.handle(.streamOpened(stream: 5), now: ms(1)) == [.foldAndSend(stream: 5, sequence: 4, after: key(5), maxBytes: mib, maxKeys: 2)])
    }

    /// A sender restarted after its copy was acknowledged to the end reports complete again at
    /// once, without a stream; told of the flip, it drops.
    @Test func aRestartAfterTheCopyReportsWithoutCopying() throws {
        var s = TransferSender(resuming: try record(.end, sequence: 9, streams: 2), settings: settings())
        #expect(s.handle(.ownershipFlipped, now: t0).isEmpty, "before start: remembered")
        #expect(s.handle(.start, now: t0) == [.reportComplete, .dropPartition])
    }

    /// Kept keys restored with the record: those the fold will visit again are forgotten, the
    /// others re-sent after the fold.
    @Test func keptKeysSurviveARestart() throws {
        var s = TransferSender(resuming: try record(.after(key(5)), sequence: 2, streams: 1), dirtyKeys: [key(2), key(8)], settings: settings())
        #expect(s.progress.dirtyKeys == 2)
        let out = s.handle(.start, now: t0)
        #expect(out.first == .forgetDirtyKeys([key(8)]))
        #expect(s.progress.dirtyKeys == 1)
        _ = s.handle(.streamOpened(stream: 2), now: ms(1))
        #expect(s.handle(.foldSent(sequence: 3, keys: 2, bytes: 20, resumeAfter: nil), now: ms(2))
            == [.sendKeys(stream: 2, sequence: 4, keys: [key(2)], maxBytes: mib)])
    }

    // MARK: Writes during the transfer

    /// A failed forward of a key the copy already passed is kept (persisted) and re-sent after
    /// the fold, before completion; one the fold will still read is not kept at all.
    @Test func failedForwardsAreResentBeforeCompletion() throws {
        var s = try streaming()
        _ = s.handle(.foldSent(sequence: 1, keys: 2, bytes: 20, resumeAfter: key(1)), now: ms(1))
        // Fold 2 is being read: any key may be behind its snapshot, so it is kept.
        #expect(s.handle(.forwardFailed(key: key(0)), now: ms(2)) == [.persistDirtyKey(key(0))])
        #expect(s.handle(.forwardFailed(key: key(9)), now: ms(2)) == [.persistDirtyKey(key(9))])
        #expect(s.handle(.forwardFailed(key: key(0)), now: ms(2)).isEmpty, "kept once")
        // Fold 2 is out (through key 3) and no fold is being read: keys after key 3 are the next
        // fold's, kept ones included.
        #expect(s.handle(.foldSent(sequence: 2, keys: 2, bytes: 20, resumeAfter: key(3)), now: ms(3)) == [.forgetDirtyKeys([key(9)])])
        #expect(s.handle(.forwardFailed(key: key(7)), now: ms(3)).isEmpty)
        #expect(s.handle(.forwardFailed(key: key(2)), now: ms(3)) == [.persistDirtyKey(key(2))])
        #expect(s.handle(.batchAcked(sequence: 2), now: ms(4)).last == .foldAndSend(stream: 1, sequence: 3, after: key(3), maxBytes: mib, maxKeys: 2))
        // The fold ends: the kept keys go next, in key order.
        #expect(s.handle(.foldSent(sequence: 3, keys: 1, bytes: 10, resumeAfter: nil), now: ms(5))
            == [.sendKeys(stream: 1, sequence: 4, keys: [key(0), key(2)], maxBytes: mib)])
        #expect(s.phase == .copying, "the end is not acknowledged yet")
        #expect(s.handle(.keysSent(sequence: 4, keys: 2, bytes: 20), now: ms(6)).isEmpty)
        #expect(s.handle(.batchAcked(sequence: 3), now: ms(7)) == [.persistCheckpoint(try record(.end, sequence: 3, batches: 3, keys: 5, bytes: 50))])
        #expect(s.phase == .catchingUp)
        #expect(s.handle(.batchAcked(sequence: 4), now: ms(8)) == [
            .persistCheckpoint(try record(.end, sequence: 4, batches: 4, keys: 7, bytes: 70)),
            .forgetDirtyKeys([key(0), key(2)]),
            .closeStream(stream: 1, reason: "copy complete"),
            .reportComplete,
        ])
    }

    /// A key re-dirtied while its batch is in flight is sent again and not forgotten with that
    /// batch; a key forwarded in vain after the report re-opens a stream, and the drop waits.
    @Test func failedForwardsAfterTheReportStillReachTheReceiver() throws {
        var s = try streaming()
        _ = s.handle(.forwardFailed(key: key(1)), now: ms(1))
        _ = s.handle(.foldSent(sequence: 1, keys: 2, bytes: 20, resumeAfter: nil), now: ms(2))
        #expect(s.handle(.keysSent(sequence: 2, keys: 1, bytes: 10), now: ms(3)).isEmpty, "two unacknowledged")
        #expect(s.handle(.forwardFailed(key: key(1)), now: ms(4)).isEmpty, "already persisted: kept again, no new persist")
        #expect(s.handle(.batchAcked(sequence: 2), now: ms(5)) == [
            .persistCheckpoint(try record(.end, sequence: 2, batches: 2, keys: 3, bytes: 30)),
            .sendKeys(stream: 1, sequence: 3, keys: [key(1)], maxBytes: mib),
        ])
        _ = s.handle(.keysSent(sequence: 3, keys: 1, bytes: 10), now: ms(6))
        #expect(s.handle(.batchAcked(sequence: 3), now: ms(7)) == [
            .persistCheckpoint(try record(.end, sequence: 3, batches: 3, keys: 4, bytes: 40)),
            .forgetDirtyKeys([key(1)]),
            .closeStream(stream: 1, reason: "copy complete"),
            .reportComplete,
        ])
        // After the report: kept, persisted, sent on a new stream; the flip does not drop yet.
        #expect(s.handle(.forwardFailed(key: key(0)), now: ms(8)) == [
            .persistDirtyKey(key(0)),
            .persistCheckpoint(try record(.end, sequence: 3, streams: 2, batches: 3, keys: 4, bytes: 40)),
            .openStream(stream: 2, from: .end),
        ])
        #expect(s.handle(.ownershipFlipped, now: ms(9)).isEmpty)
        #expect(s.handle(.streamOpened(stream: 2), now: ms(10)) == [.sendKeys(stream: 2, sequence: 4, keys: [key(0)], maxBytes: mib)])
        _ = s.handle(.keysSent(sequence: 4, keys: 1, bytes: 10), now: ms(11))
        #expect(s.handle(.batchAcked(sequence: 4), now: ms(12)) == [
            .persistCheckpoint(try record(.end, sequence: 4, streams: 2, batches: 4, keys: 5, bytes: 50)),
            .forgetDirtyKeys([key(0)]),
            .closeStream(stream: 2, reason: "copy complete"),
            .dropPartition,
        ])
    }

    /// The shell sent only part of a kept-keys batch (its byte bound): the rest go in the next.
    @Test func aPartlySentKeysBatchKeepsTheRest() throws {
        var s = try streaming(settings(keys: 3, inFlight: 1))
        for i in [0, 1, 2] { _ = s.handle(.forwardFailed(key: key(i)), now: ms(1)) }
        _ = s.handle(.foldSent(sequence: 1, keys: 3, bytes: 30, resumeAfter: nil), now: ms(2))
        #expect(s.handle(.batchAcked(sequence: 1), now: ms(3)).last == .sendKeys(stream: 1, sequence: 2, keys: [key(0), key(1), key(2)], maxBytes: mib))
        _ = s.handle(.keysSent(sequence: 2, keys: 1, bytes: 2 * mib), now: ms(4))
        #expect(s.handle(.batchAcked(sequence: 2), now: ms(5)).suffix(2) == [
            .forgetDirtyKeys([key(0)]),
            .sendKeys(stream: 1, sequence: 3, keys: [key(1), key(2)], maxBytes: mib),
        ])
    }

    /// More failed forwards than `maxDirtyKeys`: the copy starts again from the start on a new
    /// stream (the reset record persisted before the kept keys are forgotten), counted.
    @Test func dirtyKeyOverflowRefoldsFromTheStart() throws {
        var s = try streaming(settings { $0.maxDirtyKeys = 2 })
        _ = s.handle(.foldSent(sequence: 1, keys: 2, bytes: 20, resumeAfter: key(1)), now: ms(1))
        _ = s.handle(.batchAcked(sequence: 1), now: ms(2))
        #expect(s.handle(.forwardFailed(key: key(0)), now: ms(3)) == [.persistDirtyKey(key(0))])
        #expect(s.handle(.forwardFailed(key: key(1)), now: ms(3)) == [.persistDirtyKey(key(1))])
        #expect(s.handle(.forwardFailed(key: key(4)), now: ms(3)) == [
            .closeStream(stream: 1, reason: "more than 2 failed forwards: copying again from the start"),
            .persistCheckpoint(try record(.start, sequence: 1, batches: 1, keys: 2, bytes: 20, refolds: 1)),
            .forgetDirtyKeys([key(0), key(1)]),
            .persistCheckpoint(try record(.start, sequence: 1, streams: 2, batches: 1, keys: 2, bytes: 20, refolds: 1)),
            .openStream(stream: 2, from: .start),
        ])
        let p = s.progress
        #expect(p.refolds == 1 && p.dirtyKeys == 0 && p.checkpoint == .start && p.phase == .opening)
        // While the copy is behind every key, failed forwards cost nothing.
        #expect(s.handle(.forwardFailed(key: key(0)), now: ms(4)).isEmpty)
        #expect(s.handle(.streamOpened(stream: 2), now: ms(5)) == [.foldAndSend(stream: 2, sequence: 3, after: nil, maxBytes: mib, maxKeys: 2)])
    }

    // MARK: Timeouts, backoff, keepalive

    /// No acknowledgement within the batch timeout: the stream is closed, and after a backoff a
    /// new one resumes from the checkpoint (not from zero).
    @Test func aBatchTimeoutResumesFromTheCheckpointAfterABackoff() throws {
        var s = try streaming()
        _ = s.handle(.foldSent(sequence: 1, keys: 2, bytes: 20, resumeAfter: key(1)), now: ms(1))
        _ = s.handle(.foldSent(sequence: 2, keys: 2, bytes: 20, resumeAfter: key(3)), now: ms(2))
        _ = s.handle(.batchAcked(sequence: 1), now: ms(3))
        _ = s.handle(.foldSent(sequence: 3, keys: 2, bytes: 20, resumeAfter: key(5)), now: ms(4))
        let deadline = ms(4) + .seconds(120)
        #expect(s.nextDeadline == deadline)
        #expect(s.handle(.tick, now: deadline - .milliseconds(1)).isEmpty)
        #expect(s.handle(.tick, now: deadline) == [.closeStream(stream: 1, reason: "no progress on stream 1 within 120.0 seconds")])
        #expect(s.phase == .backingOff(until: deadline + .seconds(1)) && s.nextDeadline == deadline + .seconds(1))
        #expect(s.progress.failures == 1 && s.progress.checkpoint == .after(key(1)) && s.progress.batchesInFlight == 0)
        // A late acknowledgement of the closed stream changes nothing.
        #expect(s.handle(.batchAcked(sequence: 3), now: deadline + .milliseconds(10)).isEmpty)
        #expect(s.handle(.tick, now: deadline + .seconds(1)) == [
            .persistCheckpoint(try record(.after(key(1)), sequence: 1, streams: 2, batches: 1, keys: 2, bytes: 20)),
            .openStream(stream: 2, from: .after(key(1))),
        ])
        #expect(s.handle(.streamOpened(stream: 2), now: deadline + .seconds(2)) == [.foldAndSend(stream: 2, sequence: 4, after: key(1), maxBytes: mib, maxKeys: 2)])
        // Old sequences are not acknowledgements on the new stream.
        #expect(s.handle(.batchAcked(sequence: 2), now: deadline + .seconds(3)).isEmpty)
        _ = s.handle(.foldSent(sequence: 4, keys: 2, bytes: 20, resumeAfter: key(3)), now: deadline + .seconds(3))
        #expect(s.handle(.batchAcked(sequence: 4), now: deadline + .seconds(4)).first
            == .persistCheckpoint(try record(.after(key(3)), sequence: 4, streams: 2, batches: 2, keys: 4, bytes: 40)))
        #expect(s.progress.failures == 0, "an acknowledgement resets the backoff")
    }

    /// Consecutive failures back off exponentially up to the bound; past `maxConsecutiveFailures`
    /// the transfer gives up, keeping its checkpoint.
    @Test func backoffAndAttemptsAreBounded() throws {
        var s = try sender(settings {
            $0.backoffMin = .seconds(1)
            $0.backoffMax = .seconds(5)
            $0.maxConsecutiveFailures = 5
        })
        var now = t0
        var out = s.handle(.start, now: now)
        var waits: [Duration] = []
        for stream in UInt64(1)...6 {
            #expect(out.last == .openStream(stream: stream, from: .start))
            out = s.handle(.streamFailed(stream: stream, reason: "refused"), now: now)
            guard case .backingOff(let until) = s.phase else { break }
            waits.append(now.duration(to: until))
            #expect(s.handle(.tick, now: until - .milliseconds(1)).isEmpty)
            now = until
            out = s.handle(.tick, now: now)
        }
        #expect(waits == [.seconds(1), .seconds(2), .seconds(4), .seconds(5), .seconds(5)])
        #expect(out == [.finished(.gaveUp(reason: "6 attempts failed in a row; last: stream 6 failed: refused"))])
        #expect(s.progress.attempts == 6 && s.nextDeadline == nil)
    }

    /// An open that never completes times out like a batch.
    @Test func anOpenThatHangsTimesOut() throws {
        var s = try sender()
        _ = s.handle(.start, now: t0)
        #expect(s.handle(.tick, now: sec(120)) == [.closeStream(stream: 1, reason: "stream 1 not opened within 120.0 seconds")])
        #expect(s.handle(.streamOpened(stream: 1), now: sec(121)).isEmpty, "too late: that stream is gone")
    }

    /// A fold scanning for long without a batch (filtered keys) reports progress: the transfer is
    /// not timed out, and the receiver gets a keepalive at most every `keepaliveInterval`.
    @Test func foldProgressKeepsTheTransferAlive() throws {
        var s = try streaming()
        var keepalives: [Int64] = []
        for second in stride(from: Int64(10), through: 600, by: 10) {
            let out = s.handle(.foldProgress, now: sec(second))
            if out == [.sendKeepalive(stream: 1)] { keepalives.append(second) } else { #expect(out.isEmpty) }
            #expect(s.handle(.tick, now: sec(second) + .seconds(119)).isEmpty)
        }
        #expect(keepalives == Array(stride(from: Int64(30), through: 600, by: 30)))
        #expect(s.nextDeadline == sec(600) + .seconds(120))
        #expect(s.handle(.tick, now: sec(720)).first == .closeStream(stream: 1, reason: "no progress on stream 1 within 120.0 seconds"))
    }

    // MARK: Events that do not apply

    /// Stale, duplicate, out-of-order and unknown events change nothing.
    @Test func eventsThatDoNotApplyAreIgnored() throws {
        var s = try streaming()
        _ = s.handle(.foldSent(sequence: 1, keys: 2, bytes: 20, resumeAfter: key(1)), now: ms(1))
        let before = s.progress
        let ignored: [TransferEvent] = [
            .start, .dropped, .streamOpened(stream: 1), .streamOpened(stream: 2), .streamFailed(stream: 0, reason: "old"),
            .streamFailed(stream: 2, reason: "future"),
            .batchAcked(sequence: 0), .batchAcked(sequence: 3), .batchAcked(sequence: 99),   // never issued
            .foldSent(sequence: 1, keys: 2, bytes: 20, resumeAfter: key(1)),                   // duplicate
            .foldSent(sequence: 3, keys: 2, bytes: 20, resumeAfter: key(3)),                   // not being read
            .foldSent(sequence: 2, keys: 2, bytes: 20, resumeAfter: key(0)),                   // backwards
            .foldSent(sequence: 2, keys: 2, bytes: 20, resumeAfter: key(1)),                   // not forward
            .keysSent(sequence: 2, keys: 1, bytes: 1),                                         // it is a fold
            .tick,
        ]
        for e in ignored { #expect(s.handle(e, now: ms(2)).isEmpty, "\(e)") }
        #expect(s.progress == before)
        // An acknowledgement of the batch still being read counts once it is reported sent.
        #expect(s.handle(.batchAcked(sequence: 2), now: ms(3)).count == 1)
        #expect(s.handle(.batchAcked(sequence: 2), now: ms(3)).isEmpty, "duplicate")
        #expect(s.handle(.batchAcked(sequence: 1), now: ms(3)).isEmpty, "below the last")
        #expect(s.handle(.foldSent(sequence: 2, keys: 2, bytes: 20, resumeAfter: key(3)), now: ms(4)).first
            == .persistCheckpoint(try record(.after(key(3)), sequence: 2, batches: 2, keys: 4, bytes: 40)))
        // Before start, only cancel, failed forwards and the flip mean anything.
        var idle = try sender()
        for e: TransferEvent in [.tick, .streamOpened(stream: 1), .batchAcked(sequence: 1), .dropped, .foldProgress] {
            #expect(idle.handle(e, now: t0).isEmpty)
        }
        #expect(idle.phase == .idle)
    }

    /// Random event sequences, half of them plausible answers to the directives just returned:
    /// the machine never traps and its invariants hold throughout.
    @Test(arguments: UInt64(0)..<200) func randomEventsKeepTheInvariants(seed: UInt64) throws {
        var rng = SplitMix64(seed: seed)
        var cfg = settings(keys: 1 + Int(rng.next(below: 3)), inFlight: 1 + Int(rng.next(below: 3)))
        cfg.maxDirtyKeys = 1 + Int(rng.next(below: 4))
        cfg.maxConsecutiveFailures = 50
        var s = try sender(cfg)
        var now = t0
        var last: [TransferDirective] = []
        var checkpoint = TransferPosition.start, refolds: UInt64 = 0
        var flipped = false, finishedCount = 0
        func randomKey() -> [UInt8] { key(Int(rng.next(below: 12))) }
        for _ in 0..<400 {
            now = now + .milliseconds(Int64(rng.next(below: 3)) * 40_000 + 1)
            var event: TransferEvent
            if !last.isEmpty, rng.next(below: 2) == 0, let d = last.randomElement(using: &rng) {
                switch d {
                case .openStream(let n, _): event = rng.next(below: 5) == 0 ? .streamFailed(stream: n, reason: "x") : .streamOpened(stream: n)
                case .foldAndSend(_, let seq, let after, _, _):
                    let start = after.map { Int(String(decoding: $0.dropFirst(), as: UTF8.self)) ?? 0 } ?? -1
                    let k = Int(rng.next(below: 3))
                    event = .foldSent(sequence: seq, keys: k, bytes: 10 * k, resumeAfter: start + k >= 11 ? nil : key(start + max(k, 1)))
                case .sendKeys(_, let seq, let keys, _): event = .keysSent(sequence: seq, keys: Int(rng.next(below: UInt64(keys.count + 1))), bytes: 5)
                case .dropPartition: event = .dropped
                default: event = .batchAcked(sequence: rng.next(below: 20))
                }
            } else {
                switch rng.next(below: 14) {
                case 0: event = .start
                case 1: event = .streamOpened(stream: rng.next(below: 6))
                case 2: event = .streamFailed(stream: rng.next(below: 6), reason: "x")
                case 3: event = .foldSent(sequence: rng.next(below: 20), keys: Int(rng.next(below: 5)) - 1, bytes: Int(rng.next(below: 100)) - 5,
                                          resumeAfter: rng.next(below: 3) == 0 ? nil : randomKey())
                case 4: event = .keysSent(sequence: rng.next(below: 20), keys: Int(rng.next(below: 5)) - 1, bytes: 7)
                case 5, 6: event = .batchAcked(sequence: rng.next(below: 20))
                case 7: event = .foldProgress
                case 8, 9: event = .forwardFailed(key: randomKey())
                case 10: event = rng.next(below: 10) == 0 ? .ownershipFlipped : .tick
                case 11: event = .dropped
                case 12: event = rng.next(below: 50) == 0 ? .cancelled : .tick
                default: event = .tick
                }
            }
            let wasFinished = s.isFinished
            if event == .ownershipFlipped { flipped = true }
            let out = s.handle(event, now: now)
            let p = s.progress
            if wasFinished { #expect(out.isEmpty) }
            #expect(p.batchesInFlight <= cfg.maxBatchesInFlight)
            #expect(p.dirtyKeys <= cfg.maxDirtyKeys)
            #expect(p.refolds > refolds || p.checkpoint >= checkpoint, "the checkpoint moved back without a refold")
            checkpoint = p.checkpoint
            refolds = p.refolds
            if out.contains(.reportComplete) { #expect(p.checkpoint == .end && p.batchesInFlight == 0 && p.dirtyKeys == 0) }
            if out.contains(.dropPartition) { #expect(flipped && p.checkpoint == .end && p.batchesInFlight == 0 && p.dirtyKeys == 0) }
            finishedCount += out.filter { if case .finished = $0 { true } else { false } }.count
            #expect(s.reading == nil || s.reading?.sequence ?? 0 < s.nextSequence)
            if !out.isEmpty { last = out }
            if s.isFinished, rng.next(below: 20) == 0 { break }
        }
        #expect(finishedCount <= 1)
    }

    // MARK: Crashes at every step

    /// A sender killed after any step of a transfer and restarted from what it persisted: the
    /// receiver ends with every key; a key is applied at most twice, and every key applied twice
    /// lies between the persisted checkpoint and the last key read before the crash — a window of
    /// at most `maxBatchesInFlight × batchMaxKeys` keys (the batches in flight). Completion is
    /// never reported early and the drop comes only after the flip (checked as directives appear).
    @Test(arguments: [(2, 3), (1, 4), (3, 1)]) func aSenderCrashAtEveryStepResumes(inFlight: Int, keys: Int) throws {
        let cfg = settings(keys: keys, inFlight: inFlight)
        let total = try World(seed: 11, keys: 20, settings: cfg).runToEnd().steps
        #expect(total > 30)
        var mostResent = 0
        for k in 0...total {
            var w = try World(seed: 11, keys: 20, settings: cfg)
            w.run(steps: k)
            guard w.outcome == nil else { continue }
            let persisted = try w.persistedRecord.map { try TransferCheckpoint(decoding: $0).position } ?? .start
            let lastRead = w.lastFolded
            try w.crashSender()
            w = w.runToEnd()
            #expect(w.problems.isEmpty, "crash after step \(k): \(w.problems)")
            let window = w.initialKeys.filter { k in persisted.precedes(key: k) && lastRead.map { last in !precedes(last, k) } == true }
            #expect(window.count <= inFlight * keys, "crash after step \(k): \(window.count) keys in flight")
            for key in w.initialKeys {
                let n = w.applied[key, default: 0]
                #expect(n == 1 || (n == 2 && window.contains(key)), "crash after step \(k): \(key) applied \(n) times")
            }
            mostResent = max(mostResent, w.applied.values.filter { $0 == 2 }.count)
        }
        #expect(mostResent == inFlight * keys, "the bound is reached, so it is tight")
    }

    /// A receiver killed after any step: unapplied batches and unsent acknowledgements are lost,
    /// the stream fails, the sender backs off and resumes from its checkpoint. Same bound: only
    /// keys between the sender's checkpoint and its last read key are applied twice.
    @Test(arguments: [(2, 3), (1, 4)]) func aReceiverCrashAtEveryStepResumes(inFlight: Int, keys: Int) throws {
        let cfg = settings(keys: keys, inFlight: inFlight)
        let total = try World(seed: 12, keys: 20, settings: cfg).runToEnd().steps
        var mostResent = 0
        for k in 0...total {
            var w = try World(seed: 12, keys: 20, settings: cfg)
            w.run(steps: k)
            guard w.outcome == nil else { continue }
            let checkpoint = w.sender.progress.checkpoint
            let lastRead = w.lastFolded
            w.crashReceiver()
            w = w.runToEnd()
            #expect(w.problems.isEmpty, "crash after step \(k): \(w.problems)")
            let window = w.initialKeys.filter { k in checkpoint.precedes(key: k) && lastRead.map { last in !precedes(last, k) } == true }
            #expect(window.count <= inFlight * keys)
            for key in w.initialKeys {
                let n = w.applied[key, default: 0]
                #expect(n == 1 || (n == 2 && window.contains(key)), "crash after step \(k): \(key) applied \(n) times")
            }
            mostResent = max(mostResent, w.applied.values.filter { $0 == 2 }.count)
        }
        #expect(mostResent > 0 && mostResent <= inFlight * keys, "some crash made the sender re-send")
    }

    /// The same with writes during the transfer, 40 % of whose forwards fail (a write is
    /// acknowledged once the shell performed every directive returned so far): after a crash of
    /// either side at any step, the receiver holds every write the sender acknowledged (and,
    /// without a sender crash, everything the sender holds) before the report and the drop.
    @Test func crashesAtEveryStepWithWritesLoseNoAcknowledgedWrite() throws {
        let cfg = settings(keys: 3, inFlight: 2)
        for seed: UInt64 in [21, 22, 23] {
            let base = try World(seed: seed, keys: 15, settings: cfg, writes: 25, failPercent: 40).runToEnd()
            #expect(base.problems.isEmpty && base.keyBatches > 0, "kept keys were re-sent")
            let total = base.steps
            for k in 0...total {
                for senderCrash in [true, false] {
                    var w = try World(seed: seed, keys: 15, settings: cfg, writes: 25, failPercent: 40)
                    w.run(steps: k)
                    guard w.outcome == nil else { continue }
                    if senderCrash { try w.crashSender() } else { w.crashReceiver() }
                    w = w.runToEnd()
                    #expect(w.problems.isEmpty, "seed \(seed), \(senderCrash ? "sender" : "receiver") crash after step \(k): \(w.problems)")
                }
            }
        }
    }

    /// Writes with failing forwards and a small dirty-key bound: overflows re-fold from the start
    /// (counted), and the receiver still ends with everything.
    @Test func dirtyKeyOverflowUnderLoadStillDeliversEverything() throws {
        var refolds: UInt64 = 0
        for seed: UInt64 in 30..<40 {
            let w = try World(seed: seed, keys: 30, settings: settings(keys: 2, inFlight: 2) { $0.maxDirtyKeys = 2 }, writes: 60, failPercent: 70).runToEnd()
            #expect(w.problems.isEmpty, "seed \(seed): \(w.problems)")
            refolds += w.sender.progress.refolds
        }
        #expect(refolds > 0, "the bound was reached in some run")
    }

    /// Faults on a valid run: lost links, duplicated and stale acknowledgements and reports,
    /// early ticks, chunks delivered twice, crashes of either side. Every run ends handed off with
    /// every acknowledged write on the receiver.
    @Test(arguments: UInt64(0)..<60) func faultyRunsStillHandOffEverything(seed: UInt64) throws {
        var w = try World(seed: 1000 + seed, keys: 25, settings: settings(keys: 3, inFlight: 2) {
            $0.maxDirtyKeys = 8
            $0.maxConsecutiveFailures = 100
        }, writes: 30, failPercent: 30)
        w.faultsLeft = 25
        w = w.runToEnd()
        #expect(w.problems.isEmpty, "seed \(1000 + seed): \(w.problems)")
    }

    // MARK: The receiver's bookkeeping

    @Test func theReceiverRefusesUnknownAndStaleAndDedupesBySequence() throws {
        let n = try Names()
        var r = TransferReceiver()
        #expect(r.streamOpened(tid, partition: part, from: n.s, stream: 1) == .refuse("transfer-7 is not expected here"))
        #expect(r.batch(tid, stream: 1, sequence: 1) == .refuse("transfer-7 is not expected here"))
        r.expect(tid, partition: part, from: n.s)
        #expect(r.expected == [tid])
        if case .refuse = r.streamOpened(tid, partition: PartitionID(4), from: n.s, stream: 1) {} else { Issue.record("another partition accepted") }
        if case .refuse = r.streamOpened(tid, partition: part, from: n.r, stream: 1) {} else { Issue.record("another sender accepted") }
        #expect(r.streamOpened(tid, partition: part, from: n.s, stream: 2) == .accept)
        #expect(r.batch(tid, stream: 2, sequence: 1) == .accept)
        #expect(r.batch(tid, stream: 2, sequence: 1) == .duplicate)
        #expect(r.batch(tid, stream: 2, sequence: 3) == .accept, "an empty fold skips a sequence")
        #expect(r.batch(tid, stream: 2, sequence: 2) == .duplicate)
        #expect(r.streamOpened(tid, partition: part, from: n.s, stream: 2) == .refuse("stream 2 of transfer-7 is not after stream 2"))
        #expect(r.streamOpened(tid, partition: part, from: n.s, stream: 5) == .accept)
        #expect(r.batch(tid, stream: 2, sequence: 4) == .refuse("stream 2 of transfer-7 is not its current stream"))
        #expect(r.batch(tid, stream: 5, sequence: 3) == .accept, "a new stream re-sends from the checkpoint")
        r.expect(tid, partition: part, from: n.s)
        #expect(r.batch(tid, stream: 5, sequence: 3) == .duplicate, "expecting again keeps the state")
        r.forget(tid)
        #expect(r.batch(tid, stream: 5, sequence: 4) == .refuse("transfer-7 is not expected here") && r.expected.isEmpty)
    }

    // MARK: The checkpoint record

    @Test func theCheckpointRecordRoundTrips() throws {
        for position: TransferPosition in [.start, .after([]), .after(key(3)), .after(Array(repeating: 0xFF, count: 1024)), .end] {
            let r = try record(position, sequence: 12, streams: 3, batches: 11, keys: 5_000, bytes: 1 << 40, refolds: 2)
            #expect(try TransferCheckpoint(decoding: r.encoded()) == r)
        }
        let big = try record(.after(key(1)), sequence: .max, streams: .max, batches: .max, keys: .max, bytes: .max, refolds: .max)
        #expect(try TransferCheckpoint(decoding: big.encoded()) == big)
        // A record at the counters' limits still makes a working sender (saturating, not trapping).
        var s = TransferSender(resuming: big, settings: settings())
        #expect(s.handle(.start, now: t0).count == 2)
    }

    @Test func aDamagedCheckpointRecordThrows() throws {
        let bytes = try record(.after(key(3)), sequence: 300, streams: 2, batches: 3, keys: 9, bytes: 900).encoded()
        for n in 0..<bytes.count {
            #expect(throws: DecodeError.self, "truncated to \(n) bytes") { try TransferCheckpoint(decoding: Array(bytes.prefix(n))) }
        }
        #expect(throws: DecodeError.self) { try TransferCheckpoint(decoding: bytes + [0]) }
        var wrongVersion = bytes
        wrongVersion[0] = 2
        #expect(throws: DecodeError.self) { try TransferCheckpoint(decoding: wrongVersion) }
        // Header: version 1, id 8, partition 4, "n1" 3, "n2" 3: the position tag is at 19.
        var badTag = bytes
        badTag[19] = 3
        #expect(throws: DecodeError.self) { try TransferCheckpoint(decoding: badTag) }
        var badName = bytes
        badName[14] = UInt8(ascii: "/")
        #expect(throws: DecodeError.self) { try TransferCheckpoint(decoding: badName) }
        var toItself = bytes
        toItself[18] = UInt8(ascii: "1")
        #expect(throws: DecodeError.self) { try TransferCheckpoint(decoding: toItself) }
        var hugeKey = bytes
        hugeKey.replaceSubrange(20..<21, with: [0xFF, 0xFF, 0xFF, 0x7F])
        #expect(throws: DecodeError.self) { try TransferCheckpoint(decoding: hugeKey) }
        // Garbage: never a trap; whatever decodes re-encodes to the same bytes.
        var rng = SplitMix64(seed: 5)
        for _ in 0..<20_000 {
            var junk = bytes
            for _ in 0...rng.next(below: 4) {
                let i = Int(rng.next(below: UInt64(junk.count)))
                junk[i] = UInt8(truncatingIfNeeded: rng.next())
            }
            if rng.next(below: 4) == 0 { junk = (0..<Int(rng.next(below: 40))).map { _ in UInt8(truncatingIfNeeded: rng.next()) } }
            if let r = try? TransferCheckpoint(decoding: junk) { #expect(r.encoded() == junk) }
        }
    }
}

// MARK: A simulated transfer

/// One transfer end to end, deterministic from a seed: the sender's partition (key → version) and
/// its shell (performs directives one at a time, in order; persists records and kept keys), an
/// ordered stream, the receiver (applies accepted batches by keeping the highest version, as a
/// DVV merge keeps the newest, and acknowledges them), client writes whose forwards may fail, and
/// the ring (flips ownership after the report). Each step does one thing, picked by the seed;
/// with nothing to do, time jumps to the sender's deadline.
///
/// Checked as directives appear (`problems`): unacknowledged batches ≤ the bound; the checkpoint
/// never moves back without a refold; `reportComplete` only once the receiver holds every
/// acknowledged write; `dropPartition` only after the flip reached the sender and with the
/// receiver holding every acknowledged write (without a sender crash: everything the sender holds).
private struct World {
    struct Chunk {
        let stream: UInt64
        let sequence: UInt64
        let items: [(key: [UInt8], version: Int)]
    }

    enum Action { case perform, event, receive, ack, write, flip, fault }

    let names: Names
    let settings: TransferSettings
    let initialKeys: [[UInt8]]
    let newKeys: [[UInt8]]
    var rng: SplitMix64
    var now = t0
    var steps = 0

    // The sender and its shell.
    var store: [[UInt8]: Int]
    var sender: TransferSender
    var queue: [TransferDirective] = []
    var enqueued = 0
    var performed = 0
    var events: [TransferEvent] = []
    var shellStream: UInt64?
    var persistedRecord: [UInt8]?
    var persistedDirty: Set<[UInt8]> = []
    var lastFolded: [UInt8]?
    var keyBatches = 0

    // The stream and the receiver.
    var wire: [Chunk] = []
    var acks: [UInt64] = []
    var seenAcks: [UInt64] = []
    var receiver = TransferReceiver()
    var replica: [[UInt8]: Int] = [:]
    var applied: [[UInt8]: Int] = [:]

    // Clients and the ring.
    var writesLeft: Int
    let failPercent: UInt64
    var acknowledged: [[UInt8]: Int]
    var waiting: [(key: [UInt8], version: Int, until: Int)] = []
    var reported = false
    var flipped = false
    var flipDelivered = false
    var outcome: TransferOutcome?
    var senderCrashed = false
    var faultsLeft = 0

    var problems: [String] = []
    var lastCheckpoint = TransferPosition.start
    var lastRefolds: UInt64 = 0

    init(seed: UInt64, keys: Int, settings: TransferSettings, writes: Int = 0, failPercent: UInt64 = 0) throws {
        names = try Names()
        self.settings = settings
        rng = SplitMix64(seed: seed)
        initialKeys = (0..<keys).map { key($0 * 2) }
        newKeys = (0..<5).map { key($0 * 7 + 1) }
        store = Dictionary(uniqueKeysWithValues: initialKeys.map { ($0, 1) })
        acknowledged = store
        sender = TransferSender(id: tid, partition: part, from: names.s, to: names.r, settings: settings)
        writesLeft = writes
        self.failPercent = failPercent
        receiver.expect(tid, partition: part, from: names.s)
        events = [.start]
    }

    mutating func run(steps n: Int) {
        for _ in 0..<n { if !step() { break } }
    }

    func runToEnd() -> World {
        var w = self
        while w.step() {
            if w.steps > 20_000 {
                w.problems.append("no end after 20000 steps (\(w.sender.phase))")
                break
            }
        }
        if w.outcome != .handedOff { w.problems.append("ended \(w.outcome.map { "\($0)" } ?? "stuck in \(w.sender.phase)")") }
        for k in w.initialKeys where w.replica[k] == nil { w.problems.append("receiver lacks \(k)") }
        w.problems += w.missing(w.acknowledged, "at the end")
        if w.persistedRecord != nil || !w.persistedDirty.isEmpty { w.problems.append("persisted state left after finishing") }
        return w
    }

    /// One step; false once finished or stuck.
    mutating func step() -> Bool {
        guard outcome == nil else { return false }
        steps += 1
        now = now + .milliseconds(1)
        var actions: [Action] = []
        if !queue.isEmpty { actions.append(.perform) }
        if !events.isEmpty { actions.append(.event) }
        if !wire.isEmpty { actions.append(.receive) }
        if !acks.isEmpty { actions.append(.ack) }
        if writesLeft > 0, !flipped { actions.append(.write) }
        if reported, !flipped { actions.append(.flip) }
        if faultsLeft > 0, rng.next(below: 8) == 0 { actions = [.fault] }
        guard let action = actions.isEmpty ? nil : actions[Int(rng.next(below: UInt64(actions.count)))] else {
            guard let deadline = sender.nextDeadline else {
                problems.append("stuck in \(sender.phase) with no deadline")
                return false
            }
            now = max(now, deadline)
            feed(.tick)
            return true
        }
        switch action {
        case .perform: perform(queue.removeFirst())
        case .event: feed(events.removeFirst())
        case .receive: receive()
        case .ack:
            let sequence = acks.removeFirst()
            seenAcks.append(sequence)
            feed(.batchAcked(sequence: sequence))
        case .write: write()
        case .flip:
            flipped = true
            events.append(.ownershipFlipped)
        case .fault: fault()
        }
        return true
    }

    @discardableResult
    mutating func feed(_ event: TransferEvent) -> [TransferDirective] {
        if event == .ownershipFlipped { flipDelivered = true }
        let out = sender.handle(event, now: now)
        let p = sender.progress
        if p.batchesInFlight > settings.maxBatchesInFlight { problems.append("\(p.batchesInFlight) batches in flight") }
        if p.refolds == lastRefolds, p.checkpoint < lastCheckpoint { problems.append("checkpoint moved back to \(p.checkpoint)") }
        if p.dirtyKeys > settings.maxDirtyKeys { problems.append("\(p.dirtyKeys) dirty keys kept") }
        lastCheckpoint = p.checkpoint
        lastRefolds = p.refolds
        for d in out {
            switch d {
            case .reportComplete:
                if p.checkpoint != .end || p.batchesInFlight != 0 || p.dirtyKeys != 0 { problems.append("complete with work outstanding") }
                problems += missing(acknowledged, "at the report")
            case .dropPartition:
                if !flipDelivered { problems.append("drop before the flip") }
                problems += missing(acknowledged, "at the drop")
                if !senderCrashed { problems += missing(store, "at the drop") }
            default: break
            }
        }
        queue += out
        enqueued += out.count
        return out
    }

    func missing(_ writes: [[UInt8]: Int], _ when: String) -> [String] {
        writes.filter { replica[$0.key, default: 0] < $0.value }.map { "receiver lacks \($0.key) v\($0.value) \(when)" }
    }

    /// The shell: one directive.
    mutating func perform(_ d: TransferDirective) {
        performed += 1
        switch d {
        case .persistCheckpoint(let r): persistedRecord = r.encoded()
        case .persistDirtyKey(let k): persistedDirty.insert(k)
        case .forgetDirtyKeys(let ks): persistedDirty.subtract(ks)
        case .openStream(let n, _):
            if receiver.streamOpened(tid, partition: part, from: names.s, stream: n) == .accept {
                shellStream = n
                events.append(.streamOpened(stream: n))
            } else {
                problems.append("the receiver refused stream \(n)")
                events.append(.streamFailed(stream: n, reason: "refused"))
            }
        case .foldAndSend(let n, let sequence, let after, let maxBytes, let maxKeys):
            guard shellStream == n else { break }
            var items: [(key: [UInt8], version: Int)] = []
            var bytes = 0
            var resumeAfter: [UInt8]?
            for k in store.keys.sorted(by: precedes) where after.map({ precedes($0, k) }) ?? true {
                items.append((k, store[k, default: 0]))
                bytes += 100
                if items.count >= maxKeys || bytes >= maxBytes {
                    resumeAfter = k
                    break
                }
            }
            if let lastKey = items.last?.key {
                wire.append(Chunk(stream: n, sequence: sequence, items: items))
                if lastFolded.map({ precedes($0, lastKey) }) ?? true { lastFolded = lastKey }
            }
            events.append(.foldSent(sequence: sequence, keys: items.count, bytes: bytes, resumeAfter: resumeAfter))
        case .sendKeys(let n, let sequence, let keys, let maxBytes):
            guard shellStream == n else { break }
            var items: [(key: [UInt8], version: Int)] = []
            var bytes = 0
            var consumed = 0
            for k in keys {
                consumed += 1
                if let v = store[k] {
                    items.append((k, v))
                    bytes += 100
                }
                if bytes >= maxBytes { break }
            }
            if consumed > 0 {
                wire.append(Chunk(stream: n, sequence: sequence, items: items))
                keyBatches += 1
            }
            events.append(.keysSent(sequence: sequence, keys: consumed, bytes: bytes))
        case .sendKeepalive: break
        case .closeStream(let n, _):
            if shellStream == n {
                shellStream = nil
                wire.removeAll { $0.stream == n }
            }
        case .reportComplete: reported = true
        case .dropPartition:
            store = [:]
            events.append(.dropped)
        case .finished(let o):
            outcome = o
            if case .gaveUp = o {} else {
                persistedRecord = nil
                persistedDirty = []
            }
        }
        acknowledgeWaiting()
    }

    /// Writes whose failed forward waited for the directives queued before them.
    mutating func acknowledgeWaiting() {
        waiting.removeAll { w in
            guard w.until <= performed else { return false }
            acknowledged[w.key] = max(acknowledged[w.key, default: 0], w.version)
            return true
        }
    }

    /// The receiver consumes the next chunk.
    mutating func receive() {
        let c = wire.removeFirst()
        switch receiver.batch(tid, stream: c.stream, sequence: c.sequence) {
        case .accept:
            for (k, v) in c.items {
                replica[k] = max(replica[k, default: 0], v)
                if initialKeys.contains(k) { applied[k, default: 0] += 1 }
            }
            acks.append(c.sequence)
        case .duplicate:
            acks.append(c.sequence)
        case .refuse(let why):
            if shellStream == c.stream {
                shellStream = nil
                wire.removeAll { $0.stream == c.stream }
                events.append(.streamFailed(stream: c.stream, reason: why))
            }
        }
    }

    /// A client write to the sender: applied, forwarded; a failed forward is reported, and the
    /// write acknowledged once the directives that returned were performed.
    mutating func write() {
        writesLeft -= 1
        let pool = initialKeys + newKeys
        let k = pool[Int(rng.next(below: UInt64(pool.count)))]
        let version = store[k, default: 0] + 1
        store[k] = version
        if rng.next(below: 100) < failPercent {
            // Acknowledged once the directives this returned are performed (in queue order).
            // Acknowledged once every directive returned so far is performed (a barrier in the
            // shell's queue), not merely those this call returned: an earlier persist of the same
            // key, or a reset checkpoint, may still be queued.
            feed(.forwardFailed(key: k))
            waiting.append((k, version, enqueued))
            acknowledgeWaiting()
        } else {
            replica[k] = max(replica[k, default: 0], version)
            acknowledged[k] = max(acknowledged[k, default: 0], version)
        }
    }

    /// The sender dies: what it had not performed or persisted is gone. Chunks already on the
    /// wire still reach the receiver (the worst case for re-sends); acknowledgements do not.
    mutating func crashSender() throws {
        while !wire.isEmpty { receive() }
        acks = []
        events = []
        queue = []
        enqueued = performed
        waiting = []
        shellStream = nil
        senderCrashed = true
        flipDelivered = false
        let restored = try persistedRecord.map { try TransferCheckpoint(decoding: $0) }
        sender = restored.map { TransferSender(resuming: $0, dirtyKeys: persistedDirty, settings: settings) }
            ?? TransferSender(id: tid, partition: part, from: names.s, to: names.r, settings: settings)
        lastCheckpoint = sender.progress.checkpoint
        lastRefolds = sender.progress.refolds
        events = [.start] + (flipped ? [.ownershipFlipped] : [])
    }

    /// The receiver dies: what it applied is durable; chunks not applied and acknowledgements not
    /// sent are lost, and the sender's stream fails.
    mutating func crashReceiver() {
        wire = []
        acks = []
        receiver = TransferReceiver()
        receiver.expect(tid, partition: part, from: names.s)
        if let n = shellStream {
            shellStream = nil
            events.append(.streamFailed(stream: n, reason: "receiver restarted"))
        }
    }

    mutating func fault() {
        faultsLeft -= 1
        switch rng.next(below: 8) {
        case 0:
            // The link is lost; the receiver lives on.
            if let n = shellStream {
                shellStream = nil
                wire = []
                acks = []
                events.append(.streamFailed(stream: n, reason: "link lost"))
            }
        case 1:
            if let old = seenAcks.randomElement(using: &rng) { feed(.batchAcked(sequence: old)) }
        case 2:
            let reading = sender.reading?.sequence
            let stale = rng.next(below: sender.nextSequence)
            if stale != reading { feed(.foldSent(sequence: stale, keys: 1, bytes: 1, resumeAfter: key(99))) }
            if stale != reading { feed(.keysSent(sequence: stale, keys: 1, bytes: 1)) }
        case 3:
            let current: UInt64? = switch sender.link {
            case .opening(let n), .open(let n): n
            default: nil
            }
            let stale = rng.next(below: sender.progress.attempts + 1)
            if stale != current {
                feed(.streamOpened(stream: stale))
                feed(.streamFailed(stream: stale, reason: "stale"))
            }
        case 4:
            feed(.tick)
        case 5:
            if let c = wire.first { wire.insert(c, at: 0) }
        case 6:
            crashReceiver()
        default:
            if rng.next(below: 2) == 0 { try? crashSender() }
        }
    }
}
