#!/usr/bin/env python3
"""Helpers for forward.sh, the forwarding benchmark.

Subcommands:
  ports tcp|udp N            print N free 127.0.0.1 ports, one a line
  serve PORT                 the time-to-first-byte target: for each
                             connection, read one line, answer "+PONG\\r\\n"
                             at once, close (one connection at a time)
  ttfb PORT N PATH           N sequential connections to 127.0.0.1:PORT,
                             each: connect, send "PING\\r\\n", time the first
                             byte of the answer (from before connect), read
                             to EOF, close; prints result lines for PATH
  iperf FILE PATH            result line from `iperf3 -J` output
  redis FILE PATH            result lines from `redis-benchmark --csv` output
  quinn FILE                 result line from `qmesh-bench --json` output
  report RESULTS MACHINE RUNS   print the table and the targets

A result line is "PATH METRIC VALUE"; the report takes the median of a
metric's values per path.
"""

import csv
import json
import math
import socket
import statistics
import sys
import time

PATHS = [
    ("plain", "plain"),
    ("qmesh-direct", "qmesh direct"),
    ("qmesh-relay", "qmesh relayed"),
    ("rathole-noise", "rathole noise"),
    ("rathole-tcp", "rathole tcp"),
]

# (metric, label, unit, higher is better)
METRICS = [
    ("iperf_gbps", "iperf3 TCP, 5 s", "Gbit/s", True),
    ("redis_set_ops", "redis-benchmark SET", "ops/s", True),
    ("redis_get_ops", "redis-benchmark GET", "ops/s", True),
    ("redis_set_p50_ms", "redis-benchmark SET p50", "ms", False),
    ("redis_get_p50_ms", "redis-benchmark GET p50", "ms", False),
    ("ttfb_p50_us", "first byte p50, 1000 conns", "µs", False),
    ("ttfb_p99_us", "first byte p99, 1000 conns", "µs", False),
]

WARMUP = 20


def ports(kind, n):
    socks = []
    kind = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    for _ in range(n):
        s = socket.socket(socket.AF_INET, kind)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    for s in socks:
        print(s.getsockname()[1])
    for s in socks:
        s.close()


def serve(port):
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(128)
    print(f"ttfb target listening on 127.0.0.1:{port}", flush=True)
    while True:
        conn, _ = ls.accept()
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(5)
            buf = b""
            while b"\n" not in buf:
                chunk = conn.recv(64)
                if not chunk:
                    break
                buf += chunk
            if buf:
                conn.sendall(b"+PONG\r\n")
        except OSError:
            pass
        finally:
            conn.close()


def one(port):
    t0 = time.perf_counter_ns()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"PING\r\n")
        first = s.recv(1)
        t1 = time.perf_counter_ns()
        if not first:
            raise OSError("closed before the first byte")
        while s.recv(4096):
            pass
    finally:
        s.close()
    return (t1 - t0) / 1000.0


def percentile(xs, p):
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, math.ceil(p / 100.0 * len(xs)) - 1))
    return xs[k]


def ttfb(port, n, path):
    for _ in range(WARMUP):
        one(port)
    times = [one(port) for _ in range(n)]
    print(f"{path} ttfb_p50_us {percentile(times, 50):.1f}")
    print(f"{path} ttfb_p99_us {percentile(times, 99):.1f}")


def iperf(file, path):
    with open(file) as f:
        data = json.load(f)
    if "error" in data:
        raise SystemExit(f"iperf3: {data['error']}")
    bps = data["end"]["sum_received"]["bits_per_second"]
    print(f"{path} iperf_gbps {bps / 1e9:.3f}")


def redis(file, path):
    with open(file) as f:
        rows = list(csv.DictReader(f))
    seen = set()
    for row in rows:
        test = row["test"].lower()
        if test in ("set", "get"):
            seen.add(test)
            print(f"{path} redis_{test}_ops {float(row['rps']):.1f}")
            print(f"{path} redis_{test}_p50_ms {float(row['p50_latency_ms']):.3f}")
    if seen != {"set", "get"}:
        raise SystemExit(f"redis-benchmark: no SET and GET rows in {file}")


def quinn(file):
    with open(file) as f:
        data = json.load(f)
    for row in data["rows"]:
        if row["case"].startswith("bulk") and "direct vs best raw" in row["case"]:
            print(f"quinn raw_bulk_mbs {row['baseline']:.1f}")
            print(f"quinn qmesh_direct_bulk_mbs {row['qmesh']:.1f}")
            return
    raise SystemExit(f"qmesh-bench: no direct bulk row in {file}")


def load_all(results):
    vals = {}
    with open(results) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 3:
                continue
            path, metric, value = parts
            vals.setdefault((path, metric), []).append(float(value))
    return vals


