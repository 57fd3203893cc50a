#!/usr/bin/env python3
"""Summarise bench.sh results (JSON lines from chat-loadgen, tagged with stack and bench) into
summary.json and summary.md in the output directory.

Usage: bench_summary.py RESULTS_JSONL OUT_DIR
"""

import json
import sys
from collections import defaultdict
from pathlib import Path


def ms(us):
    return round(us / 1000.0, 2)


def node_cpu(report, key="processes"):
    """CPU seconds of the gateway/peer nodes (everything watched except redis)."""
    return round(sum(p["cpu_seconds"] for p in report.get(key, []) if p["label"] != "redis"), 3)


def redis_cpu(report, key="processes"):
    return round(sum(p["cpu_seconds"] for p in report.get(key, []) if p["label"] == "redis"), 3)


def fanout_row(r):
    delivered = r["delivered"]
    cpu = node_cpu(r)
    return {
        "stack": r["stack"],
        "rate_per_sender": r["rate_per_sender"],
        "senders": r["senders"],
        "members": r["members"],
        "sent": r["sent"],
        "expected": r["expected"],
        "delivered": delivered,
        "delivery_ratio": r["delivery_ratio"],
        "lost": r["lost"],
        "duplicates": r["duplicates"],
        "delivered_per_s": r["delivered_per_s"],
        "p50_ms": ms(r["latency_us"]["p50_us"]),
        "p99_ms": ms(r["latency_us"]["p99_us"]),
        "p999_ms": ms(r["latency_us"]["p999_us"]),
        "max_ms": ms(r["latency_us"]["max_us"]),
        "cross_node_p99_ms": ms(r["latency_cross_node_us"]["p99_us"]),
        "node_cpu_s": cpu,
        "redis_cpu_s": redis_cpu(r),
        "loadgen_cpu_s": r["loadgen_cpu_s"],
        "node_cpu_us_per_delivery": round(cpu * 1e6 / delivered, 2) if delivered else None,
        "disconnects": r["disconnects"],
        "connect_failures": r["connect"]["failed"],
    }


def publish_row(r):
    row = fanout_row(r)
    sent = r["sent"]
    row["bench"] = r["bench"]
    row["redis_cpu_us_per_message"] = round(row["redis_cpu_s"] * 1e6 / sent, 2) if sent else None
    return row


def memory_row(r):
    per = {p["label"]: p for p in r["rss_per_connection"]}
    nodes = [p for label, p in per.items() if label not in ("redis", "all")]
    total_before = sum(p["rss_kib_before"] for p in nodes)
    total_after = sum(p["rss_kib_after"] for p in nodes)
    connected = r["connect"]["connected"]
    return {
        "stack": r["stack"],
        "connections": r["connections"],
        "connected": connected,
        "open_at_end": r["open_at_end"],
        "nodes_rss_mib_before": round(total_before / 1024, 1),
        "nodes_rss_mib_after": round(total_after / 1024, 1),
        "bytes_per_connection": round((total_after - total_before) * 1024 / connected) if connected else None,
        "per_node_bytes_per_connection": {p["label"]: p["bytes_per_connection"] for p in nodes},
        "connect_s": r["connect"]["elapsed_s"],
        "connect_cpu_s": node_cpu(r, "processes_connect"),
        "hold_cpu_s": node_cpu(r, "processes_hold"),
        "hold_s": r["hold_s"],
        "loadgen_bytes_per_connection": r["loadgen_bytes_per_connection"],
        "failures": r["connect"]["failures"],
        "disconnects": r["disconnects"],
    }


def storm_row(r):
    c = r["connect"]
    return {
        "stack": r["stack"],
        "connections": r["connections"],
        "concurrency": r["concurrency"],
        "connected": c["connected"],
        "accepted_per_s": r["accepted_per_s"],
        "elapsed_s": c["elapsed_s"],
        "setup_p50_ms": ms(c["setup_latency_us"]["p50_us"]),
        "setup_p99_ms": ms(c["setup_latency_us"]["p99_us"]),
        "failures": c["failures"],
        "node_cpu_s": node_cpu(r),
        "redis_cpu_s": redis_cpu(r),
        "loadgen_cpu_s": r["loadgen_cpu_s"],
    }


