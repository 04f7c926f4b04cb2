import Testing
import CairnCore
@testable import CairnNode

@Suite struct TransportFaultsTests {
    @Test func rulesParseAndBadQueriesAreRefused() throws {
        let r = try TransportFaults.Rules(query: "block=n2,n3&delay=50&drop=10")
        #expect(r.blocked == [try NodeName("n2"), try NodeName("n3")] && r.delayMillis == 50 && r.dropPercent == 10)
        #expect(try TransportFaults.Rules(query: "") == TransportFaults.Rules())
        #expect(throws: ValidationError.self) { try TransportFaults.Rules(query: "drop=101") }
        #expect(throws: ValidationError.self) { try TransportFaults.Rules(query: "delay=-1") }
        #expect(throws: ValidationError.self) { try TransportFaults.Rules(query: "nonsense") }
    }

    /// `drop=30` loses 30 % of messages: half before delivery, half by losing the reply.
    @Test func dropsSplitEvenlyBetweenRequestsAndReplies() throws {
        let f = TransportFaults()
        var rules = TransportFaults.Rules()
        rules.dropPercent = 30
        rules.blocked = [try NodeName("n3")]
        f.set(rules)
        var requests = 0, replies = 0, passed = 0
        for _ in 0..<20_000 {
            switch f.decide(to: try NodeName("n2")) {
            case .dropRequest: requests += 1
            case .dropReply: replies += 1
            case .pass: passed += 1
            case .block: Issue.record("n2 is not blocked")
            }
        }
        #expect((2_600...3_400).contains(requests), "\(requests)")
        #expect((2_600...3_400).contains(replies), "\(replies)")
        #expect(f.decide(to: try NodeName("n3")) == .block)
    }
}
