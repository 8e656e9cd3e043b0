#!/usr/bin/env python3
"""One closed-loop client on the Python `etcd3` package (grpc C-core): put or get for a fixed
time against one endpoint; prints a JSON line with throughput and latency percentiles.
Used by bench_vs_etcd.py; needs `pip install etcd3 'protobuf<4'`."""
import json
import sys
import time

import etcd3

endpoint, op, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
host, port = endpoint.rsplit(":", 1)
client = etcd3.client(host=host, port=int(port), timeout=10)
value = "v" * 256
latencies = []
deadline = time.monotonic() + seconds
i = 0
while time.monotonic() < deadline:
    key = f"py/{i % 10000:08d}"
    began = time.perf_counter()
    if op == "put":
        client.put(key, value)
    else:
        client.get(key)
    latencies.append((time.perf_counter() - began) * 1000)
    i += 1
latencies.sort()
pick = lambda q: latencies[int(q * (len(latencies) - 1))]
print(json.dumps({"op": op, "clients": 1, "ops": len(latencies),
                  "throughput_per_second": len(latencies) / seconds,
                  "latency_ms": {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99),
                                 "p99.9": pick(0.999), "max": latencies[-1]}}))
