"""``node.toml``: the configuration of one organisation's node process.

Example::

    network = "medledger-local"
    org = "org-1"
    data_dir = "data"                  # keys/ and genesis.json; relative to this file
    store = "postgresql://postgres@127.0.0.1:5432/medledger_org1"
    records = "postgresql://postgres@127.0.0.1:5432/medledger_org1"   # default: as store
    orderer = "etcd://127.0.0.1:2379,127.0.0.1:2479,127.0.0.1:2579"

    [api]                              # the FHIR API
    listen = "127.0.0.1:8001"
    enabled = true                     # false: run without the FHIR API
    base_url = "http://127.0.0.1:8001" # default: http(s)://<listen>
    tls_cert = ""                      # both set: serve HTTPS
    tls_key = ""

    [peer]                             # the inter-node API
    listen = "127.0.0.1:9001"
    tls_cert = ""
    tls_key = ""
    tls_ca = ""                        # CA that signed the peers' certificates (client side)

    [gossip]
    interval = 1.0                     # seconds between checkpoint exchanges
    max_clock_skew = 30.0              # seconds accepted on signed peer requests

    [orderer_options]                  # passed to the orderer (medledger.orderer.etcd)
    compact_interval = 60.0
    # busy_rate = 30.0                 # while busy, space proposals for about this many
    #                                  # blocks a second in all (default 30; 0: never)
    # busy_threshold = 100             # busy: this many tx/s arrived while this node's
    #                                  # proposal was in flight (default 100)
    # min_interval = 0.1               # proposals at least this far apart (s), always
    # relay = true                     # hand what this node receives to the first healthy
    #                                  # member's node, which proposes for all (default: off)
    # with orderer = "etcds://...": TLS to etcd (PEM files; cert and key for
    # members started with --client-cert-auth)
    # tls_ca = "/etc/medledger/etcd-ca.pem"
    # tls_cert = "/etc/medledger/etcd-client.pem"
    # tls_key = "/etc/medledger/etcd-client-key.pem"

    [[peers]]
    org = "org-2"
    url = "http://127.0.0.1:9002"

Relative paths (``data_dir``, TLS files, ``sqlite:///relative``) are resolved
against the directory of the file, so a configuration directory can be moved.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from medledger.errors import MedledgerError
from medledger.orderer import TLS_OPTIONS, check_tls_options

__all__ = [
    "ConfigError",
    "GossipConfig",
    "HttpEndpoint",
    "NodeConfig",
    "PeerRef",
    "dump_config",
    "load_config",
    "parse_config",
    "parse_listen",
]


class ConfigError(MedledgerError):
    """The node configuration is missing, unreadable or invalid."""

    code = "config"


@dataclass(frozen=True, slots=True)
class HttpEndpoint:
    """Where a server listens, and its optional TLS material."""

    host: str
    port: int
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    base_url: str | None = None
    enabled: bool = True

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None

    @property
    def url(self) -> str:
        """The base URL clients use (``base_url`` if set, else derived from ``listen``)."""
        if self.base_url:
            return self.base_url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def listen(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PeerRef:
    """Another organisation's node: its org id and the base URL of its peer API."""

    org: str
    url: str


@dataclass(frozen=True, slots=True)
class GossipConfig:
    interval: float = 1.0
    max_clock_skew: float = 30.0


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything one organisation's node process needs (see the module docstring)."""

    network: str
    org: str
    data_dir: Path
    store: str
    records: str
    orderer: str
    api: HttpEndpoint
    peer: HttpEndpoint
    peers: tuple[PeerRef, ...] = ()
    gossip: GossipConfig = field(default_factory=GossipConfig)
    orderer_options: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the file it was read from

    @property
    def genesis_file(self) -> Path:
        return self.data_dir / "genesis.json"

    @property
    def node_key_name(self) -> str:
        """Keystore name of the organisation's node identity (as :class:`DataDir` names it)."""
        return f"node-{self.org}"

    def peer_url(self, org: str) -> str:
        for p in self.peers:
            if p.org == org:
                return p.url
        raise ConfigError(f"no peer {org!r} in the configuration")


