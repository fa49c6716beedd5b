"""The FastAPI app of ``vsteer serve``: OpenAI-compatible routes over an :class:`~vsteer.serve.engine.Engine`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true`` gives
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /v1/models``
(the base model, then each adapter with ``parent`` = base, as vLLM lists LoRA adapters),
``GET /v1/steering/vectors``, ``GET /v1/monitors``, ``GET /health``. Every response carries a
``vsteer`` object: the adapter, the steering entries applied and a fingerprint of that
configuration; with a ``monitor``, also its scores (in a stream: in each choice's last chunk).

``n`` choices are ``n`` rows of the batch; ``stop``, ``logprobs`` (chat: ``logprobs`` +
``top_logprobs``; completions: ``logprobs`` 0-5) come back in OpenAI's shapes, streamed too.
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

from vsteer.serve.engine import Engine, QueueFull, Request, split_choices
from vsteer.serve.schema import ApiError, Limits, parse_chat, parse_completion

PAGE = Path(__file__).parent / "static" / "index.html"


def _listing(kind: str, compatible: list[dict], refused: dict[str, str]) -> dict:
    """An OpenAI-style list of preloaded objects: the usable ones, then each refused one with why."""
    data = compatible + [
        {"name": name, "object": kind, "compatible": False, "reason": why} for name, why in refused.items()
    ]
    return {"object": "list", "data": data}


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
        info = {
            "adapter": req.adapter,
            "steering": [
                {"vector": s.vector, "scale": s.scale, "positions": s.positions} for s in req.steering
            ],
            "fingerprint": engine.fingerprint(req.adapter, req.steering, req.monitor, req.recheck),
        }
        if req.monitor is not None:
            info["monitor"] = {
                "name": req.monitor,
                "threshold": engine.monitors[req.monitor].threshold,
                "gate": [i for i, s in enumerate(req.steering) if s.gate is not None],
                "recheck": req.recheck,
            }
        return info

    def scored(info: dict, done: dict[int, dict]) -> dict:
        """``info`` with the monitor's scores: the prompt's, and the generated steps' of each choice
        in ``done`` (``{index: done payload}``)."""
        if "monitor" not in info or not done:
            return info
        first = next(iter(done.values()))["monitor"]
        generated = [
            {
                "index": index,
                "max_score": p["monitor"]["max_score"],
                "flagged": p["monitor"]["max_flagged"],
                "steps": p["monitor"]["steps"],
                "steered_from": p["monitor"]["steered_from"],
            }
            for index, p in sorted(done.items())
        ]
        prompt = {"score": first["prompt_score"], "flagged": first["prompt_flagged"]}
        return {**info, "monitor": {**info["monitor"], "prompt": prompt, "generated": generated}}

    def chat_logprobs(entries: list[dict]) -> dict:
        """OpenAI chat shape: ``{"content": [{token, logprob, bytes, top_logprobs}], "refusal"}``."""

        def one(token: str, logprob: float) -> dict:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        content = [
            {**one(e["token"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"]]}
            for e in entries
        ]
        return {"content": content, "refusal": None}

    def completion_logprobs(entries: list[dict], base: int) -> dict:
        """OpenAI completions shape; ``top_logprobs`` holds the alternatives and the chosen token."""
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{**dict(e["top"]), e["token"]: e["logprob"]} for e in entries],
            "text_offset": [base + e["offset"] for e in entries],
        }

    async def run(req: Request, chat: bool, stream: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        choices = split_choices(req)  # one batch row per choice
        for c in choices:
            c.emit = lambda kind, payload, i=c.index: loop.call_soon_threadsafe(
                events.put_nowait, (i, kind, payload)
            )
        try:
            engine.submit_all(choices)
        except QueueFull as exc:
            raise ApiError(429, str(exc)) from None
        model = req.adapter or engine.model_name
        rid = ("chatcmpl-" if chat else "cmpl-") + req.id
        obj = "chat.completion" if chat else "text_completion"
        info = applied(req)
        want_lp = req.logprobs is not None
        usage = lambda n: {  # noqa: E731
            "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": n,
            "total_tokens": len(req.prompt_ids) + n,
        }

        def logprobs(entries: list[dict] | None):
            if not want_lp:
                return None
            entries = entries or []
            return chat_logprobs(entries) if chat else completion_logprobs(entries, req.text_offset)

        def chunk(
            index: int, text: str | None, finish: str | None, lps, role: bool = False, extra=None
        ) -> str:
            if chat:
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": index, "delta": delta, "logprobs": lps, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": lps, "finish_reason": finish}
            body = {
                "id": rid,
                "object": obj + ".chunk" if chat else obj,
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                "vsteer": info if extra is None else extra,
            }
            return f"data: {json.dumps(body)}\n\n"

        if not stream:
            done: dict[int, dict] = {}
            try:
                while len(done) < len(choices):
                    index, kind, payload = await events.get()
                    if kind == "error":
                        req.cancelled.set()  # the other choices stop too
                        raise ApiError(500, payload)
                    if kind == "done":
                        done[index] = payload
            except asyncio.CancelledError:
                req.cancelled.set()
                raise
            out = []
            for index in range(len(choices)):
                payload = done[index]
                choice = {"index": index}
                if chat:
                    choice["message"] = {"role": "assistant", "content": payload["text"]}
                else:
                    choice["text"] = payload["text"]
                choice["logprobs"] = logprobs(payload["logprobs"])
                choice["finish_reason"] = payload["finish_reason"]
                out.append(choice)
            return JSONResponse(
                {
                    "id": rid,
                    "object": obj,
                    "created": int(time.time()),
                    "model": model,
                    "choices": out,
                    "usage": usage(sum(p["completion_tokens"] for p in done.values())),
                    "vsteer": scored(info, done),
                }
            )

        async def sse():
            try:
                if chat:
                    for c in choices:
                        yield chunk(c.index, "", None, None, role=True)
                pending: dict[int, list] = {}  # logprobs waiting for the chunk that shows their text
                left = len(choices)
                while left:
                    index, kind, payload = await events.get()
                    if kind == "logprobs":
                        pending.setdefault(index, []).extend(payload)
                    elif kind == "delta":
                        yield chunk(index, payload, None, logprobs(pending.pop(index, [])))
                    elif kind == "done":
                        lps = pending.pop(index, None)
                        lps = logprobs(lps) if lps else None
                        final = scored(info, {index: payload})
                        yield chunk(index, None if chat else "", payload["finish_reason"], lps, extra=final)
                        left -= 1
                    else:
                        err = ApiError(500, payload).body()
                        yield f"data: {json.dumps(err)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                req.cancelled.set()  # a client that disconnects frees its rows

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
        return _listing("steering_vector", data, engine.incompatible)

    @app.get("/v1/monitors")
    async def monitors(request: HttpRequest):
        authorize(request)
        data = [
            {
                "name": name,
                "object": "monitor",
                "site": m.site,
                "layers": m.layers,
                "position": m.position,
                "threshold": m.threshold,
                "fpr": m.fpr,
                "model_name": m.model_name,
                "digest": engine.monitor_digests[name],
                "compatible": True,
            }
            for name, m in engine.monitors.items()
        ]
        return _listing("monitor", data, engine.incompatible_monitors)

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        # the playground: one static file shipped in the package (no build step, no CDN)
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_name, "waiting": engine.waiting()}

    return app
