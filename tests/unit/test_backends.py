"""Sampling UNet backends: the refit plan (which tensors, diffed against what a backend holds),
the ONNX export (weights as external data, name map, cache), ONNX Runtime against torch (UNet
outputs per step within 1e-5, images within 2/255 for vs and vp, several strategies, an edit
model from disk and one just trained, two edit models back to back), the bounded cache of
compiled UNets, the canary and the fallbacks (replica-wide at build, per job at refit or run;
ONNX Runtime standing in for TensorRT, which cannot be installed here), and the CLI flag.
TensorRT's own pieces that need no GPU are in test_tensorrt.py."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from forgedit import cli
from forgedit.artifact import load_edit_model
from forgedit.backends.base import (
    BackendUnavailableError,
    LoadedWeights,
    Shape,
    example_inputs,
    refit_plan,
)
from forgedit.backends.canary import CanariedBackend
from forgedit.backends.onnx_export import (
    CONSTANTS_GRAPH_FILE,
    DATA_INPUTS,
    GRAPH_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ExportError,
    _graph_inputs,
    check_name_map,
    export_unet,
)
from forgedit.backends.onnxruntime_backend import OnnxRuntimeBackend
from forgedit.backends.select import BackendChain, BackendConfig, chain_for
from forgedit.backends.torch_backend import TorchBackend
from forgedit.cli.parser import build_parser
from forgedit.config import SweepConfig, TrainingConfig
from forgedit.engine import Engine, ResolutionReadiness
from forgedit.errors import EngineNotReadyError, InvalidInputError
from forgedit.images import load_image
from forgedit.models import SD1_UNET_TENSORS
from forgedit.weights import ResidentWeights

SIZE = 64
PROMPT = "A photo of a sitting dog."
STRATEGIES = ("donotforget", "encoderkv", "noencoder", "encoderattn")


def quick(seed: int = 1) -> TrainingConfig:
    stages = tuple(
        dataclasses.replace(s, updates=4, batch_size=2)
        for s in TrainingConfig.for_mode("joint").stages
    )
    return TrainingConfig.for_mode("joint", stages=stages, height=SIZE, width=SIZE, seed=seed)


def pixels(images: list[Any]) -> list[np.ndarray]:
    return [np.asarray(e.image, dtype=np.int16) for e in images]


def max_pixel_difference(a: list[Any], b: list[Any]) -> int:
    assert [e.spec for e in a] == [e.spec for e in b]
    return max(int(np.abs(x - y).max()) for x, y in zip(pixels(a), pixels(b), strict=True))


# -- the refit plan, without any model --------------------------------------------------------


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = torch.nn.Linear(2, 2)
        self.up = torch.nn.Linear(2, 2)


def test_refit_plan_names_exactly_the_differing_tensors() -> None:
    assert refit_plan({}, {}) == []
    assert refit_plan({"a": (1, 1.0)}, {}) == ["a"]
    assert refit_plan({}, {"a": (1, 1.0)}) == ["a"]  # back to the base
    assert refit_plan({"a": (1, 1.0), "b": (1, 0.5)}, {"a": (1, 1.0), "b": (1, 1.0)}) == ["b"]
    # Same coefficient, another edit model: different contents.
    assert refit_plan({"a": (2, 1.0)}, {"a": (1, 1.0)}) == ["a"]


def test_sync_sends_only_what_changed_since_the_backend_last_loaded() -> None:
    toy = _Toy()
    weights = ResidentWeights({"unet": toy})
    loaded = LoadedWeights(weights.state("unet"))
    sent: list[tuple[dict[str, torch.Tensor], bool]] = []

    def apply(tensors: Mapping[str, torch.Tensor], *, new_edit_model: bool) -> None:
        sent.append(({k: v.clone() for k, v in tensors.items()}, new_edit_model))

    delta_a = {"unet.down.weight": torch.ones(2, 2), "unet.up.weight": torch.ones(2, 2)}
    delta_b = {"unet.up.weight": 2 * torch.ones(2, 2), "unet.up.bias": torch.ones(2)}
    with weights.edit_model(delta_a) as live:
        live.set_forgetting([], 1.0)
        assert loaded.sync(weights, apply) == ("down.weight", "up.weight")
        assert torch.equal(sent[-1][0]["up.weight"], toy.up.weight)
        assert sent[-1][1] is False  # from the base: nothing to clear
        live.set_forgetting(["down.weight"], 0.0)  # revert one tensor
        assert loaded.sync(weights, apply) == ("down.weight",)
        assert loaded.sync(weights, apply) == ()  # nothing changed since
        assert len(sent) == 2
    with weights.edit_model(delta_b) as live:
        live.set_forgetting([], 1.0)
        # A's up.weight must go (B overwrites it), A's down.weight is already pristine.
        assert loaded.sync(weights, apply) == ("up.bias", "up.weight")
        assert sent[-1][1] is True  # another edit model: clear the bindings first
    assert loaded.sync(weights, apply) == ("up.bias", "up.weight")  # restoring the base
    assert torch.equal(sent[-1][0]["up.weight"], toy.up.weight)


def test_backend_names_and_order() -> None:
    assert chain_for("auto", torch.device("cpu")) == ["onnxruntime", "torch"]
    assert chain_for("auto", torch.device("cuda")) == ["tensorrt", "onnxruntime", "torch"]
    assert chain_for("onnxruntime", torch.device("cuda")) == ["onnxruntime", "torch"]
    assert chain_for("torch", torch.device("cpu")) == ["torch"]
    with pytest.raises(InvalidInputError, match="accepted: torch, onnxruntime, tensorrt, auto"):
        chain_for("tensorflow", torch.device("cpu"))


def test_server_setting_accepts_the_backend_names_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from server.settings import ServerSettings

    monkeypatch.delenv("FORGEDIT_UNET_BACKEND", raising=False)
    assert ServerSettings().unet_backend == "auto"  # the shipped default
    assert ServerSettings(unet_backend="onnxruntime").unet_backend == "onnxruntime"
    with pytest.raises(ValidationError, match="'auto', 'torch', 'onnxruntime' or 'tensorrt'"):
        ServerSettings(unet_backend="trt")


# -- the tiny model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def torch_engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(tiny_model_dir / "stable-diffusion", unet_backend="torch")


@pytest.fixture(scope="module")
def ort_engine(tiny_model_dir: Path, cache_dir: Path) -> Engine:
    engine = Engine.load(
        tiny_model_dir / "stable-diffusion",
        unet_backend="onnxruntime",
        cache_dir=cache_dir,
        max_batch=4,
    )
    engine.warmup()
    # Every test on this engine compares ONNX Runtime with torch: one that fell back would
    # compare torch with torch and pass, so a fallback here errors every test that uses it
    # (the conftest guard charges a fixture's fallback to the first test only).
    assert engine.sampling_backend == "onnxruntime" and not engine.backends.fallbacks
    return engine


@pytest.fixture(scope="module")
def photo(photos_dir: Path) -> Any:
    return load_image(photos_dir / "cat.jpg").image


@pytest.fixture(scope="module")
def edit_models(torch_engine: Engine, photo: Any) -> list[Any]:
    """Two edit models of the same base model (the engines share its fingerprint)."""
    return [torch_engine.finetune(photo, "A photo of a dog", quick(seed)) for seed in (1, 2)]


@pytest.mark.backend_fallback("tensorrt:no_cuda")
def test_default_backend_choice_and_tensorrt_fallback_here(
    tiny_model_dir: Path, cache_dir: Path
) -> None:
    """On this CPU machine TensorRT cannot serve (no CUDA); asking for it falls back to ONNX
    Runtime for the replica, with the reason reported, and the engine says it is degraded."""
    seen: list[Any] = []
    engine = Engine.load(
        tiny_model_dir / "stable-diffusion",
        unet_backend="tensorrt",
        cache_dir=cache_dir,
        on_backend_fallback=seen.append,
    )
    assert engine.sampling_backend == "onnxruntime"
    assert [(f.backend, f.reason, f.scope) for f in seen] == [("tensorrt", "no_cuda", "replica")]
    assert "CUDA" in seen[0].message
    assert engine.backend_degraded
    auto = Engine(engine.base, unet_backend="auto", cache_dir=cache_dir)
    assert auto.sampling_backend == "onnxruntime"
    assert auto.backends.fallbacks == [] and not auto.backend_degraded


def test_export_keeps_weights_outside_protobuf_with_a_complete_name_map(
    ort_engine: Engine, cache_dir: Path
) -> None:
    """Every weight lives in the external-data file (the graph file holds none), the name map
    is complete, the cache manifest records what the entry depends on and every file's hash,
    and TensorRT's graph is the same graph with the weights as initializers only."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    unet = ort_engine.base.unet
    shape = ort_engine.sampling_shape(SIZE, SIZE, 4)
    export = export_unet(unet, ort_engine.base.fingerprint, shape, cache_dir / "onnx")
    assert export.seconds == 0.0  # the warm-up exported it; this came from the cache
    assert len(export.name_map) == SD1_UNET_TENSORS == sum(1 for _ in unet.parameters())
    assert len(set(export.name_map.values())) == SD1_UNET_TENSORS  # one-to-one
    manifest = json.loads((export.directory / MANIFEST_FILE).read_text())
    assert manifest["base_model_fingerprint"] == ort_engine.base.fingerprint
    assert manifest["torch_version"] == torch.__version__
    assert manifest["opset"] >= 17
    assert manifest["inputs"] == list(DATA_INPUTS)
    assert manifest["name_map"] == export.name_map
    assert set(manifest["files"]) == {GRAPH_FILE, CONSTANTS_GRAPH_FILE, WEIGHTS_FILE}
    parameter_bytes = sum(p.numel() * 4 for p in unet.parameters())
    assert parameter_bytes <= export.weights_bytes < parameter_bytes + 4096 * SD1_UNET_TENSORS

    for graph_file, weight_inputs in ((GRAPH_FILE, True), (CONSTANTS_GRAPH_FILE, False)):
        graph = onnx.load(str(export.directory / graph_file), load_external_data=False)
        initializers = {t.name: t for t in graph.graph.initializer}
        assert set(initializers) == set(export.name_map.values())
        assert all(uses_external_data(t) and not t.raw_data for t in initializers.values())
        assert {e.value for t in initializers.values() for e in t.external_data} >= {WEIGHTS_FILE}
        inputs = [i.name for i in graph.graph.input]
        assert inputs[:3] == list(DATA_INPUTS)
        assert (len(inputs) == 3 + SD1_UNET_TENSORS) is weight_inputs
    # The file holds the base values, in the graph's names.
    loaded = onnx.load(str(export.directory / CONSTANTS_GRAPH_FILE))
    values = {t.name: t for t in loaded.graph.initializer}
    for name in ("conv_in.weight", "up_blocks.3.attentions.2.proj_out.bias"):
        array = onnx.numpy_helper.to_array(values[export.name_map[name]])
        assert np.array_equal(array, unet.get_parameter(name).detach().numpy())


