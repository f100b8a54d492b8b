"""Prometheus for a run, as Ray's dashboard expects it: `python -m orchestrator.monitor RUN_DIR`.

It starts Debian's `prometheus` (installed with apt-get when missing and this is root; otherwise one
line says how) on 127.0.0.1:9090 with the scrape configuration Ray generated for the run's session
(`<session>/metrics/prometheus/prometheus.yml`: every node's metrics endpoints, found through Ray's
service-discovery file), and copies the project's Grafana dashboard (configs/grafana/weightgen.json)
beside Ray's own in `<session>/metrics/grafana/dashboards/`. It follows the run: a private Ray lives
only as long as its run, so the monitor waits for the run to start Ray, and reloads Prometheus when a
rerun starts a new session. Prometheus keeps its data in `<run_dir>/logs/prometheus/`.

    python -m orchestrator.monitor runs/smoke              # Ctrl-C stops Prometheus
    python -m orchestrator.monitor runs/smoke --port 9091  # then RAY_PROMETHEUS_HOST=http://127.0.0.1:9091
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from models.errors import UserError
from orchestrator.logs import RAY_JSON
from orchestrator.storage.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "configs" / "grafana" / "weightgen.json"
INSTALL_HINT = ("Prometheus is not installed: install Debian's package (`sudo apt-get update && sudo apt-get install "
                "prometheus`), or put a `prometheus` binary (https://prometheus.io/download) on PATH")


class MonitorError(UserError):
    """The monitor cannot start; the message says what to do."""


def find_prometheus() -> str | None:
    return shutil.which("prometheus") or next((p for p in ("/usr/bin/prometheus",) if os.access(p, os.X_OK)), None)


def install_prometheus(log=print) -> str:
    """Debian's `prometheus` package, installed with apt-get when this is root; else MonitorError(INSTALL_HINT).

    The package's service is not started (a policy-rc.d says no for the length of the install): the
    service would listen on every interface, and the monitor runs its own Prometheus on 127.0.0.1.
    """
    found = find_prometheus()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise MonitorError(INSTALL_HINT)
    log("monitor: installing Prometheus (apt-get install -y prometheus; its system service is not started)")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
        if subprocess.run(cmd, env=env, capture_output=True, check=False).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise MonitorError(f"apt-get install prometheus failed ({r.stderr.strip().splitlines()[-1:]}); " + INSTALL_HINT)
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    found = find_prometheus()
    if not found:
        raise MonitorError(INSTALL_HINT)
    return found


def prometheus_home(run_dir: Path) -> Path:
    """Where the monitor keeps Prometheus's config, data and state for a run: inside the run's logs."""
    return RunDir(run_dir).logs / "prometheus"


def read_session(run_dir: Path) -> dict | None:
    """The run's Ray session (logs/ray.json, written when the run connects), if it is still there."""
    try:
        info = json.loads((RunDir(run_dir).logs / RAY_JSON).read_text())
    except (OSError, ValueError):
        return None
    config = info.get("prometheus_config")
    return info if config and Path(config).is_file() else None


def write_config(session: dict, out: Path) -> Path:
    """Ray's generated scrape configuration for the session, copied verbatim to `out` (it names the
    session's service-discovery file, which Ray keeps current as nodes come and go)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    shutil.copyfile(session["prometheus_config"], tmp)
    tmp.replace(out)
    return out


def install_dashboard(session: dict) -> Path | None:
    """Put configs/grafana/weightgen.json beside Ray's dashboards, which Ray's Grafana provisioning loads."""
    if not session.get("grafana_config"):
        return None
    folder = Path(session["grafana_config"]) / "dashboards"
    if not folder.is_dir():
        return None
    dst = folder / DASHBOARD.name
    shutil.copyfile(DASHBOARD, dst)
    return dst


def start_prometheus(binary: str, config: Path, data: Path, port: int) -> subprocess.Popen:
    """A Prometheus on 127.0.0.1:`port` reading `config`, its data in `data`, its log in `data`/../prometheus.log."""
    data.mkdir(parents=True, exist_ok=True)
    log = open(data.parent / "prometheus.log", "ab")  # noqa: SIM115 - handed to the child process
    return subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={data}", f"--web.listen-address=127.0.0.1:{port}",
         "--web.enable-lifecycle"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def query(port: int, promql: str, timeout: float = 10) -> list:
    """The result list of an instant PromQL query against the Prometheus on 127.0.0.1:`port`."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body = json.loads(r.read())
    if body.get("status") != "success":
        raise MonitorError(f"Prometheus query {promql!r} failed: {body}")
    return body["data"]["result"]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MonitorError(f"Prometheus exited with code {proc.returncode}; see its log beside its data folder")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise MonitorError(f"Prometheus did not become ready on 127.0.0.1:{port} within {timeout:g}s")


