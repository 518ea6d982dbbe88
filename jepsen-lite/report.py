"""What a person reads after a run: a one-screen summary and a PNG timeline.

Both are made from the history alone (plus facts the harness gathered about
itself: cleanup, link check), so they can be remade from a kept history. The
verdict comes from the checker; this module only reports it.
"""

from __future__ import annotations

import collections
from pathlib import Path

BIN_MS = 1000
SUMMARY_FAULTS_MAX = 12


def fault_windows(history: list[dict]) -> list[tuple[int, int, str, list[str]]]:
    """(start_ms, stop_ms, fault, targets) per fault; one fault at a time."""
    windows, open_ = [], None
    end_ms = history[-1]["time_ms"] if history else 0
    for event in history:
        if event["f"] != "nemesis":
            continue
        value = event["value"]
        if value["action"] == "start":
            open_ = (event["time_ms"], value["fault"], value["targets"])
        elif open_ is not None:
            windows.append((open_[0], event["time_ms"], open_[1], open_[2]))
            open_ = None
    if open_ is not None:
        windows.append((open_[0], end_ms, open_[1], open_[2]))
    return windows


def recovery_after_heals(history: list[dict]) -> list[dict]:
    """Per fault: how long after its heal the cluster served again.

    ``publish_ms``: from the heal to the first ``ok`` of a publish invoked at or
    after it (an operation that started before the heal proves nothing about
    after it). ``deliver_ms``: from the heal to the first delivery after it.
    None when none came before the next fault began or the history ended (the
    last fault may end with the workload). The final heal of the run is not a
    nemesis window and is not listed. ``since_start_publish_ms`` is the same as
    ``publish_ms`` but from the fault's start: the failover time when a leader
    dies, near 0 when the fault leaves a serving majority alone.
    """
    windows = fault_windows(history)
    recovery = []
    for i, (start, heal, fault, targets) in enumerate(windows):
        until = windows[i + 1][0] if i + 1 < len(windows) else None
        recovery.append({"fault": fault, "targets": targets, "start_ms": start,
                         "heal_ms": heal,
                         "since_start_publish_ms": _first_publish_after(
                             history, start, until),
                         "publish_ms": _first_publish_after(history, heal, until),
                         "deliver_ms": _first_delivery_after(history, heal, until)})
    return recovery


def _first_publish_after(history: list[dict], heal: int, until: int | None):
    invoked_after = set()
    for event in history:
        t = event["time_ms"]
        if until is not None and t >= until:
            return None
        if event["f"] != "publish" or t < heal:
            continue
        if event["type"] == "invoke":
            invoked_after.add(event["process"])
        elif event["type"] == "ok" and event["process"] in invoked_after:
            return t - heal
    return None


def _first_delivery_after(history: list[dict], heal: int, until: int | None):
    for event in history:
        t = event["time_ms"]
        if until is not None and t >= until:
            return None
        if event["f"] == "deliver" and t >= heal:
            return t - heal
    return None


def recovery_figures(recovery: list[dict]) -> dict:
    """p50 and max of the recovery times, and how many heals saw none."""
    out = {"heals": len(recovery)}
    for key in ("publish_ms", "deliver_ms", "since_start_publish_ms"):
        values = [r[key] for r in recovery if r[key] is not None]
        out[key] = {"p50": quantile(values, 0.5), "max": max(values, default=None),
                    "none": len(recovery) - len(values)}
    return out


def latencies(history: list[dict], f: str) -> list[tuple[int, int, str]]:
    """(completion time_ms, latency_ms, type) for each completed ``f`` op."""
    invoked, out = {}, []
    for event in history:
        if event["f"] != f:
            continue
        key = event["process"]
        if event["type"] == "invoke":
            invoked[key] = event["time_ms"]
        elif key in invoked:
            start = invoked.pop(key)
            out.append((event["time_ms"], event["time_ms"] - start, event["type"]))
    return out


def quantile(values: list[int], q: float) -> int | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def op_counts(history: list[dict]) -> dict[str, collections.Counter]:
    counts: dict[str, collections.Counter] = collections.defaultdict(
        collections.Counter)
    for event in history:
        if event["f"] in ("publish", "ack", "defer", "deliver"):
            counts[event["f"]][event["type"]] += 1
    return counts


def summary_text(history: list[dict], facts: dict, result: dict | None,
                 checker_text: str | None) -> str:
    run = history[0]["value"] if history else {}
    options = run.get("options", {})
    lines = [
        f"jepsen-lite  seed={facts['seed']}  nemesis={facts['nemesis'] or 'none'}  "
        f"workload {options.get('duration_ms', 0) / 1000:g} s  "
        f"wall {facts['wall_s']:.0f} s",
        f"out: {facts['out']}",
        f"verdict: {_verdict(result, facts)}",
        "",
    ]
    if options.get("unsafe_ack_before_commit"):
        lines[-1:-1] = ["UNSAFE: the nodes answered PUB before commit "
                        "(--unsafe-ack-before-commit); lost events are expected"]
    lines += _ops_lines(history)
    lines += _fault_lines(history)
    lines += _final_lines(history, facts)
    if checker_text:
        lines += ["", "checker:"] + ["  " + line for line in checker_text.splitlines()]
    lines += ["", f"reproduce: {facts['reproduce']}"]
    return "\n".join(lines) + "\n"


def _verdict(result: dict | None, facts: dict) -> str:
    if facts.get("error"):
        return f"HARNESS ERROR ({facts['error']})"
    if result is None:
        return "unknown (no checker: jepsen-lite/checker.py absent)"
    valid = result.get("valid")
    word = {True: "VALID", False: "INVALID"}.get(valid, str(valid).upper())
    counts = result.get("counts", {})
    shown = ", ".join(f"{k} {v}" for k, v in counts.items()
                      if isinstance(v, int) and v and k in ("lost", "duplicated"))
    return word + (f" ({shown})" if shown else "")


