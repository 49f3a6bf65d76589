"""The config loader: defaults, every key validated, errors that name the key and the value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from metadata_proxy.config import (
    Config,
    ConfigError,
    ControlPlane,
    Limits,
    ListenAddress,
    Route,
    load_config,
    max_workers,
    parse_config,
)

BASE: dict[str, Any] = {"host_id": "host-a", "control_plane": {"url": "https://cp.example"}}


def with_(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {**BASE, "control_plane": dict(BASE["control_plane"])}
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            table = data.setdefault(section, {})
            assert isinstance(table, dict)
            table[name] = value
        else:
            data[key] = value
    return data


def test_defaults_are_the_spec_defaults() -> None:
    config = parse_config(BASE)
    assert config.listen == (ListenAddress("169.254.169.254", 80), ListenAddress("fd00:a9fe::254", 80))
    assert config.registry == "/var/lib/metadata-proxy/registry.sqlite3"
    assert config.admin_listen == "/run/metadata-proxy/admin.sock"
    assert config.workers == 1
    assert (config.control_plane.timeout, config.control_plane.retry_budget) == (10.0, 5.0)
    assert (config.limits.requests_per_second, config.limits.burst, config.limits.max_concurrent) == (50, 100, 16)
    assert config.limits.max_body_bytes == 10485760
    assert (config.cache.max_entries_per_vm, config.cache.max_bytes) == (256, 67108864)
    assert config.routes == (Route("/runtime/", "header"),)
    assert config.per_vm_metrics is True


def test_full_config_parses() -> None:
    config = parse_config(
        with_(
            listen=["127.0.0.1:8080", "[::1]:8080"],
            host_aliases=["metadata.internal"],
            admin_listen="127.0.0.1:9169",
            workers=2,
            routes=[{"prefix": "/runtime/", "guard": "session"}, {"prefix": "/public/", "guard": "none"}],
            limits__burst=5,
        )
    )
    assert [str(entry) for entry in config.listen] == ["127.0.0.1:8080", "[::1]:8080"]
    assert config.routes[1] == Route("/public/", "none")
    assert config.limits.burst == 5
    assert config.host_aliases == ("metadata.internal",)


def test_accepted_host_aliases_and_the_workers_bound() -> None:
    aliases = ["metadata.google.internal", "[fd00::1]:80", "169.254.169.254:8080", "METADATA"]
    assert parse_config(with_(host_aliases=aliases)).host_aliases == tuple(aliases)
    assert parse_config(with_(workers=max_workers())).workers == max_workers()
    with pytest.raises(ConfigError, match=f"workers = {max_workers() + 1}"):
        parse_config(with_(workers=max_workers() + 1))
    assert parse_config(with_(per_vm_metrics=False)).per_vm_metrics is False


def test_defaults_are_defined_once_in_the_dataclasses() -> None:
    # The loader's defaults are the dataclasses' own: a default changed in one place is
    # changed for a config that leaves the key out.
    config = parse_config(BASE)
    assert config.limits == Limits()
    assert config.control_plane == ControlPlane(url="https://cp.example")
    defaults = Config(host_id="host-a", control_plane=ControlPlane(url="https://cp.example"), source="<config>")
    assert config == defaults


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (with_(bogus=1), "bogus = 1: unknown key"),
        (with_(limits__bogus="x"), 'limits.bogus = "x": unknown key'),
        (with_(limits__burst=-1), "limits.burst = -1"),
        (with_(limits__requests_per_second=0), "limits.requests_per_second = 0"),
        (with_(limits__max_concurrent=True), "limits.max_concurrent = true"),
        (with_(control_plane__url="ftp://x"), 'control_plane.url = "ftp://x"'),
        (with_(control_plane__timeout=0), "control_plane.timeout = 0"),
        (with_(control_plane__client_cert="/c.pem"), "control_plane.client_key is required"),
        (with_(listen=["169.254.169.254"]), 'listen[0] = "169.254.169.254": has no port'),
        (with_(listen=["127.0.0.1:80", "[169.254.169.254]:80"]), 'listen[1] = "[169.254.169.254]:80": an IPv4'),
        (with_(listen=["fd00::1:80"]), 'listen[0] = "fd00::1:80": an IPv6 address goes in brackets'),
        (with_(listen=["metadata:80"]), "listen[0] = \"metadata:80\": 'metadata' is not an IP address"),
        (with_(listen=["127.0.0.1:0"]), "listen[0] = \"127.0.0.1:0\": port '0' is not a number"),
        (with_(listen=["127.0.0.1:80", "127.0.0.1:80"]), 'listen[1] = "127.0.0.1:80": is listed twice'),
        (with_(listen=[]), "listen = []"),
        (with_(host_aliases=["http://metadata/"]), 'host_aliases[0] = "http://metadata/": must be what a Host'),
        (with_(host_aliases=["ok.example", "bad_name"]), 'host_aliases[1] = "bad_name"'),
        (with_(host_aliases=["fd00::1"]), 'host_aliases[0] = "fd00::1": an IPv6 address goes in brackets'),
        (with_(host_aliases=["meta:99999"]), "host_aliases[0] = \"meta:99999\": port '99999'"),
        (with_(host_aliases="metadata"), 'host_aliases = "metadata": must be a list'),
        (with_(registry="registry.sqlite3"), 'registry = "registry.sqlite3": must be an absolute path to a file'),
        (with_(registry="/var/lib/metadata-proxy/"), "must be an absolute path to a file"),
        (with_(registry="/tmp"), 'registry = "/tmp": is a directory'),
        (with_(workers=10_000), "workers = 10000: more than 4 per CPU"),
        (with_(per_vm_metrics="no"), 'per_vm_metrics = "no": must be true or false'),
        (with_(admin_listen="169.254.169.254:80"), 'admin_listen = "169.254.169.254:80"'),
        (with_(workers=0), "workers = 0"),
        (with_(host_id=""), 'host_id = ""'),
        (with_(routes=[{"prefix": "runtime"}]), 'routes[0].prefix = "runtime"'),
        (with_(routes=[{"prefix": "/metadata/v1/"}]), "routes[0].prefix"),
        (with_(routes=[{"prefix": "/a/../b/"}]), "routes[0].prefix"),
        (with_(routes=[{"prefix": "/a/", "guard": "token"}]), 'routes[0].guard = "token"'),
        (with_(routes=[{"prefix": "/a/"}, {"prefix": "/a/"}]), "configured twice"),
        (with_(cache__max_bytes="big"), 'cache.max_bytes = "big"'),
        (with_(control_plane__timeout=float("nan")), "control_plane.timeout = nan"),
        (with_(limits__requests_per_second=float("inf")), "limits.requests_per_second = inf"),
        (with_(host_id="a\r\nb"), "host_id ="),
        (with_(host_id="two words"), 'host_id = "two words"'),
        (with_(control_plane__url="https://user:pw@cp.example"), "control_plane.url ="),
        ({"control_plane": {"url": "https://x"}}, "host_id is required"),
        ({"host_id": "h"}, "control_plane is required"),
    ],
)
def test_bad_values_name_key_and_value(data: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "config.toml")
    assert expected in str(info.value)
    assert str(info.value).startswith("config.toml: ")


def test_load_config_reports_toml_syntax_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("host_id = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "absent.toml"))


def test_a_config_that_is_not_utf8_is_one_line_naming_the_file(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('host_id = "hôte"\n[control_plane]\nurl = "http://127.0.0.1:9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=f"^{latin1}: not UTF-8 text"):
        load_config(str(latin1))
    result = run_cli("check-config", "--config", str(latin1))
    assert result.returncode == 1
    assert result.stderr == f"metadata-proxy: {latin1}: not UTF-8 text (byte 12 cannot be decoded)\n"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metadata_proxy.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('host_id = "h"\n[control_plane]\nurl = "http://127.0.0.1:9"\n')
    result = run_cli("check-config", "--config", str(good))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text('host_id = "h"\n[control_plane]\nurl = "http://127.0.0.1:9"\n[limits]\nburst = 0\n')
    result = run_cli("check-config", "--config", str(bad))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "limits.burst = 0" in result.stderr
    assert "Traceback" not in result.stderr

    missing_ca = tmp_path / "ca.toml"
    missing_ca.write_text(f'host_id = "h"\n[control_plane]\nurl = "https://x"\nca_file = "{tmp_path}/nope.pem"\n')
    result = run_cli("check-config", "--config", str(missing_ca))
    assert result.returncode == 1 and "control_plane.ca_file" in result.stderr and "no such file" in result.stderr

    assert run_cli("check-config", "--bogus").returncode == 2


def test_docs_configuration_lists_every_key_with_its_default() -> None:
    """docs/configuration.md is the operator's reference: each key the loader accepts has a
    row in its section's table, and a scalar default there is the dataclass's."""
    import dataclasses
    import re

    from metadata_proxy.config import Cache

    text = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    sections = {
        "": (Config, "## Top level"),
        "control_plane": (ControlPlane, "## `[control_plane]`"),
        "limits": (Limits, "## `[limits]`"),
        "cache": (Cache, "## `[cache]`"),
        "routes": (Route, "## `[[routes]]`"),
    }
    nested = {"control_plane", "limits", "cache", "routes", "source"}
    for name, (cls, heading) in sections.items():
        body = text.split(heading, 1)[1].split("\n## ", 1)[0]
        rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]*) \|", body, re.M))
        for f in dataclasses.fields(cls):
            if name == "" and f.name in nested:
                continue
            assert f.name in rows, f"docs/configuration.md {heading!r} has no row for {f.name}"
            if f.default is not dataclasses.MISSING and isinstance(f.default, bool | int | float):
                shown = rows[f.name].strip().strip("`")
                expected = str(f.default).lower() if isinstance(f.default, bool) else f"{f.default:.15g}"
                if name != "routes":  # a route's max_body_bytes and timeout default to other keys
                    assert shown == expected, f"{name}.{f.name}: docs say {shown}, the code {expected}"
