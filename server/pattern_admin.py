"""Managing the served model's patterns: calibration jobs, imports, deletions, and the admin API's view of
what is resident. Every change forgets what served the old revision (alone or in a union), so a replaced
pattern never serves its old selection."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pattern_store.embedder import Embedder
from pattern_store.pattern import PatternError, PatternExistsError, pattern_from_bundle, validate_name
from pattern_store.selection import SelectionError
from pattern_store.store import PatternStore
from server.config import FULL_MODEL, ServerConfig
from server.errors import (
    InvalidPattern,
    InvalidRequest,
    JobInProgress,
    PatternExists,
    PatternInUse,
    PatternNotFound,
    TooManyJobs,
    shown,
)
from server.jobs import Job, JobRefused, JobRunner
from server.keep_search import held_out_indices
from server.leases import LeaseManager
from server.model.checkpoint import model_identity
from server.model.pruning import keep_count
from server.model.variant import VariantBuilder
from server.model_info import ModelInfo
from server.patterns import CalibrationText, PatternRecipe, answered_by_full_model, make_pattern
from server.resolver import Choice
from server.routing import UNION_SEPARATOR

log = logging.getLogger("taskmoe.patterns")


class PatternAdmin:
    """Create (calibrate), import, delete and describe patterns; warm and evict what serves them."""

    def __init__(
        self,
        info: ModelInfo,
        builder: VariantBuilder,
        store: PatternStore,
        embedder: Embedder,
        leases: LeaseManager,
        config: ServerConfig,
        learn: Callable[[], bool] = lambda: True,
    ) -> None:
        """`learn`: waits until routing knows the store as it is now (`Router.catch_up`: the fit runs in the
        fitting process). It is called after each change made here, on the admin call's (or job's) thread,
        so that a pattern is routable when its call returns, while routed requests go on meanwhile with
        the router they have."""
        self.info, self.builder, self.store, self.embedder = info, builder, store, embedder
        self.leases, self.config, self.learn = leases, config, learn
        self.jobs = JobRunner(on_error=lambda job, trace: log.error("job %s failed:\n%s", job.id, trace))
        self._calibrating = threading.Lock()

    def close(self) -> None:
        self.jobs.shutdown()

    def _routable(self) -> None:
        """Wait until routing knows the change just made (at most `Router.catch_up`'s timeout: on a saturated
        machine the fitting process gets little CPU); past that the call returns and routing catches up later."""
        if not self.learn():
            log.warning("routing has not learnt the pattern store's latest change yet; it will in the background")

    # -- reading ---------------------------------------------------------------------------------------

    def summary(self, name: str) -> dict[str, Any]:
        try:
            summary = self.store.summary(name)
        except KeyError:
            raise PatternNotFound(f"pattern {shown(name)} does not exist") from None
        summary.pop("tensors", None)
        summary["id"] = f"{self.info.name}@{name}"
        calibrated = (summary.get("parameters") or {}).get("coverage")
        summary["coverage"] = {"calibrated": calibrated, "live": self.leases.coverage(name)}
        return summary

    def summaries(self) -> list[dict[str, Any]]:
        """Every pattern, with the number of its examples instead of the examples."""
        rows = []
        for name in self.store.names():
            summary = self.summary(name)
            summary["examples"] = len(summary.get("examples", []))
            rows.append(summary)
        return rows

    # -- changing --------------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        texts: Sequence[CalibrationText],
        examples: Sequence[str],
        recipe: PatternRecipe,
        replace: bool,
        answer: bool = False,
    ) -> Job:
        """Start calibrating a pattern; it is routable as soon as the job succeeds. Everything that can be
        checked is checked first, so that a 202 means the job can run. `answer`: the full model answers the
        prompts first (recorded traffic comes without answers), which needs the whole model beside the pool."""
        self._check_new_name(name)
        self._check_calibration_input(texts, examples, recipe)
        if answer:
            self._check_whole_model_fits(answering=True)
        if name in self.store and not replace:
            raise PatternExists(f"pattern {name!r} exists; send replace=true to recalibrate it")
        stages = _stages(recipe, answer)

        def calibrate(progress: Any) -> dict[str, Any]:
            def staged(stage: str, done: int, total: int | None) -> None:
                # each stage an equal share of the bar; a stage of unknown length creeps towards its end
                share = done / total if total else 1 - 1 / (1 + done / 50)
                progress((stages.index(stage) + min(share, 1.0)) / len(stages) if stage in stages else 0.0)

            with self._calibrating:
                calibration = texts
                if answer:
                    prompts = [text.prompt for text in texts]
                    calibration = answered_by_full_model(self.builder, self.info.tokenizer, prompts)
                    staged("answers", 1, 1)
                pattern, _ = make_pattern(
                    name,
                    self.builder,
                    self.info.tokenizer,
                    calibration,
                    recipe,
                    examples,
                    self.embedder,
                    self.info.fingerprint,
                    staged,
                )
                self.store.add(pattern, replace=replace)
                self.leases.forget(name)  # a replaced pattern's old variant must not serve again
                stored = self.summary(name)
            self._routable()
            return stored

        try:
            return self.jobs.submit(
                "calibrate", f"calibrate pattern {name!r} from {len(texts)} prompts", calibrate, subject=name
            )
        except JobRefused as refused:
            if refused.busy:
                raise JobInProgress(str(refused), param="name") from None
            raise TooManyJobs(str(refused), retry_after=30) from None

    def import_bundle(self, data: bytes, replace: bool) -> dict[str, Any]:
        try:
            pattern = pattern_from_bundle(data)
            pattern.check_model(self.info.fingerprint, model_identity(self.builder.model_dir))
        except PatternError as error:
            raise InvalidPattern(str(error)) from None
        self._check_new_name(pattern.name)
        if pattern.example_embeddings is None or not pattern.examples:
            raise InvalidRequest(f"pattern {pattern.name!r} has no example prompts: routing could never choose it")
        try:
            self.builder.variant_bytes(pattern.selection)  # checks the selection against this model
            self.store.add(pattern, replace=replace)
        except SelectionError as error:
            raise InvalidRequest(f"pattern {pattern.name!r} does not fit this model: {error}") from None
        except PatternExistsError as error:
            raise PatternExists(str(error)) from None
        except PatternError as error:
            raise InvalidPattern(str(error)) from None
        self.leases.forget(pattern.name)
        stored = self.summary(pattern.name)  # before waiting: another process may remove it meanwhile
        self._routable()
        return stored

    def delete(self, name: str) -> None:
        if name == self.config.fallback_pattern:
            raise PatternInUse(f"pattern {name!r} is the --fallback; unmatched queries need it")
        if name in self.config.upstream_map:
            raise PatternInUse(f"pattern {name!r} is served by an --upstream; routing needs it")
        try:
            self.store.remove(name)
        except KeyError:
            raise PatternNotFound(f"pattern {shown(name)} does not exist") from None
        self.leases.forget(name)
        self._routable()

    # -- what is resident ------------------------------------------------------------------------------

    def warm(self, name: str) -> dict[str, Any]:
        """Load (or touch) what serves pattern `name` ('full': the full model)."""
        choice = Choice(() if name == FULL_MODEL else tuple(sorted(set(name.split(UNION_SEPARATOR)))), "explicit")
        lease = self.leases.acquire(choice)
        try:
            return lease.describe()
        finally:
            lease.release()

    def evict(self, name: str) -> int | None:
        """Drop a pattern's variant, or free its idle experts; None: nothing of it is resident."""
        return self.leases.evict(name)

    def cache_report(self) -> dict[str, Any]:
        return {"object": "cache", **self.leases.report()}

    # -- checks ------------------------------------------------------------------------------------------

    def _check_new_name(self, name: str) -> None:
        try:
            validate_name(name)
        except PatternError as error:
            raise InvalidRequest(str(error), param="name") from None
        if name == FULL_MODEL:
            raise InvalidRequest(f"{FULL_MODEL!r} is reserved: it names the full model", param="name")

    def _check_calibration_input(
        self, texts: Sequence[CalibrationText], examples: Sequence[str], recipe: PatternRecipe
    ) -> None:
        """Text a tokenizer can take, prompts that fit the context, a keep the model allows, and for the
        end-to-end refinement a whole model that fits this server's budget."""
        limit = self.info.character_limit
        for param, values in (
            ("prompts", [t.prompt for t in texts] + [t.response or "" for t in texts]),
            ("examples", list(examples)),
        ):
            for text in values:
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidRequest(
                        f"{param} must be valid Unicode text (a lone surrogate?)", param=param
                    ) from None
                if len(text) > limit:
                    raise InvalidRequest(
                        f"a text in {param} of {len(text)} characters cannot fit the model's context", param=param
                    )
        if self.info.kind == "moe" and not recipe.keep_auto:
            self._check_keep(recipe)
        if recipe.keep_auto:
            try:
                held_out_indices(len(texts), recipe.target)
            except ValueError as error:
                raise InvalidRequest(str(error), param="prompts") from None
            self._check_whole_model_fits(keep_auto=True)
        elif recipe.refine == "e2e":
            self._check_whole_model_fits()

    def _check_keep(self, recipe: PatternRecipe) -> None:
        top_k = int(self.builder.config.num_experts_per_tok)
        experts = min(layer.num_experts for layer in self.builder.sparse_layers.values())
        param = "keep_experts" if recipe.keep_experts is not None else "keep"
        try:
            keep_count(experts, top_k, recipe.keep_ratio, recipe.keep_experts)
        except ValueError as error:
            raise InvalidRequest(f"{param}: {error}", param=param) from None

    def _check_whole_model_fits(self, answering: bool = False, keep_auto: bool = False) -> None:
        """The answer-loss refinement (or answering prompts with the full model, or judging a keep by its
        answers) holds the whole model beside what serves: only when it fits."""
        whole, budget = self.builder.variant_bytes(None), self.config.cache_budget
        if whole <= budget:
            return
        if keep_auto:
            what, param = "keep 'auto' (the full model answers held-out prompts) holds", "keep"
            advice = "give keep as a share, or run 'taskmoe calibrate --keep auto' where the model fits and import it"
        elif answering:
            what, param = "answering the suggestion's prompts holds", "name"
            advice = "run 'taskmoe patterns suggest --calibrate NAME' where the model fits and import the pattern"
        else:
            what, param = "refine 'e2e' holds", "refine"
            advice = (
                "use refine 'local' (any model size), or run 'taskmoe calibrate --refine e2e' where the model fits "
                "and import it"
            )
        raise InvalidRequest(
            f"{what} the whole model ({whole / 2**30:.2f} GiB of experts) in this server's memory, more than its "
            f"cache budget ({budget / 2**30:.2f} GiB); {advice}",
            param=param,
        )


def _stages(recipe: PatternRecipe, answer: bool) -> list[str]:
    """The stages a calibration job reports, in order (each an equal share of its progress)."""
    stages = ["answers"] if answer else []
    if recipe.keep_auto:  # each selection the search tries refines silently: one stage for them all
        return [*stages, "statistics", "keep search"]
    stages += ["statistics", *(["layer-local refinement"] if recipe.refine != "none" else [])]
    return stages + (["answer-loss refinement"] if recipe.refine == "e2e" else [])
