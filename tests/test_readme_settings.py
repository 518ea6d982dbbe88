"""README.md's settings table is the one scripts/settings-table makes from SETTINGS.

So a setting added to ``node.main.SETTINGS`` fails here until the README shows it
(``./scripts/settings-table --write``). Variables read straight from the
environment by the node, outside SETTINGS, must at least be named in the README.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from node.main import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("node", "raft")
# ensyncctl's own variables are documented with its flags, not as node settings.
NOT_THE_NODE = {"ctl.py"}
ENV_NAME = re.compile(r"\bENSYNC_[A-Z][A-Z0-9_]*\b")


def load_settings_table():
    path = ROOT / "scripts" / "settings_table.py"
    spec = importlib.util.spec_from_file_location("settings_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_settings_table_is_generated_from_settings():
    settings_table = load_settings_table()

    block = settings_table.block_in((ROOT / "README.md").read_text())

    assert block is not None, "README.md lacks the settings-table markers"
    assert block == settings_table.table(), (
        "README.md's settings table is stale: run ./scripts/settings-table --write")


def test_generated_table_has_a_row_with_the_default_of_every_setting():
    settings_table = load_settings_table()
    rows = settings_table.table().splitlines()

    for name, kind, default, _ in SETTINGS:
        row = next(r for r in rows if r.startswith(f"| `--{name.replace('_', '-')}` |"))
        assert f"`ENSYNC_{name.upper()}`" in row
        assert settings_table.shown_default(name, kind, default) in row


def test_every_ensync_variable_in_the_code_is_named_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    used = set()
    for folder in SOURCE_DIRS:
        for path in (ROOT / folder).glob("*.py"):
            if path.name not in NOT_THE_NODE:
                used |= set(ENV_NAME.findall(path.read_text()))

    missing = sorted(name for name in used if name not in readme)
    assert not missing, f"README.md never mentions {missing}"
