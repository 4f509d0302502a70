"""`thuglm demo`: the whole story on the tiny model and the bundled data, in a couple of minutes on a CPU.

1. continued pre-training (full fine-tuning) on the bundled folder of Chinese CSV files;
2. LoRA instruction tuning of that model on the bundled alpaca data;
3. the falling losses, and a chat answer from the result.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .config import load_config
from .recipe import train

DEMO_QUESTIONS = ["春天适合做什么？", "请用一句话介绍长城。"]
AGAIN = ["overwrite_output_dir=true"]  # the demo's outputs are scratch: running it again replaces them


def resource_path(*parts: str) -> Path:
    return Path(str(resources.files("thuglm").joinpath("resources", *parts)))


def loss_story(log_history: list[dict]) -> str:
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    evals = [entry["eval_loss"] for entry in log_history if "eval_loss" in entry]
    text = f"train loss {losses[0]:.2f} -> {losses[-1]:.2f}" if losses else "no train loss logged"
    if evals:
        text += f", eval loss {evals[0]:.2f} -> {evals[-1]:.2f}"
    return text


def run_demo(out_dir: str | Path, max_new_tokens: int = 48, print_fn=print, **generation) -> dict[str, dict]:
    """Train both stages into `out_dir` and chat; `generation` goes to `model.chat` (do_sample, top_p, ...)."""
    import json

    out_dir = Path(out_dir)
    stages = {
        "pretrain": load_config(
            resource_path("configs", "demo_pretrain.yaml"),
            [f"data.files={resource_path('corpus')}", f"output_dir={out_dir / 'pretrain'}", *AGAIN],
        ),
        "lora": load_config(
            resource_path("configs", "demo_lora.yaml"),
            [f"model={out_dir / 'pretrain'}", f"data.files={resource_path('alpaca')}", f"output_dir={out_dir / 'lora'}",
             *AGAIN],
        ),
    }
    results = {}
    for name, config in stages.items():
        print_fn(f"\n=== {name}: {config.method} on {config.data.files[0]} -> {config.output_dir}")
        results[name] = train(config)
        state = json.loads((Path(config.output_dir) / "trainer_state.json").read_text(encoding="utf-8"))
        print_fn(f"=== {name}: {loss_story(state['log_history'])}"
                 f" (curve in {Path(config.output_dir) / 'loss.png'})")

    import torch

    from ..inference.loading import load_for_inference

    tokenizer, model = load_for_inference(out_dir / "lora")
    print_fn(f"\n=== chat with {out_dir / 'lora'} (a 2-layer, 64-wide model trained for a minute: expect noise)")
    torch.manual_seed(0)  # the official chat samples (top_p 0.7, temperature 0.95); seeded, the demo repeats itself
    for question in DEMO_QUESTIONS:
        answer, _ = model.chat(tokenizer, question, max_new_tokens=max_new_tokens, **generation)
        print_fn(f"用户：{question}\nChatGLM：{answer}")
    return results
