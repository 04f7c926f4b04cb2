#!/usr/bin/env python3
"""An independent open-loop Redis client with a precise schedule, to check cairn-load's latencies.

It shares no code with cairn-load: one thread, plain non-blocking sockets, and a busy-waiting
schedule (it spins on the monotonic clock, so a request leaves within microseconds of its
intended start). Each request's latency runs from its intended start to its reply, like
cairn-load's open loop (coordinated omission corrected): a request that waits for a free
connection counts the wait.

Workload: like cairn-load's workload a against Redis: 50 % GET, 50 % SET of a `VALUE_SIZE`-byte
value, over keys k000000000000 ... (RECORDS of them, uniform). Prints one JSON object:

  {"rate": 500, "operations": {"read": {"count", "p50_us", "p99_us", "p999_us", "max_us"},
   "update": {...}}, "late_sends_over_100us": N, "errors": N, "elapsed_s": S}

  precise_client.py --port 6399 --rate 500 --duration 10 [--records 100000] [--value-size 100]
                    [--connections 16] [--seed 7]
"""
import argparse
import json
import random
import select
import socket
import sys
import time


def percentile(sorted_values, p):
    """Nearest rank: the smallest value with at least p % of the values at or below it."""
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * p // 100))  # ceil
    return sorted_values[min(int(rank), len(sorted_values)) - 1]


def command(*parts):
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


class Connection:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buf = bytearray()
        self.pending = None  # (intended_ns, op) of the request in flight

    def take_reply(self):
        """One whole RESP reply from the buffer: True (ok), False (error reply), None (incomplete)."""
        b = self.buf
        end = b.find(b"\r\n")
        if end < 0:
            return None
        kind = b[0:1]
        if kind == b"$":
            n = int(b[1:end])
            total = end + 2 + (n + 2 if n >= 0 else 0)
            if len(b) < total:
                return None
            del b[:total]
            return True
        del b[:end + 2]
        return kind != b"-"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--records", type=int, default=100000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()

    rng = random.Random(a.seed)
    value = b"v" * a.value_size
    conns = [Connection(a.port) for _ in range(a.connections)]
    by_fd = {c.sock.fileno(): c for c in conns}
    poller = select.epoll()
    for c in conns:
        poller.register(c.sock.fileno(), select.EPOLLIN)
    free = list(conns)
    lat = {"read": [], "update": []}
    errors = 0
    late = 0
    total = int(a.rate * a.duration)
    interval = 1e9 / a.rate
    clock = time.monotonic_ns
    t0 = clock() + 20_000_000  # 20 ms to settle
    issued = 0
    inflight = 0
    while issued < total or inflight:
        now = clock()
        while issued < total and free:
            intended = t0 + int(issued * interval)
            if now < intended:
                break
            if now - intended > 100_000:
                late += 1
            c = free.pop()
            key = b"k%012d" % rng.randrange(a.records)
            if rng.random() < 0.5:
                op, req = "read", command(b"GET", key)
            else:
                op, req = "update", command(b"SET", key, value)
            c.pending = (intended, op)
            c.sock.sendall(req)  # a few hundred bytes into an empty socket buffer: never blocks
            issued += 1
            inflight += 1
            now = clock()
        for fd, _ev in poller.poll(0):
            c = by_fd[fd]
            data = c.sock.recv(65536)
            if not data:
                print("connection closed by the server", file=sys.stderr)
                return 1
            c.buf += data
            while c.pending is not None:
                ok = c.take_reply()
                if ok is None:
                    break
                done = clock()
                intended, op = c.pending
                c.pending = None
                inflight -= 1
                free.append(c)
                if ok:
                    lat[op].append((done - intended) // 1000)
                else:
                    errors += 1
    elapsed = (clock() - t0) / 1e9
    out = {"rate": a.rate, "operations": {}, "late_sends_over_100us": late, "errors": errors,
           "elapsed_s": round(elapsed, 3)}
    for op, values in lat.items():
        values.sort()
        out["operations"][op] = {
            "count": len(values),
            "p50_us": percentile(values, 50), "p99_us": percentile(values, 99),
            "p999_us": percentile(values, 99.9), "max_us": values[-1] if values else 0,
        }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
