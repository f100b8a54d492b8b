"""Connect to Ray: the cluster named by --address / $RAY_ADDRESS, else the one `ray start` runs on this
machine, else a private Ray that this process starts on 127.0.0.1 and stops when it ends.

Private Rays (this module's own, started for one run) live in their own temporary directory with a
marker file, `weightgen-private.json`, beside Ray's session folders. They are never joined by another
run: Ray's own auto-detection only reads `<temp dir>/ray/ray_current_cluster`, which `ray start` writes
and a private Ray never writes in the shared temp dir, and `find_running_cluster` also refuses any
cluster whose raylet runs from a marked directory.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from models.errors import UserError


class ClusterError(UserError, RuntimeError):
    """Ray could not be started or reached; the message says what to check."""


PRIVATE_MARKER = "weightgen-private.json"  # in a private Ray's temp dir: "started by a pipeline for itself"
ADDRESS_FILE = "ray_current_cluster"  # where `ray start` records the cluster of this machine (Ray's convention)


@dataclass
class RayInfo:
    """Where the Ray cluster is and what it offers."""

    address: str  # the GCS address (host:port), or what was asked for when it is not known
    dashboard_url: str | None
    cpus: float
    started_here: bool  # True only when this process started Ray (and so stops it)
    start_seconds: float
    gpus: float = 0.0
    nodes: int = 1
    how: str = "existing"  # private | found (ray start on this machine) | given (--address/RAY_ADDRESS) | existing
    session_dir: str | None = None
    log_dir: Path | None = None  # <run_dir>/logs: a private Ray's logs are copied there when it stops
    private_root: str | None = None  # the temporary folder of a private Ray (removed when it stops)
    saved_env: dict = field(default_factory=dict, repr=False)  # environment to restore after a private Ray

    def describe(self) -> list[str]:
        """The lines a run starts with: which Ray, where, how big, and how to open its dashboard."""
        what = {
            "private": f"started a private Ray at {self.address} (loopback only; it stops when this run ends)",
            "found": f"joined the Ray cluster running on this machine at {self.address} (`ray start`; it keeps running)",
            "given": f"joined the Ray cluster at {self.address}",
            "existing": f"using the Ray this process is already connected to ({self.address})",
        }[self.how]
        lines = [f"Ray: {what}; {self.nodes} node(s), {self.cpus:g} CPUs, {self.gpus:g} GPUs"]
        if self.dashboard_url:
            lines.append(f"Ray dashboard {self.dashboard_url}  ({dashboard_hint()})")
        else:
            lines.append("Ray dashboard: not running on this cluster")
        if self.log_dir is not None:
            lines.append(f"metrics: `python -m orchestrator.monitor {self.log_dir.parent}` starts Prometheus for this run "
                         "(README, Monitoring); full logs in " + str(self.log_dir))
        return lines


PROBE_SECONDS = 5.0  # how long a cluster address may take to accept a TCP connection


def _host_port(address: str) -> tuple[str, str]:
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    return host.strip("[]"), port


def answers(address: str, timeout: float = PROBE_SECONDS) -> OSError | None:
    """None when something accepts a TCP connection at host:port (or at the node IP, for a loopback host)."""
    host, port = _host_port(address)
    # ray.init dials a loopback address at this machine's node IP instead, and a GCS listens on its
    # node IP only: either answering is enough
    hosts = dict.fromkeys([host, ray._private.services.resolve_ip_for_localhost(host)])
    err = None
    for h in hosts:
        try:
            socket.create_connection((h, int(port)), timeout=timeout).close()
            return None
        except OSError as e:
            err = e
    return err


def check_reachable(address: str, timeout: float = PROBE_SECONDS) -> None:
    """Fail within seconds when nothing answers at a cluster address: ray.init retries an unreachable
    GCS for minutes (measured: still waiting after 5 min on Ray 2.60), which looks like a hang."""
    if address in ("auto", "local"):
        return  # found through this machine's session files, no network involved
    host, port = _host_port(address)
    fix = ("start the cluster (`ray start --head --port=PORT` or `ray up cluster.yaml`), correct the address, "
           "or unset RAY_ADDRESS and drop --address to run on a local Ray")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.10:6379); {fix}")
    err = answers(address, timeout)
    if err is not None:
        raise ClusterError(f"no Ray cluster answers at {address!r} ({err.strerror or err}); {fix}")


# ----------------------------------------------------------------------------- finding a cluster


def ray_temp_dir() -> Path:
    """Ray's temp dir for this environment: $RAY_TMPDIR/ray, else $TMPDIR/ray, else /tmp/ray (Ray's rule)."""
    from ray._common.utils import get_default_ray_temp_dir

    return Path(get_default_ray_temp_dir())


def _raylet_temp_dirs(gcs_address: str) -> list[Path]:
    """The --temp_dir of every raylet on this machine that belongs to the cluster at `gcs_address`."""
    import psutil  # Ray's vendored copy (ray/thirdparty_files) once ray is imported

    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if not cmd or not os.path.basename(cmd[0]).startswith("raylet"):
            continue
        args = " ".join(cmd).split()
        if f"--gcs-address={gcs_address}" not in args:
            continue
        out += [Path(a.split("=", 1)[1]) for a in args if a.startswith("--temp_dir=")]
    return out


def cluster_auth_mode(gcs_address: str) -> str | None:
    """RAY_AUTH_MODE of the cluster at `gcs_address` as its raylets on this machine run it ('token' or
    'disabled'; Ray takes the mode from that variable only), None when none of them can be read."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if not cmd or not os.path.basename(cmd[0]).startswith("raylet"):
            continue
        if f"--gcs-address={gcs_address}" not in " ".join(cmd).split():
            continue
        try:
            return (proc.environ().get("RAY_AUTH_MODE") or "disabled").lower()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    return None


