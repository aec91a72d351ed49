"""node.toml parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from medledger.consortium.config import ConfigError, dump_config, load_config, parse_listen

EXAMPLE = """
network = "medledger-local"
org = "org-1"
data_dir = "data"
store = "sqlite:///data/ledger.db"
orderer = "etcd://127.0.0.1:2379,127.0.0.1:2479"

[api]
listen = "127.0.0.1:8001"

[peer]
listen = "127.0.0.1:9001"
tls_cert = "tls/peer.crt"
tls_key = "tls/peer.key"
tls_ca = "/etc/medledger/ca.pem"

[gossip]
interval = 0.5

[[peers]]
org = "org-2"
url = "https://node2.example:9001/"

[[peers]]
org = "org-3"
url = "https://node3.example:9001"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_example_parses_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, EXAMPLE))
    base = tmp_path.resolve()
    assert cfg.network == "medledger-local" and cfg.org == "org-1"
    assert cfg.data_dir == base / "data"
    assert cfg.store == f"sqlite:///{base / 'data' / 'ledger.db'}"
    assert cfg.records == f"sqlite:///{base / 'data' / 'records.db'}"  # default beside the keys
    assert cfg.orderer == "etcd://127.0.0.1:2379,127.0.0.1:2479"
    assert (cfg.api.host, cfg.api.port, cfg.api.tls) == ("127.0.0.1", 8001, False)
    assert cfg.api.url == "http://127.0.0.1:8001"
    assert cfg.peer.tls and cfg.peer.url == "https://127.0.0.1:9001"
    assert cfg.peer.tls_cert == base / "tls" / "peer.crt"
    assert cfg.peer.tls_ca == Path("/etc/medledger/ca.pem")
    assert [(p.org, p.url) for p in cfg.peers] == [
        ("org-2", "https://node2.example:9001"),
        ("org-3", "https://node3.example:9001"),
    ]
    assert cfg.gossip.interval == 0.5 and cfg.gossip.max_clock_skew == 30.0
    assert cfg.peer_url("org-3") == "https://node3.example:9001"


def test_postgres_records_default_to_the_store(tmp_path: Path) -> None:
    text = EXAMPLE.replace(
        'store = "sqlite:///data/ledger.db"', 'store = "postgresql://postgres@127.0.0.1/ml1"'
    )
    cfg = load_config(write(tmp_path, text))
    assert cfg.store == cfg.records == "postgresql://postgres@127.0.0.1/ml1"


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, EXAMPLE))
    again = tmp_path / "again" / "node.toml"
    again.parent.mkdir()
    again.write_text(dump_config(cfg))
    back = load_config(again)
    assert back.path != cfg.path
    for name in ("network", "org", "data_dir", "store", "records", "orderer", "api", "peer"):
        assert getattr(back, name) == getattr(cfg, name), name
    assert back.peers == cfg.peers and back.gossip == cfg.gossip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('org = "org-1"', 'org = "org/1"'), "org must be an id"),
        (('orderer = "etcd://127.0.0.1:2379,127.0.0.1:2479"', 'orderer = "nats://x"'), "etcd"),
        (('store = "sqlite:///data/ledger.db"', 'store = "mysql://x"'), "store must be"),
        (('listen = "127.0.0.1:8001"', 'listen = "127.0.0.1:9001"'), "must differ"),
        (('listen = "127.0.0.1:8001"', 'listen = "nowhere"'), "api.listen"),
        (('org = "org-3"', 'org = "org-1"'), "own organisation"),
        (('org = "org-3"', 'org = "org-2"'), "listed twice"),
        (("interval = 0.5", "interval = -1"), "gossip.interval"),
        (('tls_key = "tls/peer.key"', ""), "go together"),
        (('network = "medledger-local"', 'network = "x"\ncolour = 1'), "unknown"),
        (('network = "medledger-local"', ""), "network is required"),
    ],
)
def test_invalid_configurations_are_refused(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    text = EXAMPLE.replace(*change)
    assert text != EXAMPLE
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "network = \n"))


def test_parse_listen() -> None:
    assert parse_listen("[::1]:9000", "x") == ("::1", 9000)
    assert parse_listen("0.0.0.0:1", "x") == ("0.0.0.0", 1)
    for bad in ("9000", "host:", "host:0", "host:70000", ":80"):
        with pytest.raises(ConfigError):
            parse_listen(bad, "x")


def test_orderer_options_and_a_disabled_api_round_trip(tmp_path: Path) -> None:
    text = (
        EXAMPLE.replace('listen = "127.0.0.1:8001"', 'listen = "127.0.0.1:8001"\nenabled = false')
        + "\n[orderer_options]\ncompact_interval = 2.5\nmax_batch = 500\nverify_workers = 0\n"
    )
    cfg = load_config(write(tmp_path, text))
    assert not cfg.api.enabled and cfg.peer.enabled
    assert dict(cfg.orderer_options) == {
        "compact_interval": 2.5,
        "max_batch": 500,
        "verify_workers": 0,
    }
    again = tmp_path / "b" / "node.toml"
    again.parent.mkdir()
    again.write_text(dump_config(cfg))
    back = load_config(again)
    assert back.api == cfg.api and dict(back.orderer_options) == dict(cfg.orderer_options)
    with pytest.raises(ConfigError, match=r"orderer_options\.x"):
        load_config(write(tmp_path, EXAMPLE + "\n[orderer_options]\nx = [1]\n"))


def test_etcd_tls_options_resolve_relative_to_the_file_and_are_checked(tmp_path: Path) -> None:
    tls = EXAMPLE.replace('orderer = "etcd://', 'orderer = "etcds://') + (
        '\n[orderer_options]\ntls_ca = "tls/etcd-ca.pem"\n'
        'tls_cert = "tls/etcd.pem"\ntls_key = "/abs/etcd-key.pem"\n'
    )
    cfg = load_config(write(tmp_path, tls))
    assert cfg.orderer.startswith("etcds://")
    assert cfg.orderer_options["tls_ca"] == str(tmp_path / "tls" / "etcd-ca.pem")
    assert cfg.orderer_options["tls_cert"] == str(tmp_path / "tls" / "etcd.pem")
    assert cfg.orderer_options["tls_key"] == "/abs/etcd-key.pem"
    again = tmp_path / "b" / "node.toml"
    again.parent.mkdir()
    again.write_text(dump_config(cfg))
    assert dict(load_config(again).orderer_options) == dict(cfg.orderer_options)
    with pytest.raises(ConfigError, match="needs etcds://"):
        load_config(write(tmp_path, EXAMPLE + '\n[orderer_options]\ntls_ca = "ca.pem"\n'))
    no_ca = EXAMPLE.replace('orderer = "etcd://', 'orderer = "etcds://')
    with pytest.raises(ConfigError, match="tls_ca"):
        load_config(write(tmp_path, no_ca))
    half = no_ca + '\n[orderer_options]\ntls_ca = "ca.pem"\ntls_cert = "c.pem"\n'
    with pytest.raises(ConfigError, match="go together"):
        load_config(write(tmp_path, half))
