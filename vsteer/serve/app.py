"""The FastAPI app of ``vsteer serve``: OpenAI-compatible routes over an :class:`~vsteer.serve.engine.Engine`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true`` gives
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /v1/models``
(the base model, then each adapter with ``parent`` = base, as vLLM lists LoRA adapters),
``GET /v1/steering/vectors``, ``GET /health``. Every response carries a ``vsteer`` object:
the adapter, the steering entries applied and a fingerprint of that configuration.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from pathlib import Path

# FastAPI reads the route annotations, so these imports live at module level
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from vsteer.serve.engine import Engine, QueueFull, Request
from vsteer.serve.schema import ApiError, Limits, parse_chat, parse_completion

PAGE = Path(__file__).parent / "static" / "index.html"


def create_app(engine: Engine, api_key: str | None = None, limits: Limits | None = None):

    limits = limits or Limits()
    app = FastAPI(title="vsteer serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(404)
    async def _not_found(request, exc):
        return JSONResponse(ApiError(404, f"no route {request.url.path}").body(), status_code=404)

    @app.exception_handler(405)
    async def _bad_method(request, exc):
        return JSONResponse(
            ApiError(405, f"method {request.method} not allowed on {request.url.path}").body(),
            status_code=405,
        )

    def authorize(request: HttpRequest) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        # constant-time: the comparison takes as long whatever prefix matches
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(
                401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key"
            )

    async def read_json(request: HttpRequest):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"request body has {declared} bytes; at most {limits.max_body_bytes} allowed")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                raise ApiError(413, f"request body exceeds {limits.max_body_bytes} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(
                400, f"request body is not valid JSON: {exc.msg if hasattr(exc, 'msg') else exc}"
            ) from None

    def applied(req: Request) -> dict:
        return {
            "adapter": req.adapter,
            "steering": [
                {"vector": s.vector, "scale": s.scale, "positions": s.positions} for s in req.steering
            ],
            "fingerprint": engine.fingerprint(req.adapter, req.steering),
        }

    async def run(req: Request, chat: bool, stream: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req.emit = lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
        try:
            engine.submit(req)
        except QueueFull as exc:
            raise ApiError(429, str(exc)) from None
        model = req.adapter or engine.model_name
        rid = ("chatcmpl-" if chat else "cmpl-") + req.id
        obj = "chat.completion" if chat else "text_completion"
        info = applied(req)
        usage = lambda n: {  # noqa: E731
            "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": n,
            "total_tokens": len(req.prompt_ids) + n,
        }

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            body = {
                "id": rid,
                "object": obj + ".chunk" if chat else obj,
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                "vsteer": info,
            }
            return f"data: {json.dumps(body)}\n\n"

        if not stream:
            try:
                while True:
                    kind, payload = await events.get()
                    if kind == "error":
                        raise ApiError(500, payload)
                    if kind == "done":
                        break
            except asyncio.CancelledError:
                req.cancelled.set()
                raise
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": payload["text"]},
                    "logprobs": None,
                    "finish_reason": payload["finish_reason"],
                }
            else:
                choice = {
                    "index": 0,
                    "text": payload["text"],
                    "logprobs": None,
                    "finish_reason": payload["finish_reason"],
                }
            return JSONResponse(
                {
                    "id": rid,
                    "object": obj,
                    "created": int(time.time()),
                    "model": model,
                    "choices": [choice],
                    "usage": usage(payload["completion_tokens"]),
                    "vsteer": info,
                }
            )

        async def sse():
            try:
                if chat:
                    yield chunk("", None, role=True)
                while True:
                    kind, payload = await events.get()
                    if kind == "delta":
                        yield chunk(payload, None)
                    elif kind == "done":
                        yield chunk(None if chat else "", payload["finish_reason"])
                        break
                    else:
                        err = ApiError(500, payload).body()
                        yield f"data: {json.dumps(err)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                req.cancelled.set()  # a client that disconnects frees its row

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        authorize(request)
        body = await read_json(request)
        req = parse_chat(body, engine, limits)
        return await run(req, chat=True, stream=bool(body.get("stream")))

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        authorize(request)
        body = await read_json(request)
        req = parse_completion(body, engine, limits)
        return await run(req, chat=False, stream=bool(body.get("stream")))

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        authorize(request)
        base = engine.model_name
        data = [
            {
                "id": base,
                "object": "model",
                "created": created,
                "owned_by": "vsteer",
                "root": base,
                "parent": None,
            }
        ]
        data += [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vsteer",
                "root": name,
                "parent": base,
            }
            for name in engine.adapters
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/steering/vectors")
    async def vectors(request: HttpRequest):
        authorize(request)
        data = [
            {
                "name": name,
                "object": "steering_vector",
                "site": v.site,
                "layers": v.layers,
                "model_name": v.model_name,
                "method": v.method,
                "digest": engine.digests[name],
                "compatible": True,
            }
            for name, v in engine.vectors.items()
        ]
        data += [
            {"name": name, "object": "steering_vector", "compatible": False, "reason": why}
            for name, why in engine.incompatible.items()
        ]
        return {"object": "list", "data": data}

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        # the playground: one static file shipped in the package (no build step, no CDN)
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_name, "waiting": engine.waiting()}

    return app
