"""The fleet's figures (BENCHMARKS.md, "Fleet"), measured on a local fleet (scripts/fleet.sh):
PostgreSQL, ``mlflow server --app-name basic-auth`` with proxied artifacts, N replicas.

1. Cross-replica first use: an edit model registered through one replica and loaded by a
   replica that has never seen it: fetch (download through the fleet's MLflow), verify every
   sha256, load. Measured with the registry library on a fresh data directory, signed in as
   the fleet's service user (what a replica does), for an edit model the fleet trained on the
   tiny model and, with ``--sd1``, for a random SD-1.x-sized int8 delta (the trained subset's
   587.6 M parameters, ~0.59 GB), registered first the same way. The SD-sized work runs in a
   child process (its peak RSS is reported).
2. Sample latency (p50/p99, client side, through the SDK) and the replicas' cache hit rate
   (``forgedit_registry_loads_total``), for ``--models`` edit models sampled in random order by
   ``--clients`` concurrent clients, with ``load_balancing="affinity"`` and with
   ``"round_robin"``.
3. A deletion everywhere: DeleteEditModel through one replica after every replica has sampled
   the model, then a Sample on every replica: the time until each refuses.

    bash scripts/fleet.sh up
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fleet.py [--sd1] [--out FILE]

Prints one JSON document (medians over ``--repeats`` where repeated).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # random edit models of real shapes (support.registry)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load_driver import percentiles, read_fleet_env  # noqa: E402

PROMPT = "A photo of a cat wearing a hat."
SWEEP = {"steps": 2, "gammas": [0.6]}


def service_env(fleet_dir: Path, env: dict[str, str]) -> dict[str, str]:
    """MLflow's credentials of the replicas' own (non-admin) user."""
    password = (fleet_dir / "secrets" / "mlflow-service-password").read_text().strip()
    return {
        "MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"],
        "MLFLOW_TRACKING_USERNAME": "forgedit-server",
        "MLFLOW_TRACKING_PASSWORD": password,
    }


def first_use(edit_model_id: str, uri: str, repeats: int) -> dict[str, Any]:
    """fetch (download + verify) and load on a fresh replica data directory, ``repeats`` times;
    the second fetch of each round is the disk-cache hit (verify only)."""
    from registry import EditModelRegistry, RegistryConfig

    rounds = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as work:
            reg = EditModelRegistry(RegistryConfig(data_dir=Path(work), tracking_uri=uri))
            try:
                t = time.perf_counter()
                fetched = reg.fetch(edit_model_id)
                fetch_s = time.perf_counter() - t
                assert fetched.source == "download", fetched.source
                t = time.perf_counter()
                reg.load(edit_model_id)
                load_s = time.perf_counter() - t
                t = time.perf_counter()
                reg.fetch(edit_model_id)
                cached_s = time.perf_counter() - t
                size = sum(f.stat().st_size for f in fetched.path.rglob("*") if f.is_file())
            finally:
                reg.close()
        rounds.append({"fetch_s": fetch_s, "load_s": load_s, "cached_fetch_s": cached_s})
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    med["first_use_s"] = med["fetch_s"] + med["load_s"]
    return {"bytes": size, "repeats": repeats, **med, "rounds": rounds}


def sd1_child(uri: str, repeats: int) -> dict[str, Any]:
    """In a child process: register a random SD-1.x-sized int8 edit model as a replica would,
    time its first use on fresh replicas, delete it."""
    import torch
    from support.registry import random_edit_model, sd1_trained_subset_shapes

    from registry import EditModelRegistry, RegistryConfig

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        model_dir = Path(work) / "sd1-int8"
        em = random_edit_model(0, shapes=sd1_trained_subset_shapes(), delta_format="int8")
        em.source_embedding = torch.randn(1, 77, 768)
        em.save(model_dir)
        del em
        reg = EditModelRegistry(RegistryConfig(data_dir=Path(work) / "a", tracking_uri=uri))
        try:
            t = time.perf_counter()
            registered = reg.register(model_dir, request_id=f"bench-sd1-{time.time_ns()}")
            register_s = time.perf_counter() - t
            assert not registered.spooled
            shutil.rmtree(model_dir)
            result = first_use(registered.edit_model_id, uri, repeats)
            reg.delete(registered.edit_model_id)
        finally:
            reg.close()
    result["register_s"] = register_s
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# -- Sample latency with and without affinity ----------------------------------------------------


def scrape_loads(metrics_ports: list[int]) -> dict[str, float]:
    """``forgedit_registry_loads_total`` summed over the replicas, by source."""
    totals: dict[str, float] = {}
    for port in metrics_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith("forgedit_registry_loads_total{"):
                source = line.split('source="', 1)[1].split('"', 1)[0]
                totals[source] = totals.get(source, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


async def sample_load(
    env: dict[str, str], policy: str, models: list[str], samples: int, clients: int, seed: int
) -> dict[str, Any]:
    from forgedit_client import AsyncForgeditClient

    rng = random.Random(seed)
    order = [rng.choice(models) for _ in range(samples)]
    latencies: list[float] = []
    failures: list[str] = []
    async with AsyncForgeditClient(
        env["FORGEDIT_SERVER"], token=env["FORGEDIT_TOKEN"], load_balancing=policy
    ) as client:

        async def worker(k: int) -> None:
            for n in range(k, len(order), clients):
                t = time.perf_counter()
                try:
                    await client.sample(order[n], PROMPT, seeds=[n], **SWEEP).result()
                except Exception as e:  # tallied, not raised: the run goes on
                    failures.append(f"{type(e).__name__}: {e}"[:200])
                    continue
                latencies.append(time.perf_counter() - t)

        await asyncio.gather(*(worker(k) for k in range(clients)))
    return {"latency_s": percentiles(latencies), "failures": failures}


def affinity_vs_round_robin(
    env: dict[str, str], metrics_ports: list[int], n_models: int, samples: int, clients: int
) -> dict[str, Any]:
    from forgedit_client import ForgeditClient

    models = []
    with ForgeditClient(
        env["FORGEDIT_SERVER"], token=env["FORGEDIT_TOKEN"], load_balancing="affinity"
    ) as client:
        for i in range(n_models):
            result = client.edit(
                ROOT / "samples" / "photos" / "cat.jpg",
                PROMPT,
                updates=2,
                batch_size=1,
                train_seed=500 + i,
                seeds=[1],
                **SWEEP,
            ).result()
            models.append(result.edit_model_id)
    report: dict[str, Any] = {"models": n_models, "samples": samples, "clients": clients}
    for policy in ("round_robin", "affinity", "round_robin", "affinity"):
        # A short unmeasured warm-up, then the measured run; the second pair shows the
        # order does not matter.
        asyncio.run(sample_load(env, policy, models, max(clients, samples // 5), clients, 1))
        before = scrape_loads(metrics_ports)
        run = asyncio.run(sample_load(env, policy, models, samples, clients, 2))
        after = scrape_loads(metrics_ports)
        loads = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        total = sum(loads.values()) or 1.0
        run["loads"] = loads
        run["memory_hit_rate"] = loads.get("memory", 0.0) / total
        report.setdefault(policy, []).append(run)
    return report


# -- deletion ------------------------------------------------------------------------------------


def deletion_everywhere(env: dict[str, str], repeats: int) -> dict[str, Any]:
    from forgedit_client import ForgeditClient
    from forgedit_client.errors import ForgeditRpcError

    replicas = env["FORGEDIT_REPLICAS"].split(",")
    rounds = []
    for r in range(repeats):
        clients = [ForgeditClient(a, token=env["FORGEDIT_TOKEN"]) for a in replicas]
        try:
            edit_model_id = (
                clients[0]
                .edit(
                    ROOT / "samples" / "photos" / "cat.jpg",
                    PROMPT,
                    updates=2,
                    batch_size=1,
                    train_seed=900 + r + int(time.time()) % 10_000,
                    seeds=[1],
                    **SWEEP,
                )
                .result()
                .edit_model_id
            )
            for c in clients:  # every replica holds it in memory
                c.sample(edit_model_id, PROMPT, seeds=[1], **SWEEP).result()
            t = time.perf_counter()
            clients[-1].delete_edit_model(edit_model_id)
            delete_s = time.perf_counter() - t
            refused = []
            for c in clients:
                try:
                    c.sample(edit_model_id, PROMPT, seeds=[1], **SWEEP).result()
                    refused.append(None)  # still served: a coherence failure
                except ForgeditRpcError as e:
                    assert e.code_name == "NOT_FOUND", e
                    refused.append(time.perf_counter() - t)
        finally:
            for c in clients:
                c.close()
        rounds.append({"delete_s": delete_s, "refused_on_every_replica_after_s": refused})
    everywhere = [max(r["refused_on_every_replica_after_s"]) for r in rounds]
    return {
        "repeats": repeats,
        "delete_s": statistics.median(r["delete_s"] for r in rounds),
        "refused_everywhere_after_s": statistics.median(everywhere),
        "rounds": rounds,
    }


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_avg": os.getloadavg(),
        "torch_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--env", type=Path, default=ROOT / ".forgedit-data" / "fleet" / "env", help="fleet env"
    )
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--samples", type=int, default=120)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sd1", action="store_true", help="also the SD-1.x-sized int8 delta")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--sd1-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    env = read_fleet_env(args.env)
    fleet_dir = Path(env["FORGEDIT_FLEET_DIR"])
    creds = service_env(fleet_dir, env)
    if args.sd1_child:
        os.environ.update(creds)
        print(json.dumps(sd1_child(creds["MLFLOW_TRACKING_URI"], args.repeats)))
        return
    state = json.loads((fleet_dir / "state.json").read_text())
    metrics_ports = [r["metrics_port"] for r in state["replicas"]]
    report: dict[str, Any] = {"replicas": len(metrics_ports), "machine": machine()}

    # 1. Cross-replica first use, the tiny model's edit model (trained by the fleet).
    from forgedit_client import ForgeditClient

    with ForgeditClient(env["FORGEDIT_REPLICAS"].split(",")[0], token=env["FORGEDIT_TOKEN"]) as c:
        tiny_id = (
            c.edit(
                ROOT / "samples" / "photos" / "cat.jpg",
                PROMPT,
                updates=2,
                batch_size=1,
                train_seed=int(time.time()),
                seeds=[1],
                **SWEEP,
            )
            .result()
            .edit_model_id
        )
    os.environ.update(creds)
    report["first_use_tiny"] = first_use(tiny_id, creds["MLFLOW_TRACKING_URI"], args.repeats)
    if args.sd1:
        child = subprocess.run(
            [sys.executable, __file__, "--env", str(args.env), "--sd1-child", "--repeats", "2"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        report["first_use_sd1_int8"] = json.loads(child.stdout.strip().splitlines()[-1])

    # 2. Sample latency and cache hits, with and without affinity.
    report["sample"] = affinity_vs_round_robin(
        env, metrics_ports, args.models, args.samples, args.clients
    )
    # 3. A deletion everywhere.
    report["deletion"] = deletion_everywhere(env, args.repeats)

    text = json.dumps(report, indent=2, sort_keys=True)
    if args.out is not None:
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, args.out)
    print(text)


if __name__ == "__main__":
    main()