def test_the_export_writes_base_weights_while_an_edit_model_is_live(
    ort_engine: Engine, edit_models: list[Any], tmp_path: Path
) -> None:
    """An export made while an edit model is written into the live UNet still stores the
    base: the cache is keyed by the base model, so anything else would poison it."""
    import onnx

    engine = ort_engine
    unet, weights = engine.base.unet, engine.weights
    name = next(k.removeprefix("unet.") for k in edit_models[0].delta if k.startswith("unet."))
    base = weights.base_value(f"unet.{name}").clone()
    with weights.edit_model(edit_models[0].delta) as live:
        live.set_forgetting([], 1.0)
        assert not torch.equal(unet.get_parameter(name), base)
        export = export_unet(
            unet,
            engine.base.fingerprint,
            engine.sampling_shape(SIZE, SIZE, 1),
            tmp_path,
            base_values=lambda n: weights.base_value(f"unet.{n}"),
        )
    graph = onnx.load(str(export.constants_path))
    (tensor,) = [t for t in graph.graph.initializer if t.name == export.name_map[name]]
    assert np.array_equal(onnx.numpy_helper.to_array(tensor), base.numpy())


def test_an_export_cache_entry_that_does_not_match_is_rebuilt(
    ort_engine: Engine, tmp_path: Path
) -> None:
    unet, fingerprint = ort_engine.base.unet, ort_engine.base.fingerprint
    shape = ort_engine.sampling_shape(SIZE, SIZE, 1)
    first = export_unet(unet, fingerprint, shape, tmp_path)
    assert first.seconds > 0
    manifest_path = first.directory / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["torch_version"] = "0.0.1"  # written by another torch
    manifest_path.write_text(json.dumps(manifest))
    assert export_unet(unet, fingerprint, shape, tmp_path).seconds > 0
    for damaged in (GRAPH_FILE, WEIGHTS_FILE, CONSTANTS_GRAPH_FILE):
        with open(first.directory / damaged, "r+b") as f:  # a corrupt file of the entry
            f.seek(100)
            f.write(b"\1" * 16)
        assert export_unet(unet, fingerprint, shape, tmp_path).seconds > 0
    (first.directory / WEIGHTS_FILE).unlink()  # a missing weights file
    rebuilt = export_unet(unet, fingerprint, shape, tmp_path)
    assert rebuilt.seconds > 0
    assert export_unet(unet, fingerprint, shape, tmp_path).seconds == 0.0
    other = export_unet(unet, "0" * 64, shape, tmp_path)  # another base model
    assert other.directory != rebuilt.directory
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [rebuilt.directory.name, other.directory.name]
    )  # no staging directories left behind
    assert {p.name for p in rebuilt.directory.iterdir()} == {
        GRAPH_FILE,
        CONSTANTS_GRAPH_FILE,
        WEIGHTS_FILE,
        MANIFEST_FILE,
    }