def is_private(gcs_address: str, temp_dir: Path | None = None) -> bool:
    """Whether the cluster at `gcs_address` is some pipeline's private Ray (its temp dir holds the marker)."""
    dirs = _raylet_temp_dirs(gcs_address) + ([temp_dir] if temp_dir else [])
    return any((d / PRIVATE_MARKER).exists() for d in dirs)


def find_running_cluster() -> str | None:
    """The GCS address of the cluster `ray start` runs on this machine, if it answers and is nobody's private Ray.

    Ray's convention: `ray start` (head or worker) writes the cluster's address to
    `<ray temp dir>/ray_current_cluster`; a stale file (the cluster was stopped or crashed) is ignored.
    """
    temp = ray_temp_dir()
    try:
        address = (temp / ADDRESS_FILE).read_text().strip()
    except OSError:
        return None
    if not address or answers(address, timeout=1.0) is not None:
        return None
    if is_private(address, temp):
        return None
    return address


# ----------------------------------------------------------------------------- private Ray


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _private_root() -> str:
    """A fresh folder for a private Ray, short enough for Ray's socket paths (107 bytes)."""
    from ray._common.utils import get_default_system_temp_dir

    base = get_default_system_temp_dir()
    if len(base) > 20 or not os.access(base, os.W_OK):
        base = "/tmp"
    return tempfile.mkdtemp(prefix="wg-", dir=base)


# Environment of a private Ray, inherited by every process it starts (GCS, raylet, dashboard, workers):
#  - RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray's node IP 127.0.0.1, so the GCS, raylet, worker and
#    driver gRPC servers and the metrics agent bind to 127.0.0.1 (as Ray does on macOS); measured on 2.60
#  - the autoscaler's and dashboard's metrics ports are fixed in Ray (44217, 44227): another Ray on the
#    machine may hold them, and Prometheus would then scrape that Ray's numbers; free ports instead
#  - RAY_AUTH_MODE=token: token authentication, as ray.init's default, without its warning (left on
#    afterwards, as ray.init leaves it)