def table(rows, columns):
    if not rows:
        return "_no results_\n"
    head = "| " + " | ".join(title for title, _ in columns) + " |\n"
    sep = "|" + "|".join(" --- " for _ in columns) + "|\n"
    body = ""
    for row in rows:
        cells = []
        for _, key in columns:
            v = row.get(key)
            if isinstance(v, dict):
                v = " ".join(f"{k}={n}" for k, n in v.items()) or "–"
            cells.append("–" if v is None else str(v))
        body += "| " + " | ".join(cells) + " |\n"
    return head + sep + body


def main():
    results_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    reports = [json.loads(l) for l in results_path.read_text().splitlines() if l.strip()]
    by_bench = defaultdict(list)
    for r in reports:
        by_bench[r["bench"]].append(r)

    summary = {
        "fanout": [fanout_row(r) for r in by_bench.get("fanout", [])],
        "bigroom": [fanout_row(r) for r in by_bench.get("bigroom", [])],
        "memory": [memory_row(r) for b, rs in sorted(by_bench.items()) if b.startswith("memory-") for r in rs],
        "storm": [storm_row(r) for r in by_bench.get("storm", [])],
        "publish": [publish_row(r) for b, rs in sorted(by_bench.items()) if b.startswith("publish-") for r in rs],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    fan_cols = [
        ("stack", "stack"), ("msg/s per sender", "rate_per_sender"), ("sent", "sent"),
        ("expected", "expected"), ("delivered", "delivery_ratio"), ("lost", "lost"),
        ("dup", "duplicates"), ("deliveries/s", "delivered_per_s"), ("p50 ms", "p50_ms"),
        ("p99 ms", "p99_ms"), ("p99.9 ms", "p999_ms"), ("cross-node p99 ms", "cross_node_p99_ms"),
        ("node CPU s", "node_cpu_s"), ("redis CPU s", "redis_cpu_s"), ("loadgen CPU s", "loadgen_cpu_s"),
        ("node CPU µs/delivery", "node_cpu_us_per_delivery"), ("closed", "disconnects"),
    ]
    mem_cols = [
        ("stack", "stack"), ("connections", "connections"), ("connected", "connected"),
        ("open at end", "open_at_end"), ("nodes RSS MiB before", "nodes_rss_mib_before"),
        ("after", "nodes_rss_mib_after"), ("bytes/conn", "bytes_per_connection"),
        ("per node", "per_node_bytes_per_connection"), ("connect s", "connect_s"),
        ("connect CPU s", "connect_cpu_s"), ("idle CPU s", "hold_cpu_s"), ("failures", "failures"),
    ]
    storm_cols = [
        ("stack", "stack"), ("connections", "connections"), ("in flight", "concurrency"),
        ("connected", "connected"), ("accepted/s", "accepted_per_s"), ("setup p50 ms", "setup_p50_ms"),
        ("setup p99 ms", "setup_p99_ms"), ("failures", "failures"), ("node CPU s", "node_cpu_s"),
        ("redis CPU s", "redis_cpu_s"), ("loadgen CPU s", "loadgen_cpu_s"),
    ]
    pub_cols = [
        ("stack", "stack"), ("bench", "bench"), ("published", "sent"), ("delivered", "delivery_ratio"),
        ("lost", "lost"), ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"), ("node CPU s", "node_cpu_s"),
        ("redis CPU s", "redis_cpu_s"), ("redis CPU µs/message", "redis_cpu_us_per_message"),
    ]
    md = "# Benchmark summary\n\n"
    md += ("Two nodes per stack on one machine, each stack with its own fresh redis-server; "
           "chat-loadgen on the same machine (its CPU is listed: the machine is shared).\n\n")
    md += "## Fan-out: 1,000 clients, 10 rooms split across both nodes, 1 sender per room, 64 B\n\n"
    md += table(summary["fanout"], fan_cols) + "\n"
    md += "## One room of 2,000 members across both nodes, 1 sender at 20 msg/s\n\n"
    md += table(summary["bigroom"], fan_cols) + "\n"
    md += "## Memory: idle connections\n\n"
    md += table(summary["memory"], mem_cols) + "\n"
    md += "## Connection storm\n\n"
    md += table(summary["storm"], storm_cols) + "\n"
    md += "## Publish: 500 rooms of 2 members, 10k messages/s\n\n"
    md += table(summary["publish"], pub_cols)
    (out_dir / "summary.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
