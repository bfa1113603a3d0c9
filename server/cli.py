"""The `taskmoe` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pattern_store.recipes import (  # names only, no torch
    BUDGETS,
    DEFAULT_KEEP,
    DEFAULT_MOE_METHOD,
    DEFAULT_RANK,
    DEFAULT_TARGET,
    KEEP_AUTO,
    MOE_METHODS,
    REFINEMENTS,
    SUBSTITUTES,
    suggestion_refinement,
)
from server.keep_search import HELD_OUT_EVERY, held_out_needed


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
    from demo.evaluate import task_accuracy
    from demo.tasks import TASK_NAMES, generate

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
    from demo.evaluate import greedy_answers

    model, tokenizer = _load(_model_dir(args.model))
    if args.prompt:
        print(greedy_answers(model, tokenizer, [" ".join(args.prompt)], max_new_tokens=args.max_tokens)[0])
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"taskmoe chat with {args.model}; try 'What is 7 + 5?' or \"Spell 'tanumi' backwards.\" (Ctrl-D ends)")
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
    if out.exists() and not out.is_dir():
        raise CliError(f"{out} exists and is not a directory")
    if out.resolve() == Path(args.model).resolve():
        raise CliError("--out is the model directory itself; export into a new directory")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise CliError(f"{out} exists and is not empty; pass --force to write into it")
    if bool(args.selection) == bool(args.pattern):
        raise CliError("give either --selection FILE or --pattern NAME (with --store DIR)")
    try:
        if args.pattern:
            if not args.store:
                raise CliError("--pattern needs --store DIR")
            selection = _open_store(args.store).get(args.pattern).selection
        else:
            selection = Selection.load(args.selection)
        builder = VariantBuilder(_model_dir(args.model), device="cpu", dtype=args.dtype)
        export_variant(builder, selection, out, keep_quantization=args.dtype == "auto")
    except KeyError as error:
        raise CliError(str(error.args[0])) from None
    except (SelectionError, CheckpointError, ExportError, UnsupportedModelError, ValueError) as error:
        raise CliError(str(error)) from None
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(
        f"wrote {out}: {size / 1e6:.1f} MB of weights (the full checkpoint holds "
        f"{builder.reader.total_bytes / 1e6:.1f} MB); read {builder.reader.bytes_read / 1e6:.1f} MB from {args.model}"
    )
    return 0


def _open_store(path: str, create: bool = False):
    from pattern_store.pattern import PatternError
    from pattern_store.store import PatternStore

    try:
        return PatternStore(path, create=create)
    except PatternError as error:
        raise CliError(str(error)) from None


class StageBars:
    """One tqdm bar per stage of making a pattern (statistics, refinements), opened as each stage begins."""

    def __init__(self, name: str, disable: bool) -> None:
        self.name, self.disable = name, disable
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            unit = "layer" if total is not None else "pass"
            self.bar = tqdm(total=total, desc=f"{self.name}: {stage}", unit=unit, disable=self.disable)
            self.stage = stage
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _keep_value(text: str) -> float | str:
    """`--keep`: a share of the experts, or `auto`."""
    if text == KEEP_AUTO:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share of the experts such as 0.5, or {KEEP_AUTO}") from None


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate a task pattern from prompts and store it."""
    from pattern_store.embedder import Embedder
    from pattern_store.pattern import validate_name
    from server.model.variant import VariantBuilder
    from server.patterns import PatternRecipe, load_tokenizer, make_pattern, read_calibration, read_prompts

    bars = StageBars(args.name, args.quiet)
    try:
        validate_name(args.name)
        texts = read_calibration(args.prompts)
        examples = read_prompts(args.examples) if args.examples else [text.prompt for text in texts]
        store = _open_store(args.store, create=True)
        if args.name in store and not args.replace:
            raise CliError(f"pattern {args.name!r} exists in {args.store}; pass --replace to overwrite it")
        builder = VariantBuilder(_model_dir(args.model), device="cpu", dtype="float32")
        recipe = PatternRecipe.for_model(
            builder.family.kind == "moe",
            method=args.method,
            keep=args.keep,
            keep_experts=args.keep_experts,
            threshold=args.threshold,
            sparsity=args.sparsity,
            seed=args.seed,
            budget=args.budget,
            refine=args.refine,
            target=args.target,
            substitute=args.substitute,
            rank=args.substitute_rank,
        )
        tokenizer = load_tokenizer(args.model)
        embedder = Embedder(args.embedder) if args.embedder else Embedder()  # fail before the long part
        pattern, stats = make_pattern(args.name, builder, tokenizer, texts, recipe, examples, embedder, progress=bars)
        store.add(pattern, replace=args.replace)
    except (ValueError, OSError) as error:  # bad prompts, names, selections, checkpoints, unsupported models
        raise CliError(str(error)) from None
    finally:
        bars.close()
    kept = pattern.selection.layers
    sizes = sorted({len(v) for v in kept.values()})
    refined = pattern.parameters.get("refine", "none")
    searched = pattern.parameters.get("keep_search")
    if searched:
        print(
            f"keep {KEEP_AUTO}: {searched['experts']} of {searched['of']} experts per layer; their answers matched the "
            f"full model's on {searched['matched']} of {searched['held_out']} held-out prompts, an estimated "
            f"{100 * searched['estimate']:.1f}% (target {100 * searched['target']:.1f}%; "
            f"shares tried {searched['tried']})"
        )
    print(
        f"stored pattern {args.name!r} in {args.store}: {pattern.kind}, method {recipe.method}"
        + (f", refined ({refined})" if refined != "none" else "")
        + (", novices for the pruned experts" if pattern.selection.novices else "")
        + f", {stats.prompts} prompts ({stats.tokens} tokens), keeps {sizes} per pruned layer in {len(kept)} layers"
    )
    return 0


