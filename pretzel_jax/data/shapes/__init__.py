"""The synthetic multimodal "shapes" family: scene specs, a renderer, captions, tasks, TFDS builder.

`render(spec, size)` draws a `SceneSpec` (1-3 coloured shapes on a 3x3 grid) as an anti-aliased
uint8 image; every record of the family stores its specs as exact ground truth.
"""

from pretzel_jax.data.shapes.grammar import (
    GENEVAL_CATEGORIES,
    PromptSpec,
    geneval_category,
    geneval_prompts,
    parse_caption,
    scene_captions,
)
from pretzel_jax.data.shapes.render import render
from pretzel_jax.data.shapes.scene import ObjectSpec, SceneSpec, random_scene

__all__ = [
    "GENEVAL_CATEGORIES",
    "ObjectSpec",
    "PromptSpec",
    "SceneSpec",
    "geneval_category",
    "geneval_prompts",
    "parse_caption",
    "random_scene",
    "render",
    "scene_captions",
]
