"""A real multi-node Ray cluster on this machine, started with `ray start` (the venv's Ray CLI, see LOOPBACK_RAY):
a head and N more nodes of 1 CPU each, all on loopback, with token authentication by a token of its own.
Stopped by process id. Linux only (it reads /proc).

Not `ray stop`: it kills every Ray process of the machine (another test's, another user's). Each `ray start`
runs in a new session, and every process it spawns (GCS, raylet, agents, workers) stays in that session, so
the cluster is exactly the processes of those sessions.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The `ray` CLI, keeping 127.0.0.1 as given. On Linux, Ray swaps a loopback --node-ip-address or --address for
# the machine's routable IP, and a node then listens on every interface; a node whose IP is 127.0.0.1 binds its
# servers (GCS, raylet, agents, workers) to loopback only. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 stops the swap too,
# but also stops a non-head node from starting, so nodes take this, and drivers (dsnas) the variable.
LOOPBACK_RAY = """
import sys
import ray._private.services as services
from ray.scripts.scripts import main
services.resolve_ip_for_localhost = lambda host: host
sys.argv[0] = "ray"
main()
"""
# A driver prints the alive nodes as JSON, [{"id": ..., "resources": {...}}], for the readiness check.
NODES_SCRIPT = """
import json, sys, ray
ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False, configure_logging=False)
print(json.dumps([{"id": n["NodeID"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]]))
"""


@dataclass
class RayCluster:
    address: str  # host:port of the head's GCS, what `dsnas search --address` takes
    env: dict[str, str]  # the environment a driver needs to connect (token authentication)
    node_ids: dict[str, str] = field(default_factory=dict)  # "head", "node1", ... -> Ray node id
    sessions: list[int] = field(default_factory=list)  # session ids of the `ray start` processes

    def driver_env(self) -> dict[str, str]:
        return {**inherited_env(), **self.env}


def inherited_env() -> dict[str, str]:
    """This process's environment, less what would point Ray elsewhere: RAY_AUTH_TOKEN outranks the
    cluster's RAY_AUTH_TOKEN_PATH, and RAY_ADDRESS names some other cluster."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth_env(root: Path) -> dict[str, str]:
    """Token authentication with a token file of this cluster's own: RAY_AUTH_MODE=token must be set in every
    process (nodes and drivers); a `ray start` node or a driver given an explicit address never turns it on
    by itself, and ~/.ray/auth_token (the default token) stays untouched."""
    token = root / "auth_token"
    with os.fdopen(os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(secrets.token_hex(32))  # as `ray get-auth-token --generate` makes one
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def start_cluster(root: Path, extra_nodes: int = 1, timeout: float = 90.0) -> RayCluster:
    """A head (1 CPU) and ``extra_nodes`` nodes (1 CPU and resource ``nodeN: 1`` each), temp dirs under
    ``root``. Returns once the GCS lists every node alive."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # A driver keeps 127.0.0.1 as given only with this variable: see LOOPBACK_RAY.
    env = {**auth_env(root), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cluster = RayCluster(address=f"127.0.0.1:{port}", env=env)
    try:
        _ray_start(cluster, root / "head", "--head", f"--port={port}", "--include-dashboard=false",
                   "--dashboard-host=127.0.0.1")
        for i in range(1, extra_nodes + 1):
            _ray_start(cluster, root / f"node{i}", f"--address={cluster.address}",
                       f"--resources={json.dumps({f'node{i}': 1})}")
        cluster.node_ids = _wait_for_nodes(cluster, extra_nodes + 1, timeout)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def _ray_start(cluster: RayCluster, temp_dir: Path, *args: str) -> None:
    temp_dir.mkdir()
    cmd = [sys.executable, "-c", LOOPBACK_RAY, "start", *args, "--node-ip-address=127.0.0.1", "--num-cpus=1",
           "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    env = cluster.driver_env()
    del env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]  # with it, a non-head node refuses to start
    log = temp_dir.with_suffix(".log")
    # Output to a file, not a pipe: the daemons inherit it and would hold a pipe open after `ray start` ends.
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    cluster.sessions.append(proc.pid)  # before waiting: a failed start is still cleaned up
    if proc.wait(timeout=120) != 0:
        raise RuntimeError(f"`ray {' '.join(cmd[3:])}` failed ({proc.returncode}):\n{log.read_text()[-3000:]}")


def _wait_for_nodes(cluster: RayCluster, count: int, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run([sys.executable, "-c", NODES_SCRIPT, cluster.address], env=cluster.driver_env(),
                                capture_output=True, text=True, timeout=timeout)
        lines = result.stdout.strip().splitlines()
        nodes = json.loads(lines[-1]) if result.returncode == 0 and lines else []
        if len(nodes) == count:
            return {_node_name(n["resources"]): n["id"] for n in nodes}
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster at {cluster.address} has {len(nodes)} of {count} nodes alive "
                               f"after {timeout:.0f} s:\n{result.stderr[-3000:]}")
        time.sleep(0.5)


def _node_name(resources: dict[str, float]) -> str:
    return next((name for name in resources if name.startswith("node") and name[4:].isdigit()), "head")


def stop_cluster(cluster: RayCluster) -> None:
    """SIGKILL every process of the cluster's sessions, as `ray stop --force` does to every Ray process (a GCS
    ignores SIGTERM for seconds)."""
    deadline = time.monotonic() + 10.0
    while left := session_processes(cluster.sessions):
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray processes of the cluster at {cluster.address} survived SIGKILL: {left}")
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def session_processes(sessions: list[int]) -> list[int]:
    """Live (not zombie) processes whose session id is one of ``sessions``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # Fields after the command name, which may hold spaces and parentheses: state ppid pgrp session ...
        state, _, _, session = stat.rpartition(")")[2].split()[:4]
        if state != "Z" and int(session) in sessions:
            out.append(int(entry.name))
    return out


@contextlib.contextmanager
def ray_cluster(root: Path, extra_nodes: int = 1) -> Iterator[RayCluster]:
    cluster = start_cluster(root, extra_nodes)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
