"""A node's data directory: configuration, keys, genesis and the ledger store.

Layout::

    DIR/node.json       {"format": 1, "network", "org", "store", "node_key", "admin_key"}
    DIR/genesis.json    the network's genesis document (shared by every member)
    DIR/keys/           the keystore (0700; identity files 0600, encrypted when a
                        passphrase is given through MEDLEDGER_PASSPHRASE)
    DIR/ledger.db       the SQLite ledger (the default store)
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medledger.contracts.core import normalise_genesis
from medledger.crypto.keystore import Identity, Keystore
from medledger.errors import MedledgerError
from medledger.node import Node

__all__ = ["DataDir", "DataDirError", "default_data_dir", "make_genesis"]

PASSPHRASE_ENV = "MEDLEDGER_PASSPHRASE"


class DataDirError(MedledgerError):
    """The data directory is missing, incomplete or already initialised."""

    code = "data-dir"


def default_data_dir() -> Path:
    """``$MEDLEDGER_DATA_DIR``, else ``$XDG_DATA_HOME/medledger``, else ~/.local/share."""
    env = os.environ.get("MEDLEDGER_DATA_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "medledger"


def make_genesis(
    network: str,
    orgs: Sequence[tuple[str, str, Identity]],
    admins: Sequence[tuple[str, str, Identity]],
    *,
    policy: dict[str, Any] | None = None,
    time_ms: int | None = None,
) -> dict[str, Any]:
    """A JSON-ready genesis document (keys as hex)."""
    doc: dict[str, Any] = {
        "network": network,
        "time": int(time.time() * 1000) if time_ms is None else time_ms,
        "orgs": [
            {
                "id": oid,
                "name": name,
                "node_key": ident.signing.public.raw.hex(),
                "enc_key": ident.encryption.public.raw.hex(),
                "enc_alg": ident.encryption.public.alg,
            }
            for oid, name, ident in orgs
        ],
        "admins": [
            {"id": aid, "org": org, "key": ident.signing.public.raw.hex()}
            for aid, org, ident in admins
        ],
    }
    if policy:
        doc["policy"] = policy
    normalise_genesis(doc)  # validate early
    return doc


@dataclass(slots=True)
class DataDir:
    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / "node.json"

    @property
    def genesis_file(self) -> Path:
        return self.path / "genesis.json"

    @property
    def keystore(self) -> Keystore:
        return Keystore(self.path / "keys")

    def exists(self) -> bool:
        return self.config_file.exists()

    def config(self) -> dict[str, Any]:
        if not self.config_file.exists():
            raise DataDirError(
                f"{self.path} is not a medledger data directory (run `medledger init` first)"
            )
        try:
            cfg: dict[str, Any] = json.loads(self.config_file.read_text())
        except (OSError, ValueError) as exc:
            raise DataDirError(f"cannot read {self.config_file}: {exc}") from exc
        return cfg

    def genesis(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads(self.genesis_file.read_text())
        except (OSError, ValueError) as exc:
            raise DataDirError(f"cannot read {self.genesis_file}: {exc}") from exc
        return doc

    def passphrase(self) -> str | None:
        return os.environ.get(PASSPHRASE_ENV) or None

    def identity(self, name: str) -> Identity:
        return self.keystore.load(name, self.passphrase())

    def write_json(self, path: Path, doc: dict[str, Any]) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    async def init(
        self,
        *,
        network: str,
        org: str,
        org_name: str | None = None,
        store: str | None = None,
        genesis: dict[str, Any] | None = None,
    ) -> Node:
        """Create keys, genesis (single-organisation unless given) and the ledger."""
        if self.exists():
            raise DataDirError(f"{self.path} is already initialised")
        self.path.mkdir(parents=True, exist_ok=True)
        ks = self.keystore
        node_name, admin_name = f"node-{org}", f"admin-{org}"
        names = ks.names()
        node_id = (
            ks.load(node_name, self.passphrase())
            if node_name in names
            else ks.create(node_name, self.passphrase())
        )
        admin_id = (
            ks.load(admin_name, self.passphrase())
            if admin_name in names
            else ks.create(admin_name, self.passphrase())
        )
        if genesis is None:
            genesis = make_genesis(
                network, [(org, org_name or org, node_id)], [(admin_name, org, admin_id)]
            )
        store_url = store or f"sqlite:///{(self.path / 'ledger.db').resolve()}"
        node = await Node.create(store_url, genesis, [(org, node_id.signing)])
        self.write_json(self.genesis_file, genesis)
        self.write_json(
            self.config_file,
            {
                "format": 1,
                "network": genesis["network"],
                "org": org,
                "store": store_url,
                "node_key": node_name,
                "admin_key": admin_name,
            },
        )
        return node

    def org_ids(self) -> list[str]:
        """The organisations this node acts for (all of them in an embedded network)."""
        cfg = self.config()
        orgs: list[str] = cfg.get("orgs") or [cfg["org"]]
        return orgs

    def org_keys(self) -> dict[str, Identity]:
        return {org: self.identity(f"node-{org}") for org in self.org_ids()}

    async def open_node(self, *, read_only: bool = False) -> Node:
        cfg = self.config()
        signers = (
            [] if read_only else [(org, ident.signing) for org, ident in self.org_keys().items()]
        )
        return await Node.open(cfg["store"], signers)

    @contextlib.asynccontextmanager
    async def node(self, *, read_only: bool = False) -> AsyncIterator[Node]:
        """``async with dd.node() as node:`` opens this directory's node and always closes it."""
        node = await self.open_node(read_only=read_only)
        try:
            yield node
        finally:
            await node.close()

    async def init_embedded(
        self,
        *,
        network: str,
        orgs: Sequence[tuple[str, str]],
        policy: dict[str, Any] | None = None,
        store: str | None = None,
    ) -> Node:
        """An embedded network: every organisation's node key held by this one node."""
        if self.exists():
            raise DataDirError(f"{self.path} is already initialised")
        self.path.mkdir(parents=True, exist_ok=True)
        ks = self.keystore
        pp = self.passphrase()
        nodes = [(oid, name, ks.create(f"node-{oid}", pp)) for oid, name in orgs]
        admins = [(f"admin-{oid}", oid, ks.create(f"admin-{oid}", pp)) for oid, _ in orgs]
        genesis = make_genesis(network, nodes, admins, policy=policy)
        store_url = store or f"sqlite:///{(self.path / 'ledger.db').resolve()}"
        node = await Node.create(store_url, genesis, [(oid, i.signing) for oid, _, i in nodes])
        self.write_json(self.genesis_file, genesis)
        self.write_json(
            self.config_file,
            {
                "format": 1,
                "network": network,
                "org": orgs[0][0],
                "orgs": [oid for oid, _ in orgs],
                "store": store_url,
                "node_key": f"node-{orgs[0][0]}",
                "admin_key": f"admin-{orgs[0][0]}",
            },
        )
        return node
