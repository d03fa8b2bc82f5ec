"""The TensorRT path's pieces that need no GPU, on real files: the mixed-FP16 graph (converted by
ModelOpt AutoCast, checked against the fp32 graph on ONNX Runtime, cached), the refit map read
from the graph file (complete, transposed weights included, checked against an engine's weight
list), the version switch of the build settings (a stand-in ``tensorrt`` module: the only
honest way to meet TensorRT 10 and 11 on a machine where neither installs), and the plan cache.
The engine itself runs in test_backends.py's ``gpu`` test where TensorRT exists.

The conversion is tested on a one-level UNet: AutoCast's graph clean-up is quadratic in the node
count (about 5 minutes for the SD-shaped tiny UNet's 4,900 nodes, BENCHMARKS.md), and the small
one has the same kinds of blocks (resnets, cross-attention, GroupNorm, the timestep embedding).
It is converted once per module; the cache and refusal tests reuse that conversion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from forgedit.backends.base import BackendUnavailableError, Shape
from forgedit.backends.fp16 import FP16_DIR, FP16_TOLERANCE, fp16_graph, relative_difference
from forgedit.backends.onnx_export import OnnxExport, export_unet
from forgedit.backends.refit_map import RefitMap, RefitMapError
from forgedit.backends.tensorrt_backend import (
    PLAN_FILE,
    plan_identity,
    plan_key,
    read_cached_plan,
    tensorrt_profile,
    write_plan,
)

SHAPE = Shape(8, 8, 2)


@pytest.fixture(scope="module")
def small_unet() -> Any:
    """A one-level SD-style UNet: resnets, cross-attention down, mid and up blocks."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


@pytest.fixture(scope="module")
def export(small_unet: Any, tmp_path_factory: pytest.TempPathFactory) -> OnnxExport:
    return export_unet(small_unet, "f" * 64, SHAPE, tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module")
def converted(export: OnnxExport, small_unet: Any) -> Any:
    return fp16_graph(export, small_unet, SHAPE)


def parameter_shapes(unet: Any) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in unet.named_parameters()}


# -- the mixed-FP16 graph ---------------------------------------------------------------------


def test_the_fp16_graph_matches_the_fp32_graph_on_onnx_runtime(
    converted: Any, export: OnnxExport, small_unet: Any
) -> None:
    import onnx

    assert converted.seconds > 0
    assert 0 < converted.relative_error <= FP16_TOLERANCE
    # Measured again here, independently of what the manifest says.
    again = relative_difference(export.constants_path, converted.path, small_unet, SHAPE)
    assert again == pytest.approx(converted.relative_error, rel=1e-6)
    graph = onnx.load(str(converted.path), load_external_data=False)
    # Inputs and output stay fp32 (every backend takes the same tensors); weights are fp16 and
    # live beside the graph, not in it.
    assert [(i.name, i.type.tensor_type.elem_type) for i in graph.graph.input] == [
        ("sample", onnx.TensorProto.FLOAT),
        ("timestep", onnx.TensorProto.INT64),
        ("encoder_hidden_states", onnx.TensorProto.FLOAT),
    ]
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [t for t in graph.graph.initializer if t.name.startswith("unet.")]
    assert len(weights) == sum(1 for _ in small_unet.parameters())
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in weights)
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in weights) > len(weights) // 2
    assert converted.path.stat().st_size < 1_000_000  # the graph alone


def test_the_fp16_graph_is_cached_and_a_damaged_one_is_not_trusted(
    converted: Any, export: OnnxExport, small_unet: Any, tmp_path: Path
) -> None:
    from forgedit.backends import fp16

    cached = fp16_graph(export, small_unet, SHAPE)
    assert cached.seconds == 0.0 and cached.sha256 == converted.sha256
    entry = tmp_path / FP16_DIR
    shutil.copytree(converted.directory, entry)
    expected = fp16.expected_manifest(export)
    assert fp16._load_entry(entry, expected) is not None
    weights = entry / "unet.weights"
    data = bytearray(weights.read_bytes())
    data[64:80] = b"\xff" * 16
    weights.write_bytes(bytes(data))
    assert fp16._load_entry(entry, expected) is None  # converted again, never trusted
    other_tool = {**expected, "modelopt_version": "0.0.1"}
    assert fp16._load_entry(converted.directory, other_tool) is None


