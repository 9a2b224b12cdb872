"""The interleaved sequence layout: `Document`s -> the model's fixed-length packed sequences.

One document becomes a run of tokens:

- a text segment: its token ids;
- an image: an *image slot* `<|vision_start|>`, L = gh * gw `<|image_pad|>` placeholders (one
  per latent token of the image's latent grid (gh, gw), raster order), `<|vision_end|>`;
- a plain document (every segment ROLE_NONE) ends with `<|endoftext|>`;
- a chat document (roles set) is rendered as Qwen's chat template renders it: each run of
  segments with the same role is one turn, `<|im_start|>` + tokens of "user\\n" (or
  "assistant\\n") + the turn's content + `<|im_end|>` + tokens of "\\n". With the word tokenizer
  these are exactly the ids `QwenTokenizer.encode_chat(messages, add_generation_prompt=False)`
  gives, provided no turn holds two text segments back to back (the template concatenates them
  with no space; the layout tokenizes them apart).

Loss targets (per token, then shifted to the position that predicts it):
- text: every token of a target text segment; the `<|vision_start|>` of a target image (the LM
  head opens an image); the closing `<|im_end|>` of a turn (or the `<|endoftext|>` of a plain
  document) whose last segment is a target (the model learns to stop). The first token of a
  document is never a target (nothing predicts it).
- image: the L latent slots of a target image (flow NLL on its latents).

Truncation: a document longer than `seq_len`, or with more than `max_images` images, is cut;
text may be cut anywhere but an image slot never is: the first image that does not fit is
dropped with everything after it. `truncated_tokens` / `truncated_images` count what was lost.

Branches (`Document.branches`): each branch is laid out as if it alone followed the document's
segments; the branches share the longest token prefix they have in common (the image and the
turn opening it) and their tails follow it in order, each with the positions, targets and
`branch_ids` k it would have alone; branches that do not fit are dropped whole.

Packing: documents go first-fit into sequences of `seq_len` tokens and `max_images` images;
each sequence numbers its documents 1, 2, ... in `segment_ids` (0 = padding).

Packed arrays (one row per sequence; `S = seq_len`, `I = max_images`):

  tokens           int32 (S,)    input ids; padding is `<|endoftext|>`
  targets          int32 (S,)    next-token ids: targets[t] = tokens[t + 1] inside a document,
                                 pad id elsewhere
  text_loss_mask   bool  (S,)    the logits at t are scored against targets[t]
  image_loss_mask  bool  (S,)    position t is a latent slot of a target image (its own z)
  modality         int32 (S,)    MODALITY_PAD / MODALITY_TEXT (any token, incl. vision start/end)
                                 / MODALITY_IMAGE (a latent slot)
  segment_ids      int32 (S,)    document number in this sequence, 0 for padding
  branch_ids       int32 (S,)    0, or k for the k-th branch of a branched document: a token
                                 of branch k attends to its document's branch-0 tokens and its
                                 own branch only
  positions        int32 (S, 3)  M-RoPE (t, h, w) ids, restarting at 0 for each document; equal,
                                 per document, to `pretzel_jax.vlm.rope_index.rope_index` on that
                                 document's tokens and `image_grid_thw` rows
  images           uint8 (I, H, W, 3)  the images in sequence order (resized to `image_size`)
  image_grid_thw   int32 (I, 3)  Qwen's grid per image: (1, gh * m, gw * m) with
                                 m = `spatial_merge_size`, so t * h * w / m**2 = L; zero rows
                                 for unused image slots
  image_mask       bool  (I,)    image i is real
  image_target     bool  (I,)    image i is a flow target
  image_segment_ids int32 (I,)   document number of image i (0 for unused)
  truncated_tokens int32 ()      tokens cut from this sequence's documents
  truncated_images int32 ()      images dropped from this sequence's documents

For `rope_index` over a batch: `image_grid_thw[image_mask]` (rows in batch-then-sequence order)
with `spatial_merge_size=m`, `image_token_id` = the `<|image_pad|>` id; per document slice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from pretzel_jax.data.schema import (
    KIND_IMAGE,
    ROLE_ASSISTANT,
    ROLE_NONE,
    ROLE_USER,
    Document,
    Segment,
)

MODALITY_PAD = 0
MODALITY_TEXT = 1
MODALITY_IMAGE = 2

ROLE_NAMES = {ROLE_USER: "user", ROLE_ASSISTANT: "assistant"}

# Qwen2.5-VL's names; looked up in the tokenizer, so a real Qwen tokenizer works too.
PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
IMAGE_TOKEN = "<|image_pad|>"


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """seq_len: tokens per packed sequence. latent_grid: (gh, gw) latent tokens of every image.
    image_size: (H, W) every image is resized to (bilinear) so images stack.
    max_images: images per packed sequence; 0 = as many slots as fit in `seq_len`.
    spatial_merge_size: Qwen's m, only used to write `image_grid_thw` in Qwen's units.
    vlm_grid_stride: the Pretzel VLM stream reads latent slots on a grid this many times coarser
      (its own tower's grid, when the FAE's is finer): text after an image resumes
      max(gh, gw) / stride past the image's first id, where that VLM expects it."""

    seq_len: int
    latent_grid: tuple[int, int] = (8, 8)
    image_size: tuple[int, int] = (32, 32)
    max_images: int = 0
    spatial_merge_size: int = 2
    vlm_grid_stride: int = 1

    def __post_init__(self):
        grid = tuple(int(g) for g in self.latent_grid)
        size = tuple(int(s) for s in self.image_size)
        object.__setattr__(self, "latent_grid", grid)
        object.__setattr__(self, "image_size", size)
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"latent_grid must be two positive ints (gh, gw), got {grid}.")
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be two positive ints (H, W), got {size}.")
        if self.spatial_merge_size < 1:
            raise ValueError(f"spatial_merge_size must be >= 1, got {self.spatial_merge_size}.")
        s = self.vlm_grid_stride
        if s < 1 or grid[0] % s or grid[1] % s:
            raise ValueError(
                f"vlm_grid_stride must be >= 1 and divide latent_grid {grid}, got {s}."
            )
        if self.seq_len < self.image_slot_len:
            raise ValueError(
                f"seq_len {self.seq_len} cannot hold one image slot ({self.image_slot_len} tokens "
                f"for latent_grid {grid}); raise seq_len or shrink latent_grid."
            )
        if self.max_images < 0:
            raise ValueError(
                f"max_images must be >= 0 (0 = as many as fit), got {self.max_images}."
            )

    @property
    def latents_per_image(self) -> int:
        return self.latent_grid[0] * self.latent_grid[1]

    @property
    def image_slot_len(self) -> int:
        return self.latents_per_image + 2  # <|vision_start|>, L latents, <|vision_end|>

    @property
    def images_per_sequence(self) -> int:
        return self.max_images or self.seq_len // self.image_slot_len

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        m = self.spatial_merge_size
        return (1, self.latent_grid[0] * m, self.latent_grid[1] * m)


