"""Benchmark of the etcd orderer (not a test: prints a table, asserts nothing).

Measures, in one run, on a fresh 3-member etcd cluster (real ``etcd`` processes on
loopback, started here) and three medledger nodes (one per organisation, each in its
own process with its own durable SQLite store, as in a deployment, all sharing this
machine's cores with etcd):

(a) the ceiling: raw etcd puts per second with the same client library (aetcd),
    one at a time and with 64 in flight, 300-byte values (about a transaction);
(b) saturation: ``--txs`` pre-signed ``note.anchor`` transactions submitted all at
    once, a third to each node; committed transactions per second from the first
    submit to the last receipt (a receipt means: committed on the submitting node),
    and until all three nodes have applied everything;
(c) fixed offered loads: for each of ``--rates`` (tx/s), ``--seconds`` of
    submissions spread over the three nodes in 10 ms ticks; committed tx/s and the
    p50 / p99 commit latency (submit -> receipt on the submitting node).

Every node checks every signature (``--verify-workers`` processes each) and applies
every transaction itself, so the consortium does three times the ledger work of one
node on this machine. Figures are wall-clock, across processes (``time.time``).

Run: ``.venv/bin/python bench/bench_etcd.py [--quick] [--rates 1000,2000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aetcd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from etcd_cluster import EtcdCluster
from medledger.crypto.signing import SigningKey
from medledger.ledger.tx import Transaction, make_tx
from medledger.node import Node, Receipt

NETWORK = "medledger-bench"
ORGS = ("h1", "h2", "h3")
TICK = 0.01


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def _presign(admin: SigningKey, start_seq: int, n: int, label: str) -> list[Transaction]:
    now = int(time.time() * 1000)
    return [
        make_tx(
            admin,
            NETWORK,
            "note.anchor",
            {"digest": hashlib.sha256(f"{label}/{start_seq + i}".encode()).digest()},
            seq=start_seq + i,
            time=now,
        )
        for i in range(n)
    ]


# -- (a) raw etcd ------------------------------------------------------------------------------


async def bench_raw_puts(endpoint: str, n_serial: int, n_parallel: int) -> dict[str, float]:
    host, port = endpoint.rsplit(":", 1)
    value = os.urandom(300)
    async with aetcd.Client(host=host, port=int(port), timeout=10) as client:
        await client.put(b"/bench/warmup", value)
        t0 = time.perf_counter()
        for i in range(n_serial):
            await client.put(b"/bench/serial/%d" % i, value)
        serial = n_serial / (time.perf_counter() - t0)

        sem = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            async with sem:
                await client.put(b"/bench/parallel/%d" % i, value)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n_parallel)))
        parallel = n_parallel / (time.perf_counter() - t0)
        await client.delete_prefix(b"/bench/")
    return {"serial": serial, "parallel": parallel}


# -- one process per node ----------------------------------------------------------------------


def _node_proc(i: int, cfg: dict[str, Any], barrier: Any, out: Any) -> None:
    asyncio.run(_node_main(i, cfg, barrier, out))


async def _node_main(i: int, cfg: dict[str, Any], barrier: Any, out: Any) -> None:
    """Node ``i``: its third of every phase, timed with the wall clock."""
    node_keys = {o: SigningKey.from_seed(cfg["seeds"][k][0]) for k, o in enumerate(ORGS)}
    admins = {o: SigningKey.from_seed(cfg["seeds"][k][1]) for k, o in enumerate(ORGS)}
    genesis = {
        "network": NETWORK,
        "time": cfg["genesis_time"],
        "orgs": [
            {"id": o, "name": o, "node_key": node_keys[o].public.raw, "enc_key": cfg["enc"][k]}
            for k, o in enumerate(ORGS)
        ],
        "admins": [{"id": f"admin-{o}", "org": o, "key": admins[o].public.raw} for o in ORGS],
    }
    org = ORGS[i]
    work = Path(cfg["work"])
    node = await Node.create(f"sqlite:///{work / (org + '.db')}", genesis, [(org, node_keys[org])])
    await node.start(cfg["url"], verify_workers=cfg["verify_workers"], compact_interval=None)
    loop = asyncio.get_running_loop()

    async def barrier_wait() -> None:
        await loop.run_in_executor(None, barrier.wait)

    seq = 1
    sat = _presign(admins[org], seq, cfg["n_sat"], f"{org}/sat")
    seq += len(sat)
    phases = []
    for rate in cfg["rates"]:
        n = int(rate * cfg["seconds"] / len(ORGS))
        phases.append((rate, _presign(admins[org], seq, n, f"{org}/rate{rate}")))
        seq += n
    results: dict[str, Any] = {}

    # (b) everything at once
    await barrier_wait()
    t0 = time.time()
    starts = []
    futs = []
    for tx in sat:
        starts.append(time.time())
        futs.append(node.enqueue(tx))
    ends = []
    for fut in futs:
        await fut
        ends.append(time.time())
    lat = [(e - s) * 1000 for s, e in zip(starts, ends, strict=True)]
    await node.orderer.sync()
    results["sat"] = {"t0": t0, "t1": max(ends), "t_all": time.time(), "lat": lat}
    await barrier_wait()

    # (c) this node's share of each offered rate, in 10 ms ticks
    results["rates"] = []
    for rate, txs in phases:
        await barrier_wait()
        queue = list(reversed(txs))
        latencies: list[float] = []
        pending = []

        async def track(fut: asyncio.Future[Receipt], start: float, into: list[float]) -> None:
            await fut
            into.append((time.time() - start) * 1000)

        per_tick = rate / len(ORGS) * TICK
        t0 = time.time()
        next_tick = loop.time()
        owed = 0.0
        while queue:
            owed += per_tick
            while owed >= 1 and queue:
                owed -= 1
                fut = node.enqueue(queue.pop())
                pending.append(loop.create_task(track(fut, time.time(), latencies)))
            next_tick += TICK
            await asyncio.sleep(max(0.0, next_tick - loop.time()))
        t_offered = time.time()
        await asyncio.gather(*pending)
        results["rates"].append(
            {"t0": t0, "t_offered": t_offered, "t1": time.time(), "lat": latencies}
        )
        await node.orderer.sync()

    await barrier_wait()
    await node.orderer.sync()
    results.update(head=node.head.hash, blocks=node.head.height, txs=node.head.log_size)
    out.send(results)
    out.close()
    await node.close()


def run_nodes(
    work: Path,
    url: str,
    n_sat: int,
    rates: list[float],
    seconds: float,
    verify_workers: int,
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    cfg = {
        "work": str(work),
        "url": url,
        "seeds": [(os.urandom(32), os.urandom(32)) for _ in ORGS],
        "enc": [os.urandom(32) for _ in ORGS],
        "genesis_time": int(time.time() * 1000) - 1000,
        "n_sat": n_sat // len(ORGS),
        "rates": rates,
        "seconds": seconds,
        "verify_workers": verify_workers,
    }
    barrier = ctx.Barrier(len(ORGS))
    procs, pipes = [], []
    for i in range(len(ORGS)):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_node_proc, args=(i, cfg, barrier, send))
        p.start()
        procs.append(p)
        pipes.append(recv)
    results = [r.recv() for r in pipes]
    for p in procs:
        p.join(timeout=30)

    def phase(parts: list[dict[str, Any]], end: str) -> dict[str, float]:
        lat = [x for part in parts for x in part["lat"]]
        t0 = min(part["t0"] for part in parts)
        out = {
            "n": len(lat),
            "tx_s": len(lat) / (max(part["t1"] for part in parts) - t0),
            "p50": statistics.median(lat),
            "p99": _pct(lat, 0.99),
            "max": max(lat),
        }
        out[end] = len(lat) / (max(part[end] for part in parts) - t0)
        return out

    return {
        "sat": phase([r["sat"] for r in results], "t_all"),
        "rates": [phase([r["rates"][k] for r in results], "t_offered") for k in range(len(rates))],
        "identical": len({r["head"] for r in results}) == 1,
        "blocks": results[0]["blocks"],
        "txs": results[0]["txs"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer transactions, shorter runs")
    parser.add_argument("--txs", type=int, default=None, help="transactions for (b)")
    parser.add_argument("--rates", default="1000,2000", help="offered tx/s for (c), comma list")
    parser.add_argument("--seconds", type=float, default=None, help="duration of each (c) run")
    parser.add_argument("--verify-workers", type=int, default=1)
    args = parser.parse_args()
    n_sat = args.txs or (3_000 if args.quick else 15_000)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]

    with tempfile.TemporaryDirectory(prefix="medledger-bench-etcd-") as tmp:
        work = Path(tmp)
        print(f"work directory: {work}  (cpus: {os.cpu_count()}, etcd: 3 members on loopback)")
        with EtcdCluster(work / "etcd", size=3) as cluster:
            print("(a) raw etcd puts (aetcd, 300-byte values) ...")
            raw = asyncio.run(
                bench_raw_puts(cluster.endpoints[0], 500 if args.quick else 2000, 5000)
            )
            print(
                f"(b)+(c) three node processes: {n_sat:,} txs at once, then "
                f"{', '.join(f'{r:,.0f}' for r in rates)} tx/s for {seconds:g} s each ..."
            )
            res = run_nodes(work, cluster.url, n_sat, rates, seconds, args.verify_workers)

    sat = res["sat"]
    ceiling = raw["parallel"]
    rows = [
        ("(a) raw etcd puts/s, 1 in flight", f"{raw['serial']:,.0f}", ""),
        ("(a) raw etcd puts/s, 64 in flight (ceiling)", f"{ceiling:,.0f}", ""),
        (
            f"(b) committed tx/s, {sat['n']:,} at once (receipt on submitting node)",
            f"{sat['tx_s']:,.0f}",
            f"{sat['tx_s'] / ceiling:.2f} x ceiling",
        ),
        ("(b) ... until all 3 nodes applied everything", f"{sat['t_all']:,.0f}", ""),
        (
            "(b) latency p50 / p99 (queueing included)",
            f"{sat['p50']:.0f} / {sat['p99']:.0f} ms",
            "",
        ),
    ]
    for rate, r in zip(rates, res["rates"], strict=True):
        rows += [
            (
                f"(c) committed tx/s at {rate:,.0f} tx/s offered ({r['t_offered']:,.0f} achieved)",
                f"{r['tx_s']:,.0f}",
                f"{r['tx_s'] / ceiling:.2f} x ceiling",
            ),
            (
                "    commit latency p50 / p99 / max",
                f"{r['p50']:.0f} / {r['p99']:.0f} / {r['max']:.0f} ms",
                "",
            ),
        ]
    width = max(len(r[0]) for r in rows)
    print()
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>18}  {note}")
    state = "identical" if res["identical"] else "DIFFERENT"
    print(f"\n  {res['txs']:,} txs in {res['blocks']:,} blocks; the three nodes' heads are {state}")


if __name__ == "__main__":
    main()
