"""The installed distribution's version: what `--version`, the start-up line and
`metadata_proxy_build_info` report, so an operator can tell which build answers."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "metadata-proxy"


def version() -> str:
    """The version pyproject.toml gave the installed distribution ("unknown" when run from
    a tree that was never installed)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
