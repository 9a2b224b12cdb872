"""STARFlow2 at paper scale (spec section 6): the frozen Qwen2.5-VL-7B stream, the frozen FAE on
DINOv2-g/14 (224 px -> 16x16x32 latents, 256 visual tokens per image) and the trainable TARFlow
stream (deep block of 24 layers + 2 shallow blocks of 4 layers, width 3072, head dim 64), one
file for the three curriculum stages (`:stage1`, `:stage2`, `:stage3`; default stage 3):

    python -m pretzel_jax.train --config experiments/starflow2_7b.py:stage1
    python -m pretzel_jax.train --config experiments/starflow2_7b.py:stage2
    python -m pretzel_jax.train --config experiments/starflow2_7b.py:stage3

Before training, set (as `--config.` overrides or here):
  model.pretzel.vlm_path   a local Hugging Face folder of Qwen2.5-VL-7B-Instruct (its config.json
                           is checked against `model.vlm` at build; its tokenizer.json is read)
  model.pretzel.fae_path   the FAE's fae.safetensors (experiments/fae_dinov2g.py:adapt writes it)
  model.fae.encoder.path   the facebook/dinov2-giant folder (only its config.json is read at
                           build; without it `model.fae.encoder.random` = DINOv2-g/14's config)
  data.data_dir, data.datasets   the prepared data sets (`python -m pretzel_jax.data.formats`)
Each stage writes runs/starflow2_7b_stage<k>/ and starts from the previous stage's
pretzel.safetensors (`model.pretzel.init_from`).

Where the numbers come from ([C] STARFlow's code/configs, [2]/[SL]/[HF] spec tags, [ours] = a
guess of ours, the paper does not report it):
  VLM: Qwen2.5-VL-7B's config.json [HF]; bf16 params and compute, frozen [ours: dtype].
  FAE: experiments/fae_dinov2g.py (DINOv2-g/14 [SL], 16x16x32 [2]; its decoder sizes [ours]).
  Flow: deep 24 + 2x4 shallow layers at width 3072 [2 tut]; head dim 64, pre-LN, MLP x4 GELU,
    biases, SOS, soft clip 4, softplus scale, final norm [C STARFlow]; 3-axis RoPE on the VLM's
    M-RoPE ids with sections (t, h, w) = (8, 12, 12) [ours, after STARFlow's 8/12/12 split];
    fp32 params, bf16 matmuls, full remat [ours]. sigma_a 0.3 [C STARFlow; not reported for
    STARFlow2]; lambda (lm_weight) 1.0 [ours]; adapter 2-layer MLP 32 -> 3584 -> 3584 [ours].
  Optimiser: AdamW b1 0.9, b2 0.95, wd 1e-4, cosine to min lr 1e-6, peak lr 6.4e-5 [C STARFlow
    T2I]; grad clip 1.0 [C STARFlow-V]; warm-up 2000 steps (STARFlow: one epoch) [ours]; the
    adapter-only stage 2 at lr 1e-4 [ours]; steps per stage [ours].
  Data: 224 px images (the DINOv2-g/14 input; the FAE decodes 256 px) [2 tut: 256x256];
    4096-token packed rows, 64 rows per step (~900 text-to-image documents, near STARFlow's
    batch of 1024 images [C]) [ours]; caption dropout 0.1 in stages 1 and 3 [C]; the stage-3
    mixture is pretzel_jax.data.pipeline.STAGE_WEIGHTS[3] [ours].

Parameters (`nnx.eval_shape`, no arrays; tests/pretzel/test_starflow2_7b.py prints this table):

| part                          |     parameters | stage 1 | stage 2 | stage 3 |
|-------------------------------|----------------|---------|---------|---------|
| VLM text decoder              |  7,615,616,512 | frozen  | frozen  | frozen  |
| VLM vision tower              |    676,550,144 | frozen  | frozen  | frozen  |
| FAE encoder (DINOv2-g/14)     |  1,136,480,768 | frozen  | frozen  | frozen  |
| FAE rest (latent enc., decs.) |    355,009,920 | frozen  | frozen  | frozen  |
| deep block (24 layers)        |  2,730,181,728 | trained | frozen  | trained |
| shallow blocks (2 x 4 layers) |    906,891,456 | trained | frozen  | trained |
| adapter A                     |     12,966,912 | frozen  | trained | trained |
| W_vlm                         |     11,013,120 | frozen  | frozen  | trained |
| W_D                           |     11,013,632 | frozen  | frozen  | trained |
| total / trainable             | 13,455,724,192 | 3.637B  | 0.013B  | 3.672B  |

Against the spec: the text decoder is Qwen2.5-7B's published 7.6B (7.616B: 6.526B in the 28
layers + 2 x 0.545B token table and untied LM head), with the tower 8.29B (Qwen2.5-VL-7B's
total); DINOv2-g/14 1.14B; one flow layer 113.3M, so 32 layers = 3.625B, and stage 3 trains
3,672,066,848 (3.67B: the flow's P_v, P_t, SOS, norms and heads add 0.012B, A + W_vlm + W_D
0.035B), 2.0% above the paper's "3.6B trainable".
"""

import importlib.util
from pathlib import Path

