"""Settings of the FHIR API server: where its data lives and how it is reached.

The base URL matters beyond display: SMART client assertions must name the
token endpoint (``<base>/auth/token``) as their audience, and every
``fullUrl``/``Location`` the API returns is built from it, so it must be the URL
clients actually use (``https://`` when serving with TLS).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from medledger.datadir import default_data_dir

if TYPE_CHECKING:
    from medledger.consortium.config import NodeConfig

__all__ = ["Settings"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything :func:`medledger.api.app.create_app` needs to serve a data directory."""

    data_dir: Path = field(default_factory=default_data_dir)
    base_url: str = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    demo: bool = False  # serve the demo identity picker (/api/demo/...)
    smart_url: str | None = None  # client/jti store; default sqlite:///DIR/smart.db
    records_url: str | None = None  # record store; default sqlite:///DIR/records.db
    token_ttl: int = 300  # seconds a bearer token lives

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both a TLS certificate and its key, or neither")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def fhir_base(self) -> str:
        """The FHIR base URL (``[base]`` in the FHIR specification)."""
        return f"{self.base_url}/fhir"

    @property
    def token_url(self) -> str:
        """The token endpoint; the only ``aud`` a client assertion may name."""
        return f"{self.base_url}/auth/token"

    @property
    def smart_store(self) -> str:
        return self.smart_url or f"sqlite:///{(self.data_dir / 'smart.db').resolve()}"

    @property
    def records_store(self) -> str:
        return self.records_url or f"sqlite:///{(self.data_dir / 'records.db').resolve()}"

    @classmethod
    def for_listen(
        cls,
        data_dir: Path,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        base_url: str | None = None,
        demo: bool = False,
    ) -> Settings:
        """Settings for serving on ``host:port``; the base URL follows unless given."""
        if base_url is None:
            scheme = "https" if tls_cert is not None else "http"
            shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
            if ":" in shown and not shown.startswith("["):
                shown = f"[{shown}]"  # an IPv6 literal
            base_url = f"{scheme}://{shown}:{port}"
        return cls(
            data_dir=data_dir,
            base_url=base_url,
            tls_cert=tls_cert,
            tls_key=tls_key,
            demo=demo,
        )

    @classmethod
    def for_node(cls, cfg: NodeConfig) -> Settings:
        """The FHIR API settings of a consortium node (its ``node.toml``)."""
        return cls(
            data_dir=cfg.data_dir,
            base_url=cfg.api.url,
            tls_cert=cfg.api.tls_cert,
            tls_key=cfg.api.tls_key,
            records_url=cfg.records,
        )

    @classmethod
    def from_env(cls) -> Settings:
        """Settings from ``MEDLEDGER_*`` environment variables (used by ``uvicorn --factory``)."""
        env = os.environ
        data_dir = Path(env["MEDLEDGER_DATA_DIR"]) if env.get("MEDLEDGER_DATA_DIR") else None
        base = cls() if data_dir is None else cls(data_dir=data_dir)
        cert, key = env.get("MEDLEDGER_TLS_CERT"), env.get("MEDLEDGER_TLS_KEY")
        return replace(
            base,
            base_url=env.get("MEDLEDGER_BASE_URL", base.base_url),
            tls_cert=Path(cert) if cert else None,
            tls_key=Path(key) if key else None,
            demo=env.get("MEDLEDGER_DEMO", "") in ("1", "true", "yes"),
            smart_url=env.get("MEDLEDGER_SMART_URL") or None,
            records_url=env.get("MEDLEDGER_RECORDS_URL") or None,
        )
