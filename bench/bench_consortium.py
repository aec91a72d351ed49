"""Benchmark of a three-organisation consortium (not a test: prints a table, asserts nothing).

Measures, in one run, on one machine:

(a) the ceiling: raw etcd puts per second with ``aetcd`` (the client library the
    etcd orderer uses) against the same 3-member etcd cluster, one at a time and
    with 64 in flight, ~200-byte values under a scratch prefix;
(b) committed transactions per second through three node processes (one per
    organisation, each with its own PostgreSQL database, or SQLite with
    ``--sqlite``; FHIR API off): pre-signed ``note.anchor`` transactions are
    posted in batches to the nodes' ``/ledger/v1/txs`` endpoints by ``--clients``
    concurrent clients per node (each with its own signing key, one batch in
    flight), and a transaction counts once the node acknowledges it, i.e. once
    it is in a durable block on that node (every node derives the same block from
    etcd); throughput is acknowledged transactions over the wall time from the
    first post to the last acknowledgement;
(c) commit latency per transaction, p50 and p99: at saturation (acknowledgement
    time minus the time its batch was posted; with ``--clients`` x ``--batch``
    transactions in flight per node this is mostly queueing), and at fixed offered
    loads (``--rates``, default half the saturation throughput and 2,000 tx/s, the
    goal of issue 5), each for ``2 x`` the etcd phase's seconds, in batches of
    ``--rate-batch`` spread over the clients (each client posts one batch every
    ``rate-batch x clients / rate`` seconds, one in flight, the clients' schedules
    staggered evenly over that interval so that the load is a steady stream, not
    one burst of every client at once); latency is measured from the time each
    batch was *scheduled*, so a slow answer delays the next batch's clock rather
    than hiding it. With one batch in flight per client, at most ``clients x 3 x
    rate-batch`` transactions are outstanding: once latency exceeds the interval
    the clients fall behind and the committed rate stays below the offered one
    (raise ``--clients`` to offer more concurrency). The default, 9 clients per
    node, lets 2,000 tx/s in posts of 20 be offered with up to 270 ms of latency
    (9 x 3 x 20 / 2,000 s), above the goal's 250 ms; with 4 (the default before
    2026-12-07) the clients fell behind once latency passed 120 ms, and the
    latencies measured from their schedule then grew with their backlog, so a run
    just over that line reported seconds. The committed rate of a paced
    phase is its transactions over the time from its start to its last
    acknowledgement, so short (``--quick``) phases understate it;
(d) that all three nodes end at the same height with the same log and state
    roots;
(e) for each timed phase, where the machine's CPU went (cores in use on average,
    from ``/proc``): the node processes (split into their storage threads, event
    loops and other threads), their signature workers, PostgreSQL's
    backends for the nodes and its own processes, the etcd members, this load
    generator and everything else (see :class:`CpuMeter`); and, with PostgreSQL,
    the rows of the ledger tables the databases read by sequential scans, per block
    (see :func:`seq_scan_rows`);
(f) one client alone, as an application that waits for each answer before it
    submits again: ``--sequential`` transactions (default 200; 0: none) posted one at
    a time to the first node after the other phases and a pause of 2 s; its
    committed transactions per second (beside its ceiling: raw etcd puts one at a
    time, from (a)) and p50 / p99 latency. Pacing under load (the etcd orderer's
    ``busy_rate``) must not slow such a client: it never makes a node busy.

Pre-signing happens before each timed phase; the load generator (aiohttp, for its
low per-request cost) shares the machine's cores with the nodes, etcd and the
databases; (e) shows its own share.

Run: ``.venv/bin/python bench/bench_consortium.py [--quick] [--sqlite] [--clients N]
[--rates 0,2000] [--rate-batch 20] [--sequential 200] [--orderer-option max_wait=0.01]
[--timeline F]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aetcd
import aiohttp
import httpx
import psycopg

from medledger.consortium import network as net
from medledger.crypto.keystore import Keystore
from medledger.crypto.signing import SigningKey
from medledger.encoding import decode, encode
from medledger.ledger.tx import Transaction, make_tx

PG_ADMIN = os.environ.get("MEDLEDGER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")

#: the node processes' threads, as ``CpuMeter.threads`` reports them
NODE_THREADS = ("storage threads", "event loops", "other threads")
STORAGE_THREAD = "ml-store"  # medledger.node.STORAGE_THREAD: its name in /proc

#: CPU roles reported per phase, in print order
ROLES = (
    "node processes",
    "their signature workers",
    "PostgreSQL, the nodes' connections",
    "PostgreSQL, its own processes",
    "etcd members",
    "load generator (this process)",
    "everything else on the machine",
)


class CpuMeter:
    """Where the machine's CPU goes during a phase, by role (Linux ``/proc``).

    ``start()`` then ``stop()`` give, per role, the cores used on average over the
    phase (CPU seconds / wall seconds): the node processes and etcd members named
    in the network's ``pids.json``, the nodes' child processes (signature
    workers), the PostgreSQL backends serving the network's databases, PostgreSQL's
    other processes (WAL writer, checkpointer, autovacuum and any other client),
    this load generator, and the rest of the machine (``/proc/stat`` busy time
    minus all of those). A process that exits during the phase is not counted.
    Empty where ``/proc`` is not available. ``threads`` then splits the node
    processes' share: their storage threads (named ``ml-store``), their main threads
    (the event loops) and their other threads (the process pool's, gRPC's).
    """

    def __init__(self, net_dir: Path, databases: list[str]) -> None:
        self.dir = net_dir
        self.databases = tuple(databases)
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._t0 = 0.0
        self._start: dict[int, tuple[str, int]] = {}
        self._busy0 = 0
        self._threads0: dict[int, tuple[str, int]] = {}
        self.threads: dict[str, float] = {}

    @staticmethod
    def _busy() -> int:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
        return user + nice + system + irq + softirq

    def _snapshot(self) -> dict[int, tuple[str, int]]:
        pids = json.loads((self.dir / "pids.json").read_text())
        nodes = {int(p) for p in pids.get("nodes", {}).values()}
        etcd = {int(p) for p in pids.get("etcd", {}).values()}
        me = os.getpid()
        out: dict[int, tuple[str, int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            rest = stat[stat.rindex(")") + 2 :].split()
            ppid, ticks = int(rest[1]), int(rest[11]) + int(rest[12])
            if pid in nodes:
                role = ROLES[0]
            elif ppid in nodes:
                role = ROLES[1]
            elif cmd.startswith("postgres:"):
                role = ROLES[2] if any(db in cmd for db in self.databases) else ROLES[3]
            elif pid in etcd:
                role = ROLES[4]
            elif pid == me:
                role = ROLES[5]
            else:
                continue
            out[pid] = (role, ticks)
        return out

    def _node_threads(self, procs: dict[int, tuple[str, int]]) -> dict[int, tuple[str, int]]:
        """CPU ticks of every thread of the node processes, by thread id, with its kind."""
        out: dict[int, tuple[str, int]] = {}
        for pid, (role, _) in procs.items():
            if role != ROLES[0]:
                continue
            try:
                tasks = list(Path(f"/proc/{pid}/task").iterdir())
            except OSError:
                continue
            for task in tasks:
                try:
                    stat = (task / "stat").read_text()
                except OSError:
                    continue
                tid, comm = int(task.name), stat[stat.index("(") + 1 : stat.rindex(")")]
                rest = stat[stat.rindex(")") + 2 :].split()
                kind = (
                    NODE_THREADS[1]
                    if tid == pid
                    else NODE_THREADS[0]
                    if comm == STORAGE_THREAD
                    else NODE_THREADS[2]
                )
                out[tid] = (kind, int(rest[11]) + int(rest[12]))
        return out

    def start(self) -> None:
        if not Path("/proc/stat").exists():
            return
        self._start, self._busy0, self._t0 = self._snapshot(), self._busy(), time.perf_counter()
        self._threads0 = self._node_threads(self._start)

    def stop(self) -> dict[str, float]:
        if not self._t0:
            return {}
        end, busy, wall = self._snapshot(), self._busy(), time.perf_counter() - self._t0
        threads = dict.fromkeys(NODE_THREADS, 0.0)
        for tid, (kind, ticks) in self._node_threads(end).items():
            before = self._threads0.get(tid)
            threads[kind] += (ticks - (before[1] if before else 0)) / self.hz
        self.threads = {kind: seconds / wall for kind, seconds in threads.items()}
        cores = dict.fromkeys(ROLES, 0.0)
        for pid, (role, ticks) in end.items():
            before = self._start.get(pid)
            cores[role] += (ticks - (before[1] if before and before[0] == role else 0)) / self.hz
        known = sum(cores.values())
        cores[ROLES[-1]] = max(0.0, (busy - self._busy0) / self.hz - known)
        return {role: seconds / wall for role, seconds in cores.items()}


def seq_scan_rows(databases: list[str]) -> int | None:
    """Rows of the ledger tables read by sequential scans so far, over the network's
    databases (PostgreSQL's ``pg_stat_user_tables``; None with SQLite stores).

    A node's lookups and writes go through indexes. PostgreSQL may rightly read a
    small table whole instead (the transaction ids of a block of hundreds, in a
    table of a few thousand), but a figure that grows with the ledger at a steady
    block size is a plan gone wrong: until 2026-12-08 a commit that deleted a key
    read the state tree's table whole (36,515 rows a block at 600 tx/s in posts of
    20 on a small ledger, two fifths of PostgreSQL's CPU; 121 after the fix). A busy
    backend reports its counts about once a second, so a phase's figure can miss its
    last second's reads (the next phase then counts them).
    """
    if not databases:
        return None
    total = 0
    for db in databases:
        with psycopg.connect(PG_ADMIN, dbname=db, autocommit=True) as conn:
            row = conn.execute(
                "SELECT coalesce(sum(seq_tup_read), 0) FROM pg_stat_user_tables"
                " WHERE relname LIKE 'ledger%' AND schemaname NOT LIKE 'pg_temp%'"
            ).fetchone()
        total += int(row[0]) if row else 0
    return total


async def etcd_puts(port: int, seconds: float, in_flight: int) -> float:
    """Raw puts per second (aetcd) with ``in_flight`` concurrent requests."""
    value = os.urandom(200)
    done = 0
    async with aetcd.Client(host="127.0.0.1", port=port) as client:
        deadline = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            nonlocal done
            i = 0
            while time.perf_counter() < deadline:
                await client.put(f"/bench/{w}/{i}".encode(), value)
                i += 1
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(in_flight)))
        elapsed = time.perf_counter() - t0
        await client.delete_prefix(b"/bench/")
    return done / elapsed


def presign(key: SigningKey, network: str, n: int, first_seq: int = 1) -> list[Transaction]:
    now = int(time.time() * 1000)
    return [
        make_tx(
            key,
            network,
            "note.anchor",
            {"digest": hashlib.sha256(key.key_id + i.to_bytes(8, "big")).digest()},
            seq=i,
            time=now,
        )
        for i in range(first_seq, first_seq + n)
    ]


def _session(connections: int) -> aiohttp.ClientSession:
    """The load generator's HTTP client: aiohttp, whose per-request cost is low; it
    shares the machine with the nodes, so its own CPU matters."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=120),
        headers={"Content-Type": "application/cbor"},
    )