def _plot_patterns(args: argparse.Namespace) -> int:
    """`patterns plot`: one picture of what every stored pattern keeps and how much they overlap."""
    if args.name:
        raise CliError("patterns plot takes no pattern name: it draws every pattern in the store")
    if not args.out:
        raise CliError("patterns plot needs --out FILE.png")
    store = _open_store(args.store)
    if not store.names():
        raise CliError(f"{args.store}: the store holds no patterns; calibrate one first (taskmoe calibrate)")
    if Path(args.out).is_dir():
        raise CliError(f"--out {args.out} is a directory; give a file such as {Path(args.out) / 'patterns.png'}")
    try:  # matplotlib loads here, not for every command: it is the optional extra `plots`
        from server.plots import plot_patterns
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] != "matplotlib":
            raise
        raise CliError(
            "patterns plot draws with matplotlib, which is not installed: pip install 'taskmoe[plots]'"
        ) from None
    try:
        summary = plot_patterns(store, Path(args.out))
    except (ValueError, OSError) as error:  # an unknown picture format, an unwritable directory
        raise CliError(str(error)) from None
    for file, problem in sorted(store.problems.items()):
        print(f"warning: {file}: {problem}", file=sys.stderr)
    print(f"wrote {args.out}")
    print(summary.line())
    return 0


def _served_coverage(server: str, name: str, admin_key: str | None) -> dict[str, Any]:
    """The pattern's calibrated and live coverage as a running server reports them (`/admin/patterns/NAME`)."""
    import httpx

    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    url = f"{server.rstrip('/')}/admin/patterns/{name}"
    try:
        response = httpx.get(url, headers=headers, timeout=30)
    except httpx.HTTPError as error:
        raise CliError(f"{url}: {error}") from None
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise CliError(f"{url}: {response.status_code} {message}")
    return response.json().get("coverage") or {}


