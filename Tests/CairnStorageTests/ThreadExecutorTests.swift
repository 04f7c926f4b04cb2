import Foundation
import Testing
@testable import CairnStorage

@Suite struct ThreadExecutorTests {
    /// The calling thread's nice value, from /proc (field 19 of its stat line; Linux only).
    private static func currentNice() -> Int? {
        guard let stat = try? String(contentsOfFile: "/proc/thread-self/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return nil }
        // Fields after "pid (comm)" start at field 3; nice is field 19.
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        return fields.count > 16 ? Int(fields[16]) : nil
    }

    private static func niceOn(_ executor: ThreadExecutor) async -> Int? {
        await withCheckedContinuation { c in executor.execute { c.resume(returning: currentNice()) } }
    }

    /// A worker's thread runs at the environment's background nice value; request threads and
    /// a default executor keep the process's own.
    @Test func workerThreadsRunAtTheBackgroundNiceValue() async throws {
        try #require(Self.currentNice() != nil, "no /proc/thread-self/stat here")
        let own = try #require(Self.currentNice())
        let environment = ThreadEnvironment(requestThreads: 1, backgroundNice: 7)
        let worker = try #require(environment.makeWorkerExecutor(label: "t-worker") as? ThreadExecutor)
        // Raising nice is always allowed; a process already past 7 may not be allowed to lower it.
        let nice = try #require(await Self.niceOn(worker))
        #expect(own <= 7 ? nice == 7 : (7...own).contains(nice), "worker at \(nice), process at \(own)")
        let request = try #require(environment.makeRequestExecutors(label: "t-request").first as? ThreadExecutor)
        #expect(await Self.niceOn(request) == own)
        #expect(await Self.niceOn(ThreadExecutor(label: "t-plain")) == own)
        #expect(ThreadEnvironment(backgroundNice: 40).backgroundNice == 19)
    }

    /// Work queued with `runAfterBatch` runs when the batch that queued it ends, before jobs
    /// queued since: a queue that keeps filling cannot postpone it (a log sync led there).
    @Test func workAfterABatchRunsBeforeJobsQueuedSince() async {
        let executor = ThreadExecutor(label: "t-batch", runsAfterBatchWork: true)
        let order = Shared<[String]>([])
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            executor.execute {
                order.value.withLock { $0.append("first") }
                #expect(ThreadExecutor.runAfterBatch { order.value.withLock { $0.append("after the batch") } })
                executor.execute {
                    order.value.withLock { $0.append("queued during the batch") }
                    done.resume()
                }
            }
        }
        #expect(order.value.withLock { $0 } == ["first", "after the batch", "queued during the batch"])
    }
}
