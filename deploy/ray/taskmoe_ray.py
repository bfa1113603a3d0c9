"""taskmoe on Ray Serve, for when one node is not enough.

The same request path as `taskmoe serve`, split across processes: the ingress plans each request
(`server.plan`: the same checks, the same resolver and router, the same tokenization) and sends the plan to
a replica of the model deployment, chosen through Serve's model multiplexing with the plan's pattern label
(`a`, `a+b`, `full`) as `multiplexed_model_id`; the replica runs it on its lease manager
(`server.completions.execute`): the expert pool for an MoE model, with every pattern's rows in one batched
decoder, or the variant cache. So a task's requests keep landing on the replica whose pool holds its
experts, and a pattern is loaded once per replica that serves it, not once per request.

    serve run taskmoe_ray:build_app --app-dir deploy/ray model=/models store=/patterns replicas=2 gpus=1

Arguments (all strings, as `serve run` passes them): every `taskmoe serve` setting by its name
(`model`, `store`, `cache_budget`, `route_threshold`, `fallback`, `max_batch`, `max_n`, `api_key`, ...;
`TASKMOE_*` variables in the replicas' environment work too), and for Ray `replicas` (2), `gpus` per
replica (0), `cpus` per replica (1) and `ingress_cpus` (0.5). How many patterns Serve pins to a replica
is `TASKMOE_MAX_VARIANTS_PER_REPLICA` (default 4) in the replicas' environment (Serve fixes it when the
module is imported). The app serves `GET /v1/models` and non-streamed chat and text completions;
streaming, `/v1/route`, upstream servers and the admin API are `taskmoe serve`'s.
"""

# FastAPI reads the route annotations at run time: no `from __future__ import annotations` here.
import asyncio
import os
import threading
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from pattern_store.embedder import Embedder
from server.api.auth import require_api_key
from server.api.errors import api_error, install_error_handlers
from server.api.render import whole_body
from server.api.schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest
from server.completions import execute
from server.config import FULL_MODEL, load_config
from server.errors import APIError, PatternDamaged, PatternNotFound, ServiceError
from server.leases import make_leases
from server.metrics import Metrics
from server.model.variant import VariantBuilder
from server.model_info import ModelInfo
from server.plan import Plan, plan
from server.resolver import Choice, Resolver, store_changed
from server.routing import UNION_SEPARATOR
from server.runtime import follow_store, make_router, open_store, set_torch_threads

MAX_VARIANTS_PER_REPLICA = int(os.environ.get("TASKMOE_MAX_VARIANTS_PER_REPLICA", "4"))
RAY_ARGUMENTS = {"replicas": "2", "gpus": "0", "cpus": "1", "ingress_cpus": "0.5"}

api = FastAPI(title="taskmoe on Ray Serve")
install_error_handlers(api)


@serve.deployment
class ModelReplica:
    """One copy of the model: its lease manager (the expert pool, or the variant cache) and its decoders."""

    def __init__(self, settings: dict[str, str]) -> None:
        config = load_config(**settings)
        self.builder = VariantBuilder(config.model, device=config.device, dtype=config.dtype)
        set_torch_threads(config.torch_threads, self.builder.device)
        self.info = ModelInfo.load(
            config.model, config.served_name, self.builder.config, self.builder.generation_config
        )
        self.store = open_store(config)
        self.fallback = config.fallback_pattern
        self.metrics = Metrics()
        self.leases = make_leases(self.builder, self.store, self.info.fingerprint, config, self.metrics)
        follow_store(config, self.store, leases=self.leases)  # a replaced pattern never serves its old experts
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.loads: dict[str, int] = {}

    @serve.multiplexed(max_num_models_per_replica=MAX_VARIANTS_PER_REPLICA)
    async def pattern(self, label: str) -> str:
        """Make this replica hold what serves `label` (Serve then sends that label's requests here)."""
        names = () if label == FULL_MODEL else tuple(label.split(UNION_SEPARATOR))
        lease = await asyncio.to_thread(self.leases.acquire, Choice(names, "explicit"))
        lease.release()
        self.loads[label] = self.loads.get(label, 0) + 1
        return label

    async def generate(self, planned: Plan) -> dict[str, Any]:
        """Run a plan made by the ingress, and say which plan it served (a routed plan whose patterns left
        the store since the ingress routed it is served by the fallback); a refusal comes back as the
        OpenAI error it is."""
        served: list[Plan] = []
        try:
            try:
                await self.pattern(serve.get_multiplexed_model_id())
            except (PatternNotFound, PatternDamaged):
                if not planned.choice.routed:
                    raise
            answer = await asyncio.to_thread(
                execute,
                planned,
                self.leases,
                self.info,
                self.metrics,
                threading.Event(),
                lambda choice: store_changed(choice, self.store, self.fallback),
                on_leased=served.append,
            )
        except ServiceError as error:
            refused = api_error(error)
            return {"refused": (refused.status, refused.message, refused.code, refused.param, refused.headers)}
        return {"answer": answer, "plan": served[0], "replica": self.replica, "loads": dict(self.loads)}


