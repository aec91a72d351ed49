"""Command-line of the consortium: ``medledger node ...`` and ``medledger network ...``.

Registered on the main app by :mod:`medledger.cli` (``app.add_typer(node_app,
name="node")`` and ``app.add_typer(network_app, name="network")``); also runnable
as ``python -m medledger.cli_network``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from medledger.errors import MedledgerError

__all__ = ["network_app", "node_app"]

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

node_app = typer.Typer(help="Run one organisation's consortium node.", no_args_is_help=True)
network_app = typer.Typer(
    help="A local consortium on loopback (etcd cluster + one node per organisation).",
    no_args_is_help=True,
)

ConfigOpt = Annotated[
    Path, typer.Option("--config", help="The node's node.toml.", exists=False, dir_okay=False)
]
DirOpt = Annotated[
    Path,
    typer.Option("--dir", help="Directory of the local network.", file_okay=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _emit(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


# -- node ------------------------------------------------------------------------------------


@node_app.command("start")
def node_start(config: ConfigOpt) -> None:
    """Run the node described by node.toml until SIGTERM/SIGINT (FHIR API, peer API, gossip)."""
    from medledger.consortium.process import main

    raise typer.Exit(main(["--config", str(config)]))


def _health_line(doc: dict[str, Any]) -> str:
    peers = doc.get("peers") or {}
    agree = ", ".join(doc.get("agreeing") or []) or "none yet"
    line = (
        f"{doc.get('org')}: {doc.get('status')} at height {doc.get('height')} "
        f"(log {doc.get('log_size')}); agreeing peers: {agree}"
    )
    if doc.get("divergent_peers"):
        line += f"; DIVERGED: {', '.join(doc['divergent_peers'])}"
    unreachable = [o for o, p in peers.items() if p.get("reachable") is False]
    if unreachable:
        line += f"; unreachable: {', '.join(unreachable)}"
    return line


@node_app.command("status")
def node_status(config: ConfigOpt, json_: JsonOpt = False) -> None:
    """Ask the running node for its height, peers and divergence status (exit 1 if halted)."""
    import httpx

    from medledger.consortium.client import tls_context
    from medledger.consortium.config import load_config

    cfg = load_config(config)
    try:
        resp = httpx.get(f"{cfg.peer.url}/health", verify=tls_context(cfg.peer.tls_ca), timeout=5)
        doc = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        err.print(f"error: the node at {cfg.peer.url} does not answer: {exc}", markup=False)
        raise typer.Exit(2) from None
    if json_:
        _emit(doc)
    else:
        out.print(_health_line(doc), markup=False)
        if doc.get("halted"):
            err.print(f"DIVERGENCE: {doc['halted']}", markup=False)
        for org, peer in sorted((doc.get("peers") or {}).items()):
            d = peer.get("diverged")
            if d:
                out.print(
                    f"  {org} diverged at height {d['height']}: {', '.join(d['differs'])} differ",
                    markup=False,
                )
    if not doc.get("writes", True):
        raise typer.Exit(1)


def _submit_via_node(cfg_path: Path, signer: str, type_: str, payload: dict[str, Any]) -> Any:
    """Sign one transaction with keystore identity ``signer`` and submit it to the running node."""
    import httpx

    from medledger.consortium.client import tls_context
    from medledger.consortium.config import load_config
    from medledger.datadir import DataDir
    from medledger.encoding import decode, encode
    from medledger.ledger.tx import make_tx

    cfg = load_config(cfg_path)
    key = DataDir(cfg.data_dir).identity(signer).signing
    verify = tls_context(cfg.peer.tls_ca)
    with httpx.Client(base_url=cfg.peer.url, verify=verify, timeout=60) as http:
        try:
            last = http.get(f"/ledger/v1/seq/{key.key_id.hex()}").json()["seq"]
            tx = make_tx(key, cfg.network, type_, payload, seq=int(last) + 1, time=_now_ms())
            resp = http.post("/ledger/v1/txs", content=encode([tx.raw]))
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise MedledgerError(f"the node at {cfg.peer.url} does not answer: {exc}") from exc
    if resp.status_code != 200:
        raise MedledgerError(f"the node refused ({resp.status_code}): {resp.text[:300]}")
    (result,) = decode(resp.content)
    if not result["ok"]:
        raise MedledgerError(f"{result['error']}: {result['message']}")
    return tx.tx_id.hex(), result


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


@node_app.command("keys")
def node_keys(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="The new node's data directory.")],
    org: Annotated[str, typer.Option("--org", help="The organisation id.")],
    json_: JsonOpt = False,
) -> None:
    """Create (if missing) an organisation's node and admin keys; print the public parts.

    A joining organisation runs this on its own machine and hands the printed
    JSON (public keys only) to a member, who proposes it (``node org-add``).
    """
    from medledger.datadir import DataDir

    dd = DataDir(data_dir)
    dd.path.mkdir(parents=True, exist_ok=True)
    ks, pp = dd.keystore, dd.passphrase()
    names = ks.names()
    node = ks.load(f"node-{org}", pp) if f"node-{org}" in names else ks.create(f"node-{org}", pp)
    admin_name = f"admin-{org}"
    admin = ks.load(admin_name, pp) if admin_name in names else ks.create(admin_name, pp)
    doc = {
        "org": org,
        "node_key": node.signing.public.raw.hex(),
        "enc_key": node.encryption.public.raw.hex(),
        "enc_alg": node.encryption.public.alg,
        "admin_key": admin.signing.public.raw.hex(),
    }
    if json_:
        _emit(doc)
    else:
        out.print(json.dumps(doc, indent=2), markup=False)


@node_app.command("org-add")
def node_org_add(
    config: ConfigOpt,
    keys: Annotated[Path, typer.Option("--keys", help="The joining org's `node keys` JSON.")],
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Propose adding an organisation (signed by this org's admin, through the running node)."""
    from medledger.consortium.config import load_config

    try:
        doc = json.loads(keys.read_text())
        payload = {
            "action": "add",
            "org": {
                "id": doc["org"],
                "name": name or doc["org"],
                "node_key": bytes.fromhex(doc["node_key"]),
                "enc_key": bytes.fromhex(doc["enc_key"]),
                "enc_alg": int(doc["enc_alg"]),
            },
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MedledgerError(f"cannot read the keys file {keys}: {exc}") from exc
    cfg = load_config(config)
    proposal, res = _submit_via_node(config, f"admin-{cfg.org}", "org.propose", payload)
    if json_:
        _emit({"proposal": proposal, "height": res["height"]})
    else:
        out.print(f"proposal {proposal}", markup=False)


@node_app.command("org-approve")
def node_org_approve(
    proposal: Annotated[str, typer.Argument(help="The proposal id (hex).")],
    config: ConfigOpt,
    json_: JsonOpt = False,
) -> None:
    """Approve a membership proposal as this org's admin, through the running node."""
    from medledger.consortium.config import load_config

    cfg = load_config(config)
    tx_id, res = _submit_via_node(config, f"admin-{cfg.org}", "org.approve", {"proposal": proposal})
    if json_:
        _emit({"approval": tx_id, "height": res["height"]})
    else:
        out.print(f"approved {proposal} (tx {tx_id})", markup=False)


# -- network ---------------------------------------------------------------------------------


@network_app.command("up")
def network_up(
    orgs: Annotated[int, typer.Option("--orgs", min=1, max=9, help="Organisations.")] = 3,
    sqlite: Annotated[
        bool, typer.Option("--sqlite", help="SQLite files instead of PostgreSQL databases.")
    ] = False,
    directory: DirOpt = Path("medledger-network"),
    network: Annotated[str, typer.Option(help="Network id.")] = "medledger-local",
    pg: Annotated[
        str, typer.Option("--pg", help="PostgreSQL server (admin connection) for the databases.")
    ] = "postgresql://postgres@127.0.0.1:5432/postgres",
    load_keys: Annotated[
        int, typer.Option("--load-keys", min=0, max=64, help="Extra signing keys per org.")
    ] = 0,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls", help="etcd with mutual TLS (certificates made for the network in DIR/tls)."
        ),
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Create (first time) and start a local consortium; print its addresses."""
    from medledger.consortium import network as net

    directory = directory.resolve()
    if not (directory / net.LAYOUT).exists():
        net.create_network(
            directory,
            orgs=orgs,
            sqlite=sqlite,
            network=network,
            pg_admin=pg,
            load_keys=load_keys,
            tls=tls,
        )
    started = net.start_network(directory)
    layout = started["layout"]
    doc = {
        "network": layout["network"],
        "dir": layout["dir"],
        "orderer": layout["orderer"],
        "nodes": [
            {
                "org": n["org"],
                "fhir": n["api"] + "/fhir",
                "peer": n["peer"],
                "store": n["store"],
                "config": n["config"],
                "pid": started["pids"]["nodes"][n["org"]],
            }
            for n in layout["nodes"]
        ],
        "etcd": started["pids"]["etcd"],
    }
    if json_:
        _emit(doc)
        return
    out.print(f"network [bold]{doc['network']}[/] is up ({layout['dir']})")
    out.print(f"etcd: {doc['orderer']}", markup=False)
    for n in doc["nodes"]:
        out.print(
            f"  {n['org']}: FHIR {n['fhir']}  peer {n['peer']}  store {n['store']}  pid {n['pid']}",
            markup=False,
        )
    out.print(f"stop it with: medledger network down --dir {layout['dir']}", markup=False)


@network_app.command("down")
def network_down(
    directory: DirOpt = Path("medledger-network"),
    purge: Annotated[
        bool, typer.Option("--purge", help="Also drop the databases and delete the directory.")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Stop every node and etcd member of the local network."""
    from medledger.consortium import network as net

    doc = net.stop_network(directory, purge=purge)
    if json_:
        _emit(doc)
    else:
        out.print(
            f"stopped {doc['stopped']} processes" + (" and removed the network" if purge else "")
        )


@network_app.command("status")
def network_status(directory: DirOpt = Path("medledger-network"), json_: JsonOpt = False) -> None:
    """Health of every etcd member and node (exit 1 if any is down or halted)."""
    from medledger.consortium import network as net

    doc = net.network_status(directory)
    bad = [m["name"] for m in doc["etcd"] if not m["healthy"]] + [
        n["org"]
        for n in doc["nodes"]
        if n["health"] is None or not n["health"].get("writes", False)
    ]
    if json_:
        _emit(doc)
    else:
        for m in doc["etcd"]:
            state = "healthy" if m["healthy"] else "DOWN"
            out.print(f"etcd {m['name']} {m['endpoint']}: {state}", markup=False)
        for n in doc["nodes"]:
            if n["health"] is None:
                out.print(f"{n['org']}: DOWN ({n['peer']})", markup=False)
            else:
                out.print(_health_line(n["health"]), markup=False)
    if bad:
        raise typer.Exit(1)


def _main() -> None:  # pragma: no cover - ``python -m medledger.cli_network``
    app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
    app.add_typer(node_app, name="node")
    app.add_typer(network_app, name="network")
    try:
        app()
    except MedledgerError as exc:
        err.print(f"error: {exc.code}: {exc}", markup=False)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    _main()
