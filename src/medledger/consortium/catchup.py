"""Catch-up: a node that was down, or is new, fetches the blocks it misses from other nodes.

Blocks come from any peer's ``/peer/v1/blocks``; none is trusted. For each
block, in height order, the node checks

1. that it follows its head (height, ``prev`` = hash of its head block);
2. that the header's proposer is a registered node key, and the block's
   signature over the header hash verifies with a member's node key as
   registered in the node's own committed state;
3. every transaction's encoding and signature; and
4. that re-applying the transactions with its own apply path, on its own
   committed state, accepts every one and derives a header byte-identical to
   the peer's (so log root, state root, time and proposer all match),

and only then commits the block. A peer that serves a block failing any check
is reported (CRITICAL in the log) and dropped for this catch-up; the node goes
on with the next peer. The node serves once it has reached the height the
peers report (or the target it was given), e.g. the first height etcd still
holds after compaction.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from medledger.consortium import _nodeio
from medledger.consortium.auth import current_node_keys
from medledger.consortium.client import (
    BlockBundle,
    BlocksPage,
    PeerClient,
    PeerRequestError,
    PeerUnavailable,
)
from medledger.contracts.base import get_obj, scan_objs
from medledger.contracts.core import k_key, k_principal
from medledger.crypto.signing import VerifyKey
from medledger.errors import IntegrityError, InvalidSignature, MedledgerError
from medledger.ledger.block import BlockHeader
from medledger.ledger.tx import Transaction
from medledger.node import Node
from medledger.state.base import StateReader
from medledger.store import LedgerStore

__all__ = ["BlockVerificationError", "CatchUp", "check_block_signature", "verify_and_append"]

log = logging.getLogger("medledger.consortium")


class BlockVerificationError(IntegrityError):
    """A block served by a peer fails verification; nothing of it was committed."""

    code = "bad-block"


def check_block_signature(state: StateReader, header: BlockHeader, sig: bytes) -> str:
    """The block's signature must verify with a member node's key; returns that org.

    The header's ``proposer`` must be a registered node key. The signature is
    the storing node's (with etcd ordering every node signs the identical header
    it stored, see :mod:`medledger.orderer.etcd`), so any active member's current
    node key is accepted, the proposer's first.
    """
    key = get_obj(state, k_key(header.proposer))
    principal = None if key is None else get_obj(state, k_principal(key["principal"]))
    if key is None or principal is None or principal.get("kind") != "node":
        raise BlockVerificationError(
            f"block {header.height}: proposer {header.proposer.hex()} is not a node key"
        )
    candidates = [(str(principal["org"]), bytes(key["pub"]))]
    for _k, org in scan_objs(state, b"org/"):
        if org.get("status") == "active":
            candidates += [(org["id"], pub) for pub in current_node_keys(state, org["id"])]
    for org_id, pub in candidates:
        try:
            VerifyKey(pub).verify(sig, header.hash)
        except (InvalidSignature, MedledgerError):
            continue
        return org_id
    raise BlockVerificationError(
        f"block {header.height}: signature does not verify with any member's node key"
    )


async def verify_and_append(
    node: Node,
    bundle: BlockBundle,
    *,
    before_write: Callable[[LedgerStore, int], None] | None = None,
) -> BlockHeader:
    """Verify one peer block against this node's state and commit it (see the module doc)."""
    try:
        header = BlockHeader.from_bytes(bundle.header)
    except IntegrityError as exc:
        raise BlockVerificationError(f"block {bundle.height}: {exc}") from exc
    head = node.head
    if header.height != bundle.height or header.height != head.height + 1:
        raise BlockVerificationError(
            f"block {header.height} does not follow this node's head {head.height}"
        )
    if header.prev != head.hash or header.network != head.network:
        raise BlockVerificationError(f"block {header.height} does not chain to this node's head")
    if header.count != len(bundle.txs):
        raise BlockVerificationError(
            f"block {header.height} names {header.count} transactions, {len(bundle.txs)} served"
        )
    try:
        txs = [Transaction.from_bytes(raw) for raw in bundle.txs]
    except MedledgerError as exc:
        raise BlockVerificationError(f"block {header.height}: bad transaction: {exc}") from exc
    await node.read(lambda state: check_block_signature(state, header, bundle.sig))
    try:
        return await _nodeio.append_block(
            node, bundle.header, bundle.sig, txs, before_write=before_write
        )
    except BlockVerificationError:
        raise
    except IntegrityError as exc:
        raise BlockVerificationError(str(exc)) from exc