def _ops_lines(history: list[dict]) -> list[str]:
    counts = op_counts(history)
    lines = ["operations    invoke      ok    fail    info"]
    for f in ("publish", "ack", "defer"):
        c = counts.get(f, collections.Counter())
        lines.append(f"  {f:<10} {c['invoke']:>7} {c['ok']:>7} {c['fail']:>7} "
                     f"{c['info']:>7}")
    delivers = [e for e in history if e["f"] == "deliver"]
    redelivered = sum(1 for e in delivers if (e["value"].get("attempt") or 1) > 1)
    lines.append(f"  deliver    {len(delivers):>7} (attempt > 1: {redelivered})")
    ok_ms = [lat for _, lat, kind in latencies(history, "publish") if kind == "ok"]
    if ok_ms:
        lines.append(f"  publish ok latency ms: p50 {quantile(ok_ms, 0.5)}  "
                     f"p99 {quantile(ok_ms, 0.99)}  max {max(ok_ms)}")
    return lines


def _fault_lines(history: list[dict]) -> list[str]:
    recovery = recovery_after_heals(history)
    lines = ["", f"faults: {len(recovery)}"
             + ("  (after heal: first publish ok, first delivery)" if recovery else "")]
    for r in recovery[:SUMMARY_FAULTS_MAX]:
        lines.append(f"  {r['start_ms'] / 1000:6.1f}s  {r['fault']:<26} "
                     f"{','.join(r['targets']):<9} "
                     f"{(r['heal_ms'] - r['start_ms']) / 1000:4.1f}s   "
                     f"{_ms(r['publish_ms']):>7} {_ms(r['deliver_ms']):>7}")
    if len(recovery) > SUMMARY_FAULTS_MAX:
        lines.append(f"  ... and {len(recovery) - SUMMARY_FAULTS_MAX} more")
    if recovery:
        figures = recovery_figures(recovery)
        p, d = figures["publish_ms"], figures["deliver_ms"]
        lines.append(f"  recovery after heal: publish p50 {_ms(p['p50'])} max "
                     f"{_ms(p['max'])}; delivery p50 {_ms(d['p50'])} max "
                     f"{_ms(d['max'])}")
    return lines


def _ms(value: int | None) -> str:
    return "-" if value is None else f"{value} ms"


def _final_lines(history: list[dict], facts: dict) -> list[str]:
    finals = [e["value"] for e in history if e["f"] == "final"]
    lines = [""]
    if finals:
        indexes = sorted({v["applied_index"] for v in finals})
        digests = {v["digest"] for v in finals}
        dlq = max(len(v["dlq"]) for v in finals)
        lines.append(f"final: {len(finals)} nodes, applied {indexes}, digests "
                     f"{'equal' if len(digests) == 1 else 'DIFFER'}, dlq {dlq}")
    else:
        lines.append("final: no node state recorded")
    lines.append(f"leader after heal: {facts.get('leader_after_heal') or 'NONE'}; "
                 f"drain {facts.get('drain_s', 0):.1f} s"
                 f"{' (hit the limit)' if facts.get('drain_timed_out') else ''}")
    lines.append(f"raft links from node addresses: {facts.get('links', '?')}")
    lines.append(f"cleanup: {facts.get('cleanup', '?')}")
    return lines


def timeline_png(history: list[dict], path: Path, title: str) -> str | None:
    """Throughput and latency over the run, faults shaded; None if written,
    else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (scripts/chaos installs the chaos extra)"

    end_ms = max((e["time_ms"] for e in history), default=0)
    bins = end_ms // BIN_MS + 1
    series = {"publish ok": [0] * bins, "delivered": [0] * bins, "ack ok": [0] * bins}
    for e in history:
        b = e["time_ms"] // BIN_MS
        if e["f"] == "publish" and e["type"] == "ok":
            series["publish ok"][b] += 1
        elif e["f"] == "deliver":
            series["delivered"][b] += 1
        elif e["f"] == "ack" and e["type"] == "ok":
            series["ack ok"][b] += 1

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True,
                                      height_ratios=[1, 1])
    xs = [b * BIN_MS / 1000 for b in range(bins)]
    for name, values in series.items():
        top.plot(xs, values, label=name, linewidth=1.2)
    top.set_ylabel("ops per second")
    top.legend(loc="upper right", fontsize=8)
    top.set_title(title, fontsize=10)

    points = latencies(history, "publish")
    for kind, color, marker in (("ok", "tab:blue", "."), ("fail", "tab:orange", "x"),
                                ("info", "tab:red", "x")):
        chosen = [(t / 1000, max(lat, 1)) for t, lat, k in points if k == kind]
        if chosen:
            bottom.scatter(*zip(*chosen), s=6 if kind == "ok" else 18, c=color,
                           marker=marker, label=f"publish {kind}", linewidths=0.8)
    bottom.set_yscale("log")
    bottom.set_ylabel("publish latency (ms)")
    bottom.set_xlabel("run time (s)")
    bottom.legend(loc="upper right", fontsize=8)

    for start, stop, fault, targets in fault_windows(history):
        for axis in (top, bottom):
            axis.axvspan(start / 1000, stop / 1000, color="tab:red", alpha=0.12)
        top.annotate(f"{fault} {','.join(targets)}", (start / 1000, 1.0),
                     xycoords=("data", "axes fraction"), fontsize=6, rotation=90,
                     va="top", ha="right", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
