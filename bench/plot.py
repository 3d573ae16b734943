#!/usr/bin/env python3
"""Latency against delivered rate, from `herald-bench fanout --json` files.

    python3 bench/plot.py herald-fanout.json socketio-fanout.json \
        [-o docs/bench-latency.png]

A `fanout --vs-socketio` report counts as its two reports.

One pair of lines per system (the report's target and edges; the steps of
several files of the same system are merged): p99 (solid) and p50 (dashed)
end-to-end latency of each `rate_<r>` step against its delivered messages
per second, log y-axis. Needs matplotlib.
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "cluster": "Herald (cluster)",
    "dev": "Herald (dev)",
    "socketio": "Socket.IO 4 + Redis adapter",
}


def steps(report):
    """(delivered/s, p50 ms, p99 ms) of each rate step, by delivered rate."""
    points = []
    for name, section in report["results"].items():
        if not name.startswith("rate_"):
            continue
        lat = section.get("latency_ms") or {}
        if lat.get("p99") is None:
            continue
        points.append((section["delivered_per_sec"], lat["p50"], lat["p99"]))
    return sorted(points)


def label(report):
    target = report.get("target", "?")
    edges = report.get("params", {}).get("edges")
    name = LABELS.get(target, target)
    if edges and target != "dev":
        name += f", {edges} {'servers' if target == 'socketio' else 'edges'}"
    return name


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="fanout JSON reports")
    parser.add_argument("-o", "--output", default="docs/bench-latency.png")
    parser.add_argument("--bar-ms", type=float, default=50.0,
                        help="draw a horizontal line at this p99 (0: none)")
    args = parser.parse_args()

    systems = {}
    for path in args.reports:
        with open(path) as f:
            report = json.load(f)
        both = [report[k] for k in ("herald", "socketio") if k in report]
        for report in both or [report]:
            if report.get("scenario") != "fanout":
                raise SystemExit(f"{path}: not a fanout report")
            pts = steps(report)
            if not pts:
                raise SystemExit(f"{path}: no rate steps with latencies")
            systems.setdefault(label(report), []).extend(pts)

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for i, (name, pts) in enumerate(systems.items()):
        pts.sort()
        x = [p[0] / 1000 for p in pts]
        color = colors[i % len(colors)]
        ax.plot(x, [p[2] for p in pts], "o-", color=color,
                label=f"{name}: p99")
        ax.plot(x, [p[1] for p in pts], "s--", color=color, alpha=0.7,
                label=f"{name}: p50")
    if args.bar_ms > 0:
        ax.axhline(args.bar_ms, color="grey", linewidth=0.8, linestyle=":")
        ax.annotate(f"p99 {args.bar_ms:g} ms", (0.01, args.bar_ms),
                    xycoords=("axes fraction", "data"), fontsize=8,
                    color="grey", va="bottom")
    ax.set_yscale("log")
    ax.set_xlabel("delivered messages per second (thousands)")
    ax.set_ylabel("publish → delivered latency (ms, log)")
    ax.set_title("Fan-out latency against delivered rate (one 2-core machine)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
