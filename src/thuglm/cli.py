"""The `thuglm` command.

    thuglm train CONFIG.yaml [key=value ...]   fine-tune (LoRA, full or freeze) from a folder of CSV/JSON files
    thuglm train --nproc N CONFIG.yaml ...     the same on N GPUs (DDP through torchrun)
    thuglm tiny OUT_DIR            build the tiny demo ChatGLM (tokenizer trained on the bundled corpus)
    thuglm chat MODEL_DIR [--adapter DIR]   chat in the terminal (/clear forgets the history, /exit quits)
    thuglm merge --adapter DIR --out DIR [--base DIR]   fold a LoRA adapter into its base, save a standalone model
    thuglm generate MODEL_DIR --input FILE --output FILE.jsonl   answer a file of prompts in batches
    thuglm eval MODEL_DIR --data FILES... [--format text|alpaca]   perplexity, or BLEU-4 / ROUGE; prints JSON
    thuglm predict MODEL_DIR FILE [--output OUT.jsonl]   labels (seq_cls) or BIO tags (token_cls) for every row
    thuglm serve MODEL_DIR [--host 127.0.0.1] [--port 8000]   a chat page and an OpenAI API over HTTP
    thuglm demo [--out DIR]        pre-train the tiny model on the bundled CSV corpus, LoRA-tune it on alpaca, chat
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

from .data.samples import DEFAULT_MAX_SEQ_LEN
from .inference.loading import load_for_inference, row_length, warn_past_context

DTYPE_CHOICES = ["auto", "fp32", "bf16", "fp16"]


def _fit_history(model, tokenizer, query, history, max_new_tokens, system=None):
    """Forget the oldest rounds until the prompt and the answer fit the model's context."""
    from .inference import build_prompt

    limit = model.config.max_sequence_length - max_new_tokens
    while history and len(tokenizer(build_prompt(query, history, system))["input_ids"]) > limit:
        history = history[1:]
    return history


