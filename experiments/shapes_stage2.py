"""Curriculum stage 2 at toy scale: image-to-text adapter learning. Only the visual adapter A
trains (next-token loss on shapes captioning + VQA, the images entering the VLM through the FAE
path: FAE latents -> noise at sigma_a -> the frozen shallow blocks -> A(u)); the VLM, the FAE and
the whole flow stream (stage 1's, from `runs/shapes_stage1/pretzel.safetensors`) stay frozen.
The report compares greedy VQA through the FAE path with the same frozen VLM reading the same
images through its own tower (native path), and checks that text logits of prompts without
images are the frozen VLM's.

    python -m pretzel_jax.train --config experiments/shapes_stage2.py

`:test` is a seconds-long smoke size.
"""

from pathlib import Path

from pretzel_jax.train.config import load_experiment

stage1 = load_experiment(Path(__file__).with_name("shapes_stage1.py"))


def get_config(arg: str | None = None):
    c = stage1.get_config(arg, stage=2)
    c.model.pretzel.init_from = "runs/shapes_stage1/pretzel.safetensors"
    c.data.vqa_questions = 6  # fresh questions per image each pass, each asked of it alone
    c.data.vqa_branches = True
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    # 3000 steps (0.16 s/step): the curriculum took 49 minutes on the README table's host (not
    # measured alone on a slower one); 1600 left stage 3's FAE-path VQA under 90% of native
    c.train.steps = 3000
    c.train.ckpt_every = 500
    if arg == "test":
        c.train.steps = 4
        c.train.ckpt_every = 2
        c.optim.warmup_steps = 2
    return c