def _summary(latencies: list[float], elapsed: float) -> dict[str, Any]:
    """A phase's transactions (one latency each, in seconds), their rate over
    ``elapsed`` seconds, and p50 / p99 latency in ms."""
    latencies = sorted(latencies)
    n = len(latencies)
    return {
        "txs": n,
        "tx_s": n / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(n - 1, int(0.99 * n))],
    }


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> list[dict[str, Any]]:
    async with http.post(url, data=body) as resp:
        content = await resp.read()
        resp.raise_for_status()
    results: list[dict[str, Any]] = decode(content)
    return results


async def client_loop(
    http: aiohttp.ClientSession,
    url: str,
    txs: list[Transaction],
    batch: int,
    latencies: list[float],
    acked: list[float],
) -> None:
    for start in range(0, len(txs), batch):
        chunk = txs[start : start + batch]
        t0 = time.perf_counter()
        results = await post(http, url, encode([t.raw for t in chunk]))
        t1 = time.perf_counter()
        bad = [r for r in results if not r["ok"]]
        if bad:
            raise RuntimeError(f"{len(bad)} transactions rejected: {bad[0]}")
        latencies.extend([t1 - t0] * len(chunk))
        acked.append(t1)


async def run_load(
    layout: dict[str, Any],
    keys: dict[str, list[SigningKey]],
    per_client: int,
    batch: int,
    meter: CpuMeter,
) -> dict[str, Any]:
    network = layout["network"]
    work = []
    for node in layout["nodes"]:
        for key in keys[node["org"]]:
            work.append((node["peer"] + "/ledger/v1/txs", presign(key, network, per_client)))
    latencies: list[float] = []
    acked: list[float] = []
    async with _session(len(work) + 4) as http:
        print("saturation phase starts", file=sys.stderr, flush=True)
        meter.start()
        t0 = time.perf_counter()
        await asyncio.gather(
            *(client_loop(http, url, txs, batch, latencies, acked) for url, txs in work)
        )
        elapsed = max(acked) - t0
        cpu = meter.stop()
    return {
        "seconds": elapsed,
        "cpu": cpu,
        "threads": meter.threads,
        **_summary(latencies, elapsed),
    }


