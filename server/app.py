"""The FastAPI application: `create_app(config)`. The model, the store and the worker threads belong to
the app's lifespan, never to module globals; the model loads in the background so that `/health`
answers at once and `/ready` turns 200 when requests can be served."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api import admin_routes, openai_routes, ops_routes
from server.api.body_limit import BodyLimit
from server.api.errors import install_error_handlers, install_openapi
from server.api.observe import RequestObserver
from server.config import ServerConfig
from server.metrics import Metrics
from server.model.checkpoint_errors import CheckpointError
from server.model.families import UnsupportedModelError
from server.model.quantized_slots import ExpertDtypeError
from server.model.variant import resolve_device
from server.proxy import UpstreamProxy
from server.runtime import Runtime

log = logging.getLogger("taskmoe.app")


def create_app(config: ServerConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.config, app.state.metrics = config, Metrics()
        app.state.runtime, app.state.load_error, app.state.started = None, None, time.time()
        workers = config.worker_count(resolve_device(config.device).type)
        app.state.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="taskmoe-worker")
        app.state.proxy = UpstreamProxy(config.upstream_map)
        loading = asyncio.get_running_loop().run_in_executor(app.state.executor, _load, app)
        try:
            yield
        finally:
            await loading  # a shutdown during loading waits for it, then frees what it loaded
            await app.state.proxy.close()
            if app.state.runtime is not None:
                app.state.runtime.close()
            app.state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="taskmoe",
        description="OpenAI-compatible serving with task-specialised pruned variants",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(ops_routes.router)
    app.include_router(openai_routes.router)
    if config.admin_key:
        app.include_router(admin_routes.router)
    app.add_middleware(RequestObserver)
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)  # outermost: before anything reads
    return app


def _load(app: FastAPI) -> None:
    config = app.state.config
    started = time.perf_counter()
    try:
        runtime = Runtime(config, app.state.executor, app.state.metrics)
    except (CheckpointError, UnsupportedModelError, ExpertDtypeError) as error:  # the checkpoint or the flags
        app.state.load_error = f"{type(error).__name__}: {error}"
        log.error("loading %s failed: %s", config.model, error)
        return
    except Exception as error:
        app.state.load_error = f"{type(error).__name__}: {error}"
        log.exception("loading %s failed", config.model)
        return
    app.state.runtime = runtime
    log.info(
        "ready: %s with %d patterns from %s in %.1f s",
        runtime.info.name,
        len(runtime.store.names()),
        config.store,
        time.perf_counter() - started,
    )
