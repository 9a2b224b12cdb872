"""Shapes scenes and renderer: JSON round trip, determinism, placement, colours, anti-aliasing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pretzel_jax.data.shapes import ObjectSpec, SceneSpec, random_scene, render
from pretzel_jax.data.shapes.render import render_with_placements
from pretzel_jax.data.shapes.scene import (
    BACKGROUNDS,
    COLORS,
    COLS,
    HELDOUT_COMBOS,
    ROWS,
    SHAPES,
    SIZES,
    random_heldout_scene,
)


def test_vocabulary_meets_the_contract():
    assert {"circle", "square", "triangle"} <= set(SHAPES)
    assert len(COLORS) >= 6 and len(set(COLORS.values())) == len(COLORS)
    assert set(SIZES) == {"small", "large"}
    assert len(ROWS) == len(COLS) == 3
    # Every shape and every colour still occurs in training; only the pairs are new.
    assert {s for s, _ in HELDOUT_COMBOS} <= set(SHAPES)
    for shape in SHAPES:
        assert any((shape, c) not in HELDOUT_COMBOS for c in COLORS)
    for color in COLORS:
        assert any((s, color) not in HELDOUT_COMBOS for s in SHAPES)


def test_json_round_trip_and_canonical_order():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = random_scene(rng)
        assert SceneSpec.from_json(scene.to_json()) == scene
        assert 1 <= len(scene.objects) <= 3
        assert [o.cell for o in scene.objects] == sorted(o.cell for o in scene.objects)


def test_bad_specs_name_the_field():
    with pytest.raises(ValueError, match="'color' is 'pink'"):
        ObjectSpec("circle", "pink", "small", "top", "left")
    a = ObjectSpec("circle", "red", "small", "top", "left")
    with pytest.raises(ValueError, match="share a cell"):
        SceneSpec((a, a.replace(color="blue")))
    with pytest.raises(ValueError, match="'background'"):
        SceneSpec.from_json('{"objects": [], "background": "plaid"}')


def test_random_scenes_keep_heldout_combos_out_and_heldout_scenes_in():
    rng = np.random.default_rng(1)
    for _ in range(300):
        assert not random_scene(rng).has_heldout_combo()
        assert random_heldout_scene(rng).has_heldout_combo()


def test_render_is_deterministic_by_seed():
    scene = random_scene(np.random.default_rng(2), num_objects=3, background="speckled")
    a = render(scene, 32, np.random.default_rng(5))
    b = render(scene, 32, np.random.default_rng(5))
    c = render(scene, 32, np.random.default_rng(6))
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(render(scene), render(scene))  # no rng: seeded by the spec
    assert render(scene, 48).shape == (48, 48, 3)


@pytest.mark.parametrize("size", ["small", "large"])
def test_each_colour_and_shape_fills_its_centre_exactly(size):
    rng = np.random.default_rng(3)
    for color, rgb in COLORS.items():
        for shape in SHAPES:
            row, col = ROWS[rng.integers(3)], COLS[rng.integers(3)]
            scene = SceneSpec((ObjectSpec(shape, color, size, row, col),), "speckled")
            image, (p,) = render_with_placements(scene, 64, rng)
            assert tuple(image[int(p.cy), int(p.cx)]) == rgb, (shape, color, size)


def test_objects_stay_inside_their_cells():
    rng = np.random.default_rng(4)
    for image_size in (32, 40):
        edges = [image_size * i / 3 for i in range(4)]
        for _ in range(60):
            obj = random_scene(rng, num_objects=1).objects[0]
            image = render(SceneSpec((obj,), "white"), image_size, rng)
            ys, xs = np.nonzero(np.any(image != BACKGROUNDS["white"][0], axis=-1))
            r, c = obj.cell
            assert ys.size > 0
            assert math.floor(edges[r]) <= ys.min() and ys.max() < math.ceil(edges[r + 1])
            assert math.floor(edges[c]) <= xs.min() and xs.max() < math.ceil(edges[c + 1])


def test_edges_are_anti_aliased():
    white = np.asarray(BACKGROUNDS["white"][0], np.float64)
    for shape in SHAPES:
        obj = ObjectSpec(shape, "blue", "large", "middle", "center")
        image = render(SceneSpec((obj,), "white"), 32).astype(np.float64)
        blue = np.asarray(COLORS["blue"], np.float64)
        # Each pixel is (up to rounding) a mix t * blue + (1 - t) * white; edges have 0 < t < 1.
        t = ((image - white) @ (blue - white)) / ((blue - white) @ (blue - white))
        mix = t[..., None] * blue + (1 - t[..., None]) * white
        assert np.abs(image - mix).max() <= 1.0
        partial = (t > 0.05) & (t < 0.95)
        assert partial.sum() >= 8, shape


def cell_mask(image_size: int, cells: list[tuple[int, int]]) -> np.ndarray:
    """Pixels that touch any of `cells` (a boundary pixel belongs to both neighbours)."""
    edges = [image_size * i / 3 for i in range(4)]
    mask = np.zeros((image_size, image_size), bool)
    for r, c in cells:
        rows = slice(math.floor(edges[r]), math.ceil(edges[r + 1]))
        cols = slice(math.floor(edges[c]), math.ceil(edges[c + 1]))
        mask[rows, cols] = True
    return mask


def test_same_seed_renders_differ_only_in_changed_cells():
    rng = np.random.default_rng(7)
    for _ in range(30):
        scene = random_scene(rng, num_objects=2, background="speckled")
        o = scene.objects[0]
        recoloured = o.replace(color="red" if o.color != "red" else "blue")
        changed = SceneSpec((recoloured, scene.objects[1]), scene.background)
        a = render(scene, 32, np.random.default_rng(11))
        b = render(changed, 32, np.random.default_rng(11))
        differs = np.any(a != b, axis=-1)
        assert differs.any()
        assert not (differs & ~cell_mask(32, [o.cell])).any()
