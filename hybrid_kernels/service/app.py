"""FastAPI application factory: ``create_app(config)``.

Endpoints: POST /query/hybrid, POST /stream/query (SSE), POST /retention/update (API key),
POST /diffusion/generate, POST /distillation/cascade, GET /hybrid/stats, GET /health, and the
OpenAPI schema at /openapi.json. Blocking work runs on a bounded :class:`WorkerPool`: a full
queue is answered 503, a request running past its timeout 504.
"""

import asyncio
import contextlib
import hmac
import json
import threading
from collections import defaultdict, deque
from typing import Optional

import numpy as np

from .config import ServiceConfig
from .schemas import (CascadeResponse, DiffusionRequest, DiffusionResponse, Health, QueryRequest,
                      QueryResponse, RetentionResult, RetentionUpdate, Stats)
from .workers import QueueFull, WorkerPool

LATENCY_WINDOW = 2000     # recent requests per endpoint kept for the percentiles


class _Latency:
    def __init__(self):
        self._lock = threading.Lock()
        self._seconds = defaultdict(lambda: deque(maxlen=LATENCY_WINDOW))

    def record(self, endpoint: str, seconds: float) -> None:
        with self._lock:
            self._seconds[endpoint].append(seconds)

    def summary(self):
        with self._lock:
            items = {k: np.asarray(v) for k, v in self._seconds.items() if v}
        return {k: {"count": float(len(v)), **{f"p{q}": float(np.percentile(v, q) * 1e3)
                                                for q in (50, 95, 99)}} for k, v in items.items()}


def _kernels():
    from ..bench.env import backend_status, cpu_features
    usable = [name for name, why in backend_status().items() if why is None]
    return {"backend": usable[0] if usable else None,
            "isa": str(cpu_features().get("selected_isa"))}


def create_app(config: ServiceConfig, engine=None, diffusion=None):
    """``engine``: an :class:`~hybrid_kernels.service.engine.Engine` (default: built from
    ``config`` by :func:`~hybrid_kernels.service.loading.build_engine`)."""
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse
    from fastapi.security import APIKeyHeader
    from sse_starlette.sse import EventSourceResponse

    from .engine import process_memory
    if engine is None:
        from .loading import build_diffusion, build_engine
        engine = build_engine(config)
        diffusion = diffusion if diffusion is not None else build_diffusion(config)
    pool = WorkerPool(config.workers, config.queue_limit, config.timeout_s)
    latency = _Latency()
    kernels = _kernels()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.shutdown()          # uvicorn stopped accepting; finish every accepted write
        engine.store.close()

    app = FastAPI(title="hybrid-kernels RAG service", lifespan=lifespan)
    app.state.engine, app.state.pool = engine, pool

    @app.exception_handler(QueueFull)
    async def _full(request, exc):
        return JSONResponse({"detail": f"server busy: {exc}"}, status_code=503,
                            headers={"Retry-After": "1"})

    @app.exception_handler(asyncio.TimeoutError)
    async def _timeout(request, exc):
        return JSONResponse({"detail": f"request ran past {config.timeout_s} s"}, status_code=504)

    @app.middleware("http")
    async def _timed(request: Request, call_next):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        response = await call_next(request)
        if response.status_code < 400:
            latency.record(request.url.path, loop.time() - t0)
        return response

    header = APIKeyHeader(name="X-API-Key", auto_error=False)

    def require_key(key: Optional[str] = Depends(header)):
        if key is None:
            raise HTTPException(401, "missing X-API-Key header")
        if not hmac.compare_digest(key.encode(), config.api_key.encode()):
            raise HTTPException(403, "wrong API key")

    @app.get("/health", response_model=Health)
    async def health():
        counts = engine.store.counts()
        return Health(status="ok", documents=counts["documents"], segments=counts["segments"])

    @app.post("/query/hybrid", response_model=QueryResponse)
    async def query(req: QueryRequest):
        return await pool.run(engine.answer, req.question, req.top_k, req.max_new_tokens)

    @app.post("/distillation/cascade", response_model=CascadeResponse)
    async def cascade(req: QueryRequest):
        if engine.cascade is None:
            raise HTTPException(404, "this server was started without a cascade")
        return await pool.run(engine.answer_cascade, req.question, req.top_k, req.max_new_tokens)

    @app.post("/retention/update", response_model=RetentionResult, dependencies=[Depends(require_key)])
    async def retention(req: RetentionUpdate):
        applied = await pool.run(engine.update, [d.model_dump() for d in req.add],
                                 req.remove_documents, req.remove_segments)
        return RetentionResult(log_seq=applied.log_seq, added_documents=applied.added_documents,
                               added_segments=[s[0] for s in applied.added_segments],
                               removed_documents=applied.removed_documents,
                               removed_segments=len(applied.removed_segment_ids))

    @app.post("/diffusion/generate", response_model=DiffusionResponse)
    async def diffusion_generate(req: DiffusionRequest):
        if diffusion is None:
            raise HTTPException(404, "this server was started without a diffusion model")
        texts = await pool.run(diffusion.generate_texts, req.condition, req.num_samples,
                               req.num_steps, req.seed)
        return DiffusionResponse(condition=req.condition, documents=texts)

    @app.post("/stream/query")
    async def stream(req: QueryRequest, request: Request):
        passages, timings = await pool.run(engine.retrieve, req.question, req.top_k)
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        emit = lambda word: loop.call_soon_threadsafe(tokens.put_nowait, word)  # noqa: E731
        job = asyncio.ensure_future(pool.submit(engine.stream_tokens, req.question, passages,
                                             req.max_new_tokens, emit, cancelled))
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(tokens.put_nowait, None))

        async def events():
            try:
                yield {"event": "retrieval", "data": json.dumps({"passages": passages, "timings": timings})}
                while True:
                    word = await tokens.get()
                    if word is None:
                        break
                    yield {"event": "token", "data": word}
                exc = job.exception()
                if exc is not None:
                    yield {"event": "error", "data": f"{type(exc).__name__}: {exc}"}
                else:
                    yield {"event": "done", "data": json.dumps({"tokens": job.result()})}
            finally:
                cancelled.set()      # client gone (or finished): the decoding loop stops

        return EventSourceResponse(events(), ping=15)

    @app.get("/hybrid/stats", response_model=Stats)
    async def stats():
        counts = engine.store.counts()
        index = engine.index_size()
        memory = {"process_rss": process_memory() or 0, "index": index["bytes"]}
        return Stats(documents=counts["documents"], segments=counts["segments"],
                     index_vectors=index["vectors"], index_bytes=index["bytes"],
                     log_entries=counts["log_entries"], latency_ms=latency.summary(),
                     memory=memory, kernels=kernels, workers=pool.stats())

    return app
