"""Using a trained ChatGLM: chat prompts and answers, loading with adapters, merging, batch generation, evaluation.

Only `chat` (the prompt and post-processing, which live in `thuglm.models.prompt`) is imported here eagerly; the
other names load their module on first use, so that importing one of them does not import the server, the evaluation
metrics and the rest.
"""

from importlib import import_module

from .chat import answer_token_ids, build_prompt, process_response

_LAZY_NAMES = {
    "ModelLoadError": "loading",
    "load_for_inference": "loading",
    "merge_adapter": "merge",
    "read_prompts": "generate",
    "generate_responses": "generate",
    "write_jsonl": "generate",
    "evaluate_perplexity": "evaluation",
    "generation_scores": "evaluation",
    "evaluate_alpaca": "evaluation",
}


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        return getattr(import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ModelLoadError",
    "answer_token_ids",
    "build_prompt",
    "evaluate_alpaca",
    "evaluate_perplexity",
    "generate_responses",
    "generation_scores",
    "load_for_inference",
    "merge_adapter",
    "process_response",
    "read_prompts",
    "write_jsonl",
]