def _chat_turn(model, tokenizer, query, history, args, out=None):
    """Stream one answer to `out` (default: the current sys.stdout); return the history with this round added."""
    out = out or sys.stdout
    system = getattr(args, "system", None)  # before the first query, as training lays it out (build_prompt)
    history = _fit_history(model, tokenizer, query, history, args.max_new_tokens, system)
    shown = ""
    for response, _ in model.stream_chat(
        tokenizer,
        query,
        history,
        system=system,
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


def _load_model(args):
    """MODEL (and --adapter) of a command that takes them; a missing base is named in this command's own terms."""
    return load_for_inference(
        args.model, adapter=args.adapter, dtype=args.dtype,
        how_to_name_base=f"thuglm {args.command} BASE_DIR --adapter {args.model}", quantize=args.quantize,
    )


def cmd_train(args) -> int:
    from .training.recipe import train_from_cli

    if args.nproc > 1:
        from .training.distributed import launch

        return launch(args.nproc, args.config, args.overrides)
    return train_from_cli(args.config, args.overrides)


def cmd_tiny(args) -> int:
    from .models.tiny import build_tiny_chatglm

    out = build_tiny_chatglm(args.out_dir, seed=args.seed)
    print(f"tiny ChatGLM written to {out}")
    return 0


def cmd_chat(args) -> int:
    tokenizer, model = _load_model(args)
    warn_past_context(model, f"--max-new-tokens {args.max_new_tokens}", args.max_new_tokens)
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


def cmd_merge(args) -> int:
    from .inference.merge import merge_adapter
    from .inference.quantized import trained_base_bits

    out = merge_adapter(
        args.base, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite,
        how_to_overwrite="--overwrite", how_to_name_base="--base BASE_DIR",
    )
    print(f"merged model written to {out}")
    bits = trained_base_bits(args.adapter)
    if bits:  # QLoRA: the adapter learnt on a 4-/8-bit copy, and is folded into the unquantized weights
        print(f"the adapter was trained on a {bits}-bit base (QLoRA) and is merged into the {args.dtype} base it names, "
              f"as QLoRA intends; load the merged model with --quantize {bits} to run it in {bits} bits again")
    return 0


def cmd_generate(args) -> int:
    from .data.loading import DataSettingNames, data_settings_named
    from .inference.generate import generate_responses, read_prompts, read_prompts_as, write_jsonl
    from .training.config import run_data_spec

    # The input is read as the run read its data (its thuglm_train.yaml), with data.KEY=value overrides on top.
    spec = run_data_spec(args.adapter or args.model, args.input, args.overrides)
    with data_settings_named(DataSettingNames(files=None, unread_columns="left out")):  # one --input file
        if spec is None and Path(args.input).suffix in (".json", ".jsonl"):  # a model without a run's settings
            from .data.sources import guess_dialogue_spec

            spec = guess_dialogue_spec(args.input)  # dialogue rows; else prompt or alpaca rows, as before
        rows = read_prompts(args.input) if spec is None else read_prompts_as(spec, args.input)
    tokenizer, model = _load_model(args)
    warn_past_context(model, f"--max-new-tokens {args.max_new_tokens}", args.max_new_tokens)
    responses = generate_responses(
        model,
        tokenizer,
        [row["prompt"] for row in rows],
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        top_p=args.top_p,
        temperature=args.temperature,
    )
    rows = [{"prompt": row["prompt"], "response": response, **row} for row, response in zip(rows, responses)]
    print(f"{len(rows)} answers written to {write_jsonl(rows, args.output)}")
    return 0


def cmd_eval(args) -> int:
    from .data.loading import DataSettingNames, data_settings_named
    from .inference.evaluation import evaluate_alpaca, evaluate_perplexity
    from .training.config import run_data_spec

    # The files are read as the run read its data (its thuglm_train.yaml), with data.KEY=value overrides on top.
    given = [f"data.format={args.format}"] if args.format else []
    given += [f"data.text_column={args.text_column}"] if args.text_column else []
    spec = run_data_spec(args.adapter or args.model, args.data, [*given, *args.overrides])
    tokenizer, model = _load_model(args)
    # Data messages name eval's flags where it has one; the encoding and bad rows are data.KEY=value overrides.
    with data_settings_named(DataSettingNames(files="--data", text_column="--text-column NAME",
                                               unread_columns="left out")):
        if spec is None and args.format in (None, "text") or spec is not None and spec.format == "text":
            metrics = evaluate_perplexity(
                model, tokenizer, args.data, text_column=args.text_column,
                max_seq_len=row_length(args.max_seq_len, model),
                batch_size=args.batch_size, spec=spec,
            )
        else:
            metrics = evaluate_alpaca(
                model, tokenizer, args.data, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                spec=spec,
            )
    report = json.dumps(metrics, ensure_ascii=False)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(report + "\n", encoding="utf-8")
    print(report)
    return 0


def cmd_predict(args) -> int:
    from .data.loading import DataSettingNames, data_settings_named
    from .inference.predict import predict_file

    # Data messages name predict's flags: its one FILE is not a list to remove a file from, and it has no flag
    # for the encoding or bad rows, so those are not offered.
    with data_settings_named(
        DataSettingNames(files=None, encoding=None, on_bad_row=None, text_column="--text-column NAME",
                         unread_columns="left out")
    ):
        predict_file(
            args.model, args.file, args.output, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
            text_column=args.text_column, tokens_column=args.tokens_column, dtype=args.dtype, quantize=args.quantize,
        )
    return 0


def cmd_serve(args) -> int:
    import logging

    from .inference.serve import ChatService, ServeError, make_server, resolve_api_key

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    tokenizer, model = _load_model(args)
    if args.max_seq_len is not None:
        warn_past_context(model, f"--max-seq-len {args.max_seq_len}", args.max_seq_len)
    if args.cuda_graphs and model.device.type != "cuda":
        raise ServeError(f"--cuda-graphs captures the decode step on a CUDA device, and the model is on {model.device}: "
                         "drop the flag (or serve on a machine with a GPU)")
    service = ChatService(model, tokenizer, max_new_tokens=args.max_new_tokens, slots=args.max_batch,
                          max_seq_len=args.max_seq_len, max_queued=args.max_queued,
                          model_name=args.model_name or Path(args.model).name, static_decode=args.cuda_graphs)
    server = make_server(service, args.host, args.port, api_key=resolve_api_key(args.api_key),
                         drain_seconds=args.drain_seconds)
    print(f"serving {args.model} on http://{args.host}:{args.port}/ (the chat page; API: /v1/chat/completions, "
          "/v1/models, and POST / for the official api.py protocol); Ctrl-C or SIGTERM stops")
    server.run()  # uvicorn handles SIGINT and SIGTERM: stops accepting, drains, then cancels
    return 0


def cmd_demo(args) -> int:
    import logging

    from .training.demo import run_demo

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_demo(args.out, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, top_p=args.top_p,
             temperature=args.temperature)
    return 0


class _DefaultsShownFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, so `--help` answers "what if I leave it out?".

    Unlike argparse.ArgumentDefaultsHelpFormatter it stays quiet where there is nothing to say (a flag's False, an
    option without a value) and where the help already explains the default in words.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "(default" in help_text:
            return help_text
        return f"{help_text} (default: %(default)s)"


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a model folder (official layout or saved by thuglm), or a LoRA run's output_dir")
    parser.add_argument("--adapter", help="a peft adapter folder to apply on top of MODEL")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bf16 on a GPU that has it, else fp32")
    _add_quantize_arg(parser)


def _add_quantize_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", type=int, choices=[4, 8], metavar="{4,8}",
                        help="load the model's linear layers in 4 bits (NF4) or 8 bits (LLM.int8) through bitsandbytes, "
                             'computing in --dtype (pip install "thuglm[quant]")')