def _record_coverage(args: argparse.Namespace) -> int:
    """Measure and record the calibrated coverage of stored MoE patterns made before calibration recorded it."""
    from server.model.checkpoint import model_fingerprint, model_identity
    from server.model.variant import VariantBuilder
    from server.patterns import load_tokenizer, measure_coverage, read_calibration

    if not args.model:
        raise CliError("patterns coverage needs --model, the model the patterns belong to")
    store = _open_store(args.store)
    names = [args.name] if args.name else store.names()
    try:
        builder = VariantBuilder(_model_dir(args.model), device="cpu", dtype="float32")
        tokenizer = load_tokenizer(args.model)
        texts = read_calibration(args.prompts) if args.prompts else None
        for name in names:
            pattern = store.get(name)
            if not args.name and (pattern.kind != "moe_experts" or not (pattern.examples or texts)):
                print(f"{name}: skipped ({'dense channels' if pattern.kind != 'moe_experts' else 'no examples'})")
                continue
            pattern.check_model(model_fingerprint(builder.model_dir), model_identity(builder.model_dir))
            coverage = measure_coverage(pattern, builder, tokenizer, texts, answer=args.answer)
            pattern.parameters["coverage"] = coverage
            store.add(pattern, replace=True)
            figures = f"{coverage['mass']:.3f} (top-1 {coverage['top1']:.3f}) on {coverage['tokens']} tokens"
            answers = coverage.get("answers")
            if answers:
                figures += f"; answers {answers['mass']:.3f} on {answers['tokens']} tokens"
            print(f"{name}: coverage {figures}")
    except KeyError as error:
        raise CliError(str(error.args[0])) from None
    except (ValueError, OSError) as error:
        raise CliError(str(error)) from None
    return 0


def _suggest(args: argparse.Namespace) -> int:
    """Candidate tasks in the fallback traffic a server recorded; `--calibrate NAME` makes one a pattern."""
    from pattern_store.fallback_record import FILE_NAME, read_record
    from pattern_store.suggest import suggest
    from server.route_features import FeatureWeights

    if args.min_size < 2:
        raise CliError("--min-size must be at least 2")
    store = _open_store(args.store)
    try:
        queries = read_record(store.root / FILE_NAME)
    except ValueError as error:
        raise CliError(str(error)) from None
    if not queries:
        raise CliError(
            f"{store.root}: no fallback queries recorded; start `taskmoe serve` with --record-fallback N (and "
            "--record-text to keep their prompts, which calibrating from a suggestion needs)"
        )
    weights = FeatureWeights()
    found = suggest(queries, store, weights.ngram_buckets, weights.topic, args.min_size)
    if args.calibrate:
        return _calibrate_suggestion(args, found, queries)
    if args.json:
        print(json.dumps([suggestion.to_json() for suggestion in found], indent=1))
        return 0
    print(f"{len(queries)} recorded fallback queries, {len(found)} candidate tasks (clusters of >= {args.min_size})")
    for suggestion in found:
        near = (
            f"nearest pattern {suggestion.nearest_pattern} ({suggestion.similarity:.2f})"
            if suggestion.nearest_pattern
            else "no stored pattern"
        )
        covered = f"; already covered by {suggestion.covered_by}" if suggestion.covered_by else ""
        print(f"[{suggestion.cluster}] {suggestion.size} queries, {near}{covered}")
        for example in suggestion.examples:
            print(f"      {example[:100]!r}")
    return 0


