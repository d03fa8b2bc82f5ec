"""Time to register and to fetch an edit model of the SD-1.x trained-subset size.

The edit model has random fp16 tensors with the shapes of ``down_blocks.1-3`` and
``up_blocks.1-3`` of an SD-1.x UNet (587.6 M parameters, ~1.18 GB) plus a [1, 77, 768]
embedding. It is generated once by a child process and written to disk, so this process never
holds it and its peak RSS shows what the registry itself needs (streams, never the whole model).

For each back end (the embedded SQLite store, a real ``mlflow server`` on loopback) and each
repeat: ``register`` the directory (copy into the spool, hash, upload, verify sizes, create the
version), ``fetch`` it on a fresh replica (download + verify every sha256), ``fetch`` again
(cache hit: verify only), then ``delete`` it (to bound disk use). Prints one JSON document with
the medians and the machine.

    .venv/bin/python benchmarks/bench_registry.py [--repeats 3] [--scale 1.0]
        [--backends embedded,server] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Random edit models of real shapes and a real `mlflow server` come from the tests' helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def generate(directory: Path, scale: float) -> None:
    """Child process: write the random SD-sized edit model to ``directory``."""
    import torch
    from support.registry import random_edit_model, sd1_trained_subset_shapes

    torch.set_num_threads(1)
    shapes = sd1_trained_subset_shapes()
    if scale != 1.0:
        shapes = {k: s for i, (k, s) in enumerate(shapes.items()) if i < len(shapes) * scale}
    em = random_edit_model(0, shapes=shapes, dtype=torch.float16)
    em.source_embedding = torch.randn(1, 77, 768)
    em.save(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the tensors")
    parser.add_argument("--backends", default="embedded,server")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--generate", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate is not None:
        generate(args.generate, args.scale)
        return

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-registry-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(json.dumps(run(work, args), indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from support.registry import MlflowServer

    from forgedit.artifact import read_manifest
    from registry import EditModelRegistry, RegistryConfig
    from registry.fsutil import tree_bytes

    source = work / "edit-model"
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--generate", str(source), "--scale", str(args.scale)],
        check=True,
    )
    manifest = read_manifest(source)
    report: dict[str, Any] = {
        "edit_model": {
            "parameters": manifest["delta"]["parameters"],
            "tensors": manifest["delta"]["tensors"],
            "dtype": manifest["delta"]["dtype"],
            "bytes_on_disk": tree_bytes(source),
            "generate_s": round(time.perf_counter() - started, 2),
        },
        "machine": machine(),
        "repeats": args.repeats,
        "results": {},
    }
    for backend in args.backends.split(","):
        server = None
        if backend == "server":
            server = MlflowServer(work / "mlflow-server")
            server.start()
            uri: str | None = server.uri
        elif backend == "embedded":
            uri = None
        else:
            raise SystemExit(f"unknown back end {backend!r}; accepted: embedded, server")
        try:
            timings: dict[str, list[float]] = {
                "register_s": [],
                "fetch_s": [],
                "fetch_cached_s": [],
            }
            registrar = EditModelRegistry(
                RegistryConfig(data_dir=work / backend / "a", tracking_uri=uri)
            )
            registrar._backend.experiment_id()  # store set-up is not part of the figure
            store_uri = registrar.config.resolved_tracking_uri
            for i in range(args.repeats):
                t = time.perf_counter()
                result = registrar.register(source, dedupe=False)
                timings["register_s"].append(time.perf_counter() - t)
                assert not result.spooled, "MLflow did not take the edit model"
                replica = EditModelRegistry(
                    RegistryConfig(data_dir=work / backend / f"b{i}", tracking_uri=store_uri)
                )
                t = time.perf_counter()
                fetched = replica.fetch(result.edit_model_id)
                timings["fetch_s"].append(time.perf_counter() - t)
                assert fetched.source == "download"
                t = time.perf_counter()
                assert replica.fetch(result.edit_model_id).source == "cache"
                timings["fetch_cached_s"].append(time.perf_counter() - t)
                registrar.delete(result.edit_model_id)
                shutil.rmtree(work / backend / f"b{i}", ignore_errors=True)
            report["results"][backend] = {
                **{f"median_{k}": round(statistics.median(v), 2) for k, v in timings.items()},
                "all": {k: [round(x, 2) for x in v] for k, v in timings.items()},
            }
        finally:
            if server is not None:
                server.stop()
    report["peak_rss_mb_of_this_process"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    return report


def machine() -> dict[str, Any]:
    import mlflow
    import torch

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "mlflow": mlflow.__version__,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["memory_gb"] = round(int(mem[1]) / 1024**2, 1)
    except OSError:
        pass
    return info


if __name__ == "__main__":
    main()
