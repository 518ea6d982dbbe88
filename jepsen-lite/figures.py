"""A markdown table of figures from finished runs, one row per run directory:

    .venv/bin/python jepsen-lite/figures.py build/jepsen/* /tmp/run7 ...

Reads each DIR/results.json (written by chaos.py): operations invoked (publish,
ack, defer) and deliveries, faults injected, lost, duplicated, and the recovery
after each heal (p50 / max over the run's faults; README "Recovery after a heal").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("run", "nemesis", "seed", "verdict", "ops invoked", "deliveries",
           "faults", "lost", "dup", "publish after heal p50/max ms",
           "delivery after heal p50/max ms", "publish after fault start p50/max ms")


def _pair(figure: dict | None) -> str:
    if not figure or figure.get("p50") is None:
        return "-"
    none = f" ({figure['none']} none)" if figure.get("none") else ""
    return f"{figure['p50']} / {figure['max']}{none}"


def row(out: Path) -> list[str]:
    r = json.loads((out / "results.json").read_text())
    ops = r.get("operations", {})
    invoked = sum(ops.get(f, {}).get("invoke", 0) for f in ("publish", "ack", "defer"))
    deliveries = ops.get("deliver", {}).get("ok", 0)
    counts, recovery = r.get("counts", {}), r.get("recovery", {})
    verdict = {True: "valid", False: "INVALID"}.get(r.get("valid"), str(r.get("valid")))
    nemesis = r.get("nemesis", "?") + (" UNSAFE" if r.get("unsafe_ack_before_commit")
                                       else "")
    return [out.name, nemesis, str(r.get("seed")), verdict, str(invoked),
            str(deliveries), str(r.get("faults_injected", "?")),
            str(counts.get("lost")), str(counts.get("duplicated")),
            _pair(recovery.get("publish_ms")), _pair(recovery.get("deliver_ms")),
            _pair(recovery.get("since_start_publish_ms"))]


def main(argv: list[str]) -> int:
    dirs = [Path(a) for a in argv if (Path(a) / "results.json").is_file()]
    if not dirs:
        print("figures: error: no DIR/results.json among the arguments",
              file=sys.stderr)
        return 2
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for out in dirs:
        print("| " + " | ".join(row(out)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
