#!/usr/bin/env python3
"""log-sync.py: what writing a log ahead in zeros buys an append + fdatasync on this disk.

The write-ahead log's pattern: append a record, fdatasync, repeat. `growing` appends to the end
of a file (every sync must also record the new size); `zeroed` extends the file with zeros a
chunk at a time (storage.log_preallocate_bytes; default 1 MiB) and writes records over them, as
PosixFileSystem.createLog does. Alternates the two for ROUNDS rounds and prints latency and CPU
per append+sync, and the ratio zeroed / growing.

`log-sync.py probe N` instead measures the zeroed file alone, once by one writer and once by N
writers at once (each its own file, as N nodes on one disk each sync their own log), and prints
two lines: Benchmarks/cluster/compare.sh runs it before its systems.

Environment: DIR (where the file goes; default: the current directory, so it measures the disk
the data directory would be on), OPS (3000), RECORD (300 bytes), CHUNK (1048576), ROUNDS (3).
"""
import os
import sys
import time
from multiprocessing import Pool

DIR = os.environ.get("DIR", ".")
OPS = int(os.environ.get("OPS", "3000"))
RECORD = int(os.environ.get("RECORD", "300"))
CHUNK = int(os.environ.get("CHUNK", str(1 << 20)))
ROUNDS = int(os.environ.get("ROUNDS", "3"))


def run(chunk):
    path = os.path.join(DIR, ".cairn-log-sync-%d.bin" % os.getpid())
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size = zeroed_end = 0
        record = b"x" * RECORD
        latencies = []
        cpu0 = time.process_time()
        for _ in range(OPS):
            start = time.perf_counter()
            if chunk and size + RECORD > zeroed_end:
                target = ((size + RECORD) // chunk + 1) * chunk
                os.pwrite(fd, b"\0" * (target - zeroed_end), zeroed_end)
                zeroed_end = target
            os.pwrite(fd, record, size)
            size += RECORD
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - start)
        cpu = time.process_time() - cpu0
    finally:
        os.close(fd)
        os.remove(path)
    return latencies, cpu / OPS * 1e6


def percentiles(latencies):
    """p50, p99 and p99.9 of `latencies` (seconds), in ms."""
    latencies = sorted(latencies)
    pick = lambda q: latencies[min(len(latencies) - 1, int(len(latencies) * q))] * 1e3
    return pick(0.5), pick(0.99), pick(0.999)


def probe(writers):
    one, _ = run(CHUNK)
    with Pool(writers) as pool:
        many = [t for latencies, _ in pool.map(run, [CHUNK] * writers) for t in latencies]
    line = lambda lat: "p50 %.2f  p99 %.2f  mean %.2f ms" % (*percentiles(lat)[:2], sum(lat) / len(lat) * 1e3)
    print("disk log sync (%d-byte record + fdatasync, zeroed ahead as the log is, %d per writer; "
          "Benchmarks/storage/log-sync.py probe):" % (RECORD, OPS))
    print("  1 writer:          %s" % line(one))
    print("  %d writers at once: %s   (each of %d nodes syncing its own log)" % (writers, line(many), writers))


def measured(chunk):
    latencies, cpu = run(chunk)
    return (*percentiles(latencies), cpu)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "probe" and sys.argv[2].isdigit() and int(sys.argv[2]) > 0:
        return probe(int(sys.argv[2]))
    if len(sys.argv) > 1:
        sys.exit("usage: log-sync.py [probe N]")
    results = {"growing": [], "zeroed": []}
    for _ in range(ROUNDS):
        results["growing"].append(measured(0))
        results["zeroed"].append(measured(CHUNK))
    print("append %d B + fdatasync, %d per run, %d rounds, chunk %d B, in %s" % (RECORD, OPS, ROUNDS, CHUNK, os.path.abspath(DIR)))
    print("%-8s %8s %8s %9s %11s" % ("file", "p50 ms", "p99 ms", "p99.9 ms", "cpu µs/op"))
    mean = {}
    for name, rows in results.items():
        mean[name] = [sum(r[i] for r in rows) / len(rows) for i in range(4)]
        print("%-8s %8.3f %8.3f %9.3f %11.1f" % (name, *mean[name]))
    g, z = mean["growing"], mean["zeroed"]
    print("zeroed / growing: p50 %.2fx, p99 %.2fx, cpu %.2fx" % (z[0] / g[0], z[1] / g[1], z[3] / g[3]))


if __name__ == "__main__":
    main()
