"""controlplane.vms: the --vms file (bare ids and JSON objects), re-read on change, fail closed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controlplane.vms import VM, VmDirectory, VmFileError


def write(path: Path, text: str) -> None:
    path.write_text(text)
    stamp = path.stat().st_mtime_ns + 1_000_000  # a new stamp even within the clock's granularity
    os.utime(path, ns=(stamp, stamp))


def test_bare_ids_and_objects(tmp_path: Path) -> None:
    path = tmp_path / "vms"
    obj = '{"vm_id": "vm-2", "scope": "team", "metadata": {"role": "ci"}}'
    write(path, "\n".join(["# comment", "vm-1", "", obj, '{"vm_id": "vm-3"}']) + "\n")
    vms = VmDirectory(path)
    assert vms.get("vm-1") == VM("vm-1", "vm-1", {})
    assert vms.get("vm-2") == VM("vm-2", "team", {"role": "ci"})
    assert vms.get("vm-3") == VM("vm-3", "vm-3", {})
    assert vms.exists("vm-1") and not vms.exists("vm-4")
    assert vms.scope("vm-2") == "team" and vms.scope("vm-4") == "vm-4"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"vm_id": ""}\n', "vm_id must be a non-empty string"),
        ('{"vm_id": "a", "scope": 3}\n', "scope must be a non-empty string"),
        ('{"vm_id": "a", "metadata": []}\n', "metadata must be an object"),
        ('{"vm_id": "a", "extra": 1}\n', "expected"),
        ("{not json\n", "vms:1:"),
        ("vm-1\nvm-1\n", "listed twice"),
    ],
)
def test_malformed_at_start_names_file_and_line(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "vms"
    write(path, text)
    with pytest.raises(VmFileError, match=why):
        VmDirectory(path)


def test_changes_are_seen_and_failures_fail_closed(tmp_path: Path) -> None:
    path = tmp_path / "vms"
    write(path, "vm-1\nvm-2\n")
    vms = VmDirectory(path)
    write(path, '{"vm_id": "vm-2", "metadata": {"v": 2}}\n')
    assert not vms.exists("vm-1") and vms.get("vm-2") == VM("vm-2", "vm-2", {"v": 2})
    write(path, "{half-written\n")  # malformed: the last good contents stay in force
    assert vms.get("vm-2") == VM("vm-2", "vm-2", {"v": 2})
    path.unlink()  # unreadable: no VM exists
    assert not vms.exists("vm-2")
    write(path, "vm-9\n")
    assert vms.exists("vm-9")
