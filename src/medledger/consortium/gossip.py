"""Checkpoint gossip: co-signatures from the other members, and divergence detection.

Every ``interval`` each node sends its latest signed checkpoint to every peer
(``POST /peer/v1/cosign``). A peer that has the same block at that height (same
log size and root, block hash and state root: the checkpoint bodies are then
byte-identical) adds its signature line, and the node stores the co-signed note
in place of its own. So each stored checkpoint accumulates the signatures of
the members that agree with it (C2SP signed notes allow any number), and a
client holding a checkpoint signed by a majority of the members knows the
consortium agrees on it.

A peer that has not reached the height answers with its own latest checkpoint,
which the node compares with the one it stored at that lower height; a peer
whose checkpoint differs at the same height has *diverged* from this node.

Who is wrong? Blocks chain by hash, so a fork never heals: once two nodes
differ at a height, they differ at every later one. A node that has seen a
divergence keeps serving writes only while a strict majority of the member
organisations (itself included) is known to agree with it; otherwise it halts
writes (``writes_allowed`` is false), logs it at CRITICAL level and reports it
in ``/health`` until an operator restores it. The node in the minority, e.g.
one whose database was altered, therefore stops; the majority flags it and
goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from medledger.consortium import _nodeio
from medledger.consortium.client import PeerClient, PeerRequestError, PeerUnavailable
from medledger.contracts.base import scan_objs
from medledger.crypto.signing import VerifyKey
from medledger.errors import CheckpointError, MedledgerError
from medledger.ledger.checkpoint import BlockRef, Checkpoint, sign_checkpoint
from medledger.ledger.note import (
    NoteVerifier,
    Signature,
    note_text,
    open_note,
    signature_lines,
)
from medledger.node import Node, signer_name
from medledger.state.base import StateReader

__all__ = [
    "CheckpointBook",
    "ConsortiumMonitor",
    "Divergence",
    "Gossip",
    "PeerState",
    "checkpoint_diff",
    "member_verifiers",
    "merge_notes",
]

log = logging.getLogger("medledger.consortium")


def member_verifiers(state: StateReader, network: str) -> dict[str, NoteVerifier]:
    """Checkpoint verifier of every active member organisation, by org id."""
    out: dict[str, NoteVerifier] = {}
    for _key, org in scan_objs(state, b"org/"):
        if org.get("status") == "active":
            name = signer_name(network, org["id"])
            out[org["id"]] = NoteVerifier(name, VerifyKey(org["node_key"]))
    return out


def checkpoint_diff(a: Checkpoint, b: Checkpoint) -> list[str]:
    """Which parts of two checkpoints differ (``[]``: identical)."""
    out = []
    if a.origin != b.origin:
        out.append("origin")
    if a.size != b.size:
        out.append("log size")
    if a.root != b.root:
        out.append("log root")
    ra, rb = a.block_info(), b.block_info()
    if ra is None or rb is None:
        if ra != rb:
            out.append("block")
    else:
        if ra.height != rb.height:
            out.append("height")
        if ra.block_hash != rb.block_hash:
            out.append("block hash")
        if ra.state_root != rb.state_root:
            out.append("state root")
    if not out and a.extensions != b.extensions:
        out.append("extensions")
    return out


def merge_notes(base: str, other: str, verifiers: Sequence[NoteVerifier]) -> str:
    """``base`` with the verified signature lines of ``other`` (same text) added.

    Lines of ``base`` are kept as they are, in order; of ``other`` only lines
    that verify with a known key are taken. Raises :class:`CheckpointError` if the
    texts differ or ``other`` has no verifiable signature.
    """
    text = note_text(base)
    if note_text(other) != text:
        raise CheckpointError("cannot merge signatures of two different checkpoints")
    opened = open_note(other, verifiers)
    lines = _signature_lines(base)
    for sig in opened.verified:
        line = sig.to_line()
        if line not in lines and not any(_same_key(line, have) for have in lines):
            lines.append(line)
    return text + "\n" + "".join(line + "\n" for line in lines)


def _signature_lines(note: str) -> list[str]:
    return [line for line, _sig in signature_lines(note)]


def _same_key(a: str, b: str) -> bool:
    sa, sb = Signature.parse_line(a), Signature.parse_line(b)
    return (sa.name, sa.key_hash) == (sb.name, sb.key_hash)


def signers_of(note: str, verifiers: dict[str, NoteVerifier]) -> list[str]:
    """The member orgs whose signatures on ``note`` verify (unknown keys ignored)."""
    by_key = {(v.name, v.key_hash): org for org, v in verifiers.items()}
    try:
        opened = open_note(note, list(verifiers.values()))
    except CheckpointError:
        return []
    return sorted({by_key[(s.name, s.key_hash)] for s in opened.verified})


@dataclass(frozen=True, slots=True)
class Divergence:
    """A peer's checkpoint differs from this node's at the same height."""

    org: str
    height: int
    differs: tuple[str, ...]
    ours: str  # checkpoint bodies
    theirs: str
    detected_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "org": self.org,
            "height": self.height,
            "differs": list(self.differs),
            "ours": self.ours,
            "theirs": self.theirs,
            "detected_at": self.detected_at,
        }


@dataclass(slots=True)
class PeerState:
    org: str
    reachable: bool | None = None
    error: str | None = None
    last_contact: float | None = None
    head: int | None = None
    agreed_height: int | None = None
    divergence: Divergence | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "org": self.org,
            "reachable": self.reachable,
            "error": self.error,
            "last_contact": self.last_contact,
            "head": self.head,
            "agreed_height": self.agreed_height,
            "diverged": None if self.divergence is None else self.divergence.to_json(),
        }


@dataclass(slots=True)
class ConsortiumMonitor:
    """What this node knows about agreement with the other members.

    ``members`` is the number of active member organisations (this one included).
    Divergences are permanent facts (forks do not heal); agreement counts the
    peers whose latest comparison matched.
    """

    org: str
    peers: dict[str, PeerState] = field(default_factory=dict)
    members: int = 1
    halted_reason: str | None = None
    phase: str = "starting"  # starting | catching-up | preparing | serving | stopping
    cosigned_height: int | None = None
    cosigned_by: list[str] = field(default_factory=list)
    clock: Callable[[], float] = time.time
    on_halt: Callable[[str | None], None] | None = None  # e.g. Node.halt_writes
    _last_alarm: float = 0.0

    def peer(self, org: str) -> PeerState:
        state = self.peers.get(org)
        if state is None:
            state = self.peers[org] = PeerState(org)
        return state

    def contact(self, org: str, head: int | None) -> None:
        p = self.peer(org)
        p.reachable, p.error, p.last_contact = True, None, self.clock()
        if head is not None:
            p.head = head

    def unreachable(self, org: str, error: str) -> None:
        p = self.peer(org)
        if p.reachable is not False:
            log.warning("peer %s unreachable: %s", org, error)
        p.reachable, p.error = False, error

    def agree(self, org: str, height: int) -> None:
        p = self.peer(org)
        if p.divergence is not None:
            return  # a fork does not heal; keep the first evidence
        if p.agreed_height is None or height > p.agreed_height:
            p.agreed_height = height
        self._update()

    def diverge(self, org: str, height: int, ours: Checkpoint, theirs: Checkpoint) -> None:
        p = self.peer(org)
        if p.divergence is None or height < p.divergence.height:
            differs = tuple(checkpoint_diff(ours, theirs))
            p.divergence = Divergence(
                org, height, differs, ours.to_text(), theirs.to_text(), self.clock()
            )
            log.critical(
                "DIVERGENCE: the checkpoint of %s at height %d differs from ours (%s)",
                org,
                height,
                ", ".join(differs),
            )
        self._update()

    @property
    def divergent_peers(self) -> list[str]:
        return sorted(o for o, p in self.peers.items() if p.divergence is not None)

    @property
    def agreeing_peers(self) -> list[str]:
        return sorted(
            o for o, p in self.peers.items() if p.divergence is None and p.agreed_height is not None
        )

    @property
    def in_majority(self) -> bool:
        return 2 * (1 + len(self.agreeing_peers)) > self.members

    @property
    def writes_allowed(self) -> bool:
        return self.halted_reason is None

    def _update(self) -> None:
        diverged = self.divergent_peers
        if diverged and not self.in_majority:
            reason = (
                f"this node's ledger differs from {', '.join(diverged)} and no majority of the "
                f"{self.members} members is known to agree with it; writes are halted "
                "(run `medledger verify` on this node)"
            )
            if self.halted_reason is None:
                log.critical("DIVERGENCE: %s", reason)
                self._last_alarm = self.clock()
            self.set_halted(reason)
        elif self.halted_reason is not None:
            log.warning("a majority agrees with this node again; writes resume")
            self.set_halted(None)

    def set_halted(self, reason: str | None) -> None:
        """Halt (or resume) this node's ledger writes."""
        self.halted_reason = reason
        if self.on_halt is not None:
            self.on_halt(reason)

    def alarm(self, every: float = 30.0) -> None:
        """Repeat the divergence alarm in the log while writes are halted (called periodically)."""
        if self.halted_reason is not None and self.clock() - self._last_alarm >= every:
            log.critical("DIVERGENCE (still): %s", self.halted_reason)
            self._last_alarm = self.clock()

    @property
    def status(self) -> str:
        if self.halted_reason is not None:
            return "divergent"
        if self.divergent_peers:
            return "peer-divergent"
        if self.phase != "serving":
            return self.phase
        return "ok"

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "phase": self.phase,
            "writes": self.writes_allowed,
            "halted": self.halted_reason,
            "members": self.members,
            "agreeing": self.agreeing_peers,
            "divergent_peers": self.divergent_peers,
            "cosigned_height": self.cosigned_height,
            "cosigned_by": list(self.cosigned_by),
            "peers": {o: p.to_json() for o, p in sorted(self.peers.items())},
        }


