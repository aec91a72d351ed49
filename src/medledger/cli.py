"""The ``medledger`` command line.

Every command takes ``--data-dir DIR`` (default: ``$MEDLEDGER_DATA_DIR`` or a
per-user directory), ``--help``, and reports errors as one line on stderr with
a non-zero exit status. Commands that print data take ``--json``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import Callable, Coroutine
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from medledger.datadir import DataDir, default_data_dir
from medledger.errors import MedledgerError
from medledger.ledger.checkpoint import checkpoint_of
from medledger.ledger.tx import Transaction
from medledger.ledger.verify import verify_ledger
from medledger.merkle.verify import verify_consistency, verify_inclusion

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
async def verify(data_dir: DataDirOpt = None, json_: JsonOpt = False) -> None:
    """Recompute and check every hash, link, root and signature from genesis."""
    dd = _dd(data_dir)
    async with dd.node(read_only=True) as node:
        report = await node._run(lambda: verify_ledger(node.store))
    if json_:
        emit_json(report.to_json())
    elif report.ok:
        out.print(
            f"OK: {report.blocks} blocks, {report.transactions} transactions, "
            f"{report.checkpoints} checkpoints verified; log root {report.log_root}"
        )
    else:
        err.print(f"verify FAILED: {report.failure}", markup=False)
    if not report.ok:
        raise typer.Exit(1)


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
    data_dir: DataDirOpt = None,
    count: Annotated[int, typer.Option(help="Transactions to commit.", min=1)] = 3000,
    json_: JsonOpt = False,
) -> None:
    """Run the demonstration on a fresh embedded node."""
    from medledger.demo import run_demo

    summary = asyncio.run(run_demo(data_dir, count=count, quiet=json_))
    if json_:
        emit_json(summary)
    if not summary.get("ok"):
        raise typer.Exit(1)


from medledger.cli_admin import register as _register_admin  # noqa: E402

_register_admin(app)


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
