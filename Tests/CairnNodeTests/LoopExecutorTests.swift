import Testing
@testable import CairnNode
import CairnCore
import CairnStorage
import Logging
import NIOCore
import NIOPosix
import Synchronization

/// `storage.request_threads = 0`: vnodes on the node's event loops (`EventLoopStorageEnvironment`).
@Suite struct LoopExecutorTests {
    let writer = ActorID(node: "n2", epoch: 5)

    private func object(_ value: UInt8) throws -> VersionedObject {
        var o = VersionedObject()
        try o.update(context: VersionVector(), value: Sibling(value: [value], timestampMillis: UInt64(value)), actor: writer)
        return o
    }

    /// Replica writes a loop hands its vnode in one pass are applied on the loop, share one log
    /// sync run on the loop after them (every acknowledgement arrives on the loop's thread), and
    /// every acknowledged write survives a power cut that tears the log's unsynced tail.
    @Test(arguments: UInt64(1)...3)
    func writesOnALoopShareOneSyncOnTheLoopAndSurviveAPowerCut(seed: UInt64) async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let loop = group.next()
        let disk = FaultyFileSystem()
        var options = DatabaseOptions()
        options.syncMode = .always
        let environment = EventLoopStorageEnvironment(base: ThreadEnvironment(), loops: [loop])
        let backend = try await DiskBackend.open(directory: "/db", options: options, fs: disk.session(), environment: environment)
        let (v, sup, task) = try await runningVnode(backend)
        #expect(v.servesWithoutTasks)
        #expect(try await loop.submit { v.assumeIsolated { _ in true } }.get())

        let count = 20
        let syncsBefore = backend.database.statistics.logSyncs
        let answers = Box<[(key: UInt8, ok: Bool, onLoop: Bool)]>([])
        let objects = try (0..<count).map { try object(UInt8($0)) }
        loop.execute {
            for i in 0..<count {
                let accepted = v.mergeSoon(key: [UInt8(i)], object: objects[i]) { result in
                    let ok = (try? result.get()) == objects[i]
                    answers.value.withLock { $0.append((UInt8(i), ok, loop.inEventLoop)) }
                }
                if !accepted { answers.value.withLock { $0.append((UInt8(i), false, false)) } }
            }
        }
        try await settle("every write answered") { answers.value.withLock { $0.count } == count }
        let got = answers.value.withLock { $0 }
        let failed = got.filter { !$0.ok }.map { $0.key }
        let offLoop = got.filter { !$0.onLoop }.map { $0.key }
        #expect(failed.isEmpty, "writes \(failed) failed")
        #expect(offLoop.isEmpty, "writes \(offLoop) acknowledged off the loop")
        #expect(backend.database.statistics.logSyncs - syncsBefore == 1)

        // Applied on the loop, never acknowledged: may be lost.
        _ = try await loop.submit { try backend.apply(partition: PartitionID(3), key: [200], value: [1]) }.get()
        var rng = SplitMix64(seed: seed)
        disk.crash(tearing: true, rng: &rng)
        await backend.abandon()
        sup.finish(); task.cancel(); try await task.value

        var reopenOptions = DatabaseOptions()
        reopenOptions.syncMode = .always
        let reopened = try await DiskBackend.open(directory: "/db", options: reopenOptions, fs: disk.session())
        for i in 0..<count {
            let raw = try await reopened.onExecutor(of: PartitionID(3)) { try reopened.getDurable(partition: PartitionID(3), key: [UInt8(i)]) }
            let stored = try raw.map { try VersionedObject.decode($0, limits: Limits()) }
            #expect(stored == objects[i], "seed \(seed): acknowledged write \(i) lost")
        }
        try await reopened.close()
        try await group.shutdownGracefully()
    }

    /// A log sync led on a loop waits for every task queued in the same pass (the reply batches
    /// of reads answered after the write that led it), not only for those queued before it.
    @Test func aSyncLedOnALoopRunsAfterTheTasksOfItsPass() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let loop = group.next()
        let environment = EventLoopStorageEnvironment(base: ThreadEnvironment(), loops: [loop])
        _ = environment.makeRequestExecutors(label: "test")   // queues the loop's hook first
        let order = Box<[String]>([])
        let hooked = try await loop.submit {
            loop.execute { order.value.withLock { $0.append("queued before") } }
            let hooked = ThreadExecutor.runAfterBatch { order.value.withLock { $0.append("sync") } }
            loop.execute { order.value.withLock { $0.append("queued after") } }
            return hooked
        }.get()
        #expect(hooked)
        try await settle("every task ran") { order.value.withLock { $0.count } == 3 }
        #expect(order.value.withLock { $0 } == ["queued before", "queued after", "sync"])
        try await group.shutdownGracefully()
    }

    /// A loop executor orders closures and actor jobs as queued, and answers isolation checks
    /// only on its own thread.
    @Test func aLoopExecutorRunsJobsAndClosuresInOrderOnItsThread() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let loop = group.next()
        let executor = LoopExecutor(loop)
        #expect(executor.isIsolatingCurrentContext() == false)
        #expect(try await loop.submit { executor.isIsolatingCurrentContext() }.get() == true)
        let order = Box<[Int]>([])
        let counter = OnExecutor(executor)
        for i in 0..<50 {
            if i.isMultiple(of: 2) {
                executor.execute { order.value.withLock { $0.append(i) } }
            } else {
                await counter.record(i, into: order)
            }
        }
        try await settle("all ran") { order.value.withLock { $0.count } == 50 }
        #expect(order.value.withLock { $0 } == Array(0..<50))
        try await group.shutdownGracefully()
    }
}

/// An actor whose jobs run on a given executor.
private actor OnExecutor {
    let executor: LoopExecutor
    init(_ executor: LoopExecutor) { self.executor = executor }
    nonisolated var unownedExecutor: UnownedSerialExecutor { executor.asUnownedSerialExecutor() }
    /// Appends `i`, or a negative mark when not run on the loop's thread.
    func record(_ i: Int, into order: Box<[Int]>) {
        let onLoop = executor.loop.inEventLoop
        order.value.withLock { $0.append(onLoop ? i : -1) }
    }
}

fileprivate final class Box<T: Sendable>: Sendable {
    let value: Mutex<T>
    init(_ initial: T) { value = Mutex(initial) }
}
