"""Qwen2.5-VL vision tower (work in progress: config first, module follows)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Qwen2.5-VL vision tower sizes; defaults are the 7B checkpoint's."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    rms_norm_eps: float = 1e-6
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "fullatt_block_indexes", tuple(self.fullatt_block_indexes))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"VisionConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_heads ({self.num_heads})"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"VisionConfig head_dim ({self.head_dim}) must be a multiple of 4 for the 2-D "
                "rotary embedding (half the pairs per axis)"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(
                f"VisionConfig.fullatt_block_indexes {bad} out of range for depth {self.depth}"
            )
        if self.merge_window < 1:
            raise ValueError(
                f"VisionConfig.window_size ({self.window_size}) must be at least "
                f"patch_size * spatial_merge_size ({self.patch_size * self.spatial_merge_size})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_window(self) -> int:
        """Window side in merged (2x2) units, floored as HF does."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened (C, T, P, P) patch in pixel_values."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2