class CatchUp:
    """Bring ``node`` up to the peers' height from their blocks, verifying every block."""

    def __init__(
        self,
        node: Node,
        client: PeerClient,
        *,
        page: int = 128,
        before_write: Callable[[LedgerStore, int], None] | None = None,
    ) -> None:
        self.node = node
        self.client = client
        self.page = page
        self.before_write = before_write
        self.bad_peers: dict[str, str] = {}
        self.position: tuple[int, int] | None = None

    async def peer_heads(self) -> dict[str, int]:
        """Current head height of every reachable peer."""

        async def one(org: str) -> tuple[str, int | None]:
            try:
                doc = await self.client.status(org)
            except (PeerUnavailable, PeerRequestError):
                return org, None
            return org, int(doc["height"])

        found = await asyncio.gather(*(one(o) for o in self.client.peers))
        return {org: h for org, h in found if h is not None}

    async def from_peer(self, org: str, target: int | None = None) -> int:
        """Append blocks from ``org`` until its head (or ``target``); return how many."""
        appended = 0
        while True:
            start = self.node.head.height + 1
            limit = self.page if target is None else max(1, min(self.page, target - start + 1))
            page = await self.client.blocks(org, start, limit)
            if target is not None and self.node.head.height >= target:
                page = BlocksPage(page.head, [], page.position)
            for bundle in page.blocks:
                if target is not None and bundle.height > target:
                    break
                await verify_and_append(self.node, bundle, before_write=self.before_write)
                appended += 1
            await self._record_position(page.position)
            if not page.blocks or self.node.head.height >= page.head:
                break
            if target is not None and self.node.head.height >= target:
                break
        return appended

    async def _record_position(self, position: tuple[int, int] | None) -> None:
        """Adopt a peer's etcd position when this node reached exactly that height.

        The etcd orderer then resumes after that revision (it refuses to start on
        a ledger whose head has no recorded position).
        """
        if position is None or position[0] != self.node.head.height:
            return
        height, revision = position
        from medledger.orderer.etcd import read_position, write_position

        def _write(store: LedgerStore) -> None:
            mine = read_position(store)
            if mine is None or mine[0] != height or mine[1] < revision:
                write_position(store, height, revision)

        await self.node.storage(_write)
        self.position = (height, revision)

    async def run(self, target: int | None = None) -> dict[str, Any]:
        """Catch up from the peers, best first; returns a summary.

        Stops at ``target`` if given, else at the highest head the peers report.
        Raises :class:`MedledgerError` (``PeerUnavailable``) if the target cannot
        be reached from any peer.
        """
        start_height = self.node.head.height
        heads = await self.peer_heads()
        goal = target if target is not None else max(heads.values(), default=start_height)
        order = sorted((o for o in heads if o not in self.bad_peers), key=lambda o: -heads[o])
        sources: list[str] = []
        for org in order:
            if self.node.head.height >= goal:
                break
            try:
                n = await self.from_peer(org, goal)
            except BlockVerificationError as exc:
                self.bad_peers[org] = str(exc)
                log.critical("peer %s served a block that fails verification: %s", org, exc)
                continue
            except (PeerUnavailable, PeerRequestError) as exc:
                log.warning("catch-up from %s interrupted: %s", org, exc)
                continue
            if n:
                sources.append(org)
        if self.node.head.height < goal:
            raise PeerUnavailable(
                f"caught up to height {self.node.head.height} only; no peer served up to {goal}"
            )
        if self.node.head.height > start_height:
            log.info(
                "caught up from height %d to %d from %s",
                start_height,
                self.node.head.height,
                ", ".join(sources),
            )
        return {
            "from": start_height,
            "to": self.node.head.height,
            "sources": sources,
            "bad_peers": dict(self.bad_peers),
        }
