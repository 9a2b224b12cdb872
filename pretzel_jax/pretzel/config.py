"""PretzelConfig: the joint model's knobs (DESIGN.md section 3)."""

from __future__ import annotations

import dataclasses

from pretzel_jax.flow import FlowConfig
from pretzel_jax.vlm import VLMConfig

UNDERSTANDING_INPUTS = ("fae", "native")
W_D_SCOPES = ("all", "after_image")
# Curriculum stage -> (flow NLL on target images, next-token loss on text targets).
STAGE_LOSSES = {1: (True, False), 2: (False, True), 3: (True, True)}


@dataclasses.dataclass(frozen=True)
class PretzelConfig:
    vlm: VLMConfig  # the frozen VLM stream
    # The flow stream: `layers_per_block[-1]` is the deep block over the whole sequence, the
    # others are the per-image shallow blocks; token_dim = the FAE latent channels; context_dim =
    # the VLM width (P_t); rope "sectioned" = 3-axis RoPE on the VLM's M-RoPE ids.
    flow: FlowConfig
    latent_grid: tuple[int, int] = (8, 8)  # FAE latent tokens per image (gh, gw)
    # The VLM stream reads latent slot (p, p + i, p + j) at (p, p + i // s, p + j // s): its own
    # tower's grid when the FAE's is s times finer (the layout's `vlm_grid_stride`, which also
    # resumes text where that VLM expects it). The deep block keeps the fine ids.
    vlm_grid_stride: int = 1
    sigma_a: float = 0.3  # noise augmentation of the (unit-std) FAE latents, given and generated
    adapter_hidden: int = 0  # visual adapter A's hidden width; 0 = the VLM width
    # A reads the k x k window of latents ending at each one in raster order (its own and the
    # k - 1 rows and columns above and to its left, zeros off the image): causal, so a sampled
    # latent still enters the VLM without re-encoding. 1 = the latent alone (the paper's A).
    adapter_window: int = 1
    # VLM layers that feed the flow: -1 = the final-normed hidden state (y_vlm, P_t and W_vlm);
    # others (0-based layer outputs) each through their own zero-init projection.
    vlm_taps: tuple[int, ...] = (-1,)
    understanding_input: str = "fae"  # "native": context images through the VLM's own tower
    # Where W_D(y_D) reaches the logits: "all" text positions (the paper), or "after_image", only
    # positions of a document that follow one of its latents, so text-only prompts keep the
    # frozen VLM's logits exactly.
    w_d_scope: str = "all"
    stage: int = 1  # which losses the train step computes (STAGE_LOSSES)
    lm_weight: float = 1.0  # lambda in L = L_NF + lambda * L_NTP
    ce_chunk: int = 512  # positions per block of the blockwise LM cross-entropy

    def __post_init__(self):
        object.__setattr__(self, "latent_grid", tuple(int(g) for g in self.latent_grid))
        object.__setattr__(self, "vlm_taps", tuple(int(t) for t in self.vlm_taps))
        n = self.vlm.text.num_layers
        _check(len(self.latent_grid) == 2 and min(self.latent_grid) > 0, "latent_grid", "(gh, gw)")
        _check(self.sigma_a >= 0, "sigma_a", "must be >= 0")
        _check(
            1 <= self.adapter_window <= min(self.latent_grid),
            "adapter_window",
            f"must be in [1, {min(self.latent_grid)}] (the latent grid's side)",
        )
        _check(-1 in self.vlm_taps, "vlm_taps", "must hold -1 (the final hidden state)")
        _check(
            all(t == -1 or 0 <= t < n for t in self.vlm_taps)
            and len(set(self.vlm_taps)) == len(self.vlm_taps),
            "vlm_taps",
            f"entries must be -1 or distinct layer indices in [0, {n})",
        )
        _check(
            self.understanding_input in UNDERSTANDING_INPUTS,
            "understanding_input",
            f"must be one of {UNDERSTANDING_INPUTS}",
        )
        s = self.vlm_grid_stride
        _check(
            s >= 1 and self.latent_grid[0] % s == 0 and self.latent_grid[1] % s == 0,
            "vlm_grid_stride",
            f"must be >= 1 and divide latent_grid {self.latent_grid}",
        )
        _check(self.w_d_scope in W_D_SCOPES, "w_d_scope", f"must be one of {W_D_SCOPES}")
        _check(self.stage in STAGE_LOSSES, "stage", f"must be one of {sorted(STAGE_LOSSES)}")
        _check(self.flow.num_blocks >= 1, "flow.layers_per_block", "needs the deep block")
        _check(
            self.flow.context_dim == self.vlm.text.hidden_size,
            "flow.context_dim",
            f"must equal the VLM width {self.vlm.text.hidden_size} (P_t reads y_vlm)",
        )
        _check(self.flow.use_sos, "flow.use_sos", "must be True (<vision_start> is the SOS slot)")
        if self.understanding_input == "native":
            v = self.vlm.vision
            _check(v is not None, "understanding_input", "'native' needs a VLM vision tower")

    @property
    def latents_per_image(self) -> int:
        return self.latent_grid[0] * self.latent_grid[1]

    @property
    def adapter_history(self) -> int:
        """Latent slots before a latent that its adapter window reaches back to."""
        k = self.adapter_window
        return (k - 1) * (self.latent_grid[1] + 1)

    @property
    def losses(self) -> tuple[bool, bool]:
        return STAGE_LOSSES[self.stage]


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ValueError(f"PretzelConfig.{key} {why}")