async def paced_loop(
    http: aiohttp.ClientSession,
    url: str,
    txs: list[Transaction],
    batch: int,
    interval: float,
    offset: float,
    latencies: list[float],
    timeline: list[tuple[float, str, float]] | None = None,
    t0: float = 0.0,
) -> None:
    """Post a batch every ``interval`` seconds from ``offset`` (one in flight); latency
    from the schedule. With ``timeline``, also (seconds from ``t0`` the batch was due,
    ``url``, its latency) per batch."""
    start = time.perf_counter() + offset
    for i, first in enumerate(range(0, len(txs), batch)):
        due = start + i * interval
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        chunk = txs[first : first + batch]
        results = await post(http, url, encode([t.raw for t in chunk]))
        done = time.perf_counter()
        if not all(r["ok"] for r in results):
            raise RuntimeError("transactions rejected")
        latencies.extend([done - due] * len(chunk))
        if timeline is not None:
            timeline.append((due - t0, url, done - due))


def _sample_cpu(
    meter: CpuMeter,
    t0: float,
    done: threading.Event,
    out: list[tuple[float, dict[str, float]]],
) -> None:
    """Append (seconds from ``t0``, cores per role) for every second until ``done``."""
    while not done.is_set():
        second = CpuMeter(meter.dir, list(meter.databases))
        second.start()
        done.wait(1.0)
        out.append((time.perf_counter() - t0, second.stop()))