def _start_private(num_cpus: int | None, namespace: str, log_dir: Path | None) -> RayInfo:
    root = _private_root()
    temp = Path(root, "ray")
    temp.mkdir()
    (temp / PRIVATE_MARKER).write_text(json.dumps({"pid": os.getpid(), "log_dir": str(log_dir or ""), "started": time.time()}))
    env = {
        "RAY_TMPDIR": root,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "AUTOSCALER_METRIC_PORT": str(_free_port()),
        "DASHBOARD_METRIC_PORT": str(_free_port()),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # read at import; this process is already past it
    if "RAY_AUTH_MODE" not in os.environ:
        # as ray.init does for a cluster it starts, and for good: this process's gRPC servers keep the mode
        # they started with (measured: turning it off again broke the next, tokenless cluster's actors)
        os.environ["RAY_AUTH_MODE"] = "token"
        _reload_ray_config()
    try:
        ctx = ray.init(
            num_cpus=num_cpus,
            namespace=namespace,
            include_dashboard=True,
            dashboard_host="127.0.0.1",  # never expose the dashboard beyond this machine by default
            logging_level=logging.WARNING,
            _temp_dir=str(temp),
        )
    except BaseException:
        _restore(saved)
        shutil.rmtree(root, ignore_errors=True)
        raise
    gcs = ctx.address_info["gcs_address"]
    # Ray's helpers running inside this cluster (Ray Train's placement-group cleaner uses the state API
    # with no address) find their cluster here instead of failing on "multiple active Ray instances"
    (temp / ADDRESS_FILE).write_text(gcs)
    info = _info(ctx, "private", True)
    info.private_root, info.saved_env = root, saved
    return info


def _restore(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1") not in ("0", "false", "False")


def _reload_ray_config() -> None:
    """Make this process's Ray core read RAY_AUTH_MODE and friends again (as ray.init does when it turns tokens on)."""
    from ray._raylet import Config

    Config.initialize("")


def _match_auth(address: str) -> None:
    """Use the token exactly when the cluster found on this machine does (its raylets' RAY_AUTH_MODE).

    Ray's own rule for a cluster it finds, "send the token whenever ~/.ray/auth_token exists", breaks on a
    cluster started without tokens: measured on 2.60, every actor of the run was 'cancelled before it
    started' (the driver's gRPC server then wants a token the cluster's workers never send). When the
    mode cannot be read, Ray's rule applies."""
    mode = cluster_auth_mode(address)
    if mode is None:
        if "RAY_AUTH_MODE" in os.environ:
            return
        from ray._raylet import AuthenticationTokenLoader

        mode = "token" if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True) else None
    if mode is not None and os.environ.get("RAY_AUTH_MODE", "disabled").lower() != mode:
        os.environ["RAY_AUTH_MODE"] = mode
        _reload_ray_config()


# ----------------------------------------------------------------------------- connect / shutdown


def _info(ctx, how: str, started_here: bool, t0: float | None = None) -> RayInfo:
    url = ctx.dashboard_url or None
    if url and not url.startswith("http"):
        url = f"http://{url}"
    res = ray.cluster_resources()
    node = ray._private.worker._global_node
    return RayInfo(
        address=ctx.address_info.get("gcs_address") or ctx.address_info.get("address") or "",
        dashboard_url=url, cpus=float(res.get("CPU", 0)), started_here=started_here, start_seconds=0.0,
        gpus=float(res.get("GPU", 0)), nodes=sum(1 for n in ray.nodes() if n["Alive"]), how=how,
        session_dir=node.get_session_dir_path() if node is not None else None,
    )


def connect(address: str | None = None, num_cpus: int | None = None, namespace: str = "weightgen",
            log_dir: Path | None = None) -> RayInfo:
    """Join `address` (or $RAY_ADDRESS); else the cluster `ray start` runs on this machine; else start a
    private Ray on 127.0.0.1. `address="local"`, or sizing it with `num_cpus`, forces a private Ray.

    `log_dir` (a run's `logs/` folder) receives the full logs: Ray's worker output (see orchestrator.logs)
    and, when a private Ray stops, its session logs.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return RayInfo(address or "existing", None, float(ray.cluster_resources().get("CPU", 0)), False, 0.0)
    t0 = time.perf_counter()
    how = "given"
    if address is None and num_cpus is None:
        address = find_running_cluster()
        how = "found"
    elif address == "auto":
        address = find_running_cluster()
        how = "found"
        if address is None:
            raise ClusterError(
                "--address auto: no Ray cluster started with `ray start` runs on this machine (private Rays of other "
                "runs are not joined); start one (`ray start --head`), give its address, or drop --address to run on a "
                "private Ray")
    elif address == "local":
        address = None
    try:
        if address:
            check_reachable(address)
            if how == "found":
                _match_auth(address)
            ctx = ray.init(address=address, namespace=namespace, logging_level=logging.WARNING)
            info = _info(ctx, how, False)
        else:
            info = _start_private(num_cpus, namespace, log_dir)
    except ray.exceptions.AuthenticationError as e:
        raise ClusterError(
            f"the Ray cluster at {address!r} refused this client's token: {e.message}. Export RAY_AUTH_MODE=token and "
            "put the cluster's token in ~/.ray/auth_token (or RAY_AUTH_TOKEN); docs/cluster.md"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address!r}" if address else "a private Ray instance"
        raise ClusterError(
            f"could not connect to {where}: {e}. Check that `ray start --head` is running there (and "
            "RAY_AUTH_MODE/token settings match), or unset RAY_ADDRESS / drop --address to run locally."
        ) from e
    info.start_seconds = time.perf_counter() - t0
    info.log_dir = Path(log_dir) if log_dir else None
    if info.log_dir is not None:
        from orchestrator import logs

        logs.capture_ray(info)
    return info


def shutdown(info: RayInfo | None) -> None:
    """Stop Ray if this process started it (keeping its logs in the run's logs/ folder); else just disconnect."""
    if info is None or not ray.is_initialized():
        return
    if not info.started_here:
        return
    if info.log_dir is not None:  # a monitor watching this run gets the last values before they go
        from orchestrator.monitor import wait_for_last_scrape

        wait_for_last_scrape(info.log_dir.parent, ray._config.metrics_report_interval_ms() / 1000,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
    try:
        ray.shutdown()
    finally:
        if info.log_dir is not None and info.session_dir:
            from orchestrator import logs

            logs.keep_session_logs(Path(info.session_dir), info.log_dir)
        if info.private_root:
            _restore(info.saved_env)
            shutil.rmtree(info.private_root, ignore_errors=True)


def token_file() -> str:
    """Where this machine's Ray token is read from (Ray's order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "$RAY_AUTH_TOKEN"
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")


def dashboard_hint() -> str:
    """The one step that opens a token-protected dashboard."""
    return (f"it asks for a token: paste the contents of {token_file()} (`ray get-auth-token` prints it); "
            "the browser keeps it for 30 days")


def read_token() -> str | None:
    """This machine's Ray token, or None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    try:
        return Path(token_file()).read_text().strip()
    except OSError:
        return None
