"""Fixtures that start real clusters (see tests/cluster.py).

`cluster` is one 3-node cluster shared by a module's tests, which must leave
it as they found it. `cluster_factory` makes clusters for one test, for tests
that kill, pause or restart nodes. Both stop their nodes whatever the outcome,
and a failing test's report ends with the tail of every node's log.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.cluster import Cluster


class ClusterFactory:
    """Starts clusters on demand and remembers them for teardown."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.clusters: list[Cluster] = []

    def __call__(self, size: int = 3, **options: Any) -> Cluster:
        base_dir = self.base_dir / f"cluster{len(self.clusters) + 1}"
        cluster = Cluster(size=size, base_dir=base_dir, **options)
        # Remember it before starting, so a half-started cluster is stopped too.
        self.clusters.append(cluster)
        return cluster.start()

    def stop_all(self) -> None:
        for cluster in self.clusters:
            cluster.stop()


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Cluster:
    started = Cluster(size=3, base_dir=tmp_path_factory.mktemp("cluster"))
    request.addfinalizer(started.stop)
    return started.start()


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[ClusterFactory]:
    factory = ClusterFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


def clusters_of(item: pytest.Item) -> list[Cluster]:
    funcargs = getattr(item, "funcargs", {})
    found = [funcargs["cluster"]] if "cluster" in funcargs else []
    if "cluster_factory" in funcargs:
        found += funcargs["cluster_factory"].clusters
    return [value for value in found if isinstance(value, Cluster)]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for cluster in clusters_of(item):
        report.sections.append((f"node logs {cluster.base_dir}", cluster.log_tails()))