async def run_paced(
    layout: dict[str, Any],
    keys: dict[str, list[SigningKey]],
    rate: float,
    seconds: float,
    batch: int,
    first_seq: int,
    meter: CpuMeter,
    timeline: list[tuple[float, str, float]] | None = None,
    cpu_each_second: list[tuple[float, dict[str, float]]] | None = None,
) -> dict[str, Any]:
    """One paced phase; with ``cpu_each_second``, also the cores each role used in every
    second of it (sampled by a thread, so the load generator's loop is not delayed)."""
    network = layout["network"]
    per_node = min(len(keys[n["org"]]) for n in layout["nodes"])
    clients = [  # node after node, so that consecutive start offsets go to different nodes
        (n["peer"] + "/ledger/v1/txs", keys[n["org"]][i])
        for i in range(per_node)
        for n in layout["nodes"]
    ]
    per_client = max(batch, int(rate * seconds / len(clients)))
    interval = batch * len(clients) / rate
    work = [(url, presign(key, network, per_client, first_seq)) for url, key in clients]
    await asyncio.sleep(1.0)  # let the previous phase's last blocks settle
    latencies: list[float] = []
    async with _session(len(work) + 4) as http:
        print("paced phase starts", file=sys.stderr, flush=True)
        meter.start()
        t0 = time.perf_counter()
        done = threading.Event()
        sampler = None
        if cpu_each_second is not None:
            sampler = threading.Thread(
                target=_sample_cpu, args=(meter, t0, done, cpu_each_second), daemon=True
            )
            sampler.start()
        # the clients' schedules are staggered evenly over the interval: the offered
        # load arrives as a steady stream, not as one burst of every client per interval
        await asyncio.gather(
            *(
                paced_loop(
                    http,
                    url,
                    txs,
                    batch,
                    interval,
                    j * interval / len(work),
                    latencies,
                    timeline,
                    t0,
                )
                for j, (url, txs) in enumerate(work)
            )
        )
        elapsed = time.perf_counter() - t0
        cpu = meter.stop()
        done.set()
        if sampler is not None:
            sampler.join()
    return {
        "cpu": cpu,
        "threads": meter.threads,
        "offered": rate,
        "per_client": per_client,
        **_summary(latencies, elapsed),
    }