@pytest.mark.backend_fallback("onnxruntime:build_failed")
def test_an_export_that_cannot_be_written_falls_back_for_the_replica(
    ort_engine: Engine, tmp_path: Path
) -> None:
    """A cache that cannot be written (here a file where its directory should be) makes the
    backend unavailable at warm-up, not the replica: it serves on torch and says why, without
    a path in the message."""
    blocked = tmp_path / "engines"
    blocked.write_text("not a directory")
    seen: list[Any] = []
    engine = Engine(
        ort_engine.base,
        unet_backend="onnxruntime",
        cache_dir=blocked,
        on_backend_fallback=seen.append,
    )
    engine.warmup()
    assert engine.sampling_backend == "torch" and engine.backend_degraded
    assert [(f.backend, f.reason, f.scope) for f in seen] == [
        ("onnxruntime", "build_failed", "replica")
    ]
    assert "could not be written" in seen[0].message and str(tmp_path) not in seen[0].message
    assert [(r.backend, r.ready) for r in engine.readiness] == [("torch", True)]


def test_an_incomplete_name_map_is_an_error_at_export(ort_engine: Engine, cache_dir: Path) -> None:
    unet = ort_engine.base.unet
    export = export_unet(
        unet,
        ort_engine.base.fingerprint,
        ort_engine.sampling_shape(SIZE, SIZE, 4),
        cache_dir / "onnx",
    )
    inputs = _graph_inputs(export.path)
    check_name_map(unet, inputs)
    del inputs["unet.conv_out.bias"]  # what a folded or renamed weight looks like
    with pytest.raises(ExportError, match=f"maps {SD1_UNET_TENSORS - 1} of the UNet's 686"):
        check_name_map(unet, inputs)
    inputs["onnx::Conv_123"] = (4,)
    with pytest.raises(ExportError, match="unexpected inputs: onnx::Conv_123"):
        check_name_map(unet, inputs)


