"""Curriculum stage 1 at toy scale: text-to-image pretraining of the flow stream (deep block +
shallow blocks + P_t, P_v, SOS) on the shapes captions, the stage-0 VLM and the FAE frozen (their
weights restored from their files after init: `model.pretzel.vlm_path`, `fae_path`), the
coupling (A, W_vlm, W_D) off at its zero init. Captions are dropped to the empty prompt 10% of the
time (CFG's unconditional branch). Writes `runs/shapes_stage1/pretzel.safetensors` (stage 2's
`init_from`) and `report.json` (per-image bits/dim; text-to-image judge scores per GenEval
category on fresh prompts with seen and with held-out shape-colour pairs; sample grids).

    python -m pretzel_jax.train --config experiments/shapes_stage1.py

Needs the stage-0 VLM (`runs/shapes_stage0_vlm/hf`) and the FAE after its feature phase
(`runs/shapes_fae/fae.safetensors`); `python -m pretzel_jax.curriculum` runs every step in
order. `:test` is a seconds-long smoke size (tests point its paths at tiny files).

The lr, the shallow blocks, the adapter's window and width and the reports' CFG scale were picked
by the A/Bs in the README (Results, "Pretzel curriculum, stages 1-3").
"""

from pathlib import Path

from pretzel_jax.data.pipeline import stage_config
from pretzel_jax.models.pretzel import stage_freeze
from pretzel_jax.train.config import default_config, load_config

HERE = Path(__file__).parent
VLM_RUN = "runs/shapes_stage0_vlm"
FAE_RUN = "runs/shapes_fae"


def get_config(arg: str | None = None, stage: int = 1):
    if arg not in (None, "test"):
        raise ValueError(f"unknown size {arg!r}; use no argument or 'test'")
    test = arg == "test"
    c = default_config()
    c.data = stage_config(
        stage,
        data_dir="data_cache",
        batch_size=16,
        eval_batch_size=16,
        seq_len=192,  # two image documents (66-token slots) per row
        max_images=2,
        latent_grid=(8, 8),  # the FAE's latents per 32 px image
        image_size=(32, 32),
        spatial_merge_size=2,
        # The stage-0 VLM reads a 32 px image as 4x4 merged tokens: its stream takes the 8x8
        # latents at the ids of that grid (M-RoPE ids it was trained on).
        vlm_grid_stride=2,
    )
    c.model.kind = "pretzel"
    suffix = ":test" if test else ""
    # The frozen parts' architectures: the stage-0 VLM and the FAE experiments' own.
    c.model.vlm = load_config(f"{HERE / 'shapes_stage0_vlm.py'}{suffix}").model.vlm
    # The FAE after its feature phase: the pixel-adapt phase adds ~0.5 point of judged scene
    # accuracy on reconstructions (README) for 8+ minutes of the curriculum.
    c.model.fae = load_config(f"{HERE / 'shapes_fae.py'}{suffix}").model.fae
    c.model.fae.encoder.path = f"{VLM_RUN}/hf"
    c.model.fae.encoder.if_missing = "error"
    f = c.model.flow
    f.width = 128
    f.head_dim = 32
    f.layers_per_block = (2, 2, 4)  # two 2-layer shallow blocks, the 4-layer deep block
    f.rope = "sectioned"  # 3-axis RoPE on the VLM's M-RoPE ids (t, h, w)
    f.rope_sections = (4, 6, 6)
    f.unroll_layers = True
    p = c.model.pretzel
    p.stage = stage
    p.vlm_path = f"{VLM_RUN}/hf"
    p.fae_path = f"{FAE_RUN}/fae.safetensors"
    p.sigma_a = 0.3  # the FAE's decoder was trained on latents noised at this level
    # A reads 2x2 windows of latents (the VLM's own tower merges 2x2 patches) through 512 hidden
    # units: built here, trained in stages 2 and 3.
    p.adapter_window = 2
    p.adapter_hidden = 512
    c.optim.freeze = stage_freeze(stage)
    c.optim.lr = 4e-3
    p.report.guidance = 8.0  # text-to-image in the reports of stages 1 and 3
    c.optim.warmup_steps = 100
    c.optim.min_lr = 1e-5
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0
    c.train.steps = 1500
    c.train.log_every = 50
    c.train.ckpt_every = 500
    if test:
        c.data.datasets.caption = "shapes/captions_tiny"
        c.data.datasets.vqa = "shapes/vqa_tiny"
        c.data.datasets.interleaved = "shapes/interleaved_tiny"
        c.data.datasets.edit = "shapes/edits_tiny"
        c.data.batch_size = 8  # tests run on 8 fake devices
        c.data.eval_batch_size = 8
        c.data.pack_window = 8
        f.width = 32
        f.head_dim = 16
        f.layers_per_block = (1, 1)
        f.rope_sections = (2, 3, 3)
        r = p.report
        r.t2i_per_category = 1
        r.vqa_records = 2
        r.bpd_batches = 1
        r.batch_size = 8
        r.max_answer_tokens = 2
        r.judge = False  # the judge trains for a minute when not cached
        c.train.steps = 4
        c.train.log_every = 2
        c.train.ckpt_every = 2
        c.optim.warmup_steps = 2
    return c
