"""The `thuglm` command.

    thuglm tiny OUT_DIR            build the tiny demo ChatGLM (tokenizer trained on the bundled corpus)
    thuglm chat MODEL_DIR          chat in the terminal (/clear forgets the history, /exit quits)
    thuglm demo [--out DIR]        build the tiny model and show a short chat with it
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_QUESTIONS = ["你好，请介绍一下你自己。", "春天适合做什么？"]


def _load(model_dir: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import thuglm  # noqa: F401  (registers ChatGLM with the Auto classes)

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise SystemExit(f"thuglm: {path} is not a model folder (no config.json). Build one with `thuglm tiny {path}`.")
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    return tokenizer, model.eval()


def _fit_history(model, tokenizer, query, history, max_new_tokens):
    """Forget the oldest rounds until the prompt and the answer fit the model's context."""
    from .inference import build_prompt

    limit = model.config.max_sequence_length - max_new_tokens
    while history and len(tokenizer(build_prompt(query, history))["input_ids"]) > limit:
        history = history[1:]
    return history


def _chat_turn(model, tokenizer, query, history, args, out=sys.stdout):
    """Stream one answer to `out`; return the history with this round added."""
    history = _fit_history(model, tokenizer, query, history, args.max_new_tokens)
    shown = ""
    for response, _ in model.stream_chat(
        tokenizer,
        query,
        history,
        max_length=None,
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy,
        top_p=args.top_p,
        temperature=args.temperature,
    ):
        # Post-processing may rewrite earlier characters (half-width to full-width punctuation next to hanzi);
        # then the answer is shown again on a fresh line rather than garbled.
        out.write(response[len(shown):] if response.startswith(shown) else "\n" + response)
        out.flush()
        shown = response
    out.write("\n")
    return history + [(query, shown)]


def cmd_tiny(args) -> int:
    from .models.tiny import build_tiny_chatglm

    out = build_tiny_chatglm(args.out_dir, seed=args.seed)
    print(f"tiny ChatGLM written to {out}")
    return 0


def cmd_chat(args) -> int:
    tokenizer, model = _load(args.model, args.dtype)
    history: list[tuple[str, str]] = []
    print("thuglm chat — /clear forgets the conversation, /exit quits")
    while True:
        try:
            query = input("\n用户：").strip()
        except EOFError:
            return 0
        if query in ("/exit", "/quit"):
            return 0
        if query == "/clear":
            history = []
            print("(history cleared)")
            continue
        if not query:
            continue
        print("ChatGLM：", end="")
        history = _chat_turn(model, tokenizer, query, history, args)


def cmd_demo(args) -> int:
    from .models.tiny import build_tiny_chatglm

    out = build_tiny_chatglm(args.out, seed=0)
    print(f"built a tiny random ChatGLM in {out} (its answers are noise until it is trained)")
    tokenizer, model = _load(str(out), "fp32")
    history: list[tuple[str, str]] = []
    for query in DEMO_QUESTIONS:
        print(f"\n用户：{query}\nChatGLM：", end="")
        history = _chat_turn(model, tokenizer, query, history, args)
    return 0


def _add_generation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=512, help="answer tokens at most")
    parser.add_argument("--top-p", type=float, default=0.7)
    parser.add_argument("--temperature", type=float, default=0.95)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thuglm", description="Fine-tune and use ChatGLM-6B.")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny", help="build the tiny demo ChatGLM")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_tiny)

    chat = commands.add_parser("chat", help="chat with a model in the terminal")
    chat.add_argument("model", help="a model folder (official layout or saved by thuglm)")
    chat.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    _add_generation_args(chat)
    chat.set_defaults(func=cmd_chat)

    demo = commands.add_parser("demo", help="build the tiny model and chat with it")
    demo.add_argument("--out", default="outputs/tiny-chatglm")
    _add_generation_args(demo)
    demo.set_defaults(func=cmd_demo, max_new_tokens=48)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