def test_unet_outputs_match_torch_per_step_after_every_swap(
    ort_engine: Engine, edit_models: list[Any]
) -> None:
    """ε from ONNX Runtime equals torch's within 1e-5 on the base, an edit model, a strategy
    switch (only the changed tensors re-bound), another edit model and the base again."""
    engine = ort_engine
    shape = engine.sampling_shape(SIZE, SIZE, 4)
    backend = engine.backends.current
    assert backend.name == "onnxruntime"  # never torch against torch
    reference = TorchBackend(engine.base.unet, engine.weights)
    inputs = example_inputs(engine.base.unet, shape, rows=4)
    noencoder = [n for n in engine.weights.names("unet") if n.startswith("down_blocks")]

    def check() -> tuple[str, ...]:
        got = backend.predictor(shape).predict(*inputs)
        expected = reference.predictor(shape).predict(*inputs)
        assert float((got - expected).abs().max()) < 1e-5
        return backend.last_plan(shape)

    check()
    a, b = edit_models
    unet_keys_a = sorted(k.removeprefix("unet.") for k in a.delta if k.startswith("unet."))
    unet_keys_b = sorted(k.removeprefix("unet.") for k in b.delta if k.startswith("unet."))
    with engine.weights.edit_model(a.delta) as live:
        live.set_forgetting([], 1.0)
        assert list(check()) == unet_keys_a
        live.set_forgetting(noencoder, 0.0)
        switched = check()
        assert list(switched) == [k for k in unet_keys_a if k.startswith("down_blocks")]
        assert 0 < len(switched) < len(unet_keys_a)
        live.set_forgetting(noencoder, 0.0)
        assert check() == ()
    with engine.weights.edit_model(b.delta) as live:
        live.set_forgetting([], 1.0)
        assert list(check()) == sorted(set(unet_keys_a) | set(unet_keys_b))
    assert list(check()) == unet_keys_b  # the base restored: the same operation


def sweep(interpolation: str, **kw: Any) -> SweepConfig:
    values: dict[str, Any] = {
        "prompts": (PROMPT,),
        "steps": 8,
        "seeds": (1, 2),
        "gammas": (0.6, 1.0),
        "forget": STRATEGIES,
        "interpolation": interpolation,
        **kw,
    }
    return SweepConfig(**values)


@pytest.mark.parametrize("interpolation", ["vs", "vp"])
def test_images_match_torch_within_2_of_255(
    torch_engine: Engine, ort_engine: Engine, edit_models: list[Any], interpolation: str
) -> None:
    """The edit model just trained, every strategy of the sweep, vs and vp."""
    config = sweep(interpolation)
    expected = torch_engine.sample(edit_models[0], config, max_batch=4)
    got = ort_engine.sample(edit_models[0], config, max_batch=4)
    assert {e.backend for e in got} == {"onnxruntime"}  # every image, not just the replica's
    assert max_pixel_difference(got, expected) <= 2


