"""`metadata-proxy demo` as a newcomer runs it: the curl line it prints works when pasted
into a shell, Ctrl-C stops it, and it leaves nothing behind."""

from __future__ import annotations

import glob
import json
import signal
import subprocess
import tempfile
import time

from tests.harness import BIN


def test_demo_prints_a_working_curl_line_and_cleans_up() -> None:
    before = set(glob.glob(f"{tempfile.gettempdir()}/metadata-proxy-demo-*"))
    demo = subprocess.Popen(
        [str(BIN / "metadata-proxy"), "demo"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert demo.stdout is not None
        line = demo.stdout.readline()  # flushed at once, or this would hang until the timeout
        assert line.startswith("curl "), line
        assert "127.0.0.1:" in line
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        assert port > 1024
        result = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer == {"vm_id": "demo-vm-0001", "host_id": "demo-host", "address": "127.0.0.1"}
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(timeout=30)
        except subprocess.TimeoutExpired:
            demo.kill()
            raise
        finally:
            assert demo.stdout is not None
            demo.stdout.close()
    assert demo.returncode == 0
    deadline = time.monotonic() + 5
    while set(glob.glob(f"{tempfile.gettempdir()}/metadata-proxy-demo-*")) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(glob.glob(f"{tempfile.gettempdir()}/metadata-proxy-demo-*")) - before
