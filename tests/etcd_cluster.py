"""A real N-member etcd cluster on free loopback ports, for tests and local tools.

Each member is an ``etcd`` process (Debian's ``etcd-server``, ``/usr/bin/etcd``) with
its data directory under ``base_dir``. Members can be killed (SIGKILL), stopped
(SIGTERM) and restarted on the same ports and data, so fault tests can take the
cluster's quorum away and give it back::

    with EtcdCluster(tmp_path, size=3) as cluster:
        url = cluster.url            # "etcd://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3"
        cluster.kill(0)              # writes go on (2 of 3)
        cluster.kill(1)              # no quorum: writes fail
        cluster.restart(0); cluster.restart(1)
        cluster.wait_healthy()

Health is read from each member's HTTP ``/health`` endpoint (it answers
``{"health":"true"}`` only when the member sees a leader).

Members are started with ``PR_SET_PDEATHSIG`` (Linux), set by util-linux's
``setpriv --pdeathsig KILL`` which then execs etcd: they are killed when the
thread that started them dies, so a test run killed by a timeout leaves no etcd
behind. Start and restart members from a long-lived thread (e.g. the main one).
(Not with a ``preexec_fn``: Python code between fork and exec in a process with
gRPC threads can crash the child, seen as an etcd member "exiting" with -11.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tls_files import TLSFiles

__all__ = ["ETCD_BIN", "EtcdCluster", "EtcdMember", "free_port"]

ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"


#: prefix that makes the started program die with the thread that started it
_DIE_WITH_PARENT = (
    [setpriv, "--pdeathsig", "KILL", "--"] if (setpriv := shutil.which("setpriv")) else []
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    tls: TLSFiles | None = None

    @property
    def scheme(self) -> str:
        return "http" if self.tls is None else "https"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout: float = 1.0) -> bool:
        """True when the member answers /health with a leader in sight."""
        if not self.running:
            return False
        url = f"{self.scheme}://{self.endpoint}/health"
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        try:
            with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
                body = json.loads(resp.read() or b"{}")
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return body.get("health") in ("true", True)


class EtcdCluster:
    """An etcd cluster of ``size`` members in ``base_dir`` (started by :meth:`start`)."""

    def __init__(
        self,
        base_dir: Path | str,
        size: int = 3,
        *,
        token: str | None = None,
        heartbeat_ms: int = 100,
        election_ms: int = 1000,
        tls: TLSFiles | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("an etcd cluster needs at least one member")
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.token = token or f"medledger-test-{os.getpid()}-{free_port()}"
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.members: list[EtcdMember] = []
        ports: set[int] = set()
        for i in range(size):
            client, peer = self._two_ports(ports)
            name = f"m{i}"
            self.members.append(
                EtcdMember(
                    name=name,
                    client_port=client,
                    peer_port=peer,
                    data_dir=self.base_dir / f"{name}.etcd",
                    log_path=self.base_dir / f"{name}.log",
                    tls=tls,
                )
            )
        self._started_once = [False] * size
        self.tls = tls

    @staticmethod
    def _two_ports(used: set[int]) -> tuple[int, int]:
        out: list[int] = []
        while len(out) < 2:
            p = free_port()
            if p not in used:
                used.add(p)
                out.append(p)
        return out[0], out[1]

    # -- addresses -----------------------------------------------------------------------
    @property
    def endpoints(self) -> list[str]:
        """``host:port`` of every member's client URL."""
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        """The orderer URL medledger takes: ``etcd://host:port,...`` (``etcds://`` with TLS)."""
        return ("etcd://" if self.tls is None else "etcds://") + ",".join(self.endpoints)

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    # -- processes ----------------------------------------------------------------------
    def _command(self, m: EtcdMember, state: str) -> list[str]:
        return [
            ETCD_BIN,
            "--name",
            m.name,
            "--data-dir",
            str(m.data_dir),
            "--listen-client-urls",
            f"{m.scheme}://{m.endpoint}",
            "--advertise-client-urls",
            f"{m.scheme}://{m.endpoint}",
            "--listen-peer-urls",
            m.peer_url,
            "--initial-advertise-peer-urls",
            m.peer_url,
            "--initial-cluster",
            self.initial_cluster,
            "--initial-cluster-state",
            state,
            "--initial-cluster-token",
            self.token,
            "--heartbeat-interval",
            str(self.heartbeat_ms),
            "--election-timeout",
            str(self.election_ms),
            "--logger",
            "zap",
            "--log-level",
            "warn",
            *self._tls_flags(),
        ]

    def _tls_flags(self) -> list[str]:
        """Mutual TLS on client and peer traffic (one certificate serves both here)."""
        t = self.tls
        if t is None:
            return []
        cert, key, ca = str(t.server_cert), str(t.server_key), str(t.ca)
        return [
            *("--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca),
            "--client-cert-auth",
            *("--peer-cert-file", cert, "--peer-key-file", key, "--peer-trusted-ca-file", ca),
            "--peer-client-cert-auth",
        ]

    def start_member(self, i: int) -> None:
        """Start (or restart) member ``i`` on its ports and data; does not wait."""
        m = self.members[i]
        if m.running:
            return
        state = "existing" if self._started_once[i] else "new"
        log = m.log_path.open("ab")
        try:
            m.proc = subprocess.Popen(
                [*_DIE_WITH_PARENT, *self._command(m, state)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self._started_once[i] = True

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        """Start every member and wait until all are healthy."""
        for i in range(len(self.members)):
            self.start_member(i)
        self.wait_healthy(timeout=timeout)
        return self

    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` (no clean shutdown) and reap it."""
        self._signal(i, signal.SIGKILL)

    def stop_member(self, i: int) -> None:
        """SIGTERM member ``i`` and wait for it to exit."""
        self._signal(i, signal.SIGTERM)

    def _signal(self, i: int, sig: signal.Signals) -> None:
        m = self.members[i]
        if m.proc is None:
            return
        if m.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                m.proc.send_signal(sig)
            try:
                m.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait(timeout=5)
        m.proc = None

    def restart(self, i: int) -> None:
        """Start a killed or stopped member again (same name, ports and data)."""
        self.start_member(i)

    # -- health ---------------------------------------------------------------------------
    def healthy_members(self) -> list[int]:
        return [i for i, m in enumerate(self.members) if m.healthy()]

    def wait_healthy(self, members: list[int] | None = None, timeout: float = 30.0) -> None:
        """Block until the given members (default: all running ones) report a leader."""
        deadline = time.monotonic() + timeout
        while True:
            want = members if members is not None else self._running()
            if all(self.members[i].healthy() for i in want):
                return
            for i in want:
                proc = self.members[i].proc
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(
                        f"etcd member {self.members[i].name} exited with {proc.returncode}; "
                        f"see {self.members[i].log_path}"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd members {want} not healthy after {timeout} s")
            time.sleep(0.1)

    async def wait_healthy_async(self, members: list[int] | None = None) -> None:
        """:meth:`wait_healthy` (30 s limit) without blocking the event loop."""
        await asyncio.to_thread(self.wait_healthy, members)

    def _running(self) -> list[int]:
        return [i for i, m in enumerate(self.members) if m.running]

    # -- teardown -----------------------------------------------------------------------
    def close(self) -> None:
        """Kill every member (data directories are left for the caller's tmp dir)."""
        for i in range(len(self.members)):
            self.kill(i)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