def test_edit_models_from_disk_back_to_back_leave_no_stale_weights(
    torch_engine: Engine, ort_engine: Engine, edit_models: list[Any], tmp_path: Path
) -> None:
    a, b = edit_models
    a.save(tmp_path / "a")
    from_disk = load_edit_model(tmp_path / "a", expected_base_fingerprint=a.base_model_fingerprint)
    config = sweep("vs", forget=("encoderkv", "noencoder"), gammas=(1.0,))
    expected_a = torch_engine.sample(from_disk, config, max_batch=4)
    expected_b = torch_engine.sample(b, config, max_batch=4)
    got_a = ort_engine.sample(from_disk, config, max_batch=4)
    got_b = ort_engine.sample(b, config, max_batch=4)
    again_a = ort_engine.sample(from_disk, config, max_batch=4)
    assert {e.backend for e in got_a + got_b + again_a} == {"onnxruntime"}  # not torch vs torch
    assert max_pixel_difference(got_a, expected_a) <= 2
    assert max_pixel_difference(got_b, expected_b) <= 2
    assert max_pixel_difference(again_a, got_a) == 0  # bit-identical: nothing of B left
    # The two models really differ, so a stale B would have shown.
    assert max_pixel_difference(expected_a, expected_b) > 2


class _DropsBiasesOnRefit(OnnxRuntimeBackend):
    """Fault injection: what some refittable TensorRT versions do. The base weights are
    right; every refit afterwards silently zeroes the biases it was given."""

    def predictor(self, shape: Shape) -> Any:
        predictor = super().predictor(shape)
        session: Any = self.graphs.get(shape).unet
        for name in session.loaded.last_plan:
            bound = session._bound.get(session._name_map[name])
            if name.endswith(".bias") and bound is not None:
                bound[0][:] = 0.0
        return predictor


class _FailsToRun(OnnxRuntimeBackend):
    """Fault injection: the compiled UNet runs ``good_calls`` times, then fails (a lost
    device, a broken engine)."""

    good_calls = 3

    def predictor(self, shape: Shape) -> Any:
        predictor = super().predictor(shape)
        backend = self

        class Failing:
            device = predictor.device

            def predict(self, *args: Any) -> torch.Tensor:
                if backend.good_calls <= 0:
                    raise BackendUnavailableError("the device went away", "run_failed")
                backend.good_calls -= 1
                return predictor.predict(*args)

        return Failing()


def _faulty_engine(
    tiny_model_dir: Path, cache_dir: Path, backend: type[OnnxRuntimeBackend], seen: list[Any]
) -> Engine:
    engine = Engine.load(
        tiny_model_dir / "stable-diffusion",
        unet_backend="onnxruntime",
        cache_dir=cache_dir,
        on_backend_fallback=seen.append,
    )
    bad = backend(
        engine.base.unet,
        engine.weights,
        fingerprint=engine.base.fingerprint,
        cache_dir=cache_dir / "onnx",
    )
    reference = TorchBackend(engine.base.unet, engine.weights)
    engine.backends.current = CanariedBackend(bad, reference, tolerance=1e-2)
    return engine


@pytest.mark.backend_fallback("onnxruntime:canary_failed")
def test_a_bad_refit_fails_its_canary_and_the_job_finishes_on_torch(
    torch_engine: Engine, tiny_model_dir: Path, cache_dir: Path, edit_models: list[Any]
) -> None:
    seen: list[Any] = []
    engine = _faulty_engine(tiny_model_dir, cache_dir, _DropsBiasesOnRefit, seen)
    shape = engine.sampling_shape(SIZE, SIZE, 4)
    engine.backends.current.prepare(shape)  # the base binds correctly: passes
    build = engine.backends.current.build_id(shape)
    config = sweep("vs", forget=("encoderkv",), gammas=(1.0,))
    expected = torch_engine.sample(edit_models[0], config, max_batch=4)
    for job in (1, 2):
        got = engine.sample(edit_models[0], config, max_batch=4)
        # The first refit of the edit model dropped its biases; the canary caught it before
        # anything was sampled, and this job went to torch: same images, bit for bit.
        assert [e.backend for e in got] == ["torch"] * len(got)
        assert max_pixel_difference(got, expected) == 0
        assert [(f.backend, f.reason, f.scope) for f in seen] == [
            ("onnxruntime", "canary_failed", "job")
        ] * job
        assert "relative error" in seen[-1].message
        # The replica keeps its backend; the failed session was dropped and is rebuilt (and
        # checked on the base again) for the next job.
        assert engine.sampling_backend == "onnxruntime" and not engine.backend_degraded
        assert shape not in engine.backends.current.inner.graphs  # type: ignore[attr-defined]
    engine.prepare_sampling(SIZE, SIZE, 4)
    assert engine.backends.current.build_id(shape) > build