def fmt(x):
    if x is None:
        return "failed"
    if x >= 1000:
        return f"{x:.0f}"
    if x >= 100:
        return f"{x:.1f}"
    if x >= 10:
        return f"{x:.2f}"
    return f"{x:.3f}"


def report(results, machine, runs):
    every = load_all(results)
    v = {k: statistics.median(xs) for k, xs in every.items()}
    print(f"qmesh forwarding bench on {machine}; {runs} run(s) per figure, median")
    print("ratio: the figure over the plain (no tunnel) figure")
    head = f"{'workload':<28} {'unit':<7}"
    for _, label in PATHS:
        head += f" {label:>20}"
    print(head)
    for metric, label, unit, _ in METRICS:
        base = v.get(("plain", metric))
        line = f"{label:<28} {unit:<7}"
        for path, _ in PATHS:
            x = v.get((path, metric))
            if path == "plain" or x is None or not base:
                cell = fmt(x)
            else:
                cell = f"{fmt(x)} {x / base:5.2f}x"
            line += f" {cell:>20}"
        print(line)

    raw_mbs = v.get(("quinn", "raw_bulk_mbs"))
    raw_gbps = raw_mbs * 8 / 1000 if raw_mbs is not None else None
    if raw_mbs is not None:
        print(
            f"raw quinn bulk (qmesh-bench --only bulk --runs 1 in each round): {raw_mbs:.1f} MB/s "
            f"(10^6 bytes/s) = {raw_gbps:.2f} Gbit/s; qmesh direct channel in the "
            f"same run: {v.get(('quinn', 'qmesh_direct_bulk_mbs'), float('nan')):.1f} MB/s"
        )
    else:
        print("raw quinn bulk (qmesh-bench): failed")

    print("targets:")
    checks = []
    for op in ("set", "get"):
        d = v.get(("qmesh-direct", f"redis_{op}_ops"))
        r = v.get(("qmesh-relay", f"redis_{op}_ops"))
        n = v.get(("rathole-noise", f"redis_{op}_ops"))
        checks.append((f"redis {op.upper()} ops/s, qmesh direct >= rathole noise",
                       d, n, 1.0, True, "ops/s"))
        checks.append((f"redis {op.upper()} ops/s, qmesh relayed >= 0.8x rathole noise",
                       r, n, 0.8, True, "ops/s"))
    checks.append(("iperf3, qmesh direct >= 0.8x raw quinn bulk",
                   v.get(("qmesh-direct", "iperf_gbps")), raw_gbps, 0.8, True, "Gbit/s"))
    checks.append(("first byte p50, qmesh direct <= rathole noise",
                   v.get(("qmesh-direct", "ttfb_p50_us")),
                   v.get(("rathole-noise", "ttfb_p50_us")), 1.0, False, "µs"))
    missed = 0
    for label, x, ref, factor, higher, unit in checks:
        if x is None or ref is None:
            print(f"  {label:<56} no figure                                 MISSED")
            missed += 1
            continue
        ok = x >= factor * ref if higher else x <= factor * ref
        missed += 0 if ok else 1
        against = fmt(ref) if factor == 1.0 else f"{factor}x {fmt(ref)} = {fmt(factor * ref)}"
        print(f"  {label:<56} {fmt(x):>9} vs {against:<26} {unit:<6} "
              f"({x / ref:.2f}x)  {'ok' if ok else 'MISSED'}")
    print(f"{len(checks) - missed} of {len(checks)} targets held")
    if int(runs) > 1:
        print("each round, for the targets' figures:")
        for path, metric in [
            ("qmesh-direct", "redis_set_ops"), ("qmesh-relay", "redis_set_ops"),
            ("rathole-noise", "redis_set_ops"),
            ("qmesh-direct", "redis_get_ops"), ("qmesh-relay", "redis_get_ops"),
            ("rathole-noise", "redis_get_ops"),
            ("qmesh-direct", "iperf_gbps"), ("quinn", "raw_bulk_mbs"),
            ("qmesh-direct", "ttfb_p50_us"), ("rathole-noise", "ttfb_p50_us"),
        ]:
            xs = " ".join(fmt(x) for x in every.get((path, metric), []))
            print(f"  {path + ' ' + metric:<32} {xs}")


def main(argv):
    if len(argv) < 2:
        raise SystemExit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "ports":
        ports(args[0], int(args[1]))
    elif cmd == "serve":
        serve(int(args[0]))
    elif cmd == "ttfb":
        ttfb(int(args[0]), int(args[1]), args[2])
    elif cmd == "iperf":
        iperf(args[0], args[1])
    elif cmd == "redis":
        redis(args[0], args[1])
    elif cmd == "quinn":
        quinn(args[0])
    elif cmd == "report":
        report(args[0], args[1], args[2])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
