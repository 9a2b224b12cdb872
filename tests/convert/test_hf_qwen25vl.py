"""Hugging Face Qwen2 / Qwen2.5-VL folders <-> Qwen25VL: parity with transformers on import,
sharded import on 8 fake devices, multi-shard folders, export that transformers loads bit-exactly,
and the errors a user can cause."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from pretzel_jax.convert import hf_qwen25vl as hq
from pretzel_jax.convert.safetensors_io import INDEX_FILE, ConversionError, SafetensorsFolder
from pretzel_jax.nn.sharding import DEFAULT_RULES, MESH_AXES, logical_to_spec
from tests.vlm import hf_tiny

TOL = 1e-4  # ours vs torch, fp32
EXPORT_TOL = 1e-5  # transformers on our export vs transformers on the original


def flat(model) -> dict[tuple, jax.Array]:
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


IDS = np.random.default_rng(0).integers(0, 990, (2, 7))


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def qwen2(request, tmp_path_factory):
    hf, _ = hf_tiny.tiny_qwen2(tied=request.param, seed=1)
    return hf, hf_tiny.save(hf, tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    hf = hf_tiny.tiny_qwen25vl(seed=2)
    path = tmp_path_factory.mktemp("qwen25vl")
    return hf, path, hf_tiny.converted(hf, path)


def test_saved_layout_is_the_hub_layout(vl):
    """What transformers 5.23 writes is what the name table expects, name for name and shape
    for shape (the in-memory `model.language_model.*` names are not what lands on disk)."""
    hf, path, model = vl
    with SafetensorsFolder(path) as files:
        on_disk = {k: files.shape(k) for k in files.names()}
    table = hq.name_table(model.cfg)
    assert set(on_disk) == {e.hf for e in table}
    assert hq._hf_shapes(table, nnx.state(model, nnx.Param)) == on_disk
    assert any(k.startswith("model.language_model.") for k in hf.state_dict())


def test_qwen2_logits_match_torch(qwen2):
    hf, path = qwen2
    model = hq.load(path)
    assert model.vision is None
    assert (model.text.lm_head is None) == hf.config.tie_word_embeddings
    assert hf_tiny.max_err(model(IDS), hf_tiny.torch_logits(hf, IDS)) <= TOL


def test_qwen25vl_logits_match_torch_text_and_one_image(vl):
    hf, _, model = vl
    assert hf_tiny.max_err(model(IDS), hf_tiny.torch_logits(hf, IDS)) <= TOL
    grid = [[1, 4, 8]]  # 32 patches -> 8 merged image tokens
    pixel_values = np.random.default_rng(3).standard_normal((32, 1176)).astype(np.float32)
    s, e, img = hf_tiny.VISION_START_TOKEN_ID, hf_tiny.VISION_END_TOKEN_ID, hf_tiny.IMAGE_TOKEN_ID
    ids = np.array([[5, 6, s, *[img] * 8, e, 7, 8, 9]])
    want = hf_tiny.torch_logits(hf, ids, pixel_values, grid)
    assert hf_tiny.max_err(model(ids, pixel_values, grid), want) <= TOL


def test_transforms_read_any_slice_exactly(vl):
    """Each transform's sliced read equals the full conversion, sliced (what a shard gets)."""
    _, _, model = vl
    shapes = {p: v.shape for p, v in flat(model).items()}
    rng = np.random.default_rng(0)
    seen = {}
    for e in hq.name_table(model.cfg):
        seen.setdefault(e.transform.name, e)
    assert set(seen) == {"same", "linear", "conv", "qkv", "qkv_bias"}
    for e in seen.values():
        shape = shapes[e.ours] if e.layer is None else shapes[e.ours][1:]
        ours = rng.standard_normal(shape).astype(np.float32)
        theirs = e.transform.to_hf(ours)
        reader = lambda idx, t=theirs: t[:] if idx is None else t[idx]
        for _ in range(4):
            cut = [sorted(rng.choice(n + 1, 2, replace=n == 0)) for n in shape]
            index = tuple(
                slice(int(a), int(max(b, a + 1)) if n else 0) for (a, b), n in zip(cut, shape)
            )
            np.testing.assert_array_equal(e.transform.read(reader, index), ours[index])


def test_mesh_load_places_every_slice_and_keeps_logits(vl, monkeypatch):
    hf, path, plain = vl
    mesh = jax.make_mesh((2, 2, 2), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    reads = []
    read = SafetensorsFolder.read
    monkeypatch.setattr(
        SafetensorsFolder,
        "read",
        lambda self, key, idx=None: reads.append((key, (r := read(self, key, idx)).shape)) or r,
    )
    model = hq.load(path, mesh=mesh)
    params, ref = flat(model), flat(plain)
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        spec = logical_to_spec(
            var.get_metadata()["out_sharding"], DEFAULT_RULES, ref[p].shape, mesh
        )
        assert params[p].sharding == NamedSharding(mesh, spec), p
        np.testing.assert_array_equal(np.asarray(params[p]), np.asarray(ref[p]), err_msg=str(p))
    assert params[("text", "embed")].sharding.spec == PartitionSpec("tensor", "fsdp")
    assert params[("text", "layers", "layers", "attn", "q", "kernel")].sharding.spec == (
        PartitionSpec(None, "fsdp", "tensor")
    )
    # Each device's callback read only its block: (vocab/2, hidden/2), (out/2, in/2).
    assert {s for k, s in reads if k == "model.embed_tokens.weight"} == {(500, 32)}
    assert {s for k, s in reads if k == "model.layers.1.self_attn.q_proj.weight"} == {(32, 32)}
    assert hf_tiny.max_err(model(IDS), hf_tiny.torch_logits(hf, IDS)) <= TOL
    # Other rules: embed replicated.
    rules = tuple((k, None if k == "embed" else v) for k, v in DEFAULT_RULES)
    other = hq.load(path, mesh=mesh, rules=rules)
    assert other.text.embed[...].sharding.spec == PartitionSpec("tensor", None)


def test_multi_shard_and_in_memory_layout_folders_load_the_same(vl, tmp_path):
    hf, _, ref = vl
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / INDEX_FILE).exists() and len(list(sharded.glob("*.safetensors"))) > 2
    # transformers' in-memory names (model.language_model.*, model.visual.*) in one file.
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    shutil.copy(sharded / "config.json", renamed)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in hf.state_dict().items()}, renamed / "model.safetensors"
    )
    for path in (sharded, renamed):
        got = flat(hq.load(path))
        for p, v in flat(ref).items():
            np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(v), err_msg=str(p))