@pytest.mark.backend_fallback("onnxruntime:run_failed")
def test_a_run_failure_in_a_job_resamples_that_chunk_on_torch(
    torch_engine: Engine, tiny_model_dir: Path, cache_dir: Path, edit_models: list[Any]
) -> None:
    """Three UNet calls succeed (the canary's two and the first denoising step), then the
    backend breaks mid-chunk: the chunk starts again on torch and the job completes with
    exactly torch's images, never an INTERNAL error."""
    seen: list[Any] = []
    engine = _faulty_engine(tiny_model_dir, cache_dir, _FailsToRun, seen)
    config = sweep("vs", forget=("encoderkv", "noencoder"), gammas=(1.0,))
    got = engine.sample(edit_models[1], config, max_batch=4)
    expected = torch_engine.sample(edit_models[1], config, max_batch=4)
    assert [e.backend for e in got] == ["torch"] * len(got)
    assert max_pixel_difference(got, expected) == 0
    assert [(f.backend, f.reason, f.scope) for f in seen] == [("onnxruntime", "run_failed", "job")]
    assert engine.sampling_backend == "onnxruntime"


def test_compiled_unets_are_a_bounded_lru_that_counts_its_bytes(
    ort_engine: Engine, tmp_path: Path
) -> None:
    """Two resolutions through a cache of one: the second evicts (and closes) the first;
    resident bytes are the session's base weights plus its edited copies."""
    engine = Engine(
        ort_engine.base,
        unet_backend="onnxruntime",
        cache_dir=tmp_path,
        max_compiled_graphs=1,
    )
    backend: Any = engine.backends.current.inner  # type: ignore[attr-defined]
    small, large = engine.sampling_shape(SIZE, SIZE, 1), engine.sampling_shape(96, 64, 1)
    engine.prepare_sampling(SIZE, SIZE, 1)
    first = backend.graphs.get(small).unet
    weights_bytes = backend.last_export.weights_bytes
    assert engine.compiled_bytes == first.resident_bytes == weights_bytes
    engine.prepare_sampling(96, 64, 1)
    assert backend.graphs.shapes() == [large] and backend.graphs.evictions == 1
    assert not hasattr(first, "_session")  # closed: its weights are released
    with pytest.raises(ValueError, match="2 resolutions do not fit a cache of 1 compiled UNets"):
        engine.prepare_resolutions([(SIZE, SIZE), (96, 64)], max_batch=1)


def test_warmup_reports_the_readiness_of_every_declared_resolution(ort_engine: Engine) -> None:
    engine = Engine(ort_engine.base, unet_backend="onnxruntime", max_compiled_graphs=2)
    engine.warmup([(SIZE, SIZE), (96, 64)])
    report = engine.readiness
    assert [(r.height, r.width, r.backend, r.ready) for r in report] == [
        (SIZE, SIZE, "onnxruntime", True),
        (96, 64, "onnxruntime", True),
    ]
    assert all(r.canary_error is not None and r.canary_error < 1e-4 for r in report)
    on_torch = Engine(ort_engine.base, unet_backend="torch")
    on_torch.warmup()
    assert [(r.backend, r.ready, r.canary_error) for r in on_torch.readiness] == [
        ("torch", True, None)
    ]


def test_after_warmup_only_declared_resolutions_compile_and_others_sample_on_torch(
    torch_engine: Engine, ort_engine: Engine, edit_models: list[Any], tmp_path: Path
) -> None:
    """A warmed-up engine never builds a graph inside a job: a declared size samples on its
    compiled UNet (any chunk size within the warmed-up batch profile), any other size on
    torch, the reference, without a fallback (nothing failed) and without evicting the
    declared graph. Each image says which backend made it."""
    engine = Engine(ort_engine.base, unet_backend="onnxruntime", cache_dir=tmp_path, max_batch=4)
    engine.warmup([(SIZE, SIZE)])
    backend: Any = engine.backends.current.inner  # type: ignore[attr-defined]
    declared = backend.graphs.shapes()
    assert declared == [engine.sampling_shape(SIZE, SIZE, 4)]
    config = sweep("vs", forget=("encoderkv",), gammas=(1.0,))
    native = engine.sample(edit_models[0], config, max_batch=2)  # within the profile of 4
    assert [e.backend for e in native] == ["onnxruntime"] * len(native)
    wide = dataclasses.replace(
        edit_models[0], training=dataclasses.replace(edit_models[0].training, width=96)
    )
    for model, batch in ((wide, 4), (edit_models[0], 8)):  # another size; a larger profile
        got = engine.sample(model, config, max_batch=batch)
        assert [e.backend for e in got] == ["torch"] * len(got)
        assert max_pixel_difference(got, torch_engine.sample(model, config, max_batch=batch)) == 0
    assert backend.graphs.shapes() == declared and backend.graphs.evictions == 0
    assert engine.sampling_backend == "onnxruntime" and not engine.backend_degraded
    assert engine.compiled_batch(SIZE, 96, 4) is None and engine.compiled_batch(SIZE, SIZE, 3) == 4


