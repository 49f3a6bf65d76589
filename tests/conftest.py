"""Shared test plumbing.

Tests that need root (network namespaces, nftables) carry ``@pytest.mark.root``: they skip
on a non-root machine, and fail instead of skipping under ``CI=true``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.harness import ControlPlane, running


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A real `controlplane serve` on loopback, one per test module."""
    control_plane = ControlPlane(tmp_path_factory.mktemp("cp")).start()
    with running(control_plane):
        yield control_plane


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        raise pytest.UsageError("CI=true but not root: the root-marked tests cannot run, and nothing may skip in CI")
    skip = pytest.mark.skip(reason="needs root (network namespaces, nftables)")
    for item in items:
        if item.get_closest_marker("root"):
            item.add_marker(skip)
