"""medledger.contracts: the pure, versioned contracts of the healthcare ledger.

:data:`MODULES` maps contract name -> version -> module (each exposing
``HANDLERS``); :func:`make_registry` builds the :class:`Registry` for a network
configuration (``config["contracts"]`` holds the activation heights).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from medledger.contracts import (
    access_v1,
    breakglass_v1,
    consent_v1,
    core,
    membership_v1,
    patients_v1,
    records_v1,
    referrals_v1,
    rules_v1,
)
from medledger.contracts.base import Registry

__all__ = ["MODULES", "make_registry"]

MODULES: dict[str, dict[int, ModuleType]] = {
    "core": {1: core},
    "membership": {1: membership_v1},
    "patients": {1: patients_v1},
    "records": {1: records_v1},
    "consent": {1: consent_v1},
    "access": {1: access_v1},
    "rules": {1: rules_v1},
    "breakglass": {1: breakglass_v1},
    "referrals": {1: referrals_v1},
}


def make_registry(
    config: Mapping[str, Any], modules: Mapping[str, Mapping[int, ModuleType]] | None = None
) -> Registry:
    """The registry for a network configuration (``cfg/network`` or a normalised genesis)."""
    return Registry(modules if modules is not None else MODULES, config.get("contracts") or {})