class CheckpointBook:
    """This node's signed checkpoints, with co-signatures merged in as they arrive."""

    def __init__(self, node: Node, monitor: ConsortiumMonitor) -> None:
        self.node = node
        self.monitor = monitor
        self._lock = asyncio.Lock()

    async def verifiers(self) -> dict[str, NoteVerifier]:
        network = self.node.network
        found = await self.node.read(lambda state: member_verifiers(state, network))
        self.monitor.members = max(1, len(found))
        return found

    async def latest(self) -> tuple[int, str]:
        height = self.node.head.height
        note = await self.at(height)
        assert note is not None
        return height, note

    async def at(self, height: int) -> str | None:
        """This node's checkpoint note at ``height`` (None above its head)."""
        if height > self.node.head.height:
            return None
        note = await _nodeio.stored_checkpoint(self.node, height)
        if note is not None:
            return note
        header, _sig = await self.node.get_block(height)
        cp = Checkpoint.for_block(
            self.node.origin,
            header.log_size,
            header.log_root,
            BlockRef(header.height, header.hash, header.state_root),
        )
        return sign_checkpoint(cp, self.node.note_signers)

    async def merge(self, height: int, other: str, verifiers: dict[str, NoteVerifier]) -> str:
        """Add ``other``'s verified signatures to the stored checkpoint at ``height``."""
        async with self._lock:
            mine = await self.at(height)
            if mine is None:
                raise CheckpointError(f"no block at height {height} yet")
            merged = merge_notes(mine, other, list(verifiers.values()))
            if merged != mine:
                await _nodeio.put_checkpoint(self.node, height, merged)
            signers = signers_of(merged, verifiers)
            members = max(1, len(verifiers))
            if 2 * len(signers) > members and (
                self.monitor.cosigned_height is None or height >= self.monitor.cosigned_height
            ):
                self.monitor.cosigned_height = height
                self.monitor.cosigned_by = signers
            return merged

    async def compare(
        self, org: str, note: str, verifiers: dict[str, NoteVerifier]
    ) -> tuple[str, int, str | None]:
        """Compare a peer's checkpoint (signed by ``org``) with ours at its height.

        Returns ``(verdict, height, our note)`` with verdict ``same``, ``ahead``
        (we have no block there yet) or ``divergent``; records the outcome in the
        monitor and, when the same, merges the peer's signature into ours.
        """
        verifier = verifiers.get(org)
        if verifier is None:
            raise CheckpointError(f"{org!r} is not an active member")
        open_note(note, [verifier])  # signed by that org, or CheckpointError
        theirs = Checkpoint.parse(note_text(note))
        if theirs.origin != self.node.origin:
            raise CheckpointError(f"checkpoint of another log: {theirs.origin!r}")
        ref = theirs.block_info()
        if ref is None:
            raise CheckpointError("checkpoint carries no medledger-block line")
        mine = await self.at(ref.height)
        if mine is None:
            return "ahead", ref.height, None
        ours = Checkpoint.parse(note_text(mine))
        if ours.to_text() == theirs.to_text():
            merged = await self.merge(ref.height, note, verifiers)
            self.monitor.agree(org, ref.height)
            return "same", ref.height, merged
        self.monitor.diverge(org, ref.height, ours, theirs)
        return "divergent", ref.height, mine


