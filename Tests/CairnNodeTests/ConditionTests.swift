import Testing
@testable import CairnNode
import Synchronization

/// Waiting on a condition instead of polling it: a notify re-checks, the deadline is the
/// node's clock's.
@Suite struct ConditionTests {
    @Test func aWaitEndsWhenANotifyMakesThePredicateTrue() async throws {
        let clock = ManualClock()
        let condition = Condition()
        let value = Atomic<Int>(0)
        let waiter = Task { await condition.wait(until: { value.load(ordering: .relaxed) == 2 }, deadline: clock.now() + .seconds(10), clock: clock) }
        try await settle("the waiter sleeps until its deadline") { clock.sleeping == 1 }
        value.store(1, ordering: .relaxed)
        condition.notifyAll()
        try await settle("the waiter re-checked and sleeps again") { clock.sleeping == 1 }
        value.store(2, ordering: .relaxed)
        condition.notifyAll()
        #expect(await waiter.value)
        #expect(clock.elapsed == .zero, "no time had to pass")
    }

    @Test func aWaitEndsFalseAtTheDeadline() async throws {
        let clock = ManualClock()
        let condition = Condition()
        let waiter = Task { await condition.wait(until: { false }, deadline: clock.now() + .seconds(3), clock: clock) }
        try await settle("the waiter sleeps") { clock.sleeping == 1 }
        clock.advance(by: .seconds(3))
        #expect(await waiter.value == false)
    }
}
