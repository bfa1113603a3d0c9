"""The `taskmoe` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class CliError(Exception):
    """A user error the command line reports in one line, without a traceback."""


def _model_dir(path: str) -> Path:
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise CliError(f"{path}: not a model directory (no config.json); try models/demo-moe")
    return directory


def _load(directory: Path):  # -> tuple[PreTrainedModel, PreTrainedTokenizerBase]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    return model, tokenizer


def cmd_eval(args: argparse.Namespace) -> int:
    """Per-task greedy exact-match accuracy on held-out demo examples."""
    from server.demo.evaluate import task_accuracy
    from server.demo.tasks import TASK_NAMES, generate

    tasks = tuple(args.tasks.split(",")) if args.tasks else TASK_NAMES
    unknown = sorted(set(tasks) - set(TASK_NAMES))
    if unknown:
        raise CliError(f"unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(TASK_NAMES)}")
    if args.n < 1:
        raise CliError("-n must be at least 1")
    model, tokenizer = _load(_model_dir(args.model))
    accuracy = task_accuracy(model, tokenizer, list(generate(args.n, args.seed, tasks)))
    if args.json:
        print(json.dumps({"model": args.model, "examples_per_task": args.n, "accuracy": accuracy}))
        return 0
    print(f"{'task':<12}{'accuracy':>10}")
    for task, value in accuracy.items():
        print(f"{task:<12}{100 * value:>9.1f}%")
    print(f"{'mean':<12}{100 * sum(accuracy.values()) / len(accuracy):>9.1f}%")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Greedy answers from a model directory: one prompt from the command line, or a prompt loop."""
    from server.demo.evaluate import greedy_answers

    model, tokenizer = _load(_model_dir(args.model))
    if args.prompt:
        print(greedy_answers(model, tokenizer, [" ".join(args.prompt)], max_new_tokens=args.max_tokens)[0])
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"taskmoe chat with {args.model}; try 'What is 7 + 5?' or \"Spell 'planet' backwards.\" (Ctrl-D ends)")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        if line.strip():
            print(greedy_answers(model, tokenizer, [line.strip()], max_new_tokens=args.max_tokens)[0], flush=True)


def cmd_export(args: argparse.Namespace) -> int:
    """Write the variant of a selection as a standard transformers checkpoint (for vLLM, SGLang, ...)."""
    from pattern_store.selection import Selection, SelectionError
    from server.model.checkpoint import CheckpointError
    from server.model.export import ExportError, export_variant
    from server.model.families import UnsupportedModelError
    from server.model.variant import VariantBuilder

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise CliError(f"{out} exists and is not empty; pass --force to write into it")
    try:
        selection = Selection.load(args.selection)
        builder = VariantBuilder(_model_dir(args.model), device="cpu", dtype=args.dtype)
        export_variant(builder, selection, out)
    except (SelectionError, CheckpointError, ExportError, UnsupportedModelError, ValueError) as error:
        raise CliError(str(error)) from None
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(
        f"wrote {out}: {size / 1e6:.1f} MB of weights (the full checkpoint holds "
        f"{builder.reader.total_bytes / 1e6:.1f} MB); read {builder.reader.bytes_read / 1e6:.1f} MB from {args.model}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskmoe", description="Task-specialised pruned-model inference server.")
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("eval", help="per-task accuracy of a model directory on the demo tasks")
    evaluate.add_argument("model", help="model directory, e.g. models/demo-moe")
    evaluate.add_argument("-n", type=int, default=200, help="held-out examples per task (default 200)")
    evaluate.add_argument("--tasks", help="comma-separated task names (default: all)")
    evaluate.add_argument("--seed", type=int, default=None, help="example seed (default: the held-out seed)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=cmd_eval)

    chat = commands.add_parser("chat", help="ask a model directory, once or in a loop")
    chat.add_argument("--model", default="models/demo-moe", help="model directory (default models/demo-moe)")
    chat.add_argument("--max-tokens", type=int, default=64)
    chat.add_argument("prompt", nargs="*", help="the prompt; without it, read prompts line by line")
    chat.set_defaults(func=cmd_chat)

    export = commands.add_parser("export", help="write a pruned variant as a standard transformers checkpoint")
    export.add_argument("--model", required=True, help="model directory (safetensors)")
    export.add_argument("--selection", required=True, help='selection JSON: {"kind": "moe_experts", "layers": {...}}')
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16 or float16")
    export.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "seed", 0) is None:
        from server.demo.evaluate import EVAL_SEED

        args.seed = EVAL_SEED
    try:
        return int(args.func(args))
    except CliError as error:
        print(f"taskmoe: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
