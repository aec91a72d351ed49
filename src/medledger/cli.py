"""The ``medledger`` command line.

Every command takes ``--data-dir DIR`` (default: ``$MEDLEDGER_DATA_DIR`` or a
per-user directory), ``--help``, and reports errors as one line on stderr with
a non-zero exit status. Commands that print data take ``--json``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import sys
from collections.abc import Callable, Coroutine
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from medledger.datadir import DataDir, default_data_dir
from medledger.errors import MedledgerError
from medledger.ledger.checkpoint import checkpoint_of
from medledger.ledger.tx import Transaction
from medledger.ledger.verify import verify_ledger
from medledger.merkle.verify import verify_consistency, verify_inclusion

if TYPE_CHECKING:
    import ssl

    from medledger.api.settings import Settings
    from medledger.client import Trust
    from medledger.crypto.client_key import ClientKey
    from medledger.ledger.checkpoint import Checkpoint
    from medledger.services.fhir import ImportReport, ImportWorkers

__all__ = ["app", "main"]

T = TypeVar("T")

app = typer.Typer(
    name="medledger",
    help="medledger: a verifiable ledger for sharing medical records.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
tx_app = typer.Typer(help="Inspect transactions.", no_args_is_help=True)
proof_app = typer.Typer(help="Produce Merkle proofs.", no_args_is_help=True)
app.add_typer(tx_app, name="tx")
app.add_typer(proof_app, name="proof")

# soft_wrap: never wrap at the (default 80-column) width when not on a terminal, so an
# error stays one line and printed notes / ids stay intact when piped
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Node data directory (default: $MEDLEDGER_DATA_DIR or ~/.local/share/medledger).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


class CliError(Exception):
    """A one-line user error."""


def _dd(path: Path | None) -> DataDir:
    return DataDir(path if path is not None else default_data_dir())


def run_async(fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


def _progress(json_: bool) -> Any:
    """A progress display of named tasks on stderr (off for --json or when not a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err,
        disable=json_ or not err.is_terminal,
    )


def emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def _parse_txid(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise CliError(f"transaction id {text!r} is not hex") from None
    if len(raw) != 32:
        raise CliError("a transaction id is 32 bytes (64 hex digits)")
    return raw


# -- init ----------------------------------------------------------------------------


@app.command()
@run_async
async def init(
    data_dir: DataDirOpt = None,
    network: Annotated[str, typer.Option(help="Network id.")] = "medledger-local",
    org: Annotated[str, typer.Option(help="This node's organisation id.")] = "org-1",
    org_name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    genesis: Annotated[
        Path | None, typer.Option(help="Join the network of this genesis file.")
    ] = None,
    store: Annotated[
        str | None, typer.Option(help="Store URL (default sqlite:///DIR/ledger.db).")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Create a node's data directory, keys, genesis and ledger."""
    dd = _dd(data_dir)
    doc = None
    if genesis is not None:
        try:
            doc = json.loads(genesis.read_text())
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read genesis file {genesis}: {exc}") from exc
    node = await dd.init(network=network, org=org, org_name=org_name, store=store, genesis=doc)
    try:
        info = {
            "data_dir": str(dd.path),
            "network": node.network,
            "org": org,
            "store": dd.config()["store"],
            "verifier_keys": node.verifier_keys(),
        }
    finally:
        await node.close()
    if json_:
        emit_json(info)
    else:
        out.print(f"initialised node [bold]{org}[/] of network [bold]{node.network}[/]")
        out.print(f"data directory: {dd.path}")
        for vk in info["verifier_keys"]:
            out.print(f"checkpoint verifier key: {vk}")


# -- verify ----------------------------------------------------------------------------


@app.command()
@run_async
async def verify(
    data_dir: DataDirOpt = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A consortium node's node.toml (instead of --data-dir): its ledger "
            "and record store.",
        ),
    ] = None,
    records: Annotated[
        bool,
        typer.Option(
            "--records",
            help="Also check every record held at rest: each version against its ledger "
            "commitment, opened with the custodian's key, and the search index; shredded "
            "records must be gone. Reads only.",
        ),
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Recompute and check every hash, link, root and signature from genesis."""
    from medledger.api.settings import Settings

    if config is not None and data_dir is not None:
        raise CliError("give --data-dir or --config, not both")
    if config is not None:
        from medledger.consortium.config import load_config

        try:
            cfg = load_config(config)
        except MedledgerError as exc:
            raise CliError(f"{config}: {exc}") from exc
        dd = DataDir(cfg.data_dir)
        records_url, keys = cfg.records, {cfg.org: cfg.node_key_name}
    else:
        dd = _dd(data_dir)
        records_url = Settings(data_dir=dd.path).records_store
        keys = {org: f"node-{org}" for org in dd.org_ids()}
    checks: list[Any] = []
    async with dd.node(read_only=True) as node:
        report = await node._run(lambda: verify_ledger(node.store))
        if records and report.ok:
            with _progress(json_) as progress:
                checks = await _check_records(dd, node, records_url, keys, progress)
    ok = report.ok and all(c.ok for c in checks)
    if json_:
        doc = report.to_json()
        if records:
            doc["records"] = [c.to_json() for c in checks]
        emit_json(doc)
    elif report.ok:
        out.print(
            f"OK: {report.blocks} blocks, {report.transactions} transactions, "
            f"{report.checkpoints} checkpoints verified; log root {report.log_root}"
        )
    else:
        err.print(f"verify FAILED: {report.failure}", markup=False)
    if not json_:
        for c in checks:
            counts = (
                f"records of {c.org}: {c.records} records, {c.versions} versions, "
                f"{c.index} index rows, {c.shredded} shredded"
            )
            if c.ok:
                out.print(f"OK: {counts} checked", markup=False)
                continue
            err.print(f"records FAILED: {counts}; {len(c.problems)} problems:", markup=False)
            for line in c.problems[:50]:
                err.print(f"  {line}", markup=False)
            if len(c.problems) > 50:
                err.print(f"  ... and {len(c.problems) - 50} more (--json lists all)")
    if not ok:
        raise typer.Exit(1)


async def _check_records(
    dd: DataDir, node: Any, records_url: str, keys: dict[str, str], progress: Any
) -> list[Any]:
    """``check_store`` of every organisation whose node key this directory holds."""
    from medledger.services.access import AccessService
    from medledger.services.fhir import FhirService
    from medledger.services.records import OrgCrypto, RecordService
    from medledger.services.submitter import Submitter
    from medledger.store.records import open_record_store

    orgs = {org: OrgCrypto.from_identity(org, dd.identity(name)) for org, name in keys.items()}
    store = await open_record_store(records_url)
    try:
        submitter = Submitter(node)  # nothing is submitted: the node is open read-only
        access = AccessService(node, submitter, {})
        fhir = FhirService(
            node=node,
            submitter=submitter,
            access=access,
            records=RecordService(node, submitter, access, store, orgs),
            store=store,
            orgs=orgs,
            keystore=dd.keystore,
            passphrase=dd.passphrase(),
            base_url="http://localhost/fhir",
        )
        checks = []
        for org in sorted(orgs):
            task = progress.add_task(f"checking the records of {org}", total=None)

            def on_progress(done: int, total: int, task: Any = task) -> None:
                progress.update(task, completed=done, total=total)

            checks.append(await fhir.check_store(org, on_progress=on_progress))
        return checks
    finally:
        await store.close()


# -- checkpoint ------------------------------------------------------------------------


@app.command()
@run_async
async def checkpoint(
    data_dir: DataDirOpt = None,
    verifier_key: Annotated[
        bool, typer.Option("--verifier-key", help="Print the node's C2SP verifier key instead.")
    ] = False,
) -> None:
    """Print the latest signed checkpoint (a C2SP signed note)."""
    dd = _dd(data_dir)
    async with dd.node() as node:
        if verifier_key:
            for vk in node.verifier_keys():
                sys.stdout.write(vk + "\n")
        else:
            sys.stdout.write(await node.checkpoint())


# -- tx -----------------------------------------------------------------------------------


def _tx_json(rec: Any) -> dict[str, Any]:
    tx = Transaction.from_bytes(rec.raw)
    doc = tx.to_json()
    doc["index"] = rec.index
    doc["height"] = rec.height
    return doc


@tx_app.command("list")
@run_async
async def tx_list(
    data_dir: DataDirOpt = None,
    start: Annotated[int, typer.Option(help="First log index.", min=0)] = 0,
    limit: Annotated[int, typer.Option(help="How many.", min=1, max=100000)] = 100,
    json_: JsonOpt = False,
) -> None:
    """List transactions in log order."""
    async with _dd(data_dir).node(read_only=True) as node:
        recs = await node.list_txs(start, limit)
    docs = [_tx_json(r) for r in recs]
    if json_:
        emit_json(docs)
        return
    for d in docs:
        out.print(f"{d['index']:>8}  {d['tx_id']}  {d['type']:<20} block {d['height']}")


@tx_app.command("show")
@run_async
async def tx_show(txid: str, data_dir: DataDirOpt = None, json_: JsonOpt = False) -> None:
    """Show one transaction, with its canonical bytes (base64) and log index."""
    tx_id = _parse_txid(txid)
    async with _dd(data_dir).node(read_only=True) as node:
        rec = await node.get_tx(tx_id)
    doc = _tx_json(rec)
    doc["canonical_bytes"] = base64.b64encode(rec.raw).decode()
    if json_:
        emit_json(doc)
    else:
        for k, v in doc.items():
            out.print(f"{k:>16}: {v}")


# -- proofs -------------------------------------------------------------------------------


@proof_app.command("inclusion")
@run_async
async def proof_inclusion(txid: str, data_dir: DataDirOpt = None, json_: JsonOpt = False) -> None:
    """Inclusion proof of a transaction against the latest signed checkpoint."""
    tx_id = _parse_txid(txid)
    async with _dd(data_dir).node(read_only=True) as node:
        proof = await node.inclusion_proof(tx_id)
    cp = checkpoint_of(proof.checkpoint)
    verify_inclusion(proof.leaf_index, proof.tree_size, proof.leaf_hash, proof.proof, cp.root)
    doc = proof.to_json()
    if json_:
        emit_json(doc)
    else:
        out.print(f"leaf {doc['leaf_index']} of {doc['tree_size']}: {doc['leaf_hash']}")
        for h in doc["proof"]:
            out.print(f"  {h}")
        out.print(proof.checkpoint, end="")


@proof_app.command("consistency")
@run_async
async def proof_consistency(
    from_: Annotated[int, typer.Option("--from", help="Older tree size.", min=0)],
    to: Annotated[int, typer.Option("--to", help="Newer tree size.", min=0)],
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Consistency proof between two log sizes."""
    if from_ > to:
        raise CliError("--from must not be larger than --to")
    async with _dd(data_dir).node(read_only=True) as node:
        root1, root2, proof = await node.consistency_proof(from_, to)
    verify_consistency(from_, to, proof, root1, root2)
    doc = {
        "size1": from_,
        "size2": to,
        "root1": root1.hex(),
        "root2": root2.hex(),
        "proof": [h.hex() for h in proof],
    }
    if json_:
        emit_json(doc)
    else:
        for k, v in doc.items():
            out.print(f"{k}: {v}")


# -- demo -----------------------------------------------------------------------------------


@app.command()
def demo(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            "--data-dir",
            help="Build the demo network in this new (or empty) directory and keep it "
            "(default: a temporary directory, removed on exit).",
            show_default=False,
        ),
    ] = None,
    no_serve: Annotated[
        bool, typer.Option("--no-serve", help="Only run the scenario; do not serve the portal.")
    ] = False,
    host: Annotated[str, typer.Option(help="Address the portal listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port the portal listens on.", min=1, max=65535)] = 8000,
    json_: JsonOpt = False,
) -> None:
    """Run the narrated demo on three organisations, then serve the portal until Ctrl-C."""
    from medledger.demo import main as demo_main

    code = demo_main(data_dir, serve=not no_serve, host=host, port=port, json_output=json_)
    if code:
        raise typer.Exit(code)


# -- API: serve, client register, import ----------------------------------------------------

client_app = typer.Typer(help="SMART Backend Services clients of the API.", no_args_is_help=True)
app.add_typer(client_app, name="client")


@app.command()
def serve(
    data_dir: DataDirOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8080,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="PEM certificate (chain): serve HTTPS.")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="PEM private key of --tls-cert.")
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option(
            "--base-url",
            help="The URL clients use (default from host, port and TLS); the token "
            "endpoint <base>/auth/token is the audience of client assertions.",
        ),
    ] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="Offer the portal's demo sign-in (never in production).")
    ] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the FHIR API (and the portal) of the data directory's embedded network."""
    import uvicorn

    from medledger.api.app import create_app
    from medledger.api.settings import Settings

    if (tls_cert is None) != (tls_key is None):
        raise CliError("give both --tls-cert and --tls-key, or neither")
    for f in (tls_cert, tls_key):
        if f is not None and not f.is_file():
            raise CliError(f"cannot read {f}")
    dd = _dd(data_dir)
    dd.config()  # fail now, not in the server's startup
    settings = Settings.for_listen(
        dd.path,
        host=host,
        port=port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        base_url=base_url,
        demo=demo,
    )
    err.print(
        f"medledger: serving {dd.path} at {settings.base_url} "
        f"(FHIR base {settings.fhir_base}, token endpoint {settings.token_url})",
        markup=False,
    )
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        log_level=log_level,
        proxy_headers=False,
        server_header=False,
        # the node hands work to storage threads and back; asyncio's loop wakes up for their
        # results faster than uvloop here (read p50 8 ms vs 19 ms in bench/bench_fhir.py)
        loop="asyncio",
    )