async def run_sequential(
    layout: dict[str, Any], keys: dict[str, list[SigningKey]], n: int, first_seq: int
) -> dict[str, Any]:
    """Phase (f): one client, one transaction per post, each posted once the previous
    one is answered."""
    node = layout["nodes"][0]
    txs = presign(keys[node["org"]][0], layout["network"], n, first_seq)
    url = node["peer"] + "/ledger/v1/txs"
    await asyncio.sleep(2.0)  # the previous phase has settled and no node is busy
    latencies: list[float] = []
    async with _session(1) as http:
        t0 = time.perf_counter()
        for tx in txs:
            t = time.perf_counter()
            results = await post(http, url, encode([tx.raw]))
            latencies.append(time.perf_counter() - t)
            if not results[0]["ok"]:
                raise RuntimeError(f"transaction rejected: {results[0]}")
        elapsed = time.perf_counter() - t0
    return _summary(latencies, elapsed)


async def head_height(layout: dict[str, Any]) -> int:
    """The first node's head height."""
    async with httpx.AsyncClient(timeout=10) as http:
        h: int = (await http.get(layout["nodes"][0]["peer"] + "/health")).json()["height"]
        return h


async def heads(layout: dict[str, Any]) -> set[tuple[int, str, str]]:
    async with httpx.AsyncClient(timeout=10) as http:
        out = set()
        for node in layout["nodes"]:
            h = (await http.get(node["peer"] + "/health")).json()
            out.add((h["height"], h["log_root"], h["state_root"]))
        return out


async def converge(layout: dict[str, Any], within: float = 60) -> tuple[int, str, str]:
    deadline = time.monotonic() + within
    while True:
        got = await heads(layout)
        if len(got) == 1:
            return next(iter(got))
        if time.monotonic() > deadline:
            raise RuntimeError(f"nodes did not converge: {got}")
        await asyncio.sleep(0.5)


def _delta(now: int | None, before: int | None) -> tuple[int | None, int | None]:
    """(now - before, now): rows scanned in a phase, and the new baseline."""
    return (None if now is None or before is None else now - before), now


def print_scanned(got: dict[str, Any]) -> None:
    if got.get("scanned") is None:
        return
    label = "  ledger rows read by sequential scans / block"
    print(f"{label:<44}{got['scanned'] / max(1, got['blocks']):>14,.0f}")