def test_warmup_fails_when_a_declared_resolution_is_not_ready(ort_engine: Engine) -> None:
    """Readiness (the server's startup probe) hangs on this: an engine whose report has a
    resolution that is not ready raises instead of warming up."""
    engine = Engine(ort_engine.base, unet_backend="torch")
    not_ready = ResolutionReadiness(SIZE, 96, "tensorrt", False, 0.5, 1.0, "canary failed")
    engine.prepare_resolutions = lambda sizes, max_batch=None: [not_ready]  # type: ignore[method-assign]
    with pytest.raises(EngineNotReadyError, match=r"not ready at 96x64 \(canary failed\)"):
        engine.warmup([(SIZE, 96)])


def test_step_cost_scales_with_the_unets_flops_not_just_pixels(ort_engine: Engine) -> None:
    engine = ort_engine
    assert engine.relative_step_cost(SIZE, SIZE) == 1.0
    double = engine.relative_step_cost(2 * SIZE, 2 * SIZE)
    assert 4.0 < double < 16.0  # convolutions scale with the area, attention faster
    assert engine.relative_step_cost(SIZE, 2 * SIZE) < double


@pytest.mark.backend_fallback("onnxruntime:build_failed")
def test_chain_gives_up_only_after_the_last_backend(ort_engine: Engine) -> None:
    built: list[str] = []

    def build(name: str) -> Any:
        built.append(name)
        raise BackendUnavailableError(f"{name} is broken here", "build_failed")

    with pytest.raises(BackendUnavailableError, match="torch is broken"):
        BackendChain(ort_engine.base.unet, ort_engine.weights, BackendConfig("auto"), build=build)
    assert built == ["onnxruntime", "torch"]


# -- the command line -------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_onnxruntime_edits_match_torch(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_model_dir: Path, photos_dir: Path
) -> None:
    image = photos_dir / "cat.jpg"
    common = [
        "edit", image, "--prompt", PROMPT, "--source-prompt", "A photo of a dog",
        "--base-model", tiny_model_dir / "stable-diffusion", "--size", "64x64",
        "--updates", "4", "--batch-size", "2", "--train-seed", "3", "--seeds", "1,2",
        "--steps", "6", "--forget", "encoderkv,noencoder", "--interpolation", "vp",
        "--engine-cache", tmp_path / "cache", "--json",
    ]  # fmt: skip
    results = {}
    for backend in ("torch", "onnxruntime"):
        code, out, err = _cli(
            capsys, *common, "--unet-backend", backend, "--out", tmp_path / backend
        )
        assert code == 0, err
        summary = json.loads(out)
        assert summary["unet_backend"] == {
            "requested": backend,
            "sampled_with": backend,
            "fallbacks": [],
        }
        results[backend] = summary
    names = [Path(f["path"]).name for f in results["torch"]["images"]]
    assert names == [Path(f["path"]).name for f in results["onnxruntime"]["images"]]
    assert len(names) >= 4  # 2 strategies x 2 seeds x the default gammas
    for name in names:
        a = np.asarray(load_image(tmp_path / "torch" / name).image, dtype=np.int16)
        b = np.asarray(load_image(tmp_path / "onnxruntime" / name).image, dtype=np.int16)
        assert int(np.abs(a - b).max()) <= 2


def test_cli_default_is_auto() -> None:
    args = build_parser().parse_args(["edit", "photo.png", "--prompt", "a"])
    assert args.unet_backend == "auto" and args.engine_cache is None