def test_a_conversion_that_misses_the_tolerance_is_refused(
    converted: Any,
    export: OnnxExport,
    small_unet: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A conversion that scales one weight (what an fp16 overflow does to a layer) is caught
    on ONNX Runtime before TensorRT ever sees the graph, and nothing is cached."""
    import onnx

    from forgedit.backends import fp16

    def broken(autocast: Any, source: Path) -> Any:
        model = onnx.load(str(converted.path))  # the real conversion, then the damage
        tensor = next(t for t in model.graph.initializer if t.name == "unet.conv_out.weight")
        array = onnx.numpy_helper.to_array(tensor) * 4
        tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
        return model

    copy = tmp_path / "export"
    shutil.copytree(export.directory, copy, ignore=shutil.ignore_patterns(FP16_DIR))
    moved = OnnxExport(copy, export.name_map, export.manifest, 0.0)
    monkeypatch.setattr(fp16, "_convert", broken)
    with pytest.raises(BackendUnavailableError, match="from the fp32 one") as raised:
        fp16_graph(moved, small_unet, SHAPE)
    assert raised.value.reason == "build_failed"
    assert sorted(p.name for p in copy.iterdir()) == sorted(
        p.name for p in export.directory.iterdir() if p.name != FP16_DIR
    )


# -- the refit map ------------------------------------------------------------------------------


def test_the_refit_map_is_read_from_the_file_transposed_weights_included(
    converted: Any, small_unet: Any
) -> None:
    shapes = parameter_shapes(small_unet)
    refit = RefitMap.from_graph(converted.path, shapes)
    assert set(refit.slots) == set(shapes)
    for name, slot in refit.slots.items():
        assert slot.engine_name == f"unet.{name}" and slot.shape == shapes[name]
        assert slot.dtype in ("float16", "float32")
    # A Linear weight is read through a Transpose in the legacy export: still one slot, in
    # its ONNX (torch) layout; a convolution's is not.
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert refit.slots[q].transposed and not refit.slots["conv_in.weight"].transposed
    # A refit hands TensorRT the slot's type, clamped to fp16's range.
    slot = refit.slots["conv_in.weight"]
    huge = torch.full(slot.shape, 1e6)
    array = slot.array(huge)
    assert array.dtype == np.dtype(slot.dtype) and array.flags.c_contiguous
    assert np.isfinite(array).all()
    # The graph's own initializers are kept by name, readable from the file.
    for name in refit.constants:
        assert refit.constant(name).size > 0


def test_the_refit_map_refuses_a_graph_without_every_parameter(
    converted: Any, small_unet: Any
) -> None:
    shapes = parameter_shapes(small_unet)
    with pytest.raises(RefitMapError, match=r"missing or changed: extra\.weight \(no init"):
        RefitMap.from_graph(converted.path, {**shapes, "extra.weight": (3,)})
    wrong = {**shapes, "conv_in.weight": (1, 2, 3)}
    with pytest.raises(RefitMapError, match=r"conv_in\.weight \(shape"):
        RefitMap.from_graph(converted.path, wrong)


def test_the_refit_map_is_checked_against_the_engines_weights(
    converted: Any, small_unet: Any
) -> None:
    """What ``Refitter.get_all_weights`` returns after a build: every UNet parameter must be
    there (an edit model could not reach one that is not); extra engine weights are reported."""
    refit = RefitMap.from_graph(converted.path, parameter_shapes(small_unet))
    everything = [s.engine_name for s in refit.slots.values()] + sorted(refit.constants)
    assert refit.check_engine(everything) == []
    assert refit.check_engine([*everything, "(Unnamed Layer* 7) [Constant]"]) == [
        "(Unnamed Layer* 7) [Constant]"
    ]
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    dropped = [n for n in everything if n != f"unet.{q}"]
    with pytest.raises(RefitMapError, match=rf"1 of the UNet's \d+ parameters \(e\.g\. {q} "):
        refit.check_engine(dropped)
    with pytest.raises(RefitMapError, match=r"\(transposed\)"):
        refit.check_engine(dropped)
    assert refit.torch_name(f"unet.{q}") == q and refit.torch_name("nothing") is None


# -- the version switch -------------------------------------------------------------------------


class _Flags:
    """A stand-in enum: members are ints, as TensorRT's pybind11 enums convert."""

    def __init__(self, **members: int) -> None:
        for name, value in members.items():
            setattr(self, name, value)


def fake_tensorrt(version: str) -> Any:
    """The attributes ``tensorrt_profile`` reads, as each major version has them: 10.x has
    STRONGLY_TYPED and the precision flags; 11.x dropped FP16/INT8 (and EXPLICIT_BATCH)."""
    major = int(version.split(".")[0])
    builder = {"REFIT": 6, "STRIP_PLAN": 19, "REFIT_IDENTICAL": 20}
    network = {"STRONGLY_TYPED": 1}
    if major == 10:
        builder |= {"FP16": 0, "INT8": 1}
        network |= {"EXPLICIT_BATCH": 0}
    return SimpleNamespace(
        __version__=version,
        BuilderFlag=_Flags(**builder),
        NetworkDefinitionCreationFlag=_Flags(**network),
    )


def test_tensorrt_10_asks_for_a_strongly_typed_network() -> None:
    profile = tensorrt_profile(fake_tensorrt("10.16.1.11"), strip_weights=False)
    assert (profile.major, profile.minor) == (10, 16)
    assert profile.network_flags == 1 << 1
    assert profile.builder_flags == ("REFIT",)
    assert "STRONGLY_TYPED" in profile.describe()


def test_tensorrt_11_is_strongly_typed_without_precision_flags() -> None:
    trt = fake_tensorrt("11.4.0.106")
    assert not hasattr(trt.BuilderFlag, "FP16")  # what broke the old build
    profile = tensorrt_profile(trt, strip_weights=True)
    assert profile.network_flags == 0
    assert profile.builder_flags == ("REFIT", "STRIP_PLAN")
    assert all(hasattr(trt.BuilderFlag, f) for f in profile.builder_flags)


@pytest.mark.parametrize("version", ["10.9.0.34", "8.6.1", "12.0.0", "nightly"])
def test_unsupported_tensorrt_versions_are_refused_with_a_reason(version: str) -> None:
    with pytest.raises(BackendUnavailableError, match="TensorRT") as raised:
        tensorrt_profile(SimpleNamespace(__version__=version), strip_weights=False)
    assert raised.value.reason == "unsupported_version"


# -- the plan cache -----------------------------------------------------------------------------


def test_plan_cache_key_covers_everything_a_plan_depends_on() -> None:
    shape = Shape(64, 64, 16)
    v10 = tensorrt_profile(fake_tensorrt("10.16.1.11"), strip_weights=False)
    v11 = tensorrt_profile(fake_tensorrt("11.4.0.106"), strip_weights=False)
    stripped = tensorrt_profile(fake_tensorrt("10.16.1.11"), strip_weights=True)
    a100, graph = "NVIDIA A100-SXM4-80GB", "a" * 64
    base = plan_identity(a100, v10, "f" * 64, shape, graph)
    variants = [
        plan_identity("NVIDIA H200", v10, "f" * 64, shape, graph),
        plan_identity(a100, v11, "f" * 64, shape, graph),
        plan_identity(a100, stripped, "f" * 64, shape, graph),
        plan_identity(a100, v10, "e" * 64, shape, graph),
        plan_identity(a100, v10, "f" * 64, Shape(96, 64, 16), graph),
        plan_identity(a100, v10, "f" * 64, Shape(64, 64, 8), graph),
        plan_identity(a100, v10, "f" * 64, shape, "b" * 64),  # another fp16 conversion
    ]
    keys = {plan_key(base), *(plan_key(v) for v in variants)}
    assert len(keys) == 1 + len(variants)
    assert plan_key(base) == plan_key(json.loads(json.dumps(base)))


def test_a_cached_plan_is_trusted_only_when_it_matches(tmp_path: Path) -> None:
    profile = tensorrt_profile(fake_tensorrt("11.4.0.106"), strip_weights=False)
    identity = plan_identity("NVIDIA A100", profile, "f" * 64, Shape(64, 64, 16), "a" * 64)
    entry = tmp_path / plan_key(identity)
    assert read_cached_plan(entry, identity) is None  # nothing there
    write_plan(entry, identity, b"serialized engine")
    assert read_cached_plan(entry, identity) == b"serialized engine"
    assert read_cached_plan(entry, {**identity, "gpu": "NVIDIA H200"}) is None
    (entry / PLAN_FILE).write_bytes(b"serialized engine, truncated or swapped")
    assert read_cached_plan(entry, identity) is None
