"""`python -m pretzel_jax.vlm.chat` end to end on a tiny saved Qwen2.5-VL folder with the test
tokenizer: it runs, is deterministic at temperature 0, and prints what transformers' processor +
generate + decode give for the same folder, image and prompt."""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from pretzel_jax.vlm import chat
from tests.vlm.hf_tiny import save, tiny_qwen25vl
from tests.vlm.tiny_tokenizer import ImageOnlyProcessor, write_tokenizer

PIXELS = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 12)
PROMPT = "What is the cat doing?"
NEW = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_vl")
    hf = tiny_qwen25vl(seed=3)
    save(hf, folder)
    write_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({**PIXELS, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2})
    )
    image = folder.parent / "cat.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (45, 71, 3), dtype=np.uint8)).save(image)
    return hf, folder, image


def run(capsys, *argv):
    assert chat.main(list(argv)) == 0
    return capsys.readouterr().out


def test_chat_cli_matches_transformers(ckpt, capsys):
    hf, folder, image = ckpt
    argv = ["--ckpt", str(folder), "--image", str(image), "--prompt", PROMPT]
    argv += ["--max_new_tokens", str(NEW), "--temperature", "0"]
    first = run(capsys, *argv)
    assert run(capsys, *argv) == first

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    processor = ImageOnlyProcessor(
        image_processor=transformers.Qwen2VLImageProcessorPil(**PIXELS),
        tokenizer=tok,
        video_processor=None,
        chat_template=tok.chat_template,
    )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(image)], return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert first == tok.decode(new, skip_special_tokens=True) + "\n"


def test_chat_cli_sampling_and_errors(ckpt, capsys, tmp_path):
    _, folder, image = ckpt
    argv = ["--ckpt", str(folder), "--image", str(image), "--prompt", PROMPT]
    argv += ["--max_new_tokens", "6", "--temperature", "0.8", "--top_p", "0.9", "--seed", "1"]
    assert run(capsys, *argv) == run(capsys, *argv)
    assert chat.main(["--ckpt", str(tmp_path), "--prompt", "hi"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    missing = ["--ckpt", str(folder), "--image", str(tmp_path / "nope.png"), "--prompt", "hi"]
    assert chat.main(missing) == 2
    assert "cannot read image" in capsys.readouterr().err