@serve.deployment
@serve.ingress(api)
class Ingress:
    """Plans each request as `taskmoe serve` does and sends it to a replica holding its pattern."""

    def __init__(self, replicas: DeploymentHandle, settings: dict[str, str]) -> None:
        self.replicas = replicas
        self.config = load_config(**settings)
        api.state.config = self.config  # what `require_api_key` reads
        self.info = ModelInfo.load(self.config.model, self.config.served_name)
        self.store = open_store(self.config)
        self.router = make_router(
            self.config, self.store, Embedder(self.config.embedder) if self.config.embedder else Embedder()
        )
        self.resolver = Resolver(self.info.name, self.store, self.router, Metrics())
        follow_store(self.config, self.store, router=self.router)

    @api.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def models(self) -> dict[str, Any]:
        cards = [{"id": i, "object": "model", "owned_by": "taskmoe"} for i in self.resolver.model_ids()]
        return {"object": "list", "data": cards}

    async def _complete(self, body: GenerationRequest) -> JSONResponse:
        if body.stream:
            raise APIError(400, "streaming is served by `taskmoe serve`; the Ray app answers whole", param="stream")
        planned = await asyncio.to_thread(plan, body.ask(), self.info, self.resolver, self.config.max_n)
        handle = self.replicas.options(multiplexed_model_id=planned.choice.label)
        result = await handle.generate.remote(planned)
        if "refused" in result:
            status, message, code, param, headers = result["refused"]
            raise APIError(status, message, code=code, param=param, headers=headers)
        served: Plan = result["plan"]
        headers = served.headers | {
            "x-taskmoe-replica": result["replica"],
            "x-taskmoe-replica-builds": ",".join(f"{p}={n}" for p, n in sorted(result["loads"].items())),
        }
        return JSONResponse(whole_body(served, result["answer"]), headers=headers)

    @api.post("/v1/chat/completions", dependencies=[Depends(require_api_key)])
    async def chat(self, body: ChatCompletionRequest) -> JSONResponse:
        return await self._complete(body)

    @api.post("/v1/completions", dependencies=[Depends(require_api_key)])
    async def completions(self, body: CompletionRequest) -> JSONResponse:
        return await self._complete(body)


def build_app(args: dict[str, str]) -> serve.Application:
    """The application `serve run` (or a RayService's serveConfigV2) starts."""
    ray_args = RAY_ARGUMENTS | {name: args[name] for name in RAY_ARGUMENTS if name in args}
    settings = {name: value for name, value in args.items() if name not in RAY_ARGUMENTS}
    config = load_config(**settings)  # refuses bad settings here, before any replica starts
    if config.upstream:
        raise ValueError("upstream servers are `taskmoe serve`'s; the Ray app serves every pattern itself")
    replicas = ModelReplica.options(
        num_replicas=int(ray_args["replicas"]),
        max_ongoing_requests=config.max_batch,  # concurrent requests decode together in the replica's batch
        ray_actor_options={"num_gpus": float(ray_args["gpus"]), "num_cpus": float(ray_args["cpus"])},
    ).bind(settings)
    return Ingress.options(ray_actor_options={"num_cpus": float(ray_args["ingress_cpus"])}).bind(replicas, settings)