def print_cpu(cpu: dict[str, float], threads: dict[str, float] | None = None) -> None:
    if not cpu:
        return
    print(f"{'  CPU, cores in use (of ' + str(os.cpu_count()) + ')':<44}{sum(cpu.values()):>14.2f}")
    for role in ROLES:
        print(f"{'    ' + role:<44}{cpu[role]:>14.2f}")
        if role == ROLES[0]:
            for kind in NODE_THREADS if threads else ():
                print(f"{'      ' + kind:<44}{threads[kind]:>14.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    parser.add_argument("--clients", type=int, default=9, help="clients (keys) per node")
    parser.add_argument("--batch", type=int, default=100, help="transactions per post")
    parser.add_argument("--txs", type=int, default=0, help="transactions per client")
    parser.add_argument(
        "--rates",
        default="",
        help="offered tx/s for (c), comma-separated (0: half the saturation throughput; "
        "default 0,2000)",
    )
    parser.add_argument("--rate-batch", type=int, default=20, help="batch size for (c)")
    parser.add_argument(
        "--sequential", type=int, default=200, help="transactions of (f), one at a time"
    )
    parser.add_argument(
        "--rate-seconds", type=float, default=0, help="seconds per offered load (default 2x (a))"
    )
    parser.add_argument(
        "--orderer-option",
        action="append",
        default=[],
        metavar="NAME=NUMBER",
        help="an etcd orderer option for every node (e.g. max_wait=0.01); repeatable",
    )
    parser.add_argument(
        "--timeline",
        type=Path,
        help="write every paced batch as a JSON line (offered rate, seconds from the "
        "phase's start it was due, node, latency in ms), and the cores each role used in "
        'every second of the phase (offered rate, seconds, "cpu", {role: cores}), to see '
        "when slow commits happen and what the machine was doing",
    )
    args = parser.parse_args()
    rates = [float(r) for r in (args.rates or "0,2000").split(",")]
    options: dict[str, Any] = {}
    for opt in args.orderer_option:
        name, _, value = opt.partition("=")
        options[name] = float(value) if "." in value else int(value)
    per_client = args.txs or (500 if args.quick else 2500)

    with tempfile.TemporaryDirectory(prefix="medledger-bench-") as tmp:
        d = Path(tmp) / "net"
        t0 = time.perf_counter()
        layout = net.create_network(
            d,
            orgs=3,
            sqlite=args.sqlite,
            network="medledger-bench",
            pg_admin=PG_ADMIN,
            load_keys=args.clients,
            fhir=False,
            gossip_interval=1.0,
            orderer_options=options,
        )
        try:
            net.start_network(d)
            print(f"network up in {time.perf_counter() - t0:.1f} s ({d})")
            keys = {
                n["org"]: [
                    Keystore(Path(n["data_dir"]) / "keys").load(f"load-{n['org']}-{i}").signing
                    for i in range(args.clients)
                ]
                for n in layout["nodes"]
            }
            port = layout["etcd"]["members"][0]["client_port"]
            seconds = 1.5 if args.quick else 3.0
            seq = asyncio.run(etcd_puts(port, seconds, 1))
            par = asyncio.run(etcd_puts(port, seconds, 64))
            h0 = asyncio.run(head_height(layout))
            meter = CpuMeter(d, layout["databases"])
            scanned = seq_scan_rows(layout["databases"])
            res = asyncio.run(run_load(layout, keys, per_client, args.batch, meter))
            h1 = asyncio.run(head_height(layout))
            res["blocks"] = h1 - h0
            res["scanned"], scanned = _delta(seq_scan_rows(layout["databases"]), scanned)
            paced = []
            next_seq = per_client + 1
            for rate in rates:
                rate = rate or round(res["tx_s"] / 2, -1)
                timeline: list[tuple[float, str, float]] = []
                cpu_each_second: list[tuple[float, dict[str, float]]] | None = (
                    None if args.timeline is None else []
                )
                got = asyncio.run(
                    run_paced(
                        layout,
                        keys,
                        rate,
                        args.rate_seconds or seconds * 2,
                        args.rate_batch,
                        next_seq,
                        meter,
                        timeline,
                        cpu_each_second,
                    )
                )
                if args.timeline is not None:
                    with args.timeline.open("a") as f:
                        for due, url, latency in sorted(timeline):
                            f.write(
                                json.dumps([rate, round(due, 4), url, round(1000 * latency, 1)])
                            )
                            f.write("\n")
                        for at, cores in cpu_each_second or []:
                            rounded = {role: round(c, 2) for role, c in cores.items()}
                            f.write(json.dumps([rate, round(at, 2), "cpu", rounded]) + "\n")
                next_seq += int(got["per_client"])
                h2 = asyncio.run(head_height(layout))
                got["blocks"], h1 = h2 - h1, h2
                got["scanned"], scanned = _delta(seq_scan_rows(layout["databases"]), scanned)
                paced.append(got)
            sequential = None
            if args.sequential:
                sequential = asyncio.run(run_sequential(layout, keys, args.sequential, next_seq))
            height, log_root, state_root = asyncio.run(converge(layout))
        finally:
            net.stop_network(d, purge=True)

    store = "SQLite" if args.sqlite else "PostgreSQL"
    print()
    print(f"three node processes, {store} stores, etcd 3 members, all on this machine")
    print(f"{args.clients} clients per node, {args.batch} transactions per post")
    if options:
        print(f"orderer options: {options}")
    print()
    print(f"{'measure':<44}{'value':>14}")
    print(f"{'raw etcd puts/s, 1 in flight (aetcd)':<44}{seq:>14,.0f}")
    print(f"{'raw etcd puts/s, 64 in flight (aetcd)':<44}{par:>14,.0f}")
    print(f"{'committed transactions/s (acknowledged)':<44}{res['tx_s']:>14,.0f}")
    print(f"{'  ratio to 64-in-flight etcd puts':<44}{res['tx_s'] / par:>14.2f}")
    print(f"{'  commit latency p50 / p99 at saturation (ms)':<44}", end="")
    print(f"{res['p50_ms']:>7.0f} /{res['p99_ms']:>5.0f}")
    print(f"{'  transactions':<44}{res['txs']:>14,}")
    print(f"{'  blocks (mean transactions per block)':<44}", end="")
    print(f"{res['blocks']:>7,} /{res['txs'] / max(1, res['blocks']):>5.0f}")
    print_scanned(res)
    print_cpu(res["cpu"], res["threads"])
    for got in paced:
        offered = f"offered load (tx/s, batches of {args.rate_batch})"
        print(f"{offered:<44}{got['offered']:>14,.0f}")
        print(f"{'  committed transactions/s':<44}{got['tx_s']:>14,.0f}")
        print(f"{'  commit latency p50 / p99 (ms)':<44}", end="")
        print(f"{got['p50_ms']:>7.0f} /{got['p99_ms']:>5.0f}")
        print(f"{'  blocks (mean transactions per block)':<44}", end="")
        print(f"{got['blocks']:>7,} /{got['txs'] / max(1, got['blocks']):>5.0f}")
        print_scanned(got)
        print_cpu(got["cpu"], got["threads"])
    if sequential is not None:
        print(f"{'one client, one transaction at a time':<44}{sequential['txs']:>14,}")
        print(f"{'  committed transactions/s':<44}{sequential['tx_s']:>14,.0f}")
        print(f"{'  ratio to 1-in-flight etcd puts':<44}{sequential['tx_s'] / seq:>14.2f}")
        print(f"{'  commit latency p50 / p99 (ms)':<44}", end="")
        print(f"{sequential['p50_ms']:>7.0f} /{sequential['p99_ms']:>5.0f}")
    print(f"{'final height (identical on all nodes)':<44}{height:>14,}")
    print(f"log root {log_root[:16]}…, state root {state_root[:16]}…")


if __name__ == "__main__":
    main()