def _calibrate_suggestion(args: argparse.Namespace, found: list, queries: list) -> int:
    """`taskmoe calibrate` on the recorded prompts of suggestion `--cluster` (default the largest)."""
    import tempfile

    if not args.model:
        raise CliError("patterns suggest --calibrate needs --model, the model to calibrate the pattern on")
    if not found:
        raise CliError("no suggestion to calibrate: no cluster is large enough (try a smaller --min-size)")
    chosen = next((s for s in found if s.cluster == args.cluster), None)
    if chosen is None:
        raise CliError(f"no suggestion {args.cluster}: there are {len(found)} (0 to {len(found) - 1})")
    if chosen.covered_by:
        print(f"note: suggestion {chosen.cluster} sits on pattern {chosen.covered_by!r}'s examples", file=sys.stderr)
    prompts = chosen.prompts(queries)
    if not prompts:
        raise CliError("the record keeps no text: calibrating needs the prompts (serve with --record-text)")
    from server.model.variant import VariantBuilder
    from server.patterns import answered_by_full_model, load_tokenizer

    print(f"answering the {len(prompts)} prompts of suggestion {chosen.cluster} with the full model", file=sys.stderr)
    builder = VariantBuilder(_model_dir(args.model), device="cpu", dtype="float32")
    texts = answered_by_full_model(builder, load_tokenizer(args.model), prompts)
    refine = args.refine or suggestion_refinement(builder.family.kind == "moe")
    # recorded prompts never leave the store directory: the calibration file is a private file there
    with tempfile.NamedTemporaryFile(
        "w", dir=args.store, prefix=".suggestion-", suffix=".jsonl", delete=False
    ) as handle:
        handle.writelines(json.dumps({"prompt": t.prompt, "response": t.response}) + "\n" for t in texts)
    try:
        argv = ["calibrate", "--model", args.model, "--store", args.store, "--name", args.calibrate, "--refine", refine]
        return main([*argv, "--prompts", handle.name, *(["--quiet"] if args.quiet else [])])
    finally:
        Path(handle.name).unlink(missing_ok=True)


def cmd_patterns(args: argparse.Namespace) -> int:
    """List, show, remove or plot stored patterns, record their calibrated coverage, or suggest new ones."""
    if args.action == "plot":
        return _plot_patterns(args)
    if args.action == "suggest":
        return _suggest(args)
    if args.action == "coverage":
        return _record_coverage(args)
    store = _open_store(args.store)
    if args.action == "list":
        rows = [store.summary(name) for name in store.names()]
        if args.json:
            print(json.dumps([{k: v for k, v in row.items() if k != "examples"} for row in rows]))
        else:
            print(f"{'name':<20}{'kind':<16}{'method':<13}{'prompts':>8}{'examples':>9}")
            for row in rows:
                print(
                    f"{row['name']:<20}{row['kind']:<16}{row['method']:<13}"
                    f"{row['calibration_prompts']:>8}{len(row['examples']):>9}"
                )
        for file, problem in sorted(store.problems.items()):
            print(f"warning: {file}: {problem}", file=sys.stderr)
        return 0
    if not args.name:
        raise CliError(f"patterns {args.action} needs a pattern name")
    try:
        if args.action == "show":
            summary = store.summary(args.name)
            summary["examples"] = summary["examples"][:5] + (["..."] if len(summary["examples"]) > 5 else [])
            if args.server:
                summary["coverage"] = _served_coverage(args.server, args.name, args.admin_key)
            print(json.dumps(summary, indent=1))
        else:
            store.remove(args.name)
            print(f"removed pattern {args.name!r}")
    except KeyError as error:
        raise CliError(str(error.args[0])) from None
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    """Which stored pattern would serve a query, and how sure the router is."""
    from pydantic import ValidationError

    from pattern_store.embedder import Embedder
    from pattern_store.pattern import PatternError
    from server.config import RoutingPolicy, explain
    from server.patterns import PromptFileError, read_prompts
    from server.routing import Router

    if bool(args.text) == bool(args.file):
        raise CliError("give either a query text or --file queries.jsonl")

    store = _open_store(args.store)
    try:
        policy = RoutingPolicy(**{name: getattr(args, name) for name in RoutingPolicy.model_fields if name in args})
    except ValidationError as error:
        raise CliError(explain(error, RoutingPolicy)) from None
    try:
        router = Router(store, Embedder(args.embedder) if args.embedder else Embedder(), policy=policy)
        queries = [" ".join(args.text)] if args.text else read_prompts(args.file)
        decisions = router.route_texts(queries)
    except (PatternError, PromptFileError, ValueError, OSError) as error:
        raise CliError(str(error)) from None
    if args.text:
        decision = decisions[0]
        print(f"{'pattern':<20}{'probability':>12}{'typicality':>11}{'similarity':>11}")
        for candidate in decision.candidates:
            similarity = "-" if candidate.similarity is None else f"{candidate.similarity:.3f}"
            print(f"{candidate.pattern:<20}{candidate.probability:>12.3f}{candidate.typicality:>11.3f}{similarity:>11}")
        stage = ", by its n-grams (not embedded)" if decision.by_ngrams else ""
        print(f"-> {decision.pattern or 'full model'} ({decision.reason}, p={decision.probability:.3f}{stage})")
        return 0
    for query, decision in zip(queries, decisions, strict=True):
        row = {
            "prompt": query,
            "pattern": decision.pattern,
            "reason": decision.reason,
            "by_ngrams": decision.by_ngrams,
            "probability": round(decision.probability, 4),
            "typicality": None if decision.typicality is None else round(decision.typicality, 4),
        }
        print(json.dumps(row))
    return 0