def test_cli_rejects_an_unknown_backend(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = _cli(
        capsys, "edit", tmp_path / "x.png", "--prompt", "a", "--unet-backend", "trt"
    )
    assert code == 2 and out == ""
    assert "--unet-backend" in err and "onnxruntime" in err and len(err.strip().splitlines()) == 1


def test_build_engine_without_tensorrt_says_so_and_exits_2(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path
) -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    code, out, err = _cli(
        capsys,
        "build-engine",
        "--base-model",
        tiny_model_dir / "stable-diffusion",
        "--size",
        "64x64",
    )
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "TensorRT is not installed" in err and "build-engine" in err


def test_build_engine_onnxruntime_reports_its_figures(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The real-size check's command on the tiny random model: export with external data,
    session, canary on the base and with a random edit model bound, JSON figures."""
    code, out, err = _cli(capsys, "make-random-model", "--preset", "tiny", tmp_path / "model")
    assert code == 0, err
    assert "tiny" in out
    build = [
        "build-engine", "--base-model", tmp_path / "model", "--backend", "onnxruntime",
        "--max-batch", "1", "--engine-cache", tmp_path / "cache", "--json",
    ]  # fmt: skip
    code, out, err = _cli(capsys, *build)
    assert code == 0, err
    figures = json.loads(out)
    assert figures["backend"] == "onnxruntime" and figures["size"] == "64x64"
    assert figures["unet_parameters"] == 3_257_876
    assert figures["graph_bytes"] > figures["weights_bytes"] >= 4 * figures["unet_parameters"]
    assert figures["peak_rss_bytes"] > figures["weights_bytes"]
    assert figures["export_seconds"] > 0 and figures["build_seconds"] > 0
    canary = figures["canary"]
    assert canary["base_relative_error"] < canary["tolerance"] == 1e-4
    assert 0 < canary["edit_model_relative_error"] < 1e-4
    assert canary["edit_model_tensors"] == 518  # down/up blocks 1-3, as a joint fine-tune
    # A second run finds the export in the cache.
    code, out, _ = _cli(capsys, *build)
    assert code == 0 and json.loads(out)["export_seconds"] == 0.0


def test_make_random_model_refuses_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    for argv, words in (
        (["make-random-model", tmp_path / "used"], "not an empty directory"),
        (["make-random-model", "--preset", "sd2", tmp_path / "new"], "sd1"),
    ):
        code, out, err = _cli(capsys, *argv)
        assert code == 2 and out == "" and words in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()


@pytest.mark.gpu
def test_tensorrt_engine_matches_torch_after_refits(
    tiny_model_dir: Path, tmp_path: Path, edit_models: list[Any]
) -> None:
    """On a CUDA machine with TensorRT: build, canary, refit two edit models, compare. Every
    image must come from TensorRT: a fallback anywhere (build, canary, a refit, a run) fails
    the test, here and through the conftest guard; it never compares torch with torch."""
    pytest.importorskip("tensorrt")
    seen: list[Any] = []
    engine = Engine.load(
        tiny_model_dir / "stable-diffusion",
        device="cuda",
        unet_backend="tensorrt",
        cache_dir=tmp_path,
        on_backend_fallback=seen.append,
    )
    engine.warmup()
    (ready,) = engine.readiness
    assert (ready.backend, ready.ready) == ("tensorrt", True) and seen == []
    reference = Engine.load(
        tiny_model_dir / "stable-diffusion", device="cuda", unet_backend="torch"
    )
    config = sweep("vs", forget=("encoderkv", "noencoder"), gammas=(1.0,))
    for model in edit_models + edit_models[:1]:  # A, B, then A again: refits both ways
        got = engine.sample(model, config)
        assert [e.backend for e in got] == ["tensorrt"] * len(got), seen
        assert max_pixel_difference(got, reference.sample(model, config)) <= 8
    assert seen == [] and engine.sampling_backend == "tensorrt"


@pytest.mark.gpu
def test_tensorrt_serves_every_declared_resolution_and_only_those(
    tiny_model_dir: Path, tmp_path: Path, edit_models: list[Any]
) -> None:
    """On a CUDA machine with TensorRT: two declared sizes, each built with its canary at
    warm-up; each samples on its own TensorRT engine (every image says so), and an undeclared
    size samples on torch without a build. No fallback anywhere."""
    pytest.importorskip("tensorrt")
    seen: list[Any] = []
    engine = Engine.load(
        tiny_model_dir / "stable-diffusion",
        device="cuda",
        unet_backend="tensorrt",
        cache_dir=tmp_path,
        max_batch=2,
        on_backend_fallback=seen.append,
    )
    engine.warmup([(SIZE, SIZE), (SIZE, 96)])
    assert [(r.width, r.backend, r.ready) for r in engine.readiness] == [
        (SIZE, "tensorrt", True),
        (96, "tensorrt", True),
    ]
    config = sweep("vs", forget=("encoderkv",), gammas=(1.0,))
    wide = dataclasses.replace(
        edit_models[0], training=dataclasses.replace(edit_models[0].training, width=96)
    )
    for model in (edit_models[0], wide):
        got = engine.sample(model, config, max_batch=2)
        assert [e.backend for e in got] == ["tensorrt"] * len(got), seen
    square = dataclasses.replace(
        edit_models[0],
        training=dataclasses.replace(edit_models[0].training, width=96, height=96),
    )
    built = engine.compiled_bytes
    got = engine.sample(square, config, max_batch=2)
    assert [e.backend for e in got] == ["torch"] * len(got)
    assert engine.compiled_bytes == built
    assert seen == [] and engine.sampling_backend == "tensorrt"
