"""End-of-run report of the stage-0 VLM (shapes family): greedy VQA accuracy per question type and
per number of objects in the scene, caption exact match, on the test split and on the held-out
compositional split; and the model exported as a Hugging Face folder (`<run_dir>/hf`) that
`python -m pretzel_jax.vlm.chat` reads.

Prompts are built the way the chat CLI builds them (`QwenTokenizer.encode_chat` over the data
set's tokenizer folder, `preprocess_images` with the toy patch sizes), so the numbers measure what
a user of the exported folder gets. A VQA question is asked alone (image + question, one user
turn); a caption is asked for with the image alone (plus `config.data.caption_prompt`), the
captioning recipe's prompt. Answers are compared as normalised words (the tokenizer's
normalisation and splitting); a caption matches if it equals any true caption of its scene.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np
from ml_collections import ConfigDict
from tensorflow_datasets.core import read_only_builder

from pretzel_jax.data import schema
from pretzel_jax.data.shapes.scene import MAX_OBJECTS
from pretzel_jax.data.shapes.tasks import QUESTION_TYPES
from pretzel_jax.data.tokenizer import split_words
from pretzel_jax.vlm import Qwen25VL, QwenTokenizer, generate, preprocess_images
from pretzel_jax.vlm.image_processing import CLIP_MEAN, CLIP_STD

SPLITS = {"": "test", "heldout_": "heldout"}  # metric prefix -> split (test: config's split)


def tokenizer_folder(data_cfg: ConfigDict) -> Path:
    """config.data.tokenizer_dir, else the folder of the VQA data set (its tokenizer is saved
    beside its records)."""
    if data_cfg.tokenizer_dir:
        return Path(data_cfg.tokenizer_dir)
    name = data_cfg.datasets.vqa
    return Path(read_only_builder.builder_from_files(name, data_dir=data_cfg.data_dir).data_dir)


def image_options(model: Qwen25VL, image_size) -> dict:
    """preprocess_images keywords for the toy tower: no resize at `image_size` (H, W)."""
    v = model.cfg.vision
    return dict(
        min_pixels=(v.patch_size * v.spatial_merge_size) ** 2,
        max_pixels=int(image_size[0] * image_size[1]),
        patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size,
        merge_size=v.spatial_merge_size,
    )


def normalize(text: str) -> str:
    return " ".join(split_words(text))


def _records(data_cfg: ConfigDict, task: str, split: str, limit: int) -> list[schema.Document]:
    name = data_cfg.datasets[task]
    source = read_only_builder.builder_from_files(name, data_dir=data_cfg.data_dir)
    source = source.as_data_source(split)
    return [schema.decode_record(source[i]) for i in range(min(limit, len(source)))]


def _image(doc: schema.Document) -> np.ndarray:
    (segment,) = [s for s in doc.segments if s.kind == schema.KIND_IMAGE]
    return segment.image


class _Asker:
    """Greedy answers to (image, prompt text) pairs, `batch` prompts per generate call."""

    def __init__(self, model, tokenizer: QwenTokenizer, opts: dict, batch: int):
        self.model, self.tokenizer, self.opts, self.batch = model, tokenizer, opts, batch
        self.stop = [tokenizer.token_id("<|im_end|>")]
        self.pad = tokenizer.token_id("<|endoftext|>")

    def __call__(self, pairs: list[tuple[np.ndarray, str]], max_new_tokens: int) -> list[str]:
        out = []
        for start in range(0, len(pairs), self.batch):
            chunk = pairs[start : start + self.batch]
            real = len(chunk)
            chunk = chunk + [chunk[-1]] * (self.batch - real)  # one compiled batch size
            pixels, grid = preprocess_images([img for img, _ in chunk], **self.opts)
            rows = []
            for (_, text), g in zip(chunk, grid):
                content = [{"type": "image"}] + ([{"type": "text", "text": text}] if text else [])
                rows.append(
                    self.tokenizer.encode_chat(
                        [{"role": "user", "content": content}],
                        g[None],
                        merge_size=self.opts["merge_size"],
                    )
                )
            length = max(map(len, rows))
            ids = np.full((len(rows), length), self.pad, np.int32)
            mask = np.zeros((len(rows), length), bool)
            for i, r in enumerate(rows):
                ids[i, : len(r)], mask[i, : len(r)] = r, True
            gen = generate(
                self.model,
                ids,
                mask,
                pixel_values=pixels,
                image_grid_thw=grid,
                max_new_tokens=max_new_tokens,
                stop_tokens=self.stop,
                pad_token_id=self.pad,
            )
            for i in range(real):
                tokens = gen.tokens[i, : gen.lengths[i]]
                out.append(self.tokenizer.decode(tokens, skip_special_tokens=True))
        return out


def vqa_scores(
    ask: _Asker, docs: list[schema.Document], max_tokens: int
) -> tuple[dict[str, float], list]:
    pairs, truth = [], []
    for doc in docs:
        image = _image(doc)
        scene = json.loads(doc.scene)
        objects = len(scene["images"][0]["objects"])
        for qa in scene["qa"]:
            pairs.append((image, qa["question"]))
            truth.append((qa["type"], normalize(qa["answer"]), objects))
    answers = ask(pairs, max_new_tokens=max_tokens)
    right = {t: [] for t in QUESTION_TYPES}
    by_objects = {n: [] for n in range(1, MAX_OBJECTS + 1)}
    for (qtype, want, objects), got in zip(truth, answers):
        right[qtype].append(normalize(got) == want)
        by_objects[objects].append(right[qtype][-1])
    out = {f"vqa_accuracy_{t}": float(np.mean(r)) if r else float("nan") for t, r in right.items()}
    # Per scene size: single-object scenes need no binding of the question to its object.
    out |= {
        f"vqa_accuracy_objects_{n}": float(np.mean(r)) if r else float("nan")
        for n, r in by_objects.items()
    }
    everything = [x for r in right.values() for x in r]
    out["vqa_accuracy"] = float(np.mean(everything)) if everything else float("nan")
    out["vqa_questions"] = float(len(pairs))
    examples = [
        {"question": q, "answer": a, "truth": t[1], "objects": t[2]}
        for (_, q), a, t in list(zip(pairs, answers, truth))[:8]
    ]
    return out, examples


def caption_scores(
    ask: _Asker, docs: list[schema.Document], prompt: str, max_tokens: int
) -> tuple[dict[str, float], list]:
    answers = ask([(_image(doc), prompt) for doc in docs], max_new_tokens=max_tokens)
    hits, examples = [], []
    for doc, got in zip(docs, answers):
        scene = json.loads(doc.scene)
        true = {normalize(c) for c in scene.get("captions", [])}
        hits.append(normalize(got) in true)
        if len(examples) < 8:
            examples.append({"caption": got, "true": sorted(true)[:3]})
    match = float(np.mean(hits)) if hits else float("nan")
    return {"caption_exact_match": match, "caption_records": float(len(docs))}, examples


def export_hf(model: Qwen25VL, folder: Path, tokenizer_dir: Path, opts: dict) -> None:
    """The model as a Hugging Face folder with the word tokenizer and the toy image sizes."""
    from pretzel_jax.convert.hf_qwen25vl import save  # app-level: weights out

    save(model, folder, overwrite=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_dir / name, folder / name)
    pre = {
        "min_pixels": opts["min_pixels"],
        "max_pixels": opts["max_pixels"],
        "patch_size": opts["patch_size"],
        "temporal_patch_size": opts["temporal_patch_size"],
        "merge_size": opts["merge_size"],
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "image_processor_type": "Qwen2VLImageProcessor",
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    eos = model.cfg.eos_token_id
    gen = {"eos_token_id": eos, "pad_token_id": 0, "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def report(
    model: Qwen25VL, config, data: Callable[[str], Iterator[dict]], key, run_dir: str
) -> dict[str, float]:
    del data, key  # generation reads whole records (their ground truth), greedily
    rc, data_cfg = config.model.report, config.data
    tok_dir = tokenizer_folder(data_cfg)
    tokenizer = QwenTokenizer.from_folder(tok_dir)
    vocab = tokenizer.tokenizer.get_vocab_size()
    if vocab > model.cfg.text.vocab_size:
        raise ValueError(
            f"the tokenizer in {tok_dir} has {vocab} tokens but the model's vocab_size is "
            f"{model.cfg.text.vocab_size}; set config.model.vlm.text.vocab_size = 0 (derived)"
        )
    opts = image_options(model, data_cfg.image_size)
    ask = _Asker(model, tokenizer, opts, rc.batch_size)
    out, examples = {}, {}
    for prefix, split in SPLITS.items():
        split = split if prefix else rc.split
        vqa_docs = _records(data_cfg, "vqa", split, rc.vqa_records)
        vqa, vqa_examples = vqa_scores(ask, vqa_docs, rc.max_answer_tokens)
        captions = _records(data_cfg, "caption", split, rc.caption_records)
        cap, cap_examples = caption_scores(
            ask, captions, data_cfg.caption_prompt, rc.max_caption_tokens
        )
        out.update({prefix + k: v for k, v in (vqa | cap).items()})
        examples[split] = {"vqa": vqa_examples, "captions": cap_examples}
    if jax.process_index() == 0:
        if rc.export_hf:
            export_hf(model, Path(run_dir) / "hf", tok_dir, opts)
        with open(os.path.join(run_dir, "report.json"), "w") as f:
            json.dump({**out, "examples": examples}, f, indent=2)
    return out
