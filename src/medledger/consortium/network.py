"""A local consortium on loopback, for trying medledger out: ``medledger network up|down|status``.

``network up --orgs 3 [--sqlite] [--dir D]`` creates (the first time) in ``D``:

* keys, a shared genesis and a data directory per organisation (``D/org-N/data``),
  each with its ``node.toml`` (``D/org-N/node.toml``);
* a database per organisation on the local PostgreSQL server (127.0.0.1:5432,
  user ``postgres``; ``--pg`` to change), or SQLite files with ``--sqlite``;
* an etcd cluster of one member per organisation (``D/etcd/mN``), on free
  loopback ports chosen once and kept in ``D/network.json``; with ``--tls`` (a
  CA, server and client certificate made for the network in ``D/tls/``) the
  members require mutual TLS on client and peer traffic, the nodes reach them
  over ``etcds://``, and the nodes' FHIR and peer APIs serve HTTPS;

then starts the etcd members and one node process per organisation, waits until
every node serves, prints their addresses and records the process ids in
``D/pids.json``. ``network down`` stops them (SIGTERM, then SIGKILL after a
grace period); ``down --purge`` also drops the databases and deletes ``D``.
``up`` on an existing directory starts the same network again.

This is a local toy layout (every member on one machine, on loopback); a real
deployment runs one etcd member and one node per organisation, each on its own
hosts, with TLS everywhere and certificates from the consortium's CA (see the
README).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medledger.consortium.config import (
    GossipConfig,
    HttpEndpoint,
    NodeConfig,
    PeerRef,
    dump_config,
)
from medledger.crypto.tls import make_tls_files
from medledger.datadir import DataDir, make_genesis
from medledger.errors import MedledgerError

__all__ = [
    "NetworkError",
    "create_network",
    "network_status",
    "start_network",
    "stop_network",
]

ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
LAYOUT = "network.json"
PIDS = "pids.json"


class NetworkError(MedledgerError):
    """The local network could not be created, started or stopped."""

    code = "network"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ports(n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        p = free_port()
        if p not in out:
            out.append(p)
    return out


@dataclass(frozen=True, slots=True)
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise NetworkError(f"cannot read {path}: {exc}") from exc
    return doc


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


# -- PostgreSQL ----------------------------------------------------------------------------


def _pg_url(admin_url: str, dbname: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(admin_url)
    host, port = params.get("host", "127.0.0.1"), params.get("port", "5432")
    user = params.get("user", "postgres")
    password = f":{params['password']}" if params.get("password") else ""
    return f"postgresql://{user}{password}@{host}:{port}/{dbname}"


def _pg_admin(admin_url: str, statements: list[Any]) -> None:
    import psycopg

    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
            for st in statements:
                conn.execute(st)
    except psycopg.Error as exc:
        raise NetworkError(f"PostgreSQL at {admin_url}: {exc}") from exc


def _create_databases(admin_url: str, names: list[str]) -> None:
    from psycopg import sql

    _pg_admin(admin_url, [sql.SQL("CREATE DATABASE {}").format(sql.Identifier(n)) for n in names])


def _drop_databases(admin_url: str, names: list[str]) -> None:
    from psycopg import sql

    _pg_admin(
        admin_url,
        [
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(n))
            for n in names
        ],
    )


# -- creating ------------------------------------------------------------------------------


def create_network(
    directory: Path,
    *,
    orgs: int = 3,
    sqlite: bool = False,
    network: str = "medledger-local",
    pg_admin: str = DEFAULT_PG,
    load_keys: int = 0,
    gossip_interval: float = 1.0,
    orderer_options: dict[str, Any] | None = None,
    policy: dict[str, Any] | None = None,
    fhir: bool = True,
    tls: bool = False,
) -> dict[str, Any]:
    """Write the layout, keys, genesis, databases and node configurations; returns the layout.

    ``load_keys`` extra administrator identities per organisation
    (``load-<org>-<i>`` in its keystore) are registered in the genesis, for load
    generators (tests, benchmarks) that sign their own transactions.

    ``tls``: TLS everywhere, with a CA, server and client certificate made for this
    network under ``D/tls/`` (:func:`medledger.crypto.tls.make_tls_files`, valid a
    year): the etcd members require mutual TLS on client and peer traffic, the
    nodes reach etcd over ``etcds://`` with the client certificate, and their FHIR
    and peer APIs serve HTTPS, trusting that CA for each other.
    """
    if not 1 <= orgs <= 9:
        raise NetworkError("--orgs must be between 1 and 9")
    directory = directory.resolve()
    if (directory / LAYOUT).exists():
        raise NetworkError(f"{directory} already holds a network")
    directory.mkdir(parents=True, exist_ok=True)
    slug = hashlib.sha256(str(directory).encode()).hexdigest()[:8]
    org_ids = [f"org-{i + 1}" for i in range(orgs)]
    ports = _ports(4 * orgs)
    etcd = [
        EtcdMember(f"m{i}", ports[2 * i], ports[2 * i + 1], directory / "etcd" / f"m{i}")
        for i in range(orgs)
    ]
    api_ports, peer_ports = ports[2 * orgs : 3 * orgs], ports[3 * orgs :]
    orderer = ("etcds://" if tls else "etcd://") + ",".join(m.endpoint for m in etcd)
    etcd_tls: dict[str, str] | None = None
    if tls:
        files = make_tls_files(directory / "tls", "network", days=365)
        etcd_tls = {
            "ca": str(files.ca),
            "cert": str(files.server_cert),
            "key": str(files.server_key),
            "client_cert": str(files.client_cert),
            "client_key": str(files.client_key),
        }
        orderer_options = {
            **(orderer_options or {}),
            "tls_ca": etcd_tls["ca"],
            "tls_cert": etcd_tls["client_cert"],
            "tls_key": etcd_tls["client_key"],
        }
    databases = {org: f"ml_{slug}_{org.replace('-', '_')}" for org in org_ids}
    if not sqlite:
        _create_databases(pg_admin, list(databases.values()))
    try:
        nodes = _create_nodes(
            directory,
            network,
            org_ids,
            databases,
            sqlite=sqlite,
            pg_admin=pg_admin,
            orderer=orderer,
            api_ports=api_ports,
            peer_ports=peer_ports,
            load_keys=load_keys,
            gossip=GossipConfig(interval=gossip_interval),
            orderer_options=orderer_options or {},
            policy=policy,
            fhir=fhir,
            tls=etcd_tls,
        )
    except BaseException:
        if not sqlite:
            with contextlib.suppress(NetworkError):
                _drop_databases(pg_admin, list(databases.values()))
        raise
    layout: dict[str, Any] = {
        "format": 1,
        "network": network,
        "dir": str(directory),
        "sqlite": sqlite,
        "pg_admin": None if sqlite else pg_admin,
        "databases": [] if sqlite else list(databases.values()),
        "orderer": orderer,
        "etcd": {
            "token": f"medledger-{slug}",
            "tls": etcd_tls,
            "members": [
                {
                    "name": m.name,
                    "client_port": m.client_port,
                    "peer_port": m.peer_port,
                    "data_dir": str(m.data_dir),
                }
                for m in etcd
            ],
        },
        "nodes": nodes,
    }
    _write_json(directory / LAYOUT, layout)
    return layout


def _create_nodes(
    directory: Path,
    network: str,
    org_ids: list[str],
    databases: dict[str, str],
    *,
    sqlite: bool,
    pg_admin: str,
    orderer: str,
    api_ports: list[int],
    peer_ports: list[int],
    load_keys: int,
    gossip: GossipConfig,
    orderer_options: dict[str, Any],
    policy: dict[str, Any] | None,
    fhir: bool,
    tls: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    import asyncio

    pp = os.environ.get("MEDLEDGER_PASSPHRASE") or None
    dirs = {org: DataDir(directory / org / "data") for org in org_ids}
    node_ids, admins = [], []
    for org in org_ids:
        dirs[org].path.mkdir(parents=True, exist_ok=True)
        ks = dirs[org].keystore
        node_ids.append((org, f"Organisation {org[4:]}", ks.create(f"node-{org}", pp)))
        admins.append((f"admin-{org}", org, ks.create(f"admin-{org}", pp)))
        for i in range(load_keys):
            admins.append((f"load-{org}-{i}", org, ks.create(f"load-{org}-{i}", pp)))
    genesis = make_genesis(network, node_ids, admins, policy=policy)
    # with TLS the nodes' FHIR and peer APIs serve HTTPS with the network's server
    # certificate, and trust its CA for the other members' peer APIs
    cert = Path(tls["cert"]) if tls else None
    key = Path(tls["key"]) if tls else None
    ca = Path(tls["ca"]) if tls else None
    scheme = "https" if tls else "http"
    nodes: list[dict[str, Any]] = []
    for i, org in enumerate(org_ids):
        dd = dirs[org]
        store = (
            f"sqlite:///{dd.path / 'ledger.db'}" if sqlite else _pg_url(pg_admin, databases[org])
        )
        records = f"sqlite:///{dd.path / 'records.db'}" if sqlite else store

        async def _init(dd: DataDir = dd, org: str = org, store: str = store) -> None:
            node = await dd.init(network=network, org=org, store=store, genesis=genesis)
            await node.close()

        asyncio.run(_init())
        cfg = NodeConfig(
            network=network,
            org=org,
            data_dir=dd.path,
            store=store,
            records=records,
            orderer=orderer,
            api=HttpEndpoint("127.0.0.1", api_ports[i], tls_cert=cert, tls_key=key, enabled=fhir),
            peer=HttpEndpoint("127.0.0.1", peer_ports[i], tls_cert=cert, tls_key=key, tls_ca=ca),
            peers=tuple(
                PeerRef(other, f"{scheme}://127.0.0.1:{peer_ports[j]}")
                for j, other in enumerate(org_ids)
                if other != org
            ),
            gossip=gossip,
            orderer_options=orderer_options,
        )
        path = directory / org / "node.toml"
        path.write_text(dump_config(cfg))
        nodes.append(
            {
                "org": org,
                "config": str(path),
                "data_dir": str(dd.path),
                "store": store,
                "api": cfg.api.url,
                "peer": cfg.peer.url,
                "log": str(directory / org / "node.log"),
            }
        )
    return nodes


# -- processes -----------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    # a zombie (exited, not yet reaped by its parent) counts as gone
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _etcd_command(layout: dict[str, Any], m: dict[str, Any]) -> list[str]:
    members = layout["etcd"]["members"]
    tls = layout["etcd"].get("tls")
    scheme = "https" if tls else "http"
    cluster = ",".join(f"{x['name']}={scheme}://127.0.0.1:{x['peer_port']}" for x in members)
    client = f"{scheme}://127.0.0.1:{m['client_port']}"
    peer = f"{scheme}://127.0.0.1:{m['peer_port']}"
    secure = []
    if tls:
        # mutual TLS on client and peer traffic, one CA (see the README's deployment notes)
        for prefix in ("", "peer-"):
            secure += [
                f"--{prefix}cert-file",
                tls["cert"],
                f"--{prefix}key-file",
                tls["key"],
                f"--{prefix}trusted-ca-file",
                tls["ca"],
                f"--{prefix}client-cert-auth",
            ]
    return [
        ETCD_BIN,
        "--name",
        m["name"],
        "--data-dir",
        m["data_dir"],
        "--listen-client-urls",
        client,
        "--advertise-client-urls",
        client,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        cluster,
        "--initial-cluster-state",
        "new",  # ignored once the data directory exists
        "--initial-cluster-token",
        layout["etcd"]["token"],
        "--heartbeat-interval",
        "100",
        "--election-timeout",
        "1000",
        "--logger",
        "zap",
        "--log-level",
        "warn",
        *secure,
    ]


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    return proc.pid


def _get_json(
    url: str, timeout: float = 2.0, context: ssl.SSLContext | None = None
) -> tuple[int, dict[str, Any]] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError):
        return None


def load_layout(directory: Path) -> dict[str, Any]:
    path = directory.resolve() / LAYOUT
    if not path.exists():
        raise NetworkError(f"{directory} holds no network (run `medledger network up` first)")
    return _read_json(path)


def start_network(directory: Path, *, timeout: float = 120.0) -> dict[str, Any]:
    """Start (or restart) the etcd members and node processes of the network in ``directory``."""
    directory = directory.resolve()
    layout = load_layout(directory)
    pids = _read_json(directory / PIDS) if (directory / PIDS).exists() else {}
    etcd_pids: dict[str, int] = dict(pids.get("etcd") or {})
    node_pids: dict[str, int] = dict(pids.get("nodes") or {})
    for m in layout["etcd"]["members"]:
        pid = etcd_pids.get(m["name"])
        if pid is None or not _alive(pid):
            log = Path(m["data_dir"]).parent / f"{m['name']}.log"
            etcd_pids[m["name"]] = _spawn(_etcd_command(layout, m), log)
    _write_json(directory / PIDS, {"etcd": etcd_pids, "nodes": node_pids})
    deadline = time.monotonic() + timeout
    context = _client_context(layout)
    for m in layout["etcd"]["members"]:
        while True:
            if _etcd_healthy(m, context):
                break
            if not _alive(etcd_pids[m["name"]]):
                raise NetworkError(f"etcd member {m['name']} exited; see its log")
            if time.monotonic() > deadline:
                raise NetworkError(f"etcd member {m['name']} not healthy in time")
            time.sleep(0.1)
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for node in layout["nodes"]:
        pid = node_pids.get(node["org"])
        if pid is None or not _alive(pid):
            cmd = [sys.executable, "-m", "medledger.consortium.process", "--config", node["config"]]
            node_pids[node["org"]] = _spawn(cmd, Path(node["log"]), env)
    _write_json(directory / PIDS, {"etcd": etcd_pids, "nodes": node_pids})
    for node in layout["nodes"]:
        wait_serving(node["peer"], node_pids[node["org"]], deadline, node["log"], context)
    return {"layout": layout, "pids": {"etcd": etcd_pids, "nodes": node_pids}}


def _client_context(layout: dict[str, Any]) -> ssl.SSLContext | None:
    """For a network made with TLS: trusts its CA and presents its client certificate
    (etcd requires one); None for a plain network."""
    tls = layout["etcd"].get("tls")
    if not tls:
        return None
    context = ssl.create_default_context(cafile=tls["ca"])
    context.load_cert_chain(tls["client_cert"], tls["client_key"])
    return context


def _etcd_healthy(m: dict[str, Any], context: ssl.SSLContext | None) -> bool:
    """Whether etcd member ``m`` answers its ``/health`` as healthy (over mutual TLS with
    ``context``, the network's :func:`_client_context`, when it has one)."""
    scheme = "https" if context else "http"
    got = _get_json(f"{scheme}://127.0.0.1:{m['client_port']}/health", 1.0, context)
    return got is not None and got[1].get("health") in ("true", True)


def wait_serving(
    peer_url: str,
    pid: int,
    deadline: float,
    log: str = "",
    context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """Wait until the node at ``peer_url`` reports it is serving; returns its health."""
    while True:
        got = _get_json(f"{peer_url}/health", 1.0, context)
        if got is not None and got[1].get("phase") == "serving":
            return got[1]
        if not _alive(pid):
            raise NetworkError(f"the node at {peer_url} exited; see {log}")
        if time.monotonic() > deadline:
            raise NetworkError(f"the node at {peer_url} did not start serving in time; see {log}")
        time.sleep(0.2)


def _terminate(pids: list[int], grace: float) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def stop_network(directory: Path, *, purge: bool = False, grace: float = 15.0) -> dict[str, Any]:
    """Stop the nodes, then the etcd members; with ``purge`` also drop databases and files."""
    directory = directory.resolve()
    layout = load_layout(directory)
    pids = _read_json(directory / PIDS) if (directory / PIDS).exists() else {}
    nodes = [int(p) for p in (pids.get("nodes") or {}).values()]
    etcd = [int(p) for p in (pids.get("etcd") or {}).values()]
    stopped = [p for p in nodes + etcd if _alive(p)]
    _terminate([p for p in nodes if _alive(p)], grace)
    for pid in etcd:  # one at a time: a member stopping alone exits at once
        if _alive(pid):
            _terminate([pid], grace)
    with contextlib.suppress(FileNotFoundError):
        (directory / PIDS).unlink()
    if purge:
        if layout.get("databases"):
            _drop_databases(layout["pg_admin"], list(layout["databases"]))
        shutil.rmtree(directory, ignore_errors=True)
    return {"stopped": len(stopped), "purged": purge}


def network_status(directory: Path) -> dict[str, Any]:
    """Health of every etcd member and node (None where unreachable)."""
    layout = load_layout(directory)
    pids = _read_json(directory.resolve() / PIDS) if (directory.resolve() / PIDS).exists() else {}
    context = _client_context(layout)
    etcd = []
    for m in layout["etcd"]["members"]:
        etcd.append(
            {
                "name": m["name"],
                "endpoint": f"127.0.0.1:{m['client_port']}",
                "healthy": _etcd_healthy(m, context),
            }
        )
    nodes = []
    for n in layout["nodes"]:
        got = _get_json(f"{n['peer']}/health", 2.0, context)
        pid = (pids.get("nodes") or {}).get(n["org"])
        nodes.append(
            {
                "org": n["org"],
                "api": n["api"],
                "peer": n["peer"],
                "pid": pid,
                "running": pid is not None and _alive(int(pid)),
                "health": None if got is None else got[1],
            }
        )
    return {"network": layout["network"], "dir": layout["dir"], "etcd": etcd, "nodes": nodes}