@dataclasses.dataclass(frozen=True, eq=False)
class LaidDocument:
    """One document laid out, before packing (length n <= seq_len, k images <= max_images).

    `text_target[t]`: token t is a text loss target (predicted by position t - 1)."""

    tokens: np.ndarray  # int32 (n,)
    modality: np.ndarray  # int32 (n,)
    text_target: np.ndarray  # bool (n,)
    image_loss: np.ndarray  # bool (n,)
    positions: np.ndarray  # int32 (n, 3)
    images: np.ndarray  # uint8 (k, H, W, 3)
    image_target: np.ndarray  # bool (k,)
    truncated_tokens: int
    truncated_images: int
    branch: np.ndarray  # int32 (n,): 0 shared, k the k-th branch of a branched document

    def __len__(self) -> int:
        return len(self.tokens)


class Layout:
    """Lays out and packs documents for one tokenizer and `LayoutConfig`.

    `tokenizer`: a `tokenizers.Tokenizer` holding Qwen's special token names (the word tokenizer
    of `pretzel_jax.data.tokenizer`, or a Qwen checkpoint's `tokenizer.json`)."""

    def __init__(self, tokenizer: Any, config: LayoutConfig):
        self.tokenizer = tokenizer
        self.config = config
        ids = {}
        for name in (
            PAD_TOKEN,
            IM_START_TOKEN,
            IM_END_TOKEN,
            VISION_START_TOKEN,
            VISION_END_TOKEN,
            IMAGE_TOKEN,
        ):
            token_id = tokenizer.token_to_id(name)
            if token_id is None:
                raise ValueError(
                    f"the tokenizer has no {name!r} token; the layout needs Qwen's special tokens "
                    "(build the tokenizer with pretzel_jax.data.tokenizer.build_word_tokenizer)."
                )
            ids[name] = token_id
        self.pad_id = ids[PAD_TOKEN]
        self.im_start_id = ids[IM_START_TOKEN]
        self.im_end_id = ids[IM_END_TOKEN]
        self.vision_start_id = ids[VISION_START_TOKEN]
        self.vision_end_id = ids[VISION_END_TOKEN]
        self.image_id = ids[IMAGE_TOKEN]
        self._role_header = {r: self.encode(f"{name}\n") for r, name in ROLE_NAMES.items()}
        self._turn_tail = self.encode("\n")
        self._reserved = {self.vision_start_id, self.image_id, self.vision_end_id}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    # -- one document ------------------------------------------------------------------------

    def document(self, doc: Document) -> LaidDocument:
        """Lays out `doc` (chat template if any segment has a role), truncated to fit."""
        if doc.branches:
            return self._branched(doc)
        return self._lay(self._pieces(doc), doc.id, self.config.seq_len)

    def prompt(
        self, segments: Sequence[Segment], *, open_image: bool = False, reply: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A generation prompt laid out as training lays its documents -> (tokens, positions,
        context images). `open_image`: cut right after the `<vision_start>` of a next
        (generated) image; `reply`: end with the assistant turn's header (the chat template's
        generation prompt). A plain document's end-of-text is left out."""
        segments = list(segments)
        if open_image:
            h, w = self.config.image_size
            segments.append(Segment.of_image(np.zeros((h, w, 3), np.uint8), target=True))
        laid = self.document(Document("prompt", "prompt", tuple(segments)))
        tokens, positions, images = laid.tokens, laid.positions, laid.images
        if open_image:
            cut = int(np.flatnonzero(tokens == self.vision_start_id)[-1]) + 1
            return tokens[:cut], positions[:cut], images[:-1]
        if len(tokens) and tokens[-1] == self.pad_id:
            tokens, positions = tokens[:-1], positions[:-1]
        if reply:
            tail = np.asarray([self.im_start_id, *self._role_header[ROLE_ASSISTANT]], np.int32)
            start = int(positions[-1, 0]) + 1 if len(positions) else 0
            tokens = np.concatenate([tokens, tail])
            ids = np.repeat((start + np.arange(len(tail)))[:, None], 3, axis=1).astype(np.int32)
            positions = np.concatenate([positions, ids])
        return tokens, positions, images

    def _lay(self, pieces, doc_id: str, tokens_left: int) -> LaidDocument:
        cfg = self.config
        kept = []
        images_left = cfg.images_per_sequence
        for piece in pieces:
            kind, ids, marks, payload = piece
            if kind == "image":
                if len(ids) > tokens_left or images_left == 0:
                    break  # never cut an image: drop it and everything after it
                images_left -= 1
            elif len(ids) > tokens_left:
                kept.append((kind, ids[:tokens_left], marks[:tokens_left], payload))
                break
            kept.append(piece)
            tokens_left -= len(ids)
        truncated_tokens = sum(len(p[1]) for p in pieces) - sum(len(p[1]) for p in kept)
        truncated_images = sum(p[0] == "image" for p in pieces) - sum(p[0] == "image" for p in kept)

        tokens = np.fromiter((t for p in kept for t in p[1]), np.int32)
        text_target = np.fromiter((t for p in kept for t in p[2]), np.bool_, len(tokens))
        text_target[:1] = False  # nothing predicts a document's first token
        is_latent = tokens == self.image_id
        modality = np.where(is_latent, MODALITY_IMAGE, MODALITY_TEXT).astype(np.int32)
        image_loss = np.zeros(len(tokens), np.bool_)
        images, image_target = [], []
        start = 0
        for kind, ids, _, payload in kept:
            if kind == "image":
                image, target = payload
                image_loss[start + 1 : start + 1 + cfg.latents_per_image] = target
                images.append(self._resize(image, doc_id))
                image_target.append(target)
            start += len(ids)
        h, w = cfg.image_size
        return LaidDocument(
            tokens=tokens,
            modality=modality,
            text_target=text_target,
            image_loss=image_loss,
            positions=self._positions(is_latent),
            images=np.stack(images) if images else np.zeros((0, h, w, 3), np.uint8),
            image_target=np.array(image_target, np.bool_),
            truncated_tokens=int(truncated_tokens),
            truncated_images=int(truncated_images),
            branch=np.zeros(len(tokens), np.int32),
        )

    def _branched(self, doc: Document) -> LaidDocument:
        """`segments` + each branch laid out alone share their longest common prefix; the
        branches' tails follow it in order (the k-th with branch id k), each with the positions
        and targets it has alone. Branches that do not fit are dropped whole (counted as
        truncated)."""
        if any(not b or any(s.kind == KIND_IMAGE for s in b) for b in doc.branches):
            raise ValueError(
                f"record {doc.id!r}: a document branch must be non-empty text segments (images "
                "belong in the shared segments)."
            )
        alone = [
            self._lay(
                self._pieces(dataclasses.replace(doc, segments=doc.segments + b)), doc.id, 1 << 30
            )
            for b in doc.branches
        ]
        shared = min(len(a) for a in alone)
        for a in alone[1:]:
            differ = np.flatnonzero(
                (a.tokens[:shared] != alone[0].tokens[:shared])
                | (a.text_target[:shared] != alone[0].text_target[:shared])
            )
            shared = int(differ[0]) if len(differ) else shared
        # One position predicts the token after it, so the first token of a tail may not be a
        # target (it would be predicted by the previous branch's last token): share less.
        while shared and any(len(a) > shared and a.text_target[shared] for a in alone):
            shared -= 1
        tails = [np.arange(shared, len(a)) for a in alone]
        if shared + len(tails[0]) > self.config.seq_len:  # not even the first branch fits
            first = self._pieces(dataclasses.replace(doc, segments=doc.segments + doc.branches[0]))
            laid = self._lay(first, doc.id, self.config.seq_len)
            lost = sum(len(t) for t in tails[1:])
            return dataclasses.replace(laid, truncated_tokens=laid.truncated_tokens + lost)
        kept, used, lost = [], shared, 0
        for k, (a, tail) in enumerate(zip(alone, tails), start=1):
            if used + len(tail) <= self.config.seq_len:
                kept.append((k, a, tail))
                used += len(tail)
            else:
                lost += len(tail)
        head = alone[0]

        def join(field: str) -> np.ndarray:
            parts = [getattr(head, field)[:shared]]
            return np.concatenate(parts + [getattr(a, field)[tail] for _, a, tail in kept])

        branch = np.concatenate(
            [np.zeros(shared, np.int32)] + [np.full(len(tail), k, np.int32) for k, _, tail in kept]
        )
        return dataclasses.replace(
            head,
            **{
                f: join(f) for f in ("tokens", "modality", "text_target", "image_loss", "positions")
            },
            truncated_tokens=lost,
            branch=branch,
        )

    def _pieces(self, doc: Document) -> list[tuple[str, list[int], list[bool], Any]]:
        """(kind, ids, per-id text target, payload) runs: "text" runs may be cut, "image" not."""
        roles = {s.role for s in doc.segments}
        if not doc.segments:
            raise ValueError(f"record {doc.id!r}: a document needs at least one segment.")
        if ROLE_NONE in roles and len(roles) > 1:
            raise ValueError(
                f"record {doc.id!r}: mixes role-less segments with chat roles {sorted(roles)}; "
                "give every segment a role (user/assistant) or none."
            )
        unknown = roles - {ROLE_NONE, *ROLE_NAMES}
        if unknown:
            raise ValueError(f"record {doc.id!r}: unknown roles {sorted(unknown)}.")

        pieces = []

        def text(ids: list[int], target: bool) -> None:
            pieces.append(("text", ids, [target] * len(ids), None))

        def content(segment) -> None:
            if segment.kind == KIND_IMAGE:
                ids = [self.vision_start_id] + [self.image_id] * self.config.latents_per_image
                ids.append(self.vision_end_id)
                marks = [segment.target] + [False] * (len(ids) - 1)
                pieces.append(("image", ids, marks, (segment.image, segment.target)))
            else:
                ids = self.encode(segment.text)
                if self._reserved.intersection(ids):
                    raise ValueError(
                        f"record {doc.id!r}: text {segment.text!r} holds a vision token "
                        f"({VISION_START_TOKEN}, {IMAGE_TOKEN} or {VISION_END_TOKEN}); images "
                        "must be image segments, not text."
                    )
                text(ids, segment.target)

        if roles == {ROLE_NONE}:
            for segment in doc.segments:
                content(segment)
            text([self.pad_id], doc.segments[-1].target)
            return pieces
        turn_start = 0
        for i, segment in enumerate(doc.segments):
            if i == turn_start:
                text([self.im_start_id, *self._role_header[segment.role]], False)
            content(segment)
            last = i + 1 == len(doc.segments) or doc.segments[i + 1].role != segment.role
            if last:
                text([self.im_end_id], segment.target)
                text(self._turn_tail, False)
                turn_start = i + 1
        return pieces

    def _positions(self, is_latent: np.ndarray) -> np.ndarray:
        """M-RoPE ids as `rope_index` assigns them: text (p, p, p); an image's latents
        (p, p + i, p + j) in raster order, after which p advances by max(gh, gw) / stride."""
        gh, gw = self.config.latent_grid
        n_lat = gh * gw
        out = np.empty((len(is_latent), 3), np.int32)
        rows, cols = np.divmod(np.arange(n_lat), gw)
        image_offsets = np.stack([np.zeros(n_lat, np.int64), rows, cols], axis=-1)
        p, t = 0, 0
        starts = np.flatnonzero(np.diff(np.concatenate([[0], is_latent.astype(np.int8)])) == 1)
        for s in starts:  # every run of latents is exactly one image (vision tokens separate them)
            out[t:s] = (p + np.arange(s - t))[:, None]
            p += s - t
            out[s : s + n_lat] = p + image_offsets
            p += max(gh, gw) // self.config.vlm_grid_stride
            t = s + n_lat
        out[t:] = (p + np.arange(len(is_latent) - t))[:, None]
        return out

    def _resize(self, image: np.ndarray, record_id: str) -> np.ndarray:
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(
                f"record {record_id!r}: images must be uint8 (h, w, 3), got "
                f"{array.dtype} {array.shape}."
            )
        h, w = self.config.image_size
        if array.shape[:2] == (h, w):
            return array
        return np.asarray(Image.fromarray(array).resize((w, h), Image.Resampling.BILINEAR))

    # -- packing -----------------------------------------------------------------------------

    def pack(self, docs: Sequence[LaidDocument]) -> dict[str, np.ndarray]:
        """First-fit packs laid-out documents (in order) into as few sequences as it can.

        Returns the packed arrays (module docstring) with a leading sequence dim."""
        cfg = self.config
        capacity_images = cfg.images_per_sequence
        bins: list[list[LaidDocument]] = []
        room: list[list[int]] = []  # per bin: [tokens left, images left]
        for doc in docs:
            if len(doc) > cfg.seq_len or len(doc.images) > capacity_images:
                raise ValueError(
                    f"a laid-out document of {len(doc)} tokens and {len(doc.images)} images does "
                    f"not fit a sequence ({cfg.seq_len}, {capacity_images}); lay it out with "
                    "this Layout's config."
                )
            fits = (len(doc) <= t and len(doc.images) <= i for t, i in room)
            b = next((b for b, fit in enumerate(fits) if fit), None)
            if b is None:
                b = len(bins)
                bins.append([])
                room.append([cfg.seq_len, capacity_images])
            bins[b].append(doc)
            room[b][0] -= len(doc)
            room[b][1] -= len(doc.images)
        return self._stack(bins)

    def _stack(self, bins: list[list[LaidDocument]]) -> dict[str, np.ndarray]:
        cfg = self.config
        fill = {"tokens": self.pad_id, "targets": self.pad_id, "modality": MODALITY_PAD}
        out = {
            name: np.full(shape, fill.get(name, 0), dtype)
            for name, (shape, dtype) in packed_shapes(cfg, len(bins)).items()
        }
        for b, docs in enumerate(bins):
            t, i = 0, 0
            for segment_id, doc in enumerate(docs, start=1):
                e, j = t + len(doc), i + len(doc.images)
                out["tokens"][b, t:e] = doc.tokens
                out["targets"][b, t : e - 1] = doc.tokens[1:]
                out["text_loss_mask"][b, t : e - 1] = doc.text_target[1:]
                out["image_loss_mask"][b, t:e] = doc.image_loss
                out["modality"][b, t:e] = doc.modality
                out["segment_ids"][b, t:e] = segment_id
                out["branch_ids"][b, t:e] = doc.branch
                out["positions"][b, t:e] = doc.positions
                out["images"][b, i:j] = doc.images
                out["image_grid_thw"][b, i:j] = cfg.grid_thw
                out["image_mask"][b, i:j] = True
                out["image_target"][b, i:j] = doc.image_target
                out["image_segment_ids"][b, i:j] = segment_id
                out["truncated_tokens"][b] += doc.truncated_tokens
                out["truncated_images"][b] += doc.truncated_images
                t, i = e, j
        return out


