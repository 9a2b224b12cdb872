"""The model registry: every kind builds from its default config, a kind registered from any
module (here: this test module) is found like the package's own, errors name the known kinds,
and the kind modules import without a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import nnx

from pretzel_jax import models
from pretzel_jax.models import ModelKind
from pretzel_jax.train.config import default_config
from pretzel_jax.train.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_KINDS = ("fae", "image_flow", "tower_pretrain", "vlm")


class _Toy(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.w = nnx.Param(jnp.zeros((width,)))

    def loss(self, batch, key):
        return jnp.sum(self.w), {}


# A kind of this module's own, registered as a user's module would register it: its section
# appears in default_model_config, and get/build find it.
TOY = models.register(
    ModelKind(
        name="registry_test_toy",
        default_config=lambda: {"width": 3},
        build=lambda config, *, rngs: _Toy(config.model.registry_test_toy.width, rngs=rngs),
        report=None,
        weight_sources=lambda config: ["toy.safetensors"],
    )
)


def _fae_test_size(config) -> None:
    from pretzel_jax.fae.model import FROZEN
    from pretzel_jax.models.fae import toy_qwen_vision

    config.model.fae.encoder.if_missing = "random"  # no pretrained encoder in tests
    config.model.fae.encoder.random = toy_qwen_vision()
    config.optim.freeze = FROZEN[config.model.fae.phase]


def _pretzel_test_size(config) -> None:
    from pretzel_jax.models.pretzel import stage_freeze

    _fae_test_size(config)
    config.optim.freeze = stage_freeze(config.model.pretzel.stage)


# kind -> what its default config lacks to build without files on disk (a new kind whose default
# config does not build as it is adds its entry here).
TEST_SIZE = {"fae": _fae_test_size, "pretzel": _pretzel_test_size}
# Kinds whose weight sources are files the default config cannot name: they say which key.
NEEDS_FILES = {"pretzel": "model.pretzel.vlm_path"}


def test_package_kinds_are_found():
    assert set(PACKAGE_KINDS) | {TOY.name} <= set(models.kinds())


@pytest.mark.parametrize("name", models.kinds())
def test_every_kind_builds_its_default_config(name):
    config = default_config()
    config.model.kind = name
    TEST_SIZE.get(name, lambda config: None)(config)
    model = nnx.eval_shape(lambda: models.build(config, rngs=nnx.Rngs(0)))
    assert hasattr(model, "loss")
    assert models.get(name).name == name
    report = models.report_fn(config)
    assert report is None or callable(report)
    if name in NEEDS_FILES:
        with pytest.raises(ConfigError, match=NEEDS_FILES[name]):
            models.weight_sources(config)
    else:
        assert isinstance(models.weight_sources(config), list)


def test_a_kind_from_another_module_is_found_and_built():
    assert models.get(TOY.name) is TOY
    config = default_config()
    assert config.model.registry_test_toy.width == 3
    config.model.kind = TOY.name
    config.model.registry_test_toy.width = 5
    model = models.build(config, rngs=nnx.Rngs(0))
    assert isinstance(model, _Toy) and model.w.shape == (5,)
    assert models.report_fn(config) is None
    assert models.weight_sources(config) == ["toy.safetensors"]


def test_a_kind_without_weight_sources_has_none():
    config = default_config()
    config.model.kind = "image_flow"
    assert models.weight_sources(config) == []


def test_unknown_kind_names_the_known_ones():
    config = default_config()
    config.model.kind = "nope"
    with pytest.raises(ConfigError, match="config.model.kind='nope' is unknown") as e:
        models.build(config, rngs=nnx.Rngs(0))
    for name in (*PACKAGE_KINDS, TOY.name):
        assert repr(name) in str(e.value)
    with pytest.raises(ConfigError, match="'nope' is unknown"):
        models.report_fn(config)


@pytest.mark.parametrize("name", ["image_flow", "registry_test_toy"])
def test_a_duplicate_name_fails(name):
    with pytest.raises(ValueError, match=f"{name!r} is registered twice"):
        models.register(ModelKind(name, None, lambda config, *, rngs: None, None))
    assert models.get(name).name == name  # the first one stays


def test_a_kind_section_may_not_shadow_a_shared_one(monkeypatch):
    # "flow" is a shared section (model.flow): a kind of that name with its own section would
    # overwrite it.
    from pretzel_jax.models import registry

    monkeypatch.setitem(
        registry._KINDS, "flow", ModelKind("flow", dict, lambda config, *, rngs: None, None)
    )
    with pytest.raises(ValueError, match="config.model.flow is a shared section"):
        models.default_model_config()


def test_a_kind_module_imports_first():
    """Importing a kind module before pretzel_jax.models, as experiments/shapes_fae.py imports
    pretzel_jax.models.fae, needs no import cycle."""
    code = "import pretzel_jax.models.fae, pretzel_jax.models as m; assert 'fae' in m.kinds()"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_no_kind_module_imports_the_package_init():
    """Kind modules import `registry` and `common`, never `pretzel_jax.models` itself (which
    imports kinds on demand): no import cycle, even a lazy one."""
    package = ROOT / "pretzel_jax" / "models"
    for path in package.glob("*.py"):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module] if node.level == 0 else []
                if node.module == "pretzel_jax":
                    names = [f"pretzel_jax.{a.name}" for a in node.names]
            else:
                continue
            assert "pretzel_jax.models" not in names, f"{path.name} imports pretzel_jax.models"