@client_app.command("register")
@run_async
async def client_register(
    org: Annotated[str, typer.Option("--org", help="Organisation the client acts for.")],
    jwks: Annotated[Path, typer.Option("--jwks", help="JSON file of the client's public keys.")],
    scope: Annotated[
        str, typer.Option("--scope", help='Most it may be granted, e.g. "system/*.rs".')
    ],
    practitioner: Annotated[
        str | None, typer.Option("--practitioner", help="Acts as this practitioner.")
    ] = None,
    patient: Annotated[str | None, typer.Option("--patient", help="Acts as this patient.")] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A consortium node's node.toml (instead of --data-dir); the node may be running.",
        ),
    ] = None,
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Register a Backend Services client with its public JWKS; prints its client id."""
    from medledger.api.settings import Settings
    from medledger.api.smart import SmartAuthority
    from medledger.encoding import decode

    if practitioner is not None and patient is not None:
        raise CliError("give --practitioner or --patient, not both")
    try:
        keys = json.loads(jwks.read_text())
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read JWKS file {jwks}: {exc}") from exc

    def check(get: Callable[[bytes], bytes | None]) -> None:
        if practitioner is not None:
            raw = get(f"principal/{practitioner}".encode())
            who = decode(raw) if raw else None
            if not who or who.get("kind") not in ("practitioner", "app") or who.get("org") != org:
                raise CliError(f"{practitioner} is not a practitioner of {org}")
        if patient is not None:
            raw = get(f"patient/{patient}".encode())
            if raw is None or org not in (decode(raw).get("orgs") or []):
                raise CliError(f"{patient} is not a patient of {org}")

    if config is not None:
        settings = await asyncio.to_thread(_node_settings, config, org, check)
    else:
        dd = _dd(data_dir)
        if org not in dd.org_ids():
            raise CliError(
                f"this node does not serve organisation {org!r} ({', '.join(dd.org_ids())})"
            )
        wanted = [f"principal/{practitioner}"] if practitioner is not None else []
        wanted += [f"patient/{patient}"] if patient is not None else []
        async with dd.node(read_only=True) as node:
            state: dict[bytes, bytes | None] = {}
            for key in wanted:
                state[key.encode()] = await node.state_get(key.encode())
            check(state.get)
        settings = Settings(data_dir=dd.path)
    smart = await SmartAuthority.open(settings.smart_store, token_url=settings.token_url)
    try:
        client = await smart.register_client(
            org=org, practitioner=practitioner, patient=patient, jwks=keys, scope=scope
        )
    finally:
        await smart.close()
    if json_:
        emit_json(
            {
                "client_id": client.client_id,
                "org": client.org,
                "practitioner": client.practitioner,
                "patient": client.patient,
                "scope": client.scope,
            }
        )
    else:
        sys.stdout.write(client.client_id + "\n")


def _node_settings(
    config: Path, org: str, check: Callable[[Callable[[bytes], bytes | None]], None]
) -> Settings:
    """A consortium node's API settings from its node.toml, after ``check`` on its ledger state.

    The ledger store is opened for reading only; a running node keeps writing it.
    """
    from medledger.api.settings import Settings
    from medledger.consortium.config import load_config
    from medledger.store import open_store

    try:
        cfg = load_config(config)
    except MedledgerError as exc:
        raise CliError(f"{config}: {exc}") from exc
    if org != cfg.org:
        raise CliError(f"this node serves organisation {cfg.org!r}, not {org!r}")
    store = open_store(cfg.store)
    try:
        check(store.get)
    finally:
        store.close()
    return Settings.for_node(cfg)


@client_app.command("keygen")
def client_keygen(
    out_prefix: Annotated[
        Path, typer.Option("--out", help="Writes OUT-key.pem (private, 0600) and OUT-jwks.json.")
    ] = Path("client"),
    kid: Annotated[str | None, typer.Option(help="Key id (default: random).")] = None,
) -> None:
    """Make a client key pair (EC P-384, ES384): the private key and the public JWKS to register."""
    from medledger.crypto.client_key import ClientKey

    key_file = Path(f"{out_prefix}-key.pem")
    jwks_file = Path(f"{out_prefix}-jwks.json")
    key = ClientKey.generate(kid)
    try:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CliError(f"{key_file} already exists") from None
    with os.fdopen(fd, "wb") as f:
        f.write(key.pem())
    jwks_file.write_text(json.dumps({"keys": [key.public_jwk()]}, indent=2) + "\n")
    sys.stdout.write(f"{key_file}\n{jwks_file}\n")


@client_app.command("assertion")
def client_assertion(
    client_id: Annotated[str, typer.Option("--client-id", help="The registered client id.")],
    key: Annotated[Path, typer.Option("--key", help="The client's private key (PEM).")],
    aud: Annotated[str, typer.Option("--aud", help="The token endpoint URL.")],
    kid: Annotated[
        str | None, typer.Option(help="Key id (default: read from --jwks or the key's JWKS).")
    ] = None,
    jwks: Annotated[Path | None, typer.Option("--jwks", help="JWKS holding the key id.")] = None,
    lifetime: Annotated[int, typer.Option(help="Seconds until it expires.", min=1, max=300)] = 240,
) -> None:
    """Print a signed client assertion (JWT, ES384) for POST /auth/token (private_key_jwt)."""
    private = _client_key(key, kid, jwks)
    sys.stdout.write(private.assertion(client_id, aud, lifetime=lifetime) + "\n")


def _client_key(key: Path, kid: str | None, jwks: Path | None = None) -> ClientKey:
    """The client's key from ``key`` (PEM); without ``kid``, its id from ``jwks`` (default:
    the JWKS that ``client keygen`` wrote beside it)."""
    from medledger.crypto.client_key import ClientKey

    if kid is None:
        jwks = jwks or Path(str(key).removesuffix("-key.pem") + "-jwks.json")
        try:
            kid = json.loads(jwks.read_text())["keys"][0]["kid"]
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise CliError(f"give --kid or a readable JWKS file ({jwks}: {exc})") from exc
    assert kid is not None
    try:
        return ClientKey.load(key, kid)
    except MedledgerError as exc:
        raise CliError(f"cannot read the private key {key}: {exc}") from exc


@client_app.command("audit")
def client_audit(
    fhir: Annotated[str, typer.Option("--fhir", help="The node's FHIR base URL.")],
    client_id: Annotated[str, typer.Option("--client-id", help="The registered client id.")],
    key: Annotated[Path, typer.Option("--key", help="The client's private key (PEM).")],
    patient: Annotated[str, typer.Option("--patient", help="Whose access log to check.")],
    trust: Annotated[
        list[str],
        typer.Option(
            "--trust",
            help="A member node's checkpoint verifier key (`medledger checkpoint "
            "--verifier-key` at that organisation); repeat for each.",
        ),
    ],
    quorum: Annotated[
        int | None, typer.Option(help="Signatures a checkpoint needs (default: a majority).")
    ] = None,
    keep: Annotated[
        Path | None,
        typer.Option(
            "--keep",
            help="A file holding the checkpoint kept last time: prove the log only grew "
            "since it, then keep the new one there.",
        ),
    ] = None,
    kid: Annotated[str | None, typer.Option(help="Key id (default: from the key's JWKS).")] = None,
    scope: Annotated[str, typer.Option(help="Scopes to ask for.")] = "system/AuditEvent.rs",
    cacert: Annotated[
        Path | None, typer.Option("--cacert", help="CA certificate (PEM) of the node's TLS.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Check a patient's access log on a node without trusting it.

    Every access entry (AuditEvent) is verified here with medledger.client: its signed
    transaction, its inclusion in the log of a checkpoint that a quorum of the trusted
    node keys signed, that it is about this patient, and (with --keep) that the log only
    grew since the last check. Exits 1 naming the first entry that fails. What this
    cannot show is an entry the node left out of its answer: ask another member's node
    too (every node holds the whole ledger).
    """
    import ssl

    from rich.table import Table

    from medledger.client import Trust

    client_key = _client_key(key, kid)
    pinned = Trust.from_verifier_keys(trust, quorum=quorum)
    kept = None
    if keep is not None and keep.exists():
        try:
            kept = pinned.check(keep.read_text())
        except (OSError, MedledgerError) as exc:
            raise CliError(f"the kept checkpoint {keep} does not verify: {exc}") from exc
    verify: ssl.SSLContext | bool = True
    if cacert is not None:
        verify = ssl.create_default_context(cafile=str(cacert))
    rows, cp, note = asyncio.run(
        _verified_audit(fhir, client_id, client_key, scope, pinned, verify, patient, kept)
    )
    if keep is not None:
        keep.write_text(note)
    summary = {
        "patient": patient,
        "verified": rows,
        "checkpoint": {"size": cp.size, "root": cp.root.hex(), "quorum": pinned.quorum},
        "append_only_since": None if kept is None else kept.size,
    }
    if as_json:
        emit_json(summary)
        return
    table = Table(title=f"access log of {patient}, verified here")
    for col in ("when (UTC)", "who", "organisation", "purpose", "outcome", "records", "leaf"):
        table.add_column(col)
    for r in rows:
        outcome = str(r["outcome"]) + (" (break-glass)" if r["break_glass"] else "")
        table.add_row(
            r["time"],
            str(r["actor"]),
            str(r["org"]),
            str(r["purpose"]),
            outcome,
            str(r["records"]),
            str(r["leaf"]),
        )
    out.print(table)
    grew = "" if kept is None else f"; the log only grew since the kept one ({kept.size} entries)"
    out.print(
        f"{len(rows)} {'entry' if len(rows) == 1 else 'entries'} verified against a "
        f"checkpoint of {cp.size} entries signed by "
        f"at least {pinned.quorum} trusted node keys{grew}"
    )


