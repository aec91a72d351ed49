"""The contract framework: pure state transitions, dispatched by type and height.

A contract handler is a pure function::

    handler(state: StateReader, tx: Transaction, env: Env) -> Effects

It may only read ``state`` (the world state as left by every earlier
transaction, including earlier ones in the same block) and ``env`` (block
height and time, the signer's resolved principal, network configuration). It
performs no I/O, reads no clock and draws no randomness. It either returns the
writes it wants (``Effects``) or raises a :class:`~medledger.errors.ContractError`
subclass, in which case the ledger discards the transaction and nothing changes.

Contracts are versioned modules: the network configuration names, for each
contract, the height from which each version is active
(``{"consent": [[0, 1], [5000, 2]]}``). A transaction type is known at a
height only if the contract version active there handles it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from medledger.encoding import decode, encode
from medledger.errors import Conflict, NotFound, UnknownTransactionType
from medledger.ledger.tx import Transaction
from medledger.state.base import StateReader

__all__ = [
    "Effects",
    "Env",
    "Handler",
    "Registry",
    "get_obj",
    "require_obj",
    "scan_objs",
]


@dataclass(frozen=True, slots=True)
class Env:
    """What a contract may know besides state: supplied by the ledger."""

    network: str
    height: int
    time: int  # block time, ms since epoch
    tx_id: bytes
    signer: bytes  # key id of the signer
    principal: Mapping[str, Any]  # the signer's principal record (see contracts.core)
    config: Mapping[str, Any]  # network configuration from genesis (cfg/network)


@dataclass(slots=True)
class Effects:
    """Writes (and events) a transaction produces. Values are encoded on put."""

    writes: dict[bytes, bytes | None] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def put(self, key: bytes, value: Any) -> None:
        self.writes[key] = encode(value)

    def delete(self, key: bytes) -> None:
        self.writes[key] = None

    def emit(self, event: str, /, **data: Any) -> None:
        """Record an event (``{"event": event, **data}``) in the transaction's receipt."""
        self.events.append({"event": event, **data})

    def merge(self, other: Effects) -> None:
        self.writes.update(other.writes)
        self.events.extend(other.events)


Handler = Callable[[StateReader, Transaction, Env], Effects]


def get_obj(state: StateReader, key: bytes) -> Any:
    """Decode the value at ``key``, or ``None`` when absent."""
    raw = state.get(key)
    return None if raw is None else decode(raw)


def require_obj(state: StateReader, key: bytes, what: str) -> Any:
    value = get_obj(state, key)
    if value is None:
        raise NotFound(f"{what} not found")
    return value


def require_absent(state: StateReader, key: bytes, what: str) -> None:
    if state.get(key) is not None:
        raise Conflict(f"{what} already exists")


def scan_objs(state: StateReader, prefix: bytes) -> Iterator[tuple[bytes, Any]]:
    for key, raw in state.scan(prefix):
        yield key, decode(raw)


class Registry:
    """Maps transaction types to handlers of the contract version active at a height.

    ``modules`` maps contract name -> version -> module; every module exposes
    ``HANDLERS: dict[str, Handler]``. ``activations`` (from the network
    configuration) maps contract name -> list of ``[height, version]`` pairs,
    ascending by height; a contract absent from it runs version 1 from height 0.
    """

    def __init__(
        self,
        modules: Mapping[str, Mapping[int, ModuleType]],
        activations: Mapping[str, list[list[int]]] | None = None,
    ) -> None:
        self._modules = modules
        self._activations: dict[str, list[tuple[int, int]]] = {}
        for name in modules:
            plan = (activations or {}).get(name) or [[0, 1]]
            steps = sorted((int(h), int(v)) for h, v in plan)
            for _, version in steps:
                if version not in modules[name]:
                    raise ValueError(f"contract {name} has no version {version}")
            self._activations[name] = steps
        self._type_owner: dict[str, str] = {}
        for name, versions in modules.items():
            for module in versions.values():
                for type_ in module.HANDLERS:
                    owner = self._type_owner.setdefault(type_, name)
                    if owner != name:
                        raise ValueError(f"type {type_} claimed by {owner} and {name}")

    def version_at(self, contract: str, height: int) -> int:
        version = 0
        for start, v in self._activations[contract]:
            if start <= height:
                version = v
        return version

    def handler(self, type_: str, height: int) -> Handler:
        owner = self._type_owner.get(type_)
        if owner is None:
            raise UnknownTransactionType(f"unknown transaction type {type_!r}")
        version = self.version_at(owner, height)
        module = self._modules[owner].get(version)
        handlers: Mapping[str, Handler] = module.HANDLERS if module is not None else {}
        if type_ not in handlers:
            raise UnknownTransactionType(
                f"transaction type {type_!r} is not active at height {height}"
            )
        return handlers[type_]

    def known_types(self, height: int) -> list[str]:
        out = []
        for type_ in sorted(self._type_owner):
            try:
                self.handler(type_, height)
            except UnknownTransactionType:
                continue
            out.append(type_)
        return out