def parse_listen(text: object, what: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port)."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{what} must be 'host:port'")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} must be 'host:port' with a port in 1..65535, got {text!r}")
    return host, int(port)


def _str(doc: Mapping[str, Any], key: str, what: str, default: str | None = None) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str) or not value:
        if default is None and key not in doc:
            raise ConfigError(f"{what} is required")
        raise ConfigError(f"{what} must be a non-empty string")
    return value


def _opt_path(doc: Mapping[str, Any], key: str, base: Path, what: str) -> Path | None:
    value = doc.get(key)
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a path")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _store_url(value: str, base: Path, what: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme == "sqlite":
        if parsed.netloc:
            raise ConfigError(f"{what}: sqlite URLs take the form sqlite:///path")
        path = Path(value[len("sqlite:///") :]) if value.startswith("sqlite:///") else None
        if path is None:
            raise ConfigError(f"{what}: sqlite URLs take the form sqlite:///path")
        if not value.startswith("sqlite:////"):
            # sqlite:///relative/path: relative to the configuration directory
            path = base / path
        return f"sqlite:///{path}"
    if parsed.scheme in ("postgresql", "postgres"):
        return value
    raise ConfigError(f"{what} must be a postgresql:// or sqlite:/// URL, got {value!r}")


def _endpoint(doc: object, base: Path, what: str) -> HttpEndpoint:
    if not isinstance(doc, Mapping):
        raise ConfigError(f"[{what}] must be a table with at least 'listen'")
    host, port = parse_listen(doc.get("listen"), f"{what}.listen")
    cert = _opt_path(doc, "tls_cert", base, f"{what}.tls_cert")
    key = _opt_path(doc, "tls_key", base, f"{what}.tls_key")
    if (cert is None) != (key is None):
        raise ConfigError(f"{what}: tls_cert and tls_key go together")
    base_url = doc.get("base_url")
    if base_url is not None and (not isinstance(base_url, str) or "://" not in base_url):
        raise ConfigError(f"{what}.base_url must be an http(s) URL")
    enabled = doc.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{what}.enabled must be true or false")
    return HttpEndpoint(
        host,
        port,
        cert,
        key,
        _opt_path(doc, "tls_ca", base, f"{what}.tls_ca"),
        base_url or None,
        enabled,
    )


def _peers(items: object, own_org: str) -> tuple[PeerRef, ...]:
    if items is None:
        return ()
    if not isinstance(items, list):
        raise ConfigError("peers must be an array of tables ([[peers]])")
    out: list[PeerRef] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ConfigError(f"peers[{i}] must be a table")
        org = _str(item, "org", f"peers[{i}].org")
        url = _str(item, "url", f"peers[{i}].url")
        if urlparse(url).scheme not in ("http", "https"):
            raise ConfigError(f"peers[{i}].url must be an http(s) URL")
        if org == own_org:
            raise ConfigError(f"peers[{i}] is this node's own organisation")
        if org in seen:
            raise ConfigError(f"peer {org!r} is listed twice")
        seen.add(org)
        out.append(PeerRef(org, url.rstrip("/")))
    return tuple(out)


def _gossip(doc: object) -> GossipConfig:
    if doc is None:
        return GossipConfig()
    if not isinstance(doc, Mapping):
        raise ConfigError("[gossip] must be a table")
    values: dict[str, float] = {}
    for name in ("interval", "max_clock_skew"):
        if name in doc:
            v = doc[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"gossip.{name} must be a positive number")
            values[name] = float(v)
    return GossipConfig(**values)


def _orderer_options(doc: object, base: Path, scheme: str) -> dict[str, Any]:
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        raise ConfigError("[orderer_options] must be a table")
    out: dict[str, Any] = {}
    for name, value in doc.items():
        if not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"orderer_options.{name} must be a number, string or boolean")
        out[str(name)] = value
    for name in TLS_OPTIONS:
        if name in out:
            path = _opt_path(out, name, base, f"orderer_options.{name}")
            if path is None:
                del out[name]
            else:
                out[name] = str(path)
    try:
        check_tls_options(scheme, out)
    except ValueError as exc:
        raise ConfigError(f"orderer_options: {exc}") from None
    return out


