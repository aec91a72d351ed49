"""Smart contracts: pure, versioned state transitions (see :mod:`medledger.contracts.base`)."""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from medledger.contracts import core
from medledger.contracts.base import Registry

__all__ = ["MODULES", "make_registry"]

#: contract name -> version -> module exposing ``HANDLERS``
MODULES: dict[str, dict[int, ModuleType]] = {
    "core": {1: core},
}


def make_registry(config: Mapping[str, Any]) -> Registry:
    """The handler registry for a network configuration (``cfg/network``)."""
    return Registry(MODULES, config.get("contracts") or {})
