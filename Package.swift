// swift-tools-version:6.1
import PackageDescription

let strict: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("InternalImportsByDefault"),
]

let package = Package(
    name: "Cairn",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "CairnCore", targets: ["CairnCore"]),
        .library(name: "CairnRing", targets: ["CairnRing"]),
        .library(name: "CairnAntiEntropy", targets: ["CairnAntiEntropy"]),
        .library(name: "CairnWire", targets: ["CairnWire"]),
        .library(name: "CairnNode", targets: ["CairnNode"]),
        .library(name: "CairnSim", targets: ["CairnSim"]),
        .executable(name: "cairn-sim", targets: ["cairn-sim"]),
        .library(name: "CairnClient", targets: ["CairnClient"]),
        .executable(name: "cairnd", targets: ["cairnd"]),
        .executable(name: "cairn", targets: ["cairn"]),
        .library(name: "CairnLoad", targets: ["CairnLoad"]),
        .library(name: "CairnStorage", targets: ["CairnStorage"]),
        .executable(name: "cairn-load", targets: ["cairn-load"]),
        .executable(name: "cairn-db-bench", targets: ["cairn-db-bench"]),
        .executable(name: "cairn-torture", targets: ["cairn-torture"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
        .package(url: "https://github.com/x-sheep/swift-property-based.git", from: "2.0.1"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", from: "0.2.0"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "3.12.3"),
    ],
    targets: [
        // Pure: no I/O, no NIO.
        .target(name: "CairnCore", swiftSettings: strict),
        .target(name: "CairnRing", dependencies: ["CairnCore"], swiftSettings: strict),
        // Pure: SWIM failure detection with Lifeguard's refinements (living membership builds on it).
        .target(name: "CairnMembership", dependencies: ["CairnCore"], swiftSettings: strict),
        // Pure: anti-entropy's hash trees, exchange machine and its messages.
        .target(name: "CairnAntiEntropy", dependencies: ["CairnCore", "CairnRing"], swiftSettings: strict),
        // Codec (pure over ByteBuffer) and NIO framing / multiplexing handlers.
        .target(name: "CairnWire", dependencies: [
            "CairnCore",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "DequeModule", package: "swift-collections"),
        ], swiftSettings: strict),
        // libsystemd's sd_notify / sd_watchdog_enabled (package libsystemd-dev).
        .systemLibrary(name: "CSystemd", pkgConfig: "libsystemd", providers: [.apt(["libsystemd-dev"])]),
        // Shells: vnodes, coordinators, transport, supervisor, config, HTTP, systemd notify.
        // Deterministic simulation: a seeded executor driving real nodes on virtual time.
        .target(name: "CairnSim", dependencies: [
            "CairnNode", "CairnCore", "CairnWire", "CairnClient", "CairnTorture", "CairnMembership", "CairnAntiEntropy",
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: strict),
        .target(name: "CairnNode", dependencies: [
            "CairnCore", "CairnRing", "CairnMembership", "CairnWire", "CSystemd", "CairnStorage", "CairnAntiEntropy", "CStorageSupport",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            // HMAC-SHA256 for the internode handshake's cluster secret proof.
            .product(name: "Crypto", package: "swift-crypto"),
        ], swiftSettings: strict),
        .target(name: "CairnClient", dependencies: [
            "CairnCore", "CairnWire",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: strict),
        // What cairnd runs (config, ServiceGroup, signals); shared with test-only daemons.
        .target(name: "CairnDaemon", dependencies: [
            "CairnNode",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "UnixSignals", package: "swift-service-lifecycle"),
        ], swiftSettings: strict),
        .executableTarget(name: "cairnd", dependencies: [
            "CairnDaemon",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], swiftSettings: strict),
        // Test support: cairnd with a backend that loses every tenth acknowledged write
        // (cairn-torture's self-test must catch it).
        .executableTarget(name: "cairnd-lossy", dependencies: ["CairnDaemon", "CairnNode", "CairnCore", "CairnSim"],
                          path: "Tests/LossyNode", swiftSettings: strict),
        .executableTarget(name: "cairn", dependencies: [
            "CairnClient", "CairnCore",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], swiftSettings: strict),

        // The LSM storage engine: standalone, knows nothing of the cluster; file I/O behind `FileSystem`.
        .target(name: "CairnStorage", dependencies: ["CStorageSupport"], swiftSettings: strict),
        // C helpers: CRC-32C with the CPU's CRC32 instruction (SSE 4.2, checked at run time), malloc_trim, sync_file_range,
        // thread names and timer slack.
        .target(name: "CStorageSupport"),
        .testTarget(name: "CairnStorageTests", dependencies: ["CairnStorage", "CairnProcess"], swiftSettings: strict),
        // db_bench's language over CairnStorage (Benchmarks/storage/compare-rocksdb.sh).
        .executableTarget(name: "cairn-db-bench", dependencies: [
            "CairnStorage", "CairnCore", .product(name: "Histogram", package: "hdrhistogram-swift"),
        ], path: "Benchmarks/storage/cairn-db-bench", swiftSettings: strict),
        // Test support: writes under `always` and reports each acknowledged key, until killed.
        .executableTarget(name: "cairn-crash-writer", dependencies: ["CairnStorage"], path: "Tests/CrashWriter", swiftSettings: strict),

        // The traffic generator: workloads, key choosers, targets (cairn, redis, etcd), reports.
        .target(name: "CairnLoad", dependencies: [
            "CairnClient", "CairnCore", "CairnRing", "CStorageSupport",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Histogram", package: "hdrhistogram-swift"),
            .product(name: "DequeModule", package: "swift-collections"),
        ], swiftSettings: strict),
        .executableTarget(name: "cairn-load", dependencies: [
            "CairnLoad",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], swiftSettings: strict),

        // The fault harness: namespaces + nft partitions, nemesis, set workload, checker.
        // Child processes without Foundation's Process (see ChildProcess): harnesses and tests.
        .target(name: "CairnProcess", dependencies: ["CStorageSupport"], swiftSettings: strict),
        .target(name: "CairnTorture", dependencies: ["CairnClient", "CairnCore", "CairnProcess"], swiftSettings: strict),
        .executableTarget(name: "cairn-torture", dependencies: ["CairnTorture"], swiftSettings: strict),
        .testTarget(name: "CairnTortureTests", dependencies: ["CairnTorture", "CairnProcess"], swiftSettings: strict),

        .testTarget(name: "CairnLoadTests", dependencies: [
            "CairnProcess",
            "CairnLoad", "CairnNode", "CairnCore", "CairnClient",
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: strict),
        .testTarget(name: "CairnCoreTests", dependencies: [
            "CairnCore", .product(name: "PropertyBased", package: "swift-property-based"),
        ], swiftSettings: strict),
        .testTarget(name: "CairnRingTests", dependencies: ["CairnRing", "CairnCore"], swiftSettings: strict),
        .testTarget(name: "CairnAntiEntropyTests", dependencies: ["CairnAntiEntropy", "CairnCore"], swiftSettings: strict),
        .testTarget(name: "CairnMembershipTests", dependencies: ["CairnMembership", "CairnCore"], swiftSettings: strict),
        .testTarget(name: "CairnWireTests", dependencies: [
            "CairnWire", "CairnCore", .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOEmbedded", package: "swift-nio"),
        ], swiftSettings: strict),
        .executableTarget(name: "cairn-sim", dependencies: [
            "CairnSim", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], swiftSettings: strict),
        .testTarget(name: "CairnSimTests", dependencies: [
            "CairnSim", "CairnNode", "CairnCore", "CairnWire", "CairnRing", "CairnTestSupport",
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: strict),
        .testTarget(name: "CairnNodeTests", dependencies: [
            "CairnNode", "CairnCore", "CairnRing", "CairnWire", "CairnStorage", "CairnTestSupport",
        ], swiftSettings: strict),
        // Shared by test targets: a scripted node stand-in, and running the built binaries.
        .target(name: "CairnTestSupport", dependencies: [
            "CairnCore", "CairnWire", "CairnProcess",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ], path: "Tests/CairnTestSupport", swiftSettings: strict),
        .testTarget(name: "CairnClientTests", dependencies: [
            "CairnClient", "CairnCore", "CairnWire", "CairnTestSupport",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ], swiftSettings: strict),
        // Real nodes on loopback: in-process and as cairnd processes.
        .testTarget(name: "CairnClusterTests", dependencies: [
            "CairnNode", "CairnClient", "CairnCore", "CairnWire", "CairnRing", "CairnTestSupport", "CairnSim", "CairnProcess",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: strict),
    ],
    swiftLanguageModes: [.v6]
)
