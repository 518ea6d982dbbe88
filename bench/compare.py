"""Our broker beside NATS JetStream, same machine, same durability, one run.

    ./scripts/bench [--rounds 3] [--out docs/bench] [--quick] [--only PHASES]

Rounds alternate the systems (ours, NATS, ours, NATS, ...). In each round every
phase runs once per system, on fresh 3-node clusters (one for most phases, one
for the large payloads) that are stopped before the other system starts, so the
other system is never running during a measurement. Both
acknowledge a publish only once it is fsynced on a majority (ours always; NATS
with ``sync_interval: always``, R3, file storage).

Each figure is the median over rounds, with min..max; ratios are ours divided
by NATS (for throughput above 1 is better, for latency below 1 is better). CPU
is recorded per process for every phase (bench/measure.py), so a phase where
the Python client is the ceiling says so. The phases are in bench/systems.py.

Output: a table on stdout, and with --out: latest.json (every sample),
latest.md (the table) and latest.png (the ratios). ``--quick`` is the CI mode:
one round, small counts, about 30 s of measuring.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import measure  # noqa: E402
from bench.systems import Nats, Ours, Plan, phase_groups, phase_names  # noqa: E402

# Per round and cluster, our Raft journal takes about 45 MB with these counts,
# under the 64 MiB that forces a snapshot.
FULL = Plan(sync_events=3000, pipelined_events=20_000, consume_events=10_000,
            e2e_s=5.0, large_events={8192: 2000, 65536: 400}, publishers_s=3.0,
            cross_events=10_000, phase_s_max=15.0)
QUICK = Plan(sync_events=300, pipelined_events=3000, consume_events=2000,
             e2e_s=1.0, large_events={8192: 400, 65536: 100}, publishers_s=1.0,
             cross_events=2000, phase_s_max=5.0)
# Before each sample, wait at most this long for the machine to drop below this
# busy % (our clusters are idle then, so it is someone else's load).
QUIET_BUSY_PCT_MAX = 20.0
QUIET_WAIT_S_DEFAULT = 5.0

# The targets: (ratio name, how it compares, bound).
TARGETS = {
    "pipelined_publish": (">=", 1.0),
    "sync_publish_p50": ("<=", 1.5),
    "consume": (">=", 0.5),
    "e2e_p99_1000": ("<=", 2.0),
}
THROUGHPUT = "events_per_s"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def run_phase(system, name: str, plan: Plan) -> dict:
    def meter():
        return measure.CpuMeter(system.server_pids())

    if name.startswith("e2e_"):
        return await system.e2e(plan, meter, int(name[4:]))
    if name.startswith("payload_"):
        size = int(name[8:-1]) * 1024
        return await system.pipelined_publish(plan, meter, size,
                                              plan.large_events[size])
    if name.startswith("publishers_"):
        return await system.publishers(plan, meter, int(name[11:]))
    return await getattr(system, name)(plan, meter)


def brief(sample: dict) -> str:
    if "error" in sample:
        return f"ERROR {sample['error']}"
    text = f"{sample[THROUGHPUT]:.0f}/s"
    if "p50_ms" in sample:
        text += f" p50 {sample['p50_ms']:.2f} ms p99 {sample['p99_ms']:.2f} ms"
    if "events_per_raft_entry" in sample:
        text += f" {sample['events_per_raft_entry']} events/entry"
    return (text + f" | cpu client {sample['client_cpu_pct']:.0f}% servers "
            f"{sample['servers_cpu_pct']:.0f}% other {sample['other_cpu_pct']:.0f}% | "
            f"us/event client {sample.get('client_cpu_us_per_event', 0):.0f} "
            f"servers {sample.get('servers_cpu_us_per_event', 0):.0f}")


def add_rates(sample: dict) -> None:
    """Events/s, and CPU per event: the cost of one event in client and servers,
    which a busy machine disturbs far less than it disturbs events/s."""
    count, seconds = sample["count"], sample["seconds"]
    sample[THROUGHPUT] = round(count / seconds, 1) if seconds > 0 else 0.0
    sample["seconds"] = round(seconds, 3)
    if count:
        for who in ("client", "servers"):
            cpu_s = sample[f"{who}_cpu_pct"] / 100 * seconds
            sample[f"{who}_cpu_us_per_event"] = round(cpu_s / count * 1e6, 1)


async def run_round(system, plan: Plan, names: list[str], quiet_wait_s: float,
                    tag: str) -> dict:
    t0 = time.perf_counter()
    await system.start()
    log(f"{tag} {system.label}: cluster up in {time.perf_counter() - t0:.1f} s "
        f"{system.describe()}")
    samples = {}
    try:
        for name in names:
            busy = (await asyncio.to_thread(measure.wait_quiet, QUIET_BUSY_PCT_MAX,
                                            quiet_wait_s)
                    if quiet_wait_s > 0 else None)
            try:
                sample = await run_phase(system, name, plan)
                add_rates(sample)
            except Exception as exc:  # noqa: BLE001 (recorded; the run goes on)
                sample = {"error": f"{type(exc).__name__}: {exc}"}
            sample["busy_before_pct"] = busy
            samples[name] = sample
            log(f"{tag} {system.label:4} {name:18} {brief(sample)}")
        rss = {n: measure.process_rss_bytes(p) for n, p in system.server_pids().items()}
    finally:
        await system.stop()
    return {"phases": samples, "server_rss_bytes": rss, "cluster": system.describe()}


async def bench(args, plan: Plan, names: list[str]) -> dict:
    """Rounds of every phase group, each system on a fresh cluster in turn."""
    rounds = []
    groups = [[n for n in group if n in names] for group in phase_groups(plan)]
    with tempfile.TemporaryDirectory(prefix="ensync-bench-") as tmp:
        for r in range(args.rounds):
            for g, group in enumerate(g for g in groups if g):
                systems = {"ours": Ours(Path(tmp) / f"ours{r}-{g}"),
                           "nats": Nats(Path(tmp) / f"nats{r}-{g}")}
                for system in (systems[label] for label in args.systems):
                    tag = f"[round {r + 1}/{args.rounds}]"
                    result = await run_round(system, plan, group, args.quiet_wait, tag)
                    rounds.append({"round": r + 1, "system": system.label, **result})
    return {"rounds": rounds}


def summarize(rounds: list[dict], names: list[str]) -> dict:
    """Per phase and system: spread of each figure over the rounds."""
    figures = (THROUGHPUT, "p50_ms", "p99_ms", "client_cpu_pct", "servers_cpu_pct",
               "other_cpu_pct", "events_per_raft_entry", "client_cpu_us_per_event",
               "servers_cpu_us_per_event")
    summary: dict = {}
    for name in names:
        for label in ("ours", "nats"):
            samples = [r["phases"][name] for r in rounds
                       if r["system"] == label and name in r["phases"]]
            good = [s for s in samples if "error" not in s]
            row = {"samples": len(samples), "errors": len(samples) - len(good)}
            for figure in figures:
                values = [s[figure] for s in good if s.get(figure) is not None]
                if values:
                    row[figure] = measure.spread(values)
            summary.setdefault(name, {})[label] = row
    return summary


def ratios(summary: dict) -> dict:
    def median(phase: str, label: str, figure: str) -> float | None:
        row = summary.get(phase, {}).get(label, {})
        return row.get(figure, {}).get("median")

    out = {}
    for phase, by_system in summary.items():
        for figure, suffix in ((THROUGHPUT, ""), ("p50_ms", "_p50"),
                               ("p99_ms", "_p99")):
            ours, nats = median(phase, "ours", figure), median(phase, "nats", figure)
            if ours is not None and nats:
                out[phase + suffix] = round(ours / nats, 3)
    named = {"pipelined_publish": out.get("pipelined_publish"),
             "sync_publish_p50": out.get("sync_publish_p50"),
             "consume": out.get("consume"),
             "e2e_p99_1000": out.get("e2e_1000_p99")}
    return {**named, **{k: v for k, v in sorted(out.items()) if k not in named}}


def verdicts(named: dict) -> dict:
    out = {}
    for key, (op, bound) in TARGETS.items():
        value = named.get(key)
        met = None
        if value is not None:
            met = value >= bound if op == ">=" else value <= bound
        out[key] = {"target": f"{op} {bound}", "value": value, "met": met}
    return out


def cell(row: dict, figure: str, digits: int = 0) -> str:
    spread = row.get(figure)
    if spread is None:
        return "-"
    fmt = f"{{:.{digits}f}}"
    return (f"{fmt.format(spread['median'])} ({fmt.format(spread['min'])}.."
            f"{fmt.format(spread['max'])})")


def table(summary: dict, ratio: dict) -> str:
    rows = ["| phase | system | events/s | p50 ms | p99 ms | client CPU % "
            "| servers CPU % | other CPU % | client µs/event | servers µs/event "
            "| ratio events/s | ratio p50 | ratio p99 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for phase, by_system in summary.items():
        for label in ("ours", "nats"):
            row = by_system[label]
            errors = f" ({row['errors']} failed)" if row["errors"] else ""
            ratios_text = ["", "", ""]
            if label == "ours":
                ratios_text = [_fmt_ratio(ratio.get(phase + s))
                               for s in ("", "_p50", "_p99")]
            rows.append(f"| {phase} | {label}{errors} | {cell(row, THROUGHPUT)} "
                        f"| {cell(row, 'p50_ms', 2)} | {cell(row, 'p99_ms', 2)} "
                        f"| {cell(row, 'client_cpu_pct')} "
                        f"| {cell(row, 'servers_cpu_pct')} "
                        f"| {cell(row, 'other_cpu_pct')} "
                        f"| {cell(row, 'client_cpu_us_per_event')} "
                        f"| {cell(row, 'servers_cpu_us_per_event')} | "
                        + " | ".join(ratios_text) + " |")
    return "\n".join(rows)


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def targets_table(checks: dict) -> str:
    rows = ["| ratio (ours / NATS) | target | measured | met |", "|---|---|---|---|"]
    for key, check in checks.items():
        met = {True: "yes", False: "**no**", None: "-"}[check["met"]]
        rows.append(f"| {key} | {check['target']} | {_fmt_ratio(check['value'])} "
                    f"| {met} |")
    return "\n".join(rows)


def chart(summary: dict, ratio: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = list(summary)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7.5))
    for axis, keys, title in (
            (top, [(p, p) for p in phases],
             "throughput, ours / NATS (higher is better)"),
            (bottom, [(p, p + "_p99") for p in phases if p + "_p99" in ratio],
             "p99 latency, ours / NATS (lower is better)")):
        labels = [p for p, _ in keys]
        values = [ratio.get(k) or 0.0 for _, k in keys]
        bars = axis.bar(range(len(values)), values, color="#4477aa")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(values)), labels, rotation=25, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.bar_label(bars, fmt="%.2f", fontsize=7)
    fig.suptitle("EnSync Raft broker vs NATS JetStream R3 (fsync always), "
                 "3 nodes + client on one 2-core machine", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_soak(args) -> int:
    from bench.soak import soak

    with tempfile.TemporaryDirectory(prefix="ensync-soak-") as tmp:
        result = asyncio.run(soak(Path(tmp), args.soak_minutes, log))
    result["meta"] = {"command": " ".join(["./scripts/bench", *sys.argv[1:]]),
                      "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {out}/soak.json")
    return 0 if result["flat"] else 1


class OneLineParser(argparse.ArgumentParser):
    """Reports a bad argument as one line on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main() -> int:
    parser = OneLineParser(prog="bench", description=__doc__,
                           formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per system (default 3, --quick 1)")
    parser.add_argument("--quick", action="store_true",
                        help="CI mode: small counts, one round")
    parser.add_argument("--only", default="",
                        help="comma list of phases (default: all)")
    parser.add_argument("--large-events", type=int, default=0,
                        help="events per large-payload phase (default: the plan's)")
    parser.add_argument("--soak-minutes", type=float, default=0,
                        help="instead of the comparison: memory of our cluster over "
                             "a steady run this long (writes soak.json)")
    parser.add_argument("--systems", default="ours,nats",
                        help="which systems to run (development; ratios need both)")
    parser.add_argument("--out", default=None,
                        help="directory for latest.json, latest.md, latest.png")
    parser.add_argument("--quiet-wait", type=float, default=None,
                        help="seconds to wait for a quiet machine before each sample "
                             f"(default {QUIET_WAIT_S_DEFAULT:g}, --quick 0)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.large_events > 0:
        plan = dataclasses.replace(plan, large_events={
            size: args.large_events for size in plan.large_events})
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else QUIET_WAIT_S_DEFAULT
    args.systems = args.systems.split(",")
    if not args.systems or set(args.systems) - {"ours", "nats"}:
        parser.error("--systems takes ours, nats or both")
    names = phase_names(plan)
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown phase(s) {','.join(unknown)}; "
                         f"known: {','.join(names)}")
        names = [n for n in names if n in wanted]

    if args.soak_minutes > 0:
        return run_soak(args)

    started = time.time()
    result = asyncio.run(bench(args, plan, names))
    summary = summarize(result["rounds"], names)
    ratio = ratios(summary)
    checks = verdicts(ratio)
    from importlib.metadata import version

    result = {
        "ratios": ratio, "targets": checks, "summary": summary,
        "meta": {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                              time.gmtime(started)),
                 "minutes": round((time.time() - started) / 60, 1),
                 "mode": "quick" if args.quick else "full", "rounds": args.rounds,
                 "cpus": os.cpu_count(), "python": platform.python_version(),
                 "nats_py": version("nats-py"), "plan": plan.__dict__,
                 "command": " ".join(["./scripts/bench", *sys.argv[1:]])},
        **result,
    }
    text = table(summary, ratio) + "\n\n" + targets_table(checks)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "latest.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "latest.md").write_text(
            f"Run {result['meta']['started_utc']}, {result['meta']['mode']}, "
            f"{args.rounds} round(s): `{result['meta']['command']}`\n\n" + text + "\n")
        chart(summary, ratio, out / "latest.png")
        log(f"wrote {out}/latest.json, latest.md, latest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
