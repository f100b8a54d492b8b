"""Loopback where it can be: every listening socket of a run's processes during a smoke farm, read from
/proc, is on 127.0.0.1 and is one the security table of docs/reliability.md names (process, count)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def listening_inodes() -> dict[int, tuple[str, int]]:
    """inode -> listening (IP address, port), from /proc/net/tcp and tcp6."""
    out = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            addr, port = f[1].split(":")
            raw = bytes.fromhex(addr)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # /proc prints 32-bit words little-endian
            out[int(f[9])] = (socket.inet_ntop(family, raw), int(port, 16))
    return out


def process_tree(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def listeners(root: int) -> list[tuple[int, str, str, int]]:
    """(pid, command line, IP, port) of every listening TCP socket held by `root` and its descendants."""
    inodes = listening_inodes()
    out = []
    for pid in process_tree(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            m = re.fullmatch(r"socket:\[(\d+)\]", link)
            if m and int(m.group(1)) in inodes:
                out.append((pid, cmd, *inodes[int(m.group(1))]))
    return out


def kind(pid: int, cmd: str, driver: int) -> str:
    """The security table's name for the process holding a socket."""
    if pid == driver:
        return "driver"
    exe = cmd.split(" ", 1)[0]
    for name in ("gcs_server", "raylet"):
        if exe.endswith("/" + name):
            return name
    if "ray/dashboard/dashboard.py" in cmd:
        return "dashboard"
    if "ray/autoscaler/" in cmd and "monitor.py" in cmd:
        return "autoscaler"
    for name in ("ray::DashboardAgent", "ray::RuntimeEnvAgent"):
        if cmd.startswith(name):
            return name
    if cmd.startswith("ray::"):
        return "worker"
    return f"undocumented: {cmd[:100]}"


def readme_table() -> dict[str, tuple[str, int]]:
    """The security table of docs/reliability.md: process -> (interface, ports per process)."""
    text = (ROOT / "docs" / "reliability.md").read_text().split("## Security: what a run listens on", 1)[1]
    rows = re.findall(r"^\| `([^`]+)`[^|]*\| ([^|]+) \| (\d+)", text, re.MULTILINE)
    return {name: (iface.strip(), int(n)) for name, iface, n in rows}


def test_every_listening_socket_of_a_smoke_farm_is_loopback_and_documented(smoke_run_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run_dir / "features", run / "features")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_TMPDIR")}
    env["WEIGHTGEN_PROGRESS_EVERY_S"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.experts", "--preset", "smoke", "--run-dir", str(run), "--no-progress",
         "--address", "local", "--set", "steps=1500"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    seen: dict[tuple[int, str], str] = {}
    try:
        deadline = time.monotonic() + 600
        while not any(ln.startswith("expert farm:") for ln in lines):  # the farm's actors are training
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.5)
        while proc.poll() is None and not any(ln.startswith("farm: experts per node") for ln in lines):
            for pid, cmd, ip, port in listeners(proc.pid):  # looks every second while it trains
                seen[(pid, port)] = kind(pid, cmd, proc.pid)
                assert ip in ("127.0.0.1", "::ffff:127.0.0.1"), f"{cmd[:100]} listens on {ip}:{port}"
            time.sleep(1)
        assert proc.wait(timeout=600) == 0, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)

    table = readme_table()
    assert all(iface == "127.0.0.1" for iface, _ in table.values()), table
    per_process: dict[tuple[str, int], int] = {}
    for (pid, _), k in seen.items():
        per_process[(k, pid)] = per_process.get((k, pid), 0) + 1
    for (k, pid), n in sorted(per_process.items()):
        assert k in table, f"a listener docs/reliability.md does not name: {k} (pid {pid})"
        assert n == table[k][1], f"{k} (pid {pid}) listens on {n} port(s); docs/reliability.md says {table[k][1]}"
    kinds = {k for k, _ in per_process}
    assert kinds == set(table), f"documented rows never seen: {set(table) - kinds}; seen: {kinds}"
    first_eta = re.search(r"first ETA after ([\d.]+)s", "".join(lines))
    assert first_eta, "the farm reports when it first had an ETA"
