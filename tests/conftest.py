"""Shared pytest set-up: 8 fake CPU devices and parsed absl flags, before anything imports JAX."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

# The device count is fixed when the JAX backend starts, so this must precede `import jax`.
# The suite's time goes mostly to compiling hundreds of small programs. LLVM at -O0 cut it by
# about a third (13.3 -> 9.7 min on 2 cores); XLA:CPU's legacy loop emitters in place of its MLIR
# fusion emitters cut it again (10.9 -> 6.6 min, 2026-12-08). Every test passes at its unchanged
# tolerance; the one exactness claim that holds only under the default codegen compiles with it
# (test_flow_affine.DEFAULT_CODEGEN).
os.environ["XLA_FLAGS"] = " ".join(
    filter(
        None,
        [
            os.environ.get("XLA_FLAGS"),
            "--xla_force_host_platform_device_count=8",
            "--xla_backend_optimization_level=0",
            "--xla_cpu_use_fusion_emitters=false",
        ],
    )
)
os.environ["JAX_PLATFORMS"] = "cpu"
# Make `pretzel_jax` importable when pytest runs without an install (plain `pytest`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import absl.flags  # noqa: E402

# Grain's worker processes read absl flags; outside `absl.app.run` they are unparsed and raise
# UnparsedFlagAccessError.
absl.flags.FLAGS.mark_as_parsed()

# One persistent compilation cache per test run, shared by the xdist workers (they inherit the
# controller's environment): a run that builds the same programs again (a resume from a
# checkpoint, the same model in another test) loads them instead of compiling. Made fresh by the
# controller and removed when the run ends, so nothing stale carries over.
_OWN_CACHE = "PRETZEL_TEST_XLA_CACHE" not in os.environ
if _OWN_CACHE:
    os.environ["PRETZEL_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="pretzel-jax-xla-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["PRETZEL_TEST_XLA_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_sessionfinish(session):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["PRETZEL_TEST_XLA_CACHE"], ignore_errors=True)