def _add_generation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=512, help="answer tokens at most")
    parser.add_argument("--top-p", type=float, default=0.7,
                        help="sample among the likeliest tokens whose probabilities add up to P (with sampling)")
    parser.add_argument("--temperature", type=float, default=0.95,
                        help="below 1 sharpens the choice of the next token, above 1 flattens it (with sampling)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thuglm", description="Fine-tune and use ChatGLM-6B.", formatter_class=_DefaultsShownFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its message")
    commands = parser.add_subparsers(
        dest="command", required=True,
        parser_class=partial(argparse.ArgumentParser, formatter_class=_DefaultsShownFormatter),
    )

    train = commands.add_parser("train", help="fine-tune from a YAML config (LoRA, full or freeze)")
    train.add_argument("config", help="a YAML file (see configs/)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. data.text_column=sentence")
    train.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="train in N processes (one a GPU; gloo on CPU) through torchrun; batch_size is per process")
    train.set_defaults(func=cmd_train)

    tiny = commands.add_parser("tiny", help="build the tiny demo ChatGLM")
    tiny.add_argument("out_dir", help="the folder to write the model and its tokenizer to")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.set_defaults(func=cmd_tiny)

    chat = commands.add_parser("chat", help="chat with a model in the terminal")
    _add_model_args(chat)
    _add_generation_args(chat)
    chat.add_argument("--system", help="a system text for the whole conversation, put before the first query as "
                      "training puts a data row's system text")
    chat.set_defaults(func=cmd_chat)

    merge = commands.add_parser("merge", help="fold a LoRA adapter into its base model and save a standalone model")
    merge.add_argument("--base", help="the base model folder (default: the one recorded in the adapter's config)")
    merge.add_argument("--adapter", required=True, help="the LoRA adapter folder (a LoRA run's output_dir)")
    merge.add_argument("--out", required=True, help="the folder to write the merged model to")
    merge.add_argument("--dtype", choices=DTYPE_CHOICES[1:], default="fp32", help="dtype of the saved weights")
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it is not empty")
    merge.set_defaults(func=cmd_merge)

    generate = commands.add_parser("generate", help="answer a file of prompts in batches, into a JSONL file")
    _add_model_args(generate)
    generate.add_argument("--input", required=True, help="prompts: .txt (one a line), .json or .jsonl rows with "
                          "`prompt`, or alpaca rows (instruction / input / history; `output` kept as `reference`)")
    generate.add_argument("--output", required=True, help="the .jsonl file to write (prompt, response, reference)")
    generate.add_argument("--batch-size", type=int, default=8, help="prompts answered together")
    generate.add_argument("--max-new-tokens", type=int, default=256, help="answer tokens at most")
    generate.add_argument("--sample", action="store_true", help="sample (top-p) instead of greedy decoding")
    generate.add_argument("--top-p", type=float, default=0.7, help="with --sample")
    generate.add_argument("--temperature", type=float, default=0.95, help="with --sample")
    generate.add_argument("overrides", nargs="*", metavar="data.KEY=value",
                          help="read --input with these data settings instead of the run's own (its thuglm_train.yaml):"
                          " the keys of `thuglm train`, e.g. data.format=sharegpt data.columns.prompt=content")
    generate.set_defaults(func=cmd_generate)

    evaluate = commands.add_parser("eval", help="perplexity on text, or BLEU-4 / ROUGE on alpaca data; prints JSON")
    _add_model_args(evaluate)
    evaluate.add_argument("--data", nargs="+", required=True, help="data files or glob patterns (CSV / JSON / JSONL)")
    evaluate.add_argument("--format", choices=["text", "alpaca", "sharegpt"], default=None,
                          help="text: perplexity of a text column; alpaca / sharegpt: answer each row's question, "
                          "score against its answer (default: the run's data.format, else text)")
    evaluate.add_argument("--text-column", help="with --format text (default: guessed from the columns)")
    evaluate.add_argument("--max-seq-len", type=int, default=None, help="with --format text: tokens a window (default: "
                          f"{DEFAULT_MAX_SEQ_LEN}, at most the model's max_sequence_length)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="texts or instructions a batch")
    evaluate.add_argument("--max-new-tokens", type=int, default=256, help="with --format alpaca: answer tokens at most")
    evaluate.add_argument("--output", help="also write the metrics to this JSON file")
    evaluate.add_argument("overrides", nargs="*", metavar="data.KEY=value",
                          help="read --data with these data settings instead of the run's own (its thuglm_train.yaml)")
    evaluate.set_defaults(func=cmd_eval)

    predict = commands.add_parser("predict", help="labels or BIO tags from a classifier (task seq_cls / token_cls)")
    predict.add_argument("model", help="the output_dir of `thuglm train` with task seq_cls or token_cls (LoRA or full)")
    predict.add_argument("file", help="a data file (CSV / JSON / JSONL / parquet / TXT) with the texts or tokens")
    predict.add_argument("--output", help="the .jsonl file to write (default: FILE's name + .predictions.jsonl)")
    predict.add_argument("--batch-size", type=int, default=16, help="rows a batch")
    predict.add_argument("--max-seq-len", type=int, default=None, help="pieces a row; longer texts are cut at the end "
                         f"(default: {DEFAULT_MAX_SEQ_LEN}, at most the model's max_sequence_length)")
    predict.add_argument("--text-column", help="seq_cls: the text (default: guessed); token_cls: a text whose "
                         "characters are the tokens, when there is no tokens column")
    predict.add_argument("--tokens-column", help="token_cls: the list of tokens (default: tokens)")
    predict.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bf16 on a GPU that has it, else fp32")
    _add_quantize_arg(predict)
    predict.set_defaults(func=cmd_predict)

    serve = commands.add_parser("serve", help="a chat page and an OpenAI-compatible API (and the official api.py "
                                "protocol) over HTTP, many users at once, on 127.0.0.1 unless --host says otherwise")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every network; "
                       "use --api-key with it)")
    serve.add_argument("--port", type=int, default=8000, help="the TCP port to listen on")
    serve.add_argument("--api-key", help="require `Authorization: Bearer KEY` on the API (default: $THUGLM_API_KEY; "
                       "neither: no authentication)")
    serve.add_argument("--max-new-tokens", type=int, default=512, help="answer tokens when a request names none")
    serve.add_argument("--max-batch", type=int, default=16, help="requests decoded together (KV-cache slots)")
    serve.add_argument("--max-seq-len", type=int, default=None, help="prompt + answer tokens a slot holds (default: "
                       "the model's max_sequence_length, 2048 for ChatGLM-6B)")
    serve.add_argument("--max-queued", type=int, default=64, help="requests waiting for a slot before 429")
    serve.add_argument("--drain-seconds", type=float, default=30.0, help="on SIGTERM, how long in-flight requests may "
                       "finish before they are cancelled")
    serve.add_argument("--model-name", help="the model id /v1/models lists (default: the model folder's name)")
    serve.add_argument("--cuda-graphs", action="store_true", help="decode every slot over the whole --max-seq-len in "
                       "fixed shapes, captured once as a CUDA graph: far fewer kernel launches a token (GPU only)")
    serve.set_defaults(func=cmd_serve)

    demo = commands.add_parser("demo", help="pre-train the tiny model, LoRA-tune it and chat with it (CPU, minutes)")
    demo.add_argument("--out", default="outputs/demo", help="the folder for the pre-trained model and the adapter")
    _add_generation_args(demo)
    demo.set_defaults(func=cmd_demo, max_new_tokens=48)
    return parser


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; `generate` and `eval` take `data.KEY=value` overrides anywhere after MODEL (argparse alone
    would refuse those that follow an option)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "overrides", None) is not None and args.command in ("generate", "eval") \
            and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def quiet_optional_kernel_notice() -> None:
    """Drop bitsandbytes' notice that an optional CPU kernel for 4-bit matmuls (the `kernels` package) is missing.

    bitsandbytes logs it when imported on a CPU with AVX512-BF16, and peft imports bitsandbytes in every LoRA run,
    so every command would open with it; 4-bit on a CPU runs without that kernel (its own fallback)."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage())


def main(argv: list[str] | None = None) -> int:
    from .errors import INTERRUPTED_STATUS, ThuglmError

    quiet_optional_kernel_notice()
    args = parse_arguments(argv)
    try:
        return args.func(args)
    except ThuglmError as error:  # one line, no traceback: the message says what to fix
        if args.debug:
            raise
        print(f"thuglm: {error}", file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt:  # Ctrl-C outside a training run (loading, chat, a data pass): no traceback either
        if args.debug:
            raise
        print("\nthuglm: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS


if __name__ == "__main__":
    sys.exit(main())