from pretzel_jax.data.pipeline import stage_config
from pretzel_jax.models.pretzel import stage_freeze
from pretzel_jax.train.config import default_config

_spec = importlib.util.spec_from_file_location(
    "_fae_dinov2g", Path(__file__).with_name("fae_dinov2g.py")
)
fae_dinov2g = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fae_dinov2g)

VLM_PATH = "checkpoints/Qwen2.5-VL-7B-Instruct"  # a local HF folder (set it; never downloaded)
FAE_PATH = "checkpoints/fae_dinov2g/fae.safetensors"  # experiments/fae_dinov2g.py:adapt's
STAGES = {"stage1": 1, "stage2": 2, "stage3": 3}

# facebook/dinov2-giant's architecture as DinoV2Config fields (its config.json: 40 layers,
# width 1536, 24 heads, SwiGLU MLP, patch 14, 518 px position table, no registers).
DINOV2_G = dict(
    hidden_size=1536,
    num_layers=40,
    num_heads=24,
    mlp_ratio=4,
    use_swiglu_ffn=True,
    hidden_act="gelu",
    patch_size=14,
    image_size=518,
    num_register_tokens=0,
    use_mask_token=True,
    qkv_bias=True,
    layer_norm_eps=1e-6,
)


def qwen25vl_7b() -> dict:
    """config.model.vlm for Qwen2.5-VL-7B-Instruct (its config.json), bf16 and frozen."""
    bf16 = dict(param_dtype="bfloat16", compute_dtype="bfloat16")
    return dict(
        text=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            mrope_section=(16, 24, 24),
            tie_word_embeddings=False,
            remat="full",  # gradients reach the adapter through it in stages 2 and 3
            unroll_layers=False,
            **bf16,
        ),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            in_channels=3,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=112,
            fullatt_block_indexes=(7, 15, 23, 31),
            out_hidden_size=3584,
            rms_norm_eps=1e-6,
            unroll_layers=False,
            **bf16,
        ),
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        bos_token_id=151643,
        eos_token_id=151645,
    )


def get_config(arg: str | None = None):
    if arg not in (None, *STAGES):
        raise ValueError(f"unknown stage {arg!r}; use one of {sorted(STAGES)} (default stage3)")
    stage = STAGES[arg or "stage3"]
    c = default_config()
    c.run_dir = f"runs/starflow2_7b_stage{stage}"
    c.mesh.data = 1
    c.mesh.fsdp = -1  # FSDP over every device (STARFlow trains with FSDP)

    c.data = stage_config(
        stage,
        data_dir="data",
        datasets=dict(
            caption="webdataset_captions/t2i",
            vqa="llava_conversations/vqa",
            interleaved="interleaved_documents/interleaved",
            edit="edit_triplets/edits",
            text="",
        ),
        tokenizer_dir=VLM_PATH,
        batch_size=64,
        eval_batch_size=64,
        seq_len=4096,
        max_images=0,  # as many 258-token image slots as fit
        latent_grid=(16, 16),  # the FAE's 16x16 latents per image
        image_size=(224, 224),  # DINOv2-g/14's input (16 x 14 px patches)
        spatial_merge_size=2,  # Qwen's 2x2 merge: image_grid_thw = (1, 32, 32)
        num_workers=8,
    )

    c.model.kind = "pretzel"
    c.model.vlm = qwen25vl_7b()
    # The FAE's architecture; its weights (encoder included) come from model.pretzel.fae_path.
    # Build reads the encoder's config.json at encoder.path when it exists, else `random`.
    c.model.fae = fae_dinov2g.get_config().model.fae
    c.model.fae.encoder.random = dict(DINOV2_G)

    f = c.model.flow
    f.width = 3072
    f.head_dim = 64
    f.layers_per_block = (4, 4, 24)  # two 4-layer shallow blocks, the 24-layer deep block
    f.mlp_ratio = 4.0
    f.context_dim = 0  # = the VLM width, 3584 (P_t reads y_vlm)
    f.rope = "sectioned"  # 3-axis RoPE on the VLM's M-RoPE ids (t, h, w)
    f.rope_sections = (8, 12, 12)  # sums to head_dim / 2 = 32
    f.remat = "full"  # "dots" is faster where memory allows
    f.param_dtype = "float32"
    f.compute_dtype = "bfloat16"

    p = c.model.pretzel
    p.stage = stage
    p.vlm_path = VLM_PATH
    p.fae_path = FAE_PATH
    p.sigma_a = 0.3
    p.lm_weight = 1.0
    p.init_from = f"runs/starflow2_7b_stage{stage - 1}/pretzel.safetensors" if stage > 1 else ""

    o = c.optim
    o.freeze = stage_freeze(stage)
    o.lr = 1e-4 if stage == 2 else 6.4e-5
    o.min_lr = 1e-6
    o.b1 = 0.9
    o.b2 = 0.95
    o.weight_decay = 1e-4
    o.schedule = "cosine"
    o.warmup_steps = 2000
    o.grad_clip = 1.0
    c.train.steps = {1: 200_000, 2: 20_000, 3: 100_000}[stage]
    c.train.log_every = 100
    c.train.ckpt_every = 2000
    return c
