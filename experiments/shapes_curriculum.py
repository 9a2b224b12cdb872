"""The whole toy curriculum on the shapes family, one step after another, resumable at every step:

    python -m pretzel_jax.curriculum --config experiments/shapes_curriculum.py [--dry_run]

 1. data          prepare the shapes data sets (a no-op for those already built)
 2. stage0_tower  experiments/shapes_stage0_tower.py -> runs/shapes_stage0_tower (tower.safetensors)
 3. stage0_vlm    experiments/shapes_stage0_vlm.py   -> runs/shapes_stage0_vlm (hf/)
 4. fae           experiments/shapes_fae.py          -> runs/shapes_fae (fae.safetensors)
 5. stage1        experiments/shapes_stage1.py       -> runs/shapes_stage1 (pretzel.safetensors)
 6. stage2        experiments/shapes_stage2.py       -> runs/shapes_stage2 (pretzel.safetensors)
 7. stage3        experiments/shapes_stage3.py       -> runs/shapes_stage3 (pretzel.safetensors)
 8. report        runs/curriculum/summary.json, summary.md: headline numbers and wall time per step

The Pretzel stages use the FAE after its feature phase: the pixel-adapt phase
(`experiments/shapes_fae.py:adapt`) adds about half a point of judged scene accuracy on
reconstructions (README) for 8+ minutes, so the curriculum leaves it out.

Each step entry: `name`, `kind` ("prepare" | "train" | "report"), `experiment` (file[:arg], for
`python -m pretzel_jax.train --config`), `run_dir`, `done` (files or globs relative to run_dir whose
existence proves the step finished), `overrides` (`--config.` overrides of the experiment),
`datasets` and `workers` (prepare: how many data sets are built at once), `headline` (report.json
keys for the summary). `{runs}` and `{data}` in run_dir, done and overrides stand for `runs_dir` and
`data_dir`: every path an experiment hard-codes under runs/ (the stage-0 tower and VLM, the FAE
files, the previous stage's weights) is passed as an override, so
`--config.runs_dir=elsewhere` keeps the whole chain there.

`:test` is the same chain at the experiments' `:test` smoke sizes over the `_tiny` data sets; give
it a scratch folder: `--config.runs_dir=/tmp/curriculum_test`.
"""

import ml_collections

DATASETS = ("cells", "vqa", "captions", "images", "interleaved", "edits")
# Data set name -> its folder under data_dir: cells and images are views of the captions records.
FOLDERS = {"cells": "captions", "images": "captions"}
VLM_HF = "{runs}/shapes_stage0_vlm/hf"
FAE = "model.fae.encoder.path=" + VLM_HF
FAE_PSNR = ("psnr_clean", "psnr_noisy", "scene_acc_clean", "scene_acc_noisy")
T2I = ("image_bits_per_dim", "t2i_overall", "t2i_heldout_overall")
VQA = ("fae_vqa_accuracy", "native_vqa_accuracy", "fae_over_native_vqa")


def _step(
    name, kind, run_dir, done=(), experiment="", overrides=(), datasets=(), headline=(), workers=1
):
    return ml_collections.ConfigDict(
        dict(
            name=name,
            workers=workers,
            kind=kind,
            experiment=experiment,
            run_dir=run_dir,
            done=tuple(done),
            overrides=tuple(overrides),
            datasets=tuple(datasets),
            headline=tuple(headline),
        )
    )


def _train(name, experiment, folder, outputs, overrides=(), headline=()):
    return _step(
        name,
        "train",
        f"{{runs}}/{folder}",
        done=("report.json", *outputs),  # report.json is the run's last write
        experiment=f"experiments/{experiment}",
        overrides=("data.data_dir={data}", *overrides),
        headline=headline,
    )


def get_config(arg=None):
    if arg not in (None, "test"):
        raise ValueError(f"unknown size {arg!r}; use no argument or 'test'")
    test = arg == "test"
    sfx, tiny = (":test", "_tiny") if test else ("", "")
    pretzel = (
        "model.pretzel.vlm_path=" + VLM_HF,
        "model.pretzel.fae_path={runs}/shapes_fae/fae.safetensors",
        FAE,
    )
    c = ml_collections.ConfigDict()
    c.data_dir = "data_cache"
    c.runs_dir = "" if test else "runs"  # :test: a scratch folder, --config.runs_dir=DIR
    c.steps = (
        _step(
            "data",
            "prepare",
            "{data}",
            # Each data set's folder once (dict keeps the order).
            done=tuple(
                dict.fromkeys(
                    f"shapes/{FOLDERS.get(d, d)}{tiny}/[0-9]*/dataset_info.json" for d in DATASETS
                )
            ),
            datasets=tuple(f"shapes_{d}{tiny}" for d in DATASETS),
            workers=2,  # the shapes builders are single-threaded: two at once on 2 cores
        ),
        _train(
            "stage0_tower",
            f"shapes_stage0_tower.py{sfx}",
            "shapes_stage0_tower",
            ("tower.safetensors",),
            headline=("cell_accuracy_0", "token_cell_accuracy_0", "heldout_cell_accuracy_0"),
        ),
        _train(
            "stage0_vlm",
            f"shapes_stage0_vlm.py{sfx}",
            "shapes_stage0_vlm",
            ("hf/config.json", "hf/model.safetensors"),
            ("model.vision_init={runs}/shapes_stage0_tower/tower.safetensors",),
            headline=("vqa_accuracy", "heldout_vqa_accuracy", "caption_exact_match"),
        ),
        _train(
            "fae",
            f"shapes_fae.py{sfx}",
            "shapes_fae",
            ("fae.safetensors",),
            # 1200 of the experiment's 1500 feature steps (training loss 0.0324 against 0.0313
            # on 2026-12-06), 2 of the curriculum's 60 minutes.
            (FAE, *(() if test else ("train.steps=1200",))),
            headline=FAE_PSNR,
        ),
        _train(
            "stage1",
            f"shapes_stage1.py{sfx}",
            "shapes_stage1",
            ("pretzel.safetensors",),
            pretzel,
            headline=T2I,
        ),
        _train(
            "stage2",
            f"shapes_stage2.py{sfx}",
            "shapes_stage2",
            ("pretzel.safetensors",),
            (*pretzel, "model.pretzel.init_from={runs}/shapes_stage1/pretzel.safetensors"),
            headline=(*VQA, "text_logits_max_abs_diff"),
        ),
        _train(
            "stage3",
            f"shapes_stage3.py{sfx}",
            "shapes_stage3",
            ("pretzel.safetensors",),
            (*pretzel, "model.pretzel.init_from={runs}/shapes_stage2/pretzel.safetensors"),
            headline=(*T2I, *VQA, "text_argmax_agreement"),
        ),
        _step("report", "report", "{runs}/curriculum", done=()),  # always rewritten (cheap)
    )
    return c