class Gossip:
    """The periodic checkpoint exchange with every peer."""

    def __init__(
        self,
        node: Node,
        book: CheckpointBook,
        client: PeerClient,
        monitor: ConsortiumMonitor,
        *,
        interval: float = 1.0,
    ) -> None:
        self.node = node
        self.book = book
        self.client = client
        self.monitor = monitor
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        for org in client.peers:
            monitor.peer(org)

    async def round(self) -> None:
        """One exchange with every peer (concurrently)."""
        verifiers = await self.book.verifiers()
        await asyncio.gather(*(self._exchange(org, verifiers) for org in self.client.peers))
        self.monitor.alarm()

    async def _exchange(self, org: str, verifiers: dict[str, NoteVerifier]) -> None:
        try:
            height, note = await self.book.latest()
            res = await self.client.cosign(org, note)
        except (PeerUnavailable, PeerRequestError) as exc:
            self.monitor.unreachable(org, str(exc))
            return
        self.monitor.contact(org, res.head)
        try:
            if res.status == "cosigned":
                verifier = verifiers.get(org)
                if verifier is None:
                    raise CheckpointError(f"{org!r} is not an active member")
                open_note(res.note, [verifier])
                await self.book.merge(height, res.note, verifiers)
                self.monitor.agree(org, height)
            else:
                await self.book.compare(org, res.note, verifiers)
        except (CheckpointError, MedledgerError) as exc:
            log.warning("bad checkpoint answer from %s: %s", org, exc)
            self.monitor.unreachable(org, f"bad checkpoint answer: {exc}")

    async def run(self) -> None:
        while True:
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep gossiping whatever one round hit
                log.exception("gossip round failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="medledger-gossip")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