async def _verified_audit(
    fhir: str,
    client_id: str,
    key: ClientKey,
    scope: str,
    trust: Trust,
    verify: ssl.SSLContext | bool,
    patient: str,
    kept: Checkpoint | None,
) -> tuple[list[dict[str, Any]], Checkpoint, str]:
    """``client audit``'s checks over the network: (rows, checkpoint, its signed note)."""
    from datetime import UTC, datetime

    import httpx

    from medledger.client import Client
    from medledger.errors import ProofError

    rows: list[dict[str, Any]] = []
    async with (
        httpx.AsyncClient(verify=verify, timeout=60) as http,
        Client(fhir, client_id=client_id, key=key, scope=scope, trust=trust, http=http) as client,
    ):
        cp, note = await client.checkpoint_note()
        for event in await client.search_all("AuditEvent", patient=patient):
            try:
                proof = await client.access_proof(str(event["id"]), cp)
            except ProofError as exc:
                if "not yet in the checkpoint" in str(exc):
                    continue  # newer than the co-signed checkpoint: checked next time
                raise ProofError(f"AuditEvent/{event['id']}: {exc}") from exc
            e = proof.entry
            if e.get("patient") != patient:  # proved, but about someone else
                raise ProofError(f"AuditEvent/{event['id']} is an entry about another patient")
            when = datetime.fromtimestamp(proof.transaction.time / 1000, UTC)
            rows.append(
                {
                    "id": str(event["id"]),
                    "time": when.isoformat(timespec="seconds"),
                    "actor": e.get("actor"),
                    "org": e.get("org"),
                    "purpose": e.get("purpose"),
                    "outcome": e.get("outcome"),
                    "break_glass": bool(e.get("break_glass")),
                    "records": len(e.get("records") or []),
                    "leaf": proof.leaf_index,
                }
            )
        if kept is not None:
            await client.prove_append_only(kept, cp)
    return rows, cp, note