def serve_config(args: argparse.Namespace):  # -> ServerConfig
    """The server's settings: the flags given, over `TASKMOE_*` variables, over the defaults."""
    from server.config import ConfigError, ServerConfig, load_config

    try:
        return load_config(**{name: value for name, value in vars(args).items() if name in ServerConfig.model_fields})
    except ConfigError as error:
        raise CliError(str(error)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the OpenAI-compatible API."""
    import uvicorn

    from server.app import create_app
    from server.logs import configure_logging

    config = serve_config(args)
    configure_logging(config.log_level, json_lines=config.log_format == "json")
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=config.log_level, access_log=False)
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    """Export a stored pattern as one file, or import such a file into a store."""
    from pattern_store.pattern import PatternError, pattern_from_bundle, pattern_to_bundle

    if args.action == "export" and not args.name:
        raise CliError("pattern-file export needs --name")
    store = _open_store(args.store, create=args.action == "import")
    try:
        if args.action == "export":
            data = pattern_to_bundle(store.get(args.name))
            Path(args.file).write_bytes(data)
            print(f"wrote pattern {args.name!r} to {args.file} ({len(data)} bytes)")
        else:
            pattern = pattern_from_bundle(Path(args.file).read_bytes())
            store.add(pattern, replace=args.replace)
            print(f"imported pattern {pattern.name!r} into {args.store}")
    except KeyError as error:
        raise CliError(str(error.args[0])) from None
    except (PatternError, OSError) as error:
        raise CliError(str(error)) from None
    return 0


def add_settings(parser: argparse.ArgumentParser, model: Any, flags: dict[str, str] | None = None) -> None:
    """One flag per field of a settings model (`ServerConfig`, `RoutingPolicy`), its help, choices and default
    taken from the field. A flag that is not given is absent from the parsed arguments, so that the
    environment and the field's default apply (pydantic-settings)."""
    import typing

    from server.config import flag, shown_default

    for name, field in model.model_fields.items():
        option = (flags or {}).get(name, flag(name))
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": name}
        choices = field_choices(field)
        if choices:
            kwargs["choices"] = choices
        if typing.get_origin(field.annotation) is tuple:  # a list setting: the flag is repeated
            kwargs["action"] = "append"
        if field.examples:  # how a value is written: the flag's metavar
            kwargs["metavar"] = field.examples[0]
        default = shown_default(field)
        kwargs["help"] = field.description + (f" (default {default})" if default is not None else "")
        parser.add_argument(*option.split(","), **kwargs)


def field_choices(field: Any) -> list[str] | None:
    """The values a Literal or bool field takes, as the command line writes them."""
    import typing

    annotation = field.annotation
    if annotation is bool:
        return ["true", "false"]
    if typing.get_origin(annotation) is typing.Literal:
        return [str(value) for value in typing.get_args(annotation)]
    return None


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    from server.config import ServerConfig

    serve = commands.add_parser(
        "serve",
        help="serve the OpenAI-compatible API",
        description="Every flag can also be set as TASKMOE_<FLAG> (e.g. TASKMOE_CACHE_BUDGET=8GiB); a flag wins "
        "over its variable. docs/serving.md lists them all.",
    )
    add_settings(serve, ServerConfig)
    serve.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    from server.config import RoutingPolicy

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
    export.add_argument("--selection", help='selection JSON: {"kind": "moe_experts", "layers": {...}}')
    export.add_argument("--pattern", help="export the variant of this stored pattern (with --store)")
    export.add_argument("--store", help="pattern store directory (with --pattern)")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument(
        "--dtype",
        default="auto",
        help="auto (the checkpoint's precision: an FP8 or MXFP4 checkpoint's variant stays quantized), or "
        "float32, bfloat16, float16 (dequantized)",
    )
    export.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    export.set_defaults(func=cmd_export)

    calibrate = commands.add_parser("calibrate", help="calibrate a task pattern from prompts and store it")
    calibrate.add_argument("--model", required=True, help="model directory")
    calibrate.add_argument("--store", required=True, help="pattern store directory (created if missing)")
    calibrate.add_argument("--name", required=True, help="pattern name (letters, digits, _ . -)")
    calibrate.add_argument(
        "--prompts", required=True, help="JSONL with a 'prompt' (and optional 'response') field: drives the scores"
    )
    calibrate.add_argument("--examples", help="JSONL of prompts routing matches against (default: --prompts)")
    keep = calibrate.add_mutually_exclusive_group()
    keep.add_argument(
        "--keep",
        type=_keep_value,
        help=f"MoE: share of experts kept per layer (default {DEFAULT_KEEP}), or {KEEP_AUTO}: the fewest experts whose "
        "answers to held-out calibration prompts match the full model's --target share of the time (the full "
        "model must fit in memory)",
    )
    keep.add_argument("--keep-experts", type=int, help="MoE: number of experts kept per layer")
    calibrate.add_argument(
        "--method",
        help=f"MoE: {', '.join(MOE_METHODS)} (default {DEFAULT_MOE_METHOD}); "
        "dense: seap (default), seap-wifn, magnitude, random",
    )
    calibrate.add_argument(
        "--budget",
        choices=BUDGETS,
        default="uniform",
        help="MoE: keep the same number of experts in every layer, spread the same total by what each "
        "layer's scores ask for (adaptive), or move it from layer to layer while the answer loss drops (loss: "
        "needs --refine e2e); a pattern whose layers keep different counts cannot be exported",
    )
    calibrate.add_argument(
        "--refine",
        choices=REFINEMENTS,
        default="none",
        help="MoE: swap experts while the layer-local reconstruction error drops (local: any model size), or "
        "choose among every score's selection and swap while the divergence from the full model on the "
        "calibration answers drops (e2e: the "
        "model must fit in memory; prompts without a response are answered by the full model first)",
    )
    calibrate.add_argument(
        "--substitute",
        choices=SUBSTITUTES,
        default="none",
        help="MoE: what a pruned expert's choice gets: nothing, the router choosing among the kept experts only "
        "(none), the expert's novice, its mean output on the calibration tokens routed to it, the router "
        "choosing as the full model does (novice: a vector of the hidden size per pruned expert, not a slot; "
        "the refinements score candidates with novices; cannot be exported), or a low-rank novice (low-rank: the "
        "novice plus a linear map of the token of rank --substitute-rank, fitted on those tokens)",
    )
    calibrate.add_argument(
        "--substitute-rank",
        type=int,
        help=f"--substitute low-rank: the rank of each pruned expert's map (default {DEFAULT_RANK}; it stores 2 x rank "
        "+ 2 vectors of the hidden size per pruned expert and layer)",
    )
    calibrate.add_argument(
        "--target",
        type=float,
        help=f"--keep {KEEP_AUTO}: the share of held-out answers that must match the full model's, estimated as "
        f"(matched + 1) / (held out + 2), so a target near 1 needs many prompts (default {DEFAULT_TARGET}: at least "
        f"{HELD_OUT_EVERY * held_out_needed(DEFAULT_TARGET)} prompts, every {HELD_OUT_EVERY}th held out)",
    )
    calibrate.add_argument("--threshold", type=float, default=0.0, help="TCESS confidence threshold r (default 0)")
    calibrate.add_argument("--sparsity", type=float, default=0.2, help="dense: global channel sparsity (default 0.2)")
    calibrate.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    calibrate.add_argument("--embedder", help="sentence-transformers model directory (default all-MiniLM-L6-v2)")
    calibrate.add_argument("--replace", action="store_true", help="overwrite a pattern of the same name")
    calibrate.add_argument("--quiet", action="store_true", help="no progress bar")
    calibrate.set_defaults(func=cmd_calibrate)

    patterns = commands.add_parser(
        "patterns", help="list, show, remove or plot stored patterns, or record their calibrated coverage"
    )
    patterns.add_argument("action", choices=["list", "show", "remove", "plot", "coverage", "suggest"])
    patterns.add_argument("name", nargs="?", help="the pattern (show, remove; coverage: default every MoE pattern)")
    patterns.add_argument("--model", help="coverage, suggest --calibrate: the model directory")
    patterns.add_argument("--min-size", type=int, default=5, help="suggest: the fewest queries a suggestion groups")
    patterns.add_argument("--calibrate", metavar="NAME", help="suggest: calibrate a pattern NAME from a suggestion")
    patterns.add_argument("--cluster", type=int, default=0, help="suggest --calibrate: which (default 0, the largest)")
    patterns.add_argument("--quiet", action="store_true", help="suggest --calibrate: no progress bar")
    patterns.add_argument(
        "--refine",
        choices=REFINEMENTS,
        help="suggest --calibrate: the refinement (default e2e on a MoE model: the full model answers the prompts "
        "anyway, and refining by answer loss closes most of the gap to a pattern calibrated on true answers)",
    )
    patterns.add_argument(
        "--server", help="show: also the live coverage a running server measures (its URL, e.g. http://host:8000)"
    )
    patterns.add_argument(
        "--admin-key", default=os.environ.get("TASKMOE_ADMIN_KEY"), help="show --server: the admin key"
    )
    patterns.add_argument(
        "--prompts", help="coverage: JSONL calibration prompts to measure on (default: each pattern's examples)"
    )
    patterns.add_argument(
        "--answer",
        action="store_true",
        help="coverage: the full model answers the prompts that come without a response, so that the answers' "
        "coverage (what live coverage is judged against) is recorded too; the whole model must fit in memory",
    )
    patterns.add_argument("--store", required=True, help="pattern store directory")
    patterns.add_argument("--json", action="store_true", help="list: one JSON array")
    patterns.add_argument("--out", help="plot: the picture to write (FILE.png)")
    patterns.set_defaults(func=cmd_patterns)

    bundle = commands.add_parser("pattern-file", help="export a stored pattern as one file, or import one")
    bundle.add_argument("action", choices=["export", "import"])
    bundle.add_argument("file", help="the pattern file (.safetensors)")
    bundle.add_argument("--store", required=True, help="pattern store directory")
    bundle.add_argument("--name", help="export: the pattern to write")
    bundle.add_argument("--replace", action="store_true", help="import: overwrite a pattern of the same name")
    bundle.set_defaults(func=cmd_bundle)

    _add_serve_parser(commands)

    route = commands.add_parser("route", help="which stored pattern would serve a query")
    route.add_argument("text", nargs="*", help="the query")
    route.add_argument("--store", required=True, help="pattern store directory")
    route.add_argument("--file", help="JSONL of queries ('prompt' field): one JSON line per query")
    route.add_argument("--embedder", help="sentence-transformers model directory (default all-MiniLM-L6-v2)")
    add_settings(route, RoutingPolicy, flags={"neighbours": "-k,--neighbours"})
    route.set_defaults(func=cmd_route)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the command never downloads; set before transformers loads
    args = build_parser().parse_args(argv)
    if getattr(args, "seed", 0) is None:
        from demo.evaluate import EVAL_SEED

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
