"""Connect to Ray: join a cluster when an address is given, else start a local one on loopback."""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

import ray

from models.errors import UserError


class ClusterError(UserError, RuntimeError):
    """Ray could not be started or reached; the message says what to check."""


@dataclass
class RayInfo:
    """Where the Ray cluster is and what it offers."""

    address: str
    dashboard_url: str | None
    cpus: float
    started_here: bool
    start_seconds: float


PROBE_SECONDS = 5.0  # how long a cluster address may take to accept a TCP connection


def check_reachable(address: str, timeout: float = PROBE_SECONDS) -> None:
    """Fail within seconds when nothing answers at a cluster address: ray.init retries an unreachable
    GCS for minutes (measured: still waiting after 5 min on Ray 2.60), which looks like a hang."""
    if address in ("auto", "local"):
        return  # found through this machine's session files, no network involved
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    fix = ("start the cluster (`ray start --head --port=PORT` or `ray up cluster.yaml`), correct the address, "
           "or unset RAY_ADDRESS and drop --address to run on a local Ray")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.10:6379); {fix}")
    host = host.strip("[]")
    # ray.init dials a loopback address at this machine's node IP instead, and a GCS listens on its
    # node IP only: either answering is enough
    hosts = dict.fromkeys([host, ray._private.services.resolve_ip_for_localhost(host)])
    err = None
    for h in hosts:
        try:
            socket.create_connection((h, int(port)), timeout=timeout).close()
            return
        except OSError as e:
            err = e
    raise ClusterError(f"no Ray cluster answers at {address!r} ({err.strerror or err}); {fix}")


def connect(address: str | None = None, num_cpus: int | None = None, namespace: str = "weightgen") -> RayInfo:
    """Join `address` (or $RAY_ADDRESS); without one start a local Ray bound to 127.0.0.1 with its dashboard."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return RayInfo(address or "existing", None, float(ray.cluster_resources().get("CPU", 0)), False, 0.0)
    t0 = time.perf_counter()
    if address:
        check_reachable(address)
    try:
        if address:
            ctx = ray.init(address=address, namespace=namespace, logging_level=logging.WARNING)
        else:
            ctx = ray.init(
                num_cpus=num_cpus,
                namespace=namespace,
                include_dashboard=True,
                dashboard_host="127.0.0.1",  # never expose the dashboard beyond this machine by default
                _node_ip_address="127.0.0.1",
                logging_level=logging.WARNING,
            )
    except ray.exceptions.AuthenticationError as e:
        raise ClusterError(
            f"the Ray cluster at {address!r} refused this client's token: {e.message}. Export RAY_AUTH_MODE=token and "
            "put the cluster's token in ~/.ray/auth_token (or RAY_AUTH_TOKEN); docs/cluster.md"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        raise ClusterError(
            f"could not connect to {where}: {e}. Check that `ray start --head` is running there (and "
            "RAY_AUTH_MODE/token settings match), or unset RAY_ADDRESS / drop --address to run locally."
        ) from e
    url = ctx.dashboard_url or None
    if url and not url.startswith("http"):
        url = f"http://{url}"
    cpus = float(ray.cluster_resources().get("CPU", 0))
    return RayInfo(address or "local", url, cpus, address is None, time.perf_counter() - t0)


def shutdown(info: RayInfo | None) -> None:
    """Stop Ray if this process started it."""
    if info is not None and info.started_here and ray.is_initialized():
        ray.shutdown()
