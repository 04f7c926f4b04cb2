import Testing
@testable import CairnNode

/// A direct request's steps keep their order however many there are: the first three inline,
/// the rest in the overflow array.
@Suite struct StepsTests {
    @Test(arguments: [0, 1, 2, 3, 4, 9])
    func stepsComeOutInTheOrderTheyWereAdded(count: Int) {
        var steps = Steps<Int>()
        for i in 0..<count { steps.append(i * 10) }
        #expect(Array(steps) == (0..<count).map { $0 * 10 })
        // Iterating twice gives the same again (the list is a value).
        #expect(Array(steps) == Array(steps))
    }
}