def packed_shapes(config: LayoutConfig, n: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each packed array for `n` sequences (the module docstring's fields)."""
    s, k = config.seq_len, config.images_per_sequence
    h, w = config.image_size
    i32, flag = np.dtype(np.int32), np.dtype(np.bool_)
    return {
        "tokens": ((n, s), i32),
        "targets": ((n, s), i32),
        "text_loss_mask": ((n, s), flag),
        "image_loss_mask": ((n, s), flag),
        "modality": ((n, s), i32),
        "segment_ids": ((n, s), i32),
        "branch_ids": ((n, s), i32),
        "positions": ((n, s, 3), i32),
        "images": ((n, k, h, w, 3), np.dtype(np.uint8)),
        "image_grid_thw": ((n, k, 3), i32),
        "image_mask": ((n, k), flag),
        "image_target": ((n, k), flag),
        "image_segment_ids": ((n, k), i32),
        "truncated_tokens": ((n,), i32),
        "truncated_images": ((n,), i32),
    }


def unpack(packed: dict[str, np.ndarray], row: int) -> list[dict[str, np.ndarray]]:
    """Splits sequence `row` of packed arrays back into its documents, by segment id: per
    document the per-token arrays (tokens, modality, positions, text_target, image_loss, branch)
    and the per-image arrays (images, image_target). Inverse of `Layout.pack` (tests, debugging)."""
    seg = packed["segment_ids"][row]
    img_seg = packed["image_segment_ids"][row]
    docs = []
    for segment_id in range(1, int(seg.max(initial=0)) + 1):
        at = np.flatnonzero(seg == segment_id)
        text_target = np.zeros(len(at), np.bool_)
        text_target[1:] = packed["text_loss_mask"][row, at[:-1]]
        images = img_seg == segment_id
        docs.append(
            {
                "tokens": packed["tokens"][row, at],
                "modality": packed["modality"][row, at],
                "positions": packed["positions"][row, at],
                "branch": packed["branch_ids"][row, at],
                "text_target": text_target,
                "image_loss": packed["image_loss_mask"][row, at],
                "images": packed["images"][row, images],
                "image_target": packed["image_target"][row, images],
            }
        )
    return docs