@app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="An NDJSON file, a Bundle, or a directory.")],
    org: Annotated[str, typer.Option("--org", help="Custodian organisation of the data.")],
    source: Annotated[
        str,
        typer.Option(help="Name of the source system (ids are derived from it and source ids)."),
    ] = "import",
    concurrency: Annotated[
        int,
        typer.Option(
            min=1,
            max=4096,
            help="Resources in flight at most (4 batches of up to 256 by default).",
        ),
    ] = 1024,
    workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=256,
            help="Worker processes validating and encrypting (default: one per CPU; "
            "0: everything in this process).",
        ),
    ] = None,
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Import FHIR Bulk Data NDJSON and Bundles (resumable; re-running changes nothing)."""
    from medledger.services.fhir import fork_import_workers

    if not path.exists():
        raise CliError(f"{path} does not exist")
    dd = _dd(data_dir)
    # fork the workers now, while this process runs one thread and has the validation
    # models loaded (the progress display and the node start threads)
    pool = fork_import_workers(workers)
    try:
        report = _import_with_progress(dd, path, org, source, concurrency, workers, pool, json_)
    finally:
        if pool is not None:
            pool.shutdown()
    doc = report.to_json()
    if json_:
        emit_json(doc)
    else:
        skipped = ", ".join(f"{k} {v}" for k, v in doc["skipped"].items()) or "none"
        out.print(
            f"imported {doc['created']} resources ({doc['resources_per_second']}/s), "
            f"{doc['existing']} already present, {doc['resumed']} resumed from the checkpoint; "
            f"skipped types: {skipped}; failed: {len(doc['failed'])}"
        )
        for f in doc["failed"][:20]:
            err.print(f"failed: {f['where']}: {f['error']}", markup=False)
    if doc["failed"]:
        raise typer.Exit(1)


def _import_with_progress(
    dd: DataDir,
    path: Path,
    org: str,
    source: str,
    concurrency: int,
    workers: int | None,
    pool: ImportWorkers | None,
    json_: bool,
) -> ImportReport:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("importing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=json_ or not err.is_terminal,
        transient=json_,
    ) as progress:
        task = progress.add_task("import", total=None)
        report = asyncio.run(
            _import(
                dd,
                path,
                org,
                source=source,
                concurrency=concurrency,
                workers=workers,
                pool=pool,
                on_total=lambda n: progress.update(task, total=n),
                on_advance=lambda n: progress.advance(task, n),
            )
        )
    return report


async def _import(dd: DataDir, path: Path, org: str, **options: Any) -> ImportReport:
    from medledger.api.runtime import Runtime
    from medledger.api.settings import Settings
    from medledger.services.fhir import Importer

    if org not in dd.org_ids():
        raise CliError(f"this node does not serve organisation {org!r} ({', '.join(dd.org_ids())})")
    # a few ms of block batching: an import is about throughput, not the latency of one write
    runtime = await Runtime.open(Settings(data_dir=dd.path), smart=False, max_wait=0.005)
    try:
        importer = Importer(runtime.fhir, org, state_dir=dd.path / "imports", **options)
        return await importer.run(path)
    finally:
        await runtime.close()


@app.command("reindex")
def reindex(
    org: Annotated[
        list[str] | None,
        typer.Option("--org", help="Custodian organisation (repeatable; default: every one)."),
    ] = None,
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Recompute the search index of the records the organisations hold.

    Each current version is decrypted with the custodian's key and indexed as a write
    indexes it now; rows that differ are rewritten. Nothing goes on the ledger.
    Run it with the server stopped, like an import. A server reindexes by itself when
    it starts on a store indexed by an older version.
    """
    dd = _dd(data_dir)
    orgs = org or dd.org_ids()
    unknown = [o for o in orgs if o not in dd.org_ids()]
    if unknown:
        raise CliError(f"this node does not serve {', '.join(unknown)} ({', '.join(dd.org_ids())})")
    with _progress(json_) as progress:
        tasks = {o: progress.add_task(f"reindexing {o}", total=None) for o in orgs}
        results = asyncio.run(
            _reindex(
                dd,
                orgs,
                lambda o, done, total: progress.update(tasks[o], completed=done, total=total),
            )
        )
    doc = {o: {"checked": c, "rewritten": r} for o, (c, r) in results.items()}
    if json_:
        emit_json(doc)
        return
    for o, counts in doc.items():
        out.print(f"{o}: {counts['checked']} records checked, {counts['rewritten']} reindexed")


async def _reindex(
    dd: DataDir, orgs: list[str], on_progress: Callable[[str, int, int], None]
) -> dict[str, tuple[int, int]]:
    from medledger.api.runtime import Runtime
    from medledger.api.settings import Settings

    # not reindexed at open as well: the pass below is the one asked for, and it reports
    runtime = await Runtime.open(Settings(data_dir=dd.path), smart=False, upgrade_index=False)
    try:
        results: dict[str, tuple[int, int]] = {}
        for o in orgs:
            progress = functools.partial(on_progress, o)
            results[o] = await runtime.fhir.reindex(o, on_progress=progress)
        return results
    finally:
        await runtime.close()


from medledger.cli_admin import register as _register_admin  # noqa: E402

_register_admin(app)

from medledger.cli_network import network_app, node_app  # noqa: E402

app.add_typer(node_app, name="node")
app.add_typer(network_app, name="network")


def main() -> None:
    try:
        app()
    except CliError as exc:
        err.print(f"error: {exc}", markup=False)
        sys.exit(2)
    except MedledgerError as exc:
        err.print(f"error: {exc.code}: {exc}", markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
