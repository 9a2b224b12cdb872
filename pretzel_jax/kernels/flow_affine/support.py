"""Which backend a pallas call targets, what each requires, block sizes, and fallback logging.

Backends and what each requires (`is_supported` checks them; the pallas path otherwise falls
back to the reference and logs why, once per reason):

- every backend: h and W float32 / bfloat16 / float16, x and b floating; block_n a power of two
  in [16, 4096] (default: 256 on TPU, 128 in interpret mode, 64 on GPU, capped at the next
  power of two >= N).
- interpret mode (CPU, default there): nothing more; the TPU kernel body runs in the HLO
  interpreter.
- TPU (Mosaic): C and D are full-extent block dims (any size), block_n a multiple of 8 (implied).
  The backward tile must fit the VMEM budget (`TPU_VMEM_LIMIT`); `is_supported` estimates it.
- GPU (Triton): D is zero-padded to a power of two >= 16 and C is walked in power-of-two
  chunks: C must be a multiple of 16.
- lowering from a CPU host with interpret=False: the kernel is chosen per platform at lowering
  time (`lax.platform_dependent`), so one traced function lowers for TPU and for GPU; the
  constraints of both apply. On a platform with no Pallas compiler (CPU) it runs interpreted.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

IMPLS = ("xla", "pallas")
OPERAND_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
TPU_VMEM_LIMIT = 48 * 2**20  # scoped-VMEM request; fits v5e/v5p/v6e (128 MiB) and v7x (64)
DEFAULT_BLOCK_N = {"tpu": 256, "interpret": 128, "triton": 64}

log = logging.getLogger(__name__)
_logged_reasons: set[str] = set()


def log_fallback_once(reason: str) -> None:
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        log.warning("flow_affine: Pallas kernel not used, falling back to XLA: %s", reason)


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def resolve_interpret(interpret: bool | None) -> bool:
    return jax.default_backend() == "cpu" if interpret is None else bool(interpret)


def targets(interpret: bool, platform: str | None) -> tuple[str, ...]:
    """Kernel variants a call may lower to: subset of ("interpret", "tpu", "triton")."""
    if platform is None:
        if interpret:
            return ("interpret",)
        platform = jax.default_backend()
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    if platform == "interpret":
        return ("interpret",)
    if platform == "tpu":
        return ("tpu",)
    if platform == "gpu":
        return ("triton",)
    # No Pallas compiler here (a CPU host lowering for an accelerator): both may be chosen.
    return ("tpu", "triton")


def default_block_n(n: int, target: str) -> int:
    return max(16, min(DEFAULT_BLOCK_N[target], next_pow2(n)))


def tpu_backward_vmem(
    block_n: int, c: int, d: int, h_bytes: int, w_bytes: int, columns: int = 0
) -> int:
    """Rough VMEM bytes of the backward tile (the larger kernel), double-buffered, lanes padded.

    columns: (block_n, 1) fp32 input tiles (mask, per-position cotangents), each lane-padded.
    """
    dl = -(-d // 128) * 128
    io = block_n * c * 2 * h_bytes + 2 * c * dl * (w_bytes + 4) + 3 * block_n * dl * 4
    io += columns * block_n * 128 * 4
    return 2 * io + block_n * c * 4 + 8 * block_n * dl * 4


def is_supported(
    impl: str,
    h=None,
    w=None,
    x=None,
    *,
    block_n: int | None = None,
    interpret: bool | None = None,
    platform: str | None = None,
    masked: bool = False,
    per_position: bool = False,
) -> tuple[bool, str]:
    """Whether `affine_forward(h, w, b, x, impl=impl, ...)` can run its kernel: (ok, reason).

    h, w, x: arrays or ShapeDtypeStructs (None skips the shape checks). platform: "tpu", "gpu",
    "interpret" or None (what the call would target: interpret mode, else the default backend;
    a CPU host with interpret=False may lower for TPU or GPU, so both sets of rules apply).
    masked / per_position: whether the call passes a mask / asks for per-position sums (they
    only enter the TPU VMEM estimate).
    """
    if impl not in IMPLS:
        return False, f"unknown impl {impl!r}; expected one of {IMPLS}"
    if impl == "xla":
        return True, "reference implementation (XLA)"
    tgts = targets(resolve_interpret(interpret), platform)
    if block_n is not None and not (is_pow2(block_n) and 16 <= block_n <= 4096):
        return False, f"block_n={block_n} must be a power of two in [16, 4096]"
    if h is None or w is None or x is None:
        return True, f"pallas ({', '.join(tgts)})"
    for name, arr in (("h", h), ("w", w)):
        if jnp.dtype(arr.dtype) not in map(jnp.dtype, OPERAND_DTYPES):
            return False, f"{name} dtype {jnp.dtype(arr.dtype).name} is not f32/bf16/f16"
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return False, f"x dtype {jnp.dtype(x.dtype).name} is not floating"
    _, n, c = h.shape
    d = x.shape[-1]
    if "triton" in tgts and c % 16:
        return False, f"Triton walks C in power-of-two chunks >= 16: C={c} is not a multiple of 16"
    if "tpu" in tgts:
        bn = block_n or default_block_n(n, "tpu")
        hb, wb = jnp.dtype(h.dtype).itemsize, jnp.dtype(w.dtype).itemsize
        need = tpu_backward_vmem(bn, c, d, hb, wb, int(masked) + 2 * int(per_position))
        if need > TPU_VMEM_LIMIT:
            return False, (
                f"TPU tile needs ~{need / 2**20:.0f} MiB VMEM > {TPU_VMEM_LIMIT / 2**20:.0f} MiB "
                f"(block_n={bn}, C={c}, D={d}): lower block_n"
            )
    return True, f"pallas ({', '.join(tgts)})"