@pytest.mark.parametrize("shard_bytes", [5 * 2**30, 100_000], ids=["one_file", "shards"])
def test_export_loads_in_transformers_bit_exactly(vl, tmp_path, shard_bytes):
    hf, _, model = vl
    files = hq.save(model, tmp_path / "out", max_shard_bytes=shard_bytes)
    assert (len(files) > 1) == (shard_bytes < 2**20)
    assert (tmp_path / "out" / INDEX_FILE).exists() == (len(files) > 1)
    back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out")
    want, got = hf.state_dict(), back.eval().state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    back_logits = hf_tiny.torch_logits(back, IDS)
    assert hf_tiny.max_err(back_logits, hf_tiny.torch_logits(hf, IDS)) <= EXPORT_TOL
    with pytest.raises(ConversionError, match="not empty.*overwrite=True"):
        hq.save(model, tmp_path / "out")
    hq.save(model, tmp_path / "out", overwrite=True)  # one file now: stale shards are gone
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


def test_qwen2_export_round_trip_and_cli(qwen2, tmp_path):
    hf, path = qwen2
    (path / "tokenizer.json").write_text("{}")
    assert hq.main(["--in", str(path), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert hq.main(["--in", str(path), "--out", str(tmp_path / "out")]) == 2  # not empty
    back = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    for k, v in hf.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    back_logits = hf_tiny.torch_logits(back, IDS)
    assert hf_tiny.max_err(back_logits, hf_tiny.torch_logits(hf, IDS)) <= EXPORT_TOL


def test_bf16_load_and_export(vl, tmp_path):
    _, path, ref = vl
    model = hq.load(path, dtype=jnp.bfloat16)
    got, want = flat(model), flat(ref)
    assert got[("text", "embed")].dtype == jnp.bfloat16
    assert got[("text", "norm", "scale")].dtype == jnp.float32  # norms stay fp32
    for p, v in want.items():
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(v).astype(got[p].dtype))
    hq.save(model, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    with SafetensorsFolder(tmp_path / "bf16") as files:
        assert files.dtype("model.embed_tokens.weight") == "BF16"


# -- errors -----------------------------------------------------------------------------------


def edited(src, dst, edit):
    """Copy of the folder `src` with its single weights file rewritten by `edit(dict)`."""
    shutil.copytree(src, dst)
    tensors = safetensors.numpy.load_file(dst / "model.safetensors")
    edit(tensors)
    safetensors.numpy.save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_unexpected_and_misshaped_tensors_are_all_named(vl, tmp_path):
    _, path, _ = vl

    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
        t["visual.blocks.0.attn.qkv.weight"] = t["visual.blocks.0.attn.qkv.weight"][:-1]
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4, np.float32)  # skipped

    with pytest.raises(ConversionError) as e:
        hq.load(edited(path, tmp_path / "bad", edit))
    msg = str(e.value)
    assert "3 problems" in msg
    assert "missing tensor model.layers.1.mlp.up_proj.weight [128, 64]" in msg
    assert "unexpected tensor model.layers.0.mlp.extra.weight" in msg
    assert "visual.blocks.0.attn.qkv.weight (model.safetensors) has shape [95, 32]" in msg
    assert "expected [96, 32]" in msg and "config.json" in msg


def test_tied_checkpoint_may_carry_lm_head(qwen2, tmp_path):
    hf, path = qwen2
    if not hf.config.tie_word_embeddings:
        pytest.skip("tied only")
    extra = lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"])
    model = hq.load(edited(path, tmp_path / "with_head", extra))
    assert model.text.lm_head is None


def test_truncated_or_corrupt_shard_and_missing_shard_are_named(vl, tmp_path):
    hf, _, _ = vl
    hf.save_pretrained(tmp_path / "ok", max_shard_size="100KB")
    shards = sorted((tmp_path / "ok").glob("model-*.safetensors"))
    for name, damage in [
        ("truncated", lambda f: f.write_bytes(f.read_bytes()[:-100])),
        ("corrupt", lambda f: f.write_bytes(b"\xff" * 64)),
        ("gone", lambda f: f.unlink()),
    ]:
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        damage(tmp_path / name / shards[1].name)
        with pytest.raises(ConversionError, match=shards[1].name) as e:
            hq.load(tmp_path / name)
        assert ("not in" if name == "gone" else "truncated or corrupt") in str(e.value)


def test_config_and_folder_errors(vl, tmp_path):
    _, path, _ = vl
    shutil.copytree(path, tmp_path / "gelu")
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["hidden_act"] = "gelu"
    (tmp_path / "gelu" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"config\.json.*hidden_act='gelu'"):
        hq.load(tmp_path / "gelu")
    with pytest.raises(ConversionError, match="config.json does not exist"):
        hq.load(tmp_path / "nowhere")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(path / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin.*never load"):
        hq.load(pickled)