STATE = "monitor.json"  # in <run_dir>/logs/prometheus/ while a monitor watches the run: its pid and port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _when(stamp: str) -> float:
    """Seconds since the epoch of Prometheus's RFC 3339 time (nanoseconds cut to microseconds)."""
    from datetime import datetime

    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac or '0')[:6]}+00:00").timestamp()


def wait_for_last_scrape(run_dir: Path, export_interval_s: float, log=print, limit_s: float = 40.0) -> bool:
    """Before a private Ray stops: when a monitor watches this run, wait until Prometheus has scraped every
    target after Ray's last export (values recorded now reach the metrics agent within one export
    interval). Without this, a short run's final counts never reach Prometheus. False when it gave up."""
    try:
        state = json.loads((prometheus_home(run_dir) / STATE).read_text())
    except (OSError, ValueError):
        return True
    if not _alive(int(state.get("pid", 0))):
        return True
    exported = time.time() + export_interval_s
    log(f"monitor: waiting up to {limit_s:g}s for Prometheus (127.0.0.1:{state['port']}) to scrape this run's last metrics")
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{state['port']}/api/v1/targets?state=active", timeout=5) as r:
                targets = json.loads(r.read())["data"]["activeTargets"]
            up = [t for t in targets if t.get("health") == "up"]
            if up and all(_when(t["lastScrape"]) > exported for t in up):
                return True
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(1)
    return False


def grafana_lines(session: dict, port: int, dashboard: Path | None) -> list[str]:
    ini = Path(session["grafana_config"]) / "grafana.ini" if session.get("grafana_config") else None
    grafana = (f"Grafana (not packaged here; install it from grafana.com): grafana server --config {ini} --homepath "
               "/usr/share/grafana  (Ray's generated settings: anonymous viewer, embedding allowed, Prometheus at "
               "RAY_PROMETHEUS_HOST; Ray's dashboards and weightgen.json in folder 'Ray')")
    embed = (f"Ray dashboard's Metrics view: start the run with RAY_PROMETHEUS_HOST=http://127.0.0.1:{port} and "
             "RAY_GRAFANA_HOST=http://127.0.0.1:3000 in its environment (README, Monitoring)")
    return [grafana, embed] + ([f"weightgen dashboard: {dashboard}"] if dashboard else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.monitor", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="the run to watch (its logs/ray.json names the Ray session)")
    p.add_argument("--port", type=int, default=9090, help="Prometheus port on 127.0.0.1 (default 9090, Ray's RAY_PROMETHEUS_HOST default)")
    p.add_argument("--no-install", action="store_true", help="never run apt-get; fail with the install hint instead")
    args = p.parse_args(argv)
    run_dir = args.run_dir.resolve()
    try:
        binary = find_prometheus() or (install_prometheus() if not args.no_install else None)
        if not binary:
            raise MonitorError(INSTALL_HINT)
    except MonitorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    home = prometheus_home(run_dir)
    config = home / "prometheus.yml"
    session = read_session(run_dir)
    if session is None:
        print(f"monitor: waiting for {run_dir} to start Ray (its logs/ray.json); Ctrl-C to stop", flush=True)
    while session is None:
        time.sleep(2)
        session = read_session(run_dir)
    write_config(session, config)
    proc = start_prometheus(binary, config, home / "data", args.port)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    state = home / STATE
    try:
        wait_ready(args.port, proc)
        state.write_text(json.dumps({"pid": os.getpid(), "port": args.port}))
        dashboard = install_dashboard(session)
        print(f"Prometheus: http://127.0.0.1:{args.port}  scraping Ray session {session['session_dir']} "
              f"(config {config}; data {home / 'data'})", flush=True)
        for line in grafana_lines(session, args.port, dashboard):
            print(line, flush=True)
        current = session["session_dir"]
        while not stop["now"] and proc.poll() is None:
            time.sleep(2)
            new = read_session(run_dir)
            if new is not None and new["session_dir"] != current:  # a rerun started a new Ray: follow it
                write_config(new, config)
                proc.send_signal(signal.SIGHUP)
                install_dashboard(new)
                current = new["session_dir"]
                print(f"monitor: now scraping Ray session {current}", flush=True)
    except KeyboardInterrupt:
        pass
    except MonitorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        state.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
