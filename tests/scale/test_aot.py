"""Ahead-of-time compile of the toy stage-3 train step for a v5p-8 slice (compile-only TPU
devices on this CPU host): it fits the chip's HBM, the counted FLOPs match XLA's compiled FLOPs
of the same step with every layer scan unrolled, and an over-budget variant fails with one line
naming the HBM figures. Skips (never fails) where libtpu is not installed: it is an optional
install (`pip install -r requirements-tpu.txt`; Linux x86-64 and arm64 wheels, no macOS or
Windows)."""

from __future__ import annotations

import importlib.util

import pytest

from pretzel_jax.scale import aot, topology
from pretzel_jax.train.config import load_config
from pretzel_jax.train.errors import ConfigError
from pretzel_jax.train.mesh import make_mesh

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -r requirements-tpu.txt; Linux only)",
)
EXPERIMENT = "experiments/shapes_stage3.py"


def _devices(s: topology.Slice) -> list:
    try:
        return topology.devices(s)
    except topology.TopologyError as e:  # a libtpu that cannot make this chip's devices
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def v5p8():
    s = topology.parse("v5p-8")
    _devices(s)
    return s


def _config(*overrides: str):
    # No weight file is read; the paths are cleared so the FAE encoder's architecture comes
    # from the config, as on a fresh clone (a trained toy VLM may sit in runs/).
    paths = ("model.pretzel.vlm_path=", "model.fae.encoder.path=")
    return load_config(EXPERIMENT, overrides=paths + overrides, device_count=4, process_count=1)


@pytest.mark.slow
@needs_libtpu
def test_toy_stage3_fits_v5p8_and_its_counted_flops_match_the_unrolled_compile(v5p8):
    config = aot.variant(_config(), unroll=True)
    report = aot.compile_step(config, EXPERIMENT, v5p8)
    print("\n" + report.table())
    assert report.devices == 4 and report.fits
    assert 0 < report.peak_bytes < report.hbm_bytes
    assert 0 < 2 * report.params_bytes <= report.opt_state_bytes < 2 * report.params_bytes + 64
    assert report.while_loops == 0
    # Counted from the jaxpr vs XLA's cost analysis of the compiled, partitioned program.
    assert report.compiled_flops == pytest.approx(report.flops, rel=0.10)
    # The gradients' all-reduce (a few scalars of the trainable set get none).
    assert report.collective_bytes["all-reduce"] >= 0.9 * report.params_bytes


@pytest.mark.slow
@needs_libtpu
def test_an_over_budget_step_names_the_hbm_figures(v5p8):
    # A 32768-wide flow: 12.9B parameters replicated on each chip with their Adam moments.
    config = load_config(
        f"{EXPERIMENT}:test",
        overrides=("model.pretzel.vlm_path=", "model.fae.encoder.path=", "model.flow.width=32768"),
        device_count=4,
        process_count=1,
    )
    with pytest.raises(aot.AotError) as e:
        aot.compile_step(config, EXPERIMENT, v5p8)
    message = str(e.value)
    assert "\n" not in message
    assert "does not fit v5p-8" in message and "HBM" in message and "microbatches" in message


def test_topology_names():
    assert topology.parse("v5p-128").shape == (4, 4, 4)
    assert topology.parse("v4-8").chips == 4
    assert topology.parse("v5e-256").shape == (16, 16)
    assert topology.parse("v6e-8", num_slices=2).chips == 16
    with pytest.raises(topology.TopologyError, match="v5p slices come as"):
        topology.parse("v5p-12")
    with pytest.raises(topology.TopologyError, match="not a TPU slice name"):
        topology.parse("h100-8")


@needs_libtpu
def test_two_slices_put_the_data_axis_across_them():
    devices = _devices(topology.parse("v5e-4", num_slices=2))
    mesh = make_mesh({"data": 2, "fsdp": -1, "tensor": 1}, devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]
    with pytest.raises(ConfigError, match="mesh.data=1: the devices span 2 slices"):
        make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)


@pytest.mark.slow
@needs_libtpu
def test_cli_compiles_two_slices_saves_the_step_and_writes_the_table(tmp_path, capsys):
    paths = ["--config.model.pretzel.vlm_path=", "--config.model.fae.encoder.path="]
    argv = ["--config", f"{EXPERIMENT}:test", "--topology", "v5e-4", "--num_slices", "2"]
    argv += ["--save", str(tmp_path / "step.bin"), "--markdown", str(tmp_path / "fit.md")]
    assert aot.main(argv + paths + ["--config.mesh.data=2", "--config.mesh.fsdp=-1"]) == 0
    assert "v5e-4 x 2 = 8 chips, data=2 x fsdp=4 x tensor=1" in capsys.readouterr().out
    assert (tmp_path / "step.bin").stat().st_size > 0
    rows = (tmp_path / "fit.md").read_text().splitlines()
    assert len(rows) == 3 and rows[2].startswith("| v5e-4 x 2 | 8 | 1 |") and "| yes |" in rows[2]
    assert aot.main(["--config", f"{EXPERIMENT}:test", "--topology", "v5p-12"]) == 2
    assert "v5p slices come as" in capsys.readouterr().err


HLO = """\
%cond.1 (p: (s32[], f32[8])) -> pred[] {
  %c = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body.2 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = bf16[4,1024]{1,0:T(8,128)} all-gather(%x), channel_id=1, dimensions={0}
  %ar = (f32[8]{0}, /*index=1*/f32[2,2]{1,0}) all-reduce(%a, %b), to_apply=%add
}

ENTRY %main.3 (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond.1, body=%body.2
  %rs = f32[16]{0} reduce-scatter(%y), dimensions={0}, to_apply=%add
}
"""


def test_collective_bytes_multiply_loop_bodies_by_their_trip_count():
    assert aot.collective_bytes(HLO) == {
        "all-gather": 6 * 4 * 1024 * 2,
        "all-reduce": 6 * (8 + 4) * 4,
        "reduce-scatter": 16 * 4,
    }