_TOP_KEYS = {
    "network",
    "org",
    "data_dir",
    "store",
    "records",
    "orderer",
    "api",
    "peer",
    "peers",
    "gossip",
    "orderer_options",
}


def parse_config(doc: Mapping[str, Any], *, base: Path, path: Path | None = None) -> NodeConfig:
    """Validate a parsed ``node.toml`` document; relative paths resolve against ``base``."""
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"unknown configuration key(s): {', '.join(sorted(unknown))}")
    network = _str(doc, "network", "network")
    org = _str(doc, "org", "org")
    if "/" in org or " " in org or "+" in org:
        raise ConfigError("org must be an id without '/', spaces or '+'")
    data_dir = _opt_path(doc, "data_dir", base, "data_dir") or base
    store = _store_url(_str(doc, "store", "store"), base, "store")
    if "records" in doc:
        records = _store_url(_str(doc, "records", "records"), base, "records")
    elif store.startswith("sqlite:"):
        records = f"sqlite:///{data_dir / 'records.db'}"
    else:
        records = store
    orderer = _str(doc, "orderer", "orderer")
    scheme = urlparse(orderer).scheme
    if scheme not in ("etcd", "etcds", "embedded"):
        raise ConfigError(f"orderer must be an etcd://host:port,... URL, got {orderer!r}")
    api = _endpoint(doc.get("api"), base, "api")
    peer = _endpoint(doc.get("peer"), base, "peer")
    if (api.host, api.port) == (peer.host, peer.port):
        raise ConfigError("api.listen and peer.listen must differ")
    return NodeConfig(
        network=network,
        org=org,
        data_dir=data_dir,
        store=store,
        records=records,
        orderer=orderer,
        api=api,
        peer=peer,
        peers=_peers(doc.get("peers"), org),
        gossip=_gossip(doc.get("gossip")),
        orderer_options=_orderer_options(doc.get("orderer_options"), base, scheme),
        path=path,
    )


def load_config(path: str | Path) -> NodeConfig:
    """Read and validate ``node.toml``."""
    p = Path(path).expanduser()
    try:
        with p.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from exc
    return parse_config(doc, base=p.resolve().parent, path=p.resolve())


def _toml_str(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _endpoint_toml(name: str, ep: HttpEndpoint) -> list[str]:
    lines = [f"[{name}]", f"listen = {_toml_str(ep.listen)}"]
    if not ep.enabled:
        lines.append("enabled = false")
    if ep.base_url:
        lines.append(f"base_url = {_toml_str(ep.base_url)}")
    for key in ("tls_cert", "tls_key", "tls_ca"):
        value = getattr(ep, key)
        if value is not None:
            lines.append(f"{key} = {_toml_str(str(value))}")
    return lines


def dump_config(cfg: NodeConfig) -> str:
    """``cfg`` as ``node.toml`` text (absolute paths); ``load_config`` reads it back equal."""
    lines = [
        "# medledger node configuration (see medledger.consortium.config)",
        f"network = {_toml_str(cfg.network)}",
        f"org = {_toml_str(cfg.org)}",
        f"data_dir = {_toml_str(str(cfg.data_dir))}",
        f"store = {_toml_str(cfg.store)}",
        f"records = {_toml_str(cfg.records)}",
        f"orderer = {_toml_str(cfg.orderer)}",
        "",
        *_endpoint_toml("api", cfg.api),
        "",
        *_endpoint_toml("peer", cfg.peer),
        "",
        "[gossip]",
        f"interval = {cfg.gossip.interval!r}",
        f"max_clock_skew = {cfg.gossip.max_clock_skew!r}",
    ]
    if cfg.orderer_options:
        lines += ["", "[orderer_options]"]
        for name, value in cfg.orderer_options.items():
            shown = _toml_str(value) if isinstance(value, str) else _toml_scalar(value)
            lines.append(f"{name} = {shown}")
    for p in cfg.peers:
        lines += ["", "[[peers]]", f"org = {_toml_str(p.org)}", f"url = {_toml_str(p.url)}"]
    return "\n".join(lines) + "\n"
