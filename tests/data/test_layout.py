"""Sequence layout: exact small cases, the chat template, truncation, packing, and hypothesis
properties on random documents (image slots whole, masks agree with modality, packing lossless,
truncation never cuts an image, M-RoPE positions equal `vlm.rope_index` per document)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pretzel_jax.data import tokenizer as wt
from pretzel_jax.data.layout import (
    MODALITY_IMAGE,
    MODALITY_PAD,
    MODALITY_TEXT,
    Layout,
    LayoutConfig,
    unpack,
)
from pretzel_jax.data.schema import ROLE_ASSISTANT, ROLE_NONE, ROLE_USER, Document, Segment
from pretzel_jax.vlm.rope_index import rope_index
from pretzel_jax.vlm.tokenizer import QwenTokenizer

WORDS = ["a", "red", "blue", "circle", "square", "two", "left", "of", "yes", "no", "?", "."]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    wt.build_word_tokenizer(WORDS, path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    return wt.load_word_tokenizer(tok_dir)


def image(seed: int, h: int = 4, w: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def small(seq_len: int = 32, **kw) -> LayoutConfig:
    return LayoutConfig(seq_len=seq_len, latent_grid=(2, 3), image_size=(4, 4), **kw)


def ids(tok, text: str) -> list[int]:
    return tok.encode(text).ids


# --- exact cases -----------------------------------------------------------------------------


def test_plain_caption_document_exactly(tok):
    layout = Layout(tok, small())
    doc = Document(
        "c:0", "caption", (Segment.of_text("a red circle"), Segment.of_image(image(0), target=True))
    )
    laid = layout.document(doc)
    vs, ve, im, pad = wt.VISION_START_ID, wt.VISION_END_ID, wt.IMAGE_PAD_ID, wt.PAD_ID
    assert laid.tokens.tolist() == [*ids(tok, "a red circle"), vs, *[im] * 6, ve, pad]
    # <|vision_start|> of a target image and the closing pad of a target-ended doc are targets.
    assert np.flatnonzero(laid.text_target).tolist() == [3, 11]
    assert np.flatnonzero(laid.image_loss).tolist() == list(range(4, 10))
    assert laid.modality.tolist() == [MODALITY_TEXT] * 4 + [MODALITY_IMAGE] * 6 + [1, 1]
    # rope: text 0..3, image (4, 4 + r, 4 + c) for a 2x3 grid, then p = 4 + max(2, 3) = 7.
    expected = [[p] * 3 for p in range(4)]
    expected += [[4, 4 + r, 4 + c] for r in range(2) for c in range(3)]
    expected += [[7] * 3, [8] * 3]
    assert laid.positions.tolist() == expected
    np.testing.assert_array_equal(laid.images[0], image(0))
    assert (laid.truncated_tokens, laid.truncated_images) == (0, 0)

    packed = layout.pack([laid])
    assert packed["tokens"].shape == (1, 32) and packed["images"].shape == (1, 4, 4, 4, 3)
    assert packed["targets"][0, :11].tolist() == laid.tokens[1:].tolist()
    assert np.flatnonzero(packed["text_loss_mask"][0]).tolist() == [2, 10]  # predicts 3 and 11
    assert packed["image_grid_thw"][0].tolist() == [[1, 4, 6]] + [[0, 0, 0]] * 3
    assert packed["image_mask"][0].tolist() == [True, False, False, False]  # 32 // 8 slots
    assert (packed["tokens"][0, 12:] == pad).all() and (packed["segment_ids"][0, 12:] == 0).all()


def test_chat_layout_equals_qwen_tokenizer_chat_template(tok, tok_dir):
    layout = Layout(tok, small(64))
    doc = Document(
        "v:0",
        "vqa",
        (
            Segment.of_image(image(1), role=ROLE_USER),
            Segment.of_text("red ?", role=ROLE_USER),
            Segment.of_text("yes", role=ROLE_ASSISTANT, target=True),
            Segment.of_text("two circle ?", role=ROLE_USER),
            Segment.of_text("no", role=ROLE_ASSISTANT, target=True),
        ),
    )
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "red ?"}]},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "two circle ?"},
        {"role": "assistant", "content": "no"},
    ]
    qwen = QwenTokenizer.from_folder(tok_dir)
    grid = layout.config.grid_thw
    expected = qwen.encode_chat(messages, [grid], merge_size=2, add_generation_prompt=False)
    laid = layout.document(doc)
    assert laid.tokens.tolist() == expected
    # Targets: each answer and its <|im_end|>; never the role header.
    targets = laid.tokens[laid.text_target].tolist()
    yes, no, end = tok.token_to_id("yes"), tok.token_to_id("no"), wt.IM_END_ID
    assert targets == [yes, end, no, end]
    assert not laid.image_loss.any()  # the question's image is context


def test_truncation_drops_the_image_that_does_not_fit_and_what_follows(tok):
    layout = Layout(tok, small(14))  # an image slot is 8 tokens
    doc = Document(
        "i:0",
        "interleaved",
        (
            Segment.of_text("a red circle", target=True),  # 3
            Segment.of_image(image(2), target=True),  # 8 -> 11
            Segment.of_text("two blue", target=True),  # 2 -> 13
            Segment.of_image(image(3), target=True),  # 8: does not fit in 1
            Segment.of_text("yes", target=True),
        ),
    )
    laid = layout.document(doc)
    assert len(laid) == 13 and len(laid.images) == 1
    assert (laid.truncated_tokens, laid.truncated_images) == (8 + 1 + 1, 1)
    cut_text = layout.document(
        Document("i:1", "interleaved", (Segment.of_text("a red circle two blue square ."),))
    )
    assert cut_text.tokens.tolist() == [*ids(tok, "a red circle two blue square ."), wt.PAD_ID]
    cut = Layout(tok, LayoutConfig(seq_len=4, latent_grid=(1, 1))).document(
        Document("i:1", "interleaved", (Segment.of_text("a red circle two blue square ."),))
    )
    assert cut.tokens.tolist() == ids(tok, "a red circle two")
    assert cut.truncated_tokens == 4  # "blue square ." and the end-of-document pad
    two_images = Layout(tok, small(64, max_images=1)).document(doc)
    assert len(two_images.images) == 1 and two_images.truncated_images == 1


def test_first_fit_packing_and_segment_ids(tok):
    layout = Layout(tok, small(10))
    texts = ["a a a a a", "red red red red", "two two", "blue blue blue"]  # +1 pad each
    laid = [layout.document(Document(f"t:{i}", "text", (Segment.of_text(t),))) for i, t in
            enumerate(texts)]  # fmt: skip
    assert [len(d) for d in laid] == [6, 5, 3, 4]
    packed = layout.pack(laid)
    # First fit: 6 -> bin 0; 5 -> bin 1; 3 -> bin 0 (6 + 3 <= 10); 4 -> bin 1 (5 + 4).
    assert packed["segment_ids"].tolist() == [
        [1] * 6 + [2] * 3 + [0],
        [1] * 5 + [2] * 4 + [0],
    ]
    assert [d["tokens"].tolist() for d in unpack(packed, 0)] == [
        laid[0].tokens.tolist(),
        laid[2].tokens.tolist(),
    ]
    # Text targets never cross a document boundary.
    assert not packed["text_loss_mask"][0, 5] and packed["targets"][0, 5] == wt.PAD_ID


def test_images_are_resized_to_image_size(tok):
    layout = Layout(tok, small())
    laid = layout.document(Document("r:0", "caption", (Segment.of_image(image(0, 9, 5)),)))
    assert laid.images.shape == (1, 4, 4, 3) and laid.images.dtype == np.uint8


def test_user_errors_are_named(tok):
    layout = Layout(tok, small())
    mixed = Document("m:3", "vqa", (Segment.of_image(image(0)), Segment.of_text("a", ROLE_USER)))
    with pytest.raises(ValueError, match=r"'m:3'.*mixes role-less segments"):
        layout.document(mixed)
    sneaky = Document("s:1", "text", (Segment.of_text("a <|image_pad|> b"),))
    with pytest.raises(ValueError, match=r"'s:1'.*holds a vision token"):
        layout.document(sneaky)
    with pytest.raises(ValueError, match="seq_len 7 cannot hold one image slot"):
        small(7)
    with pytest.raises(ValueError, match="does not fit a sequence"):
        Layout(tok, small(8)).pack(
            [layout.document(Document("x", "text", (Segment.of_text("a " * 9),)))]
        )
    with pytest.raises(ValueError, match="no '<|im_start|>' token"):
        Layout(type("Tok", (), {"token_to_id": lambda self, t: None})(), small())


# --- properties on random documents ----------------------------------------------------------

TEXT = st.lists(st.sampled_from([*WORDS, "purple"]), max_size=6).map(" ".join)


@st.composite
def documents(draw, index: int = 0) -> Document:
    chat = draw(st.booleans())
    n = draw(st.integers(1, 6))
    segments = []
    for k in range(n):
        role = (ROLE_USER if draw(st.booleans()) else ROLE_ASSISTANT) if chat else ROLE_NONE
        target = draw(st.booleans())
        if draw(st.integers(0, 2)) == 0:
            h, w = draw(st.integers(2, 6)), draw(st.integers(2, 6))
            segments.append(Segment.of_image(image(100 * index + k, h, w), role, target))
        else:
            segments.append(Segment.of_text(draw(TEXT), role, target))
    return Document(f"doc:{index}", "interleaved", tuple(segments))


@st.composite
def configs(draw) -> LayoutConfig:
    grid = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    return LayoutConfig(
        seq_len=draw(st.integers(grid[0] * grid[1] + 2, 48)),
        latent_grid=grid,
        image_size=(4, 4),
        max_images=draw(st.integers(0, 3)),
        spatial_merge_size=draw(st.integers(1, 2)),
    )


def check_sequence(layout: Layout, packed: dict, row: int) -> None:
    """Every image slot whole; masks, modality, targets and segment ids consistent."""
    cfg = layout.config
    tok, mod, seg = packed["tokens"][row], packed["modality"][row], packed["segment_ids"][row]
    tl, il = packed["text_loss_mask"][row], packed["image_loss_mask"][row]
    assert ((mod == MODALITY_PAD) == (seg == 0)).all()
    assert (tok[mod == MODALITY_PAD] == layout.pad_id).all()
    assert ((tok == layout.image_id) == (mod == MODALITY_IMAGE)).all()
    real = np.flatnonzero(seg)
    assert (real == np.arange(len(real))).all()  # documents first, padding after
    # Image slots: <|vision_start|>, exactly L latents, <|vision_end|>, inside one document.
    starts = np.flatnonzero(tok == layout.vision_start_id)
    assert len(starts) == len(np.flatnonzero(tok == layout.vision_end_id))
    assert len(starts) == packed["image_mask"][row].sum()
    for i, s in enumerate(starts):
        e = s + 1 + cfg.latents_per_image
        assert (mod[s + 1 : e] == MODALITY_IMAGE).all() and tok[e] == layout.vision_end_id
        assert (seg[s : e + 1] == seg[s]).all() and packed["image_segment_ids"][row, i] == seg[s]
        assert (il[s + 1 : e] == packed["image_target"][row, i]).all()
    assert mod.tolist().count(MODALITY_IMAGE) == len(starts) * cfg.latents_per_image
    # Masks agree with modality: text loss predicts a text token of the same document.
    t = np.flatnonzero(tl)
    assert (t + 1 < len(tok)).all()
    assert (
        (mod[t + 1] == MODALITY_TEXT).all() and (seg[t + 1] == seg[t]).all() and (seg[t] > 0).all()
    )
    assert (mod[il] == MODALITY_IMAGE).all()
    same = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)
    np.testing.assert_array_equal(packed["targets"][row, :-1][same], tok[1:][same])
    n_img = packed["image_mask"][row]
    assert (packed["image_grid_thw"][row][n_img] == cfg.grid_thw).all()
    assert (packed["image_grid_thw"][row][~n_img] == 0).all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(), docs=st.lists(documents(), min_size=1, max_size=6))
def test_random_documents_pack_whole_and_lossless(tok, config, docs):
    layout = Layout(tok, config)
    full = Layout(tok, LayoutConfig(seq_len=10_000, latent_grid=config.latent_grid,
                                    image_size=config.image_size, max_images=100))  # fmt: skip
    laid = [layout.document(d) for d in docs]
    for doc, one in zip(docs, laid, strict=True):
        untruncated = full.document(doc)
        assert len(one) <= config.seq_len and len(one.images) <= config.images_per_sequence
        # Truncation keeps a prefix, ending outside any image slot, and counts what it dropped.
        np.testing.assert_array_equal(one.tokens, untruncated.tokens[: len(one)])
        np.testing.assert_array_equal(one.positions, untruncated.positions[: len(one)])
        assert one.truncated_tokens == len(untruncated) - len(one)
        assert one.truncated_images == len(untruncated.images) - len(one.images)
        assert (one.tokens == layout.image_id).sum() == len(one.images) * config.latents_per_image
        assert len(one) > 0
    packed = layout.pack(laid)
    rows = len(packed["tokens"])
    unpacked = []
    for row in range(rows):
        check_sequence(layout, packed, row)
        unpacked += unpack(packed, row)

    # Packing loses nothing: the unpacked documents are the laid-out ones (as a multiset).
    def key(d) -> bytes:
        return b"|".join(np.ascontiguousarray(d[k]).tobytes() for k in
                         ("tokens", "positions", "text_target", "image_loss", "images",
                          "image_target"))  # fmt: skip

    assert sorted(map(key, unpacked)) == sorted(key(vars(d)) for d in laid)
    assert packed["truncated_tokens"].sum() == sum(d.truncated_tokens for d in laid)
    # Positions restart per document and equal vlm.rope_index on the document alone.
    for doc in unpacked:
        n_images = len(doc["images"])
        positions, _ = rope_index(
            doc["tokens"][None],
            np.tile(config.grid_thw, (n_images, 1)),
            spatial_merge_size=config.spatial_merge_size,
            image_token_id=layout.image_id,
            vision_start_token_id=layout.vision_start_id,
        )
        np.testing.assert_array_equal(doc["positions"], positions[0])


# --- branched documents ----------------------------------------------------------------------


@st.composite
def branched(draw) -> Document:
    """A chat document (an image and maybe a question) with 1-4 text branches."""
    role = lambda: ROLE_USER if draw(st.booleans()) else ROLE_ASSISTANT  # noqa: E731
    shared = [Segment.of_image(image(7), ROLE_USER)]
    if draw(st.booleans()):
        shared.append(Segment.of_text(draw(TEXT), ROLE_USER))
    branches = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 3))
        branches.append(
            tuple(Segment.of_text(draw(TEXT), role(), draw(st.booleans())) for _ in range(n))
        )
    return Document("b:0", "vqa", tuple(shared), branches=tuple(branches))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=branched(), seq_len=st.integers(12, 80))
def test_each_branch_is_laid_out_as_it_would_be_alone(tok, doc, seq_len):
    layout = Layout(tok, small(seq_len, max_images=1))
    laid = layout.document(doc)
    packed = layout.pack([laid])
    branch = packed["branch_ids"][0]
    unbounded = Layout(tok, small(10_000, max_images=1))
    alone = [unbounded.document(Document("b:0", "vqa", doc.segments + b)) for b in doc.branches]
    shared = int((laid.branch == 0).sum())
    kept = sorted(set(laid.branch[shared:].tolist()))
    assert (laid.branch[:shared] == 0).all() and (np.diff(laid.branch) >= 0).all()
    if kept:  # the branches that fit, each what it is alone (tokens, positions, loss targets)
        assert len(laid) <= seq_len
        for k in kept:
            view = np.flatnonzero((branch == 0) & (packed["segment_ids"][0] > 0) | (branch == k))
            one = alone[k - 1]
            np.testing.assert_array_equal(packed["tokens"][0, view], one.tokens)
            np.testing.assert_array_equal(packed["positions"][0, view], one.positions)
            np.testing.assert_array_equal(
                packed["text_loss_mask"][0, view][:-1], one.text_target[1:]
            )
            loss = packed["text_loss_mask"][0, view]
            np.testing.assert_array_equal(
                packed["targets"][0, view][loss], np.append(one.tokens[1:], 0)[loss]
            )
        dropped = sum(len(alone[k]) - shared for k in range(len(alone)) if k + 1 not in kept)
        assert laid.truncated_tokens == dropped
    else:  # not even one branch fits: the first one alone, truncated
        np.testing.assert_array_equal(laid.tokens, alone[0].tokens[: len(laid)])
    assert laid.images.shape[0] == 1  # the image slot is shared, never repeated


def test_a_branch_may_hold_no_image(tok):
    doc = Document(
        "b:1",
        "vqa",
        (Segment.of_image(image(0), ROLE_USER),),
        branches=((Segment.of_image(image(1), ROLE_USER),),),
    )
    with pytest.raises(ValueError, match="record 'b:1': a document branch"):
        Layout(tok, small(64)).document(doc)
