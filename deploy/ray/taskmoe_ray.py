"""taskmoe on Ray Serve, for when one node is not enough.

An ingress deployment routes each query to a pattern (the same router as `taskmoe serve`); the model
deployment's replicas hold variants through Serve's model multiplexing, with the pattern as
`multiplexed_model_id`. Serve sends a request to a replica that already holds its variant, and each
replica keeps its own least-recently-used set of variants; so a task's
requests keep landing where its experts are, and a variant is built once per replica that serves it,
not once per request.

    serve run taskmoe_ray:build_app --app-dir deploy/ray model=/models store=/patterns replicas=2 gpus=1

Arguments (all strings, as `serve run` passes them): `model`, `store`, `replicas` (2), `gpus` per replica
(0), `cpus` per replica (1), `device` (auto), `dtype` (auto), `route_threshold` (0.9, a probability),
`fallback` (full). How many variants a replica keeps is `TASKMOE_MAX_VARIANTS_PER_REPLICA` (default
4) in the replicas' environment (Serve fixes it when the module is imported).
The Ray app serves `GET /v1/models` and non-streamed `POST /v1/chat/completions`;
streaming, text completions and the admin API are `taskmoe serve`'s.
"""

# FastAPI reads the route annotations at run time: no `from __future__ import annotations` here.
import asyncio
import os
import secrets
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from transformers import AutoConfig

from pattern_store.embedder import Embedder
from pattern_store.pattern import PatternError
from pattern_store.selection import union
from pattern_store.store import PatternStore
from server.api.errors import install_error_handlers
from server.api.openai_routes import completion_body
from server.api.schemas import ChatCompletionRequest
from server.config import FULL_MODEL
from server.engine import Generation, SamplingParams
from server.errors import APIError
from server.model.checkpoint import model_fingerprint
from server.model.variant import VariantBuilder
from server.patterns import load_tokenizer
from server.request_path import chat_prompt_ids, eos_ids, explicit_choice, model_ids, sampling_params, served_id
from server.routing import UNION_SEPARATOR, Router

MAX_VARIANTS_PER_REPLICA = int(os.environ.get("TASKMOE_MAX_VARIANTS_PER_REPLICA", "4"))
MAX_N = 16  # as `taskmoe serve --max-n`

api = FastAPI(title="taskmoe on Ray Serve")
install_error_handlers(api)


@serve.deployment
class VariantReplica:
    """Holds the backbone once and the variants Serve multiplexes onto it; generates."""

    def __init__(self, model: str, store: str, device: str = "auto", dtype: str = "auto") -> None:
        self.builder = VariantBuilder(model, device=device, dtype=dtype)
        self.tokenizer = load_tokenizer(model)
        self.store = PatternStore(store, create=False)
        self.fingerprint = model_fingerprint(model)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.builds: dict[str, int] = {}
        self.eos_ids = eos_ids(self.tokenizer, self.builder.generation_config)

    @serve.multiplexed(max_num_models_per_replica=MAX_VARIANTS_PER_REPLICA)
    async def variant(self, pattern: str) -> Any:
        """Build the variant of `pattern` (a union `a+b` keeps what either keeps; FULL_MODEL: the whole model);
        Serve keeps the recent ones."""
        selection = None
        if pattern != FULL_MODEL:
            self.store.refresh()
            selections = []
            for name in pattern.split(UNION_SEPARATOR):
                stored = self.store.get(name)
                stored.check_model(self.fingerprint)
                selections.append(stored.selection)
            selection = union(selections)
        model = await asyncio.to_thread(self.builder.build, selection)
        self.builds[pattern] = self.builds.get(pattern, 0) + 1
        return model

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> dict[str, Any]:
        pattern = serve.get_multiplexed_model_id()
        model = await self.variant(pattern)
        generation = Generation(model, self.tokenizer, prompt_ids, params, self.eos_ids)
        await asyncio.to_thread(generation.run)
        return {
            "choices": [(choice.text, choice.finish_reason) for choice in generation.choices],
            "completion_tokens": generation.completion_tokens,
            "replica": self.replica,
            "builds": dict(self.builds),
        }


@serve.deployment
@serve.ingress(api)
class Ingress:
    """Routes each query to a pattern and sends it to a replica holding that pattern's variant."""

    def __init__(
        self,
        replicas: DeploymentHandle,
        model: str,
        store: str,
        route_threshold: float = 0.9,
        fallback: str = FULL_MODEL,
    ) -> None:
        self.replicas = replicas
        self.model_name = Path(model).resolve().name
        self.tokenizer = load_tokenizer(model)
        self.context = int(getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", 0) or 0) or None
        self.store = PatternStore(store, create=False)
        fallback_pattern = None if fallback == FULL_MODEL else fallback
        self.router = Router(self.store, Embedder(), threshold=route_threshold, fallback=fallback_pattern)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        ids = model_ids(self.model_name, self.store.names())
        return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "taskmoe"} for i in ids]}

    def _pattern(self, body: ChatCompletionRequest) -> tuple[str, str]:
        chosen = explicit_choice(body.model, body.pattern, self.model_name, self.store)
        if chosen is not None:
            return chosen.label, chosen.how
        decision = self.router.route(body.query())
        return decision.pattern or FULL_MODEL, decision.reason

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatCompletionRequest) -> JSONResponse:
        body.unsupported()
        if body.stream:
            raise APIError(400, "streaming is served by `taskmoe serve`; the Ray app answers whole", param="stream")
        prompt = chat_prompt_ids(self.tokenizer, body.conversation(), self.context)
        params = sampling_params(body, len(prompt), body.token_limit, self.context, MAX_N)
        pattern, how = await asyncio.to_thread(self._pattern, body)
        try:
            result = await self.replicas.options(multiplexed_model_id=pattern).generate.remote(prompt, params)
        except PatternError as error:
            raise APIError(409, str(error), code="pattern_unusable") from None
        model_id = served_id(self.model_name, pattern)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": result["completion_tokens"]}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        response = completion_body(
            "chat",
            f"chatcmpl-{secrets.token_hex(12)}",
            int(time.time()),
            model_id,
            f"taskmoe-{pattern}",
            result["choices"],
            usage,
        )
        headers = {
            "x-taskmoe-pattern": pattern,
            "x-taskmoe-route": how,
            "x-taskmoe-replica": result["replica"],
            "x-taskmoe-replica-builds": ",".join(f"{p}={n}" for p, n in sorted(result["builds"].items())),
        }
        return JSONResponse(response, headers=headers)


def build_app(args: dict[str, str]) -> serve.Application:
    """The application `serve run` (or a RayService's serveConfigV2) starts."""
    if "model" not in args:
        raise ValueError("taskmoe on Ray needs model=DIR (and store=DIR, default MODEL/patterns)")
    model = args["model"]
    store = args.get("store", str(Path(model) / "patterns"))
    replicas = VariantReplica.options(
        num_replicas=int(args.get("replicas", 2)),
        ray_actor_options={"num_gpus": float(args.get("gpus", 0)), "num_cpus": float(args.get("cpus", 1))},
    ).bind(model, store, args.get("device", "auto"), args.get("dtype", "auto"))
    return Ingress.options(ray_actor_options={"num_cpus": float(args.get("ingress_cpus", 0.5))}).bind(
        replicas,
        model,
        store,
        float(args.get("route_threshold", 0.9)),
        args.get("fallback", FULL_MODEL),
    )
