"""The README's table of node settings, made from ``node.main.SETTINGS``.

    .venv/bin/python scripts/settings_table.py           print the table
    .venv/bin/python scripts/settings_table.py --write   rewrite it in README.md

The table sits in README.md between the two marker comments below;
tests/test_readme_settings.py fails when it differs from what this prints, so a
setting added to SETTINGS without ``--write`` is caught.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from node.main import SETTINGS  # noqa: E402

README = ROOT / "README.md"
BEGIN = "<!-- settings-table: made by scripts/settings-table, do not edit -->"
END = "<!-- settings-table end -->"

# Empty defaults that mean more than "empty".
SHOWN_DEFAULTS = {"admin_token": "required", "log_file": "stderr"}
MS_UNITS = ((86_400_000, "d"), (3_600_000, "h"), (60_000, "min"), (1000, "s"))
BYTE_UNITS = ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))


def shown_default(name: str, kind: type, default) -> str:
    if name in SHOWN_DEFAULTS:
        return SHOWN_DEFAULTS[name]
    if kind is bool:
        return "on" if default else "off"
    if default == "":
        return "empty"
    return f"`{default}`" + _human(name, default)


def _human(name: str, value) -> str:
    """`` (10 min)`` for round durations and sizes, so a reader needs no maths."""
    if not isinstance(value, int) or value == 0:
        return ""
    if name.endswith("_ms"):
        units = MS_UNITS
    elif "bytes" in name:
        units = BYTE_UNITS
    else:
        return ""
    for size, unit in units:
        if value >= size and value % size == 0 and value > 1000:
            return f" ({value // size} {unit})"
    return ""


def table() -> str:
    rows = ["| flag | `ENSYNC_` variable | default | meaning |", "|---|---|---|---|"]
    for name, kind, default, help_text in SETTINGS:
        flag = "--" + name.replace("_", "-")
        meaning = help_text.replace("|", "\\|")
        rows.append(f"| `{flag}` | `ENSYNC_{name.upper()}` | "
                    f"{shown_default(name, kind, default)} | {meaning} |")
    rows.append("| `--config` | | | TOML file with any of the keys above |")
    return "\n".join(rows) + "\n"


def replace_block(text: str, block: str) -> str:
    head, begin, rest = text.partition(BEGIN + "\n")
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise SystemExit(f"settings-table: {README.name} lacks the marker comments")
    return head + begin + block + end + tail


def block_in(text: str) -> str | None:
    _, begin, rest = text.partition(BEGIN + "\n")
    block, end, _ = rest.partition(END)
    return block if begin and end else None


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        README.write_text(replace_block(README.read_text(), table()))
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
