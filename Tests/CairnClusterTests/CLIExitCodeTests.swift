import Testing
import CairnWire
import CairnTestSupport

/// Issue 10: a write whose outcome is unknown exits 3, as the README promises — including a
/// storage error from the coordinator and a reply the CLI cannot decode. Errors that certainly
/// applied nothing stay 1.
@Suite(.timeLimit(.minutes(3)))
struct CLIExitCodeTests {
    private func cairn(_ address: String, _ args: [String]) async throws -> ProcessResult {
        try await runProcess(try Repo.binary("cairn"), ["--node", address, "--timeout", "5000"] + args)
    }

    @Test(arguments: [ErrorCode.storage, .internalError])
    func aWriteThatFailedOnTheServerHasAnUnknownOutcome(code: ErrorCode) async throws {
        let server = ScriptedServer(.refuse(code))
        let address = try await server.start()
        await #expect(try cairn(address, ["put", "k", "v"]).status == 3)
        await #expect(try cairn(address, ["delete", "k"]).status == 3)
        await #expect(try cairn(address, ["get", "k"]).status == 1, "a read applies nothing: an ordinary error")
        await server.stop()
    }

    @Test func anUndecodableWriteReplyHasAnUnknownOutcome() async throws {
        let server = ScriptedServer(.undecodable)
        let address = try await server.start()
        let put = try await cairn(address, ["put", "k", "v", "--json"])
        #expect(put.status == 3)
        #expect(put.stdout.contains("\"kind\""))
        await server.stop()
    }

    @Test func aWriteThatCertainlyAppliedNothingIsAnOrdinaryError() async throws {
        let server = ScriptedServer(.refuse(.invalidArgument))
        let address = try await server.start()
        await #expect(try cairn(address, ["put", "k", "v"]).status == 1)
        await server.stop()
    }
}
