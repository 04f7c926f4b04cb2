/// A minimal JSON writer with stable key order (the CLI's and the admin verbs' output).
public indirect enum JSON: Sendable {
    case string(String), int(Int), double(Double), bool(Bool), null, array([JSON]), object([(String, JSON)])

    public var text: String {
        switch self {
        case .string(let s): return Self.quote(s)
        case .int(let i): return "\(i)"
        case .double(let d): return d.isFinite ? "\(d)" : "null"
        case .bool(let b): return b ? "true" : "false"
        case .null: return "null"
        case .array(let a): return "[" + a.map(\.text).joined(separator: ",") + "]"
        case .object(let o): return "{" + o.map { Self.quote($0.0) + ":" + $0.1.text }.joined(separator: ",") + "}"
        }
    }

    public static func quote(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case let c where c.value < 0x20:
                let hex = String(c.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(u)
            }
        }
        return out + "\""
    }
}

extension JSON {
    /// A sibling as `cairn get --json` prints it: `value` (UTF-8 text; empty for a tombstone) or
    /// `value_base64`, `deleted`, `timestamp_ms`.
    public static func sibling(_ s: Sibling) -> JSON {
        var fields: [(String, JSON)] = []
        if s.isTombstone {
            fields.append(("value", .string("")))
        } else if let text = String(validating: s.value, as: UTF8.self) {
            fields.append(("value", .string(text)))
        } else {
            fields.append(("value_base64", .string(Base64URL.encodeStandard(s.value))))
        }
        fields.append(("deleted", .bool(s.isTombstone)))
        fields.append(("timestamp_ms", .int(Int(clamping: s.timestampMillis))))
        return .object(fields)
    }
}
