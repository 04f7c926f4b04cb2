/// A `host:port` pair. IPv6 hosts are written in brackets: `[::1]:7401`.
public struct HostPort: Hashable, Sendable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    public init(parsing text: String) throws(ValidationError) {
        let t = text.trimmingSpaces
        var host: Substring
        var portText: Substring
        if t.hasPrefix("[") {
            guard let close = t.firstIndex(of: "]"), t[t.index(after: close)...].hasPrefix(":") else {
                throw ValidationError("'\(text)' is not [ipv6]:port")
            }
            host = t[t.index(after: t.startIndex)..<close]
            portText = t[t.index(close, offsetBy: 2)...]
        } else {
            guard let colon = t.lastIndex(of: ":") else { throw ValidationError("'\(text)' is not host:port") }
            host = t[..<colon]
            portText = t[t.index(after: colon)...]
        }
        guard !host.isEmpty, let port = Int(portText), (0...65535).contains(port) else {
            throw ValidationError("'\(text)' is not host:port with a port 0...65535")
        }
        self.host = String(host)
        self.port = port
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

extension StringProtocol {
    /// The string without leading and trailing whitespace.
    package var trimmingSpaces: Substring {
        let s = Substring(self)
        guard let start = s.firstIndex(where: { !$0.isWhitespace }), let end = s.lastIndex(where: { !$0.isWhitespace }) else {
            return s[s.endIndex...]
        }
        return s[start...end]
    }
}
