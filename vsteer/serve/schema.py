"""Request validation for ``vsteer serve``: a JSON body in, a :class:`~vsteer.serve.engine.Request` out.

Every problem raises :class:`ApiError` with its HTTP status and one line naming the field, the
value and what was expected (OpenAI's error shape: ``{"error": {"message", "type", "param",
"code"}}``). Steering names a preloaded vector, ``monitor`` a preloaded monitor; anything that
looks like a file path is refused before any lookup.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from vsteer.serve.engine import Request, Steer

POSITIONS = ("generated", "prompt", "all")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = {
            401: "authentication_error",
            404: "not_found_error",
            413: "request_too_large",
            429: "rate_limit_error",
        }.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_tokens: int = 512
    max_prompt_tokens: int = 4096
    max_body_bytes: int = 1 << 20
    max_steering: int = 8
    max_scale: float = 100.0
    max_n: int = 8
    max_stop: int = 4  # OpenAI's limit
    max_stop_chars: int = 256
    max_top_logprobs: int = 20  # chat; completions allow 5, as OpenAI


def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (integer and not isinstance(value, int))
    ):
        raise ApiError(400, f"{key} must be {kind}, got {value!r}", key)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ApiError(400, f"{key} must be {kind} in [{lo:g}, {hi:g}], got {value!r}", key)
    return value


def check_name(value, what: str, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{what} must be a non-empty string, got {value!r}", param)
    if "/" in value or "\\" in value or ".." in value or value.startswith(".") or "~" in value:
        raise ApiError(400, f"{what} {value!r} looks like a path; name a preloaded {what} instead", param)
    if not NAME.match(value):
        raise ApiError(400, f"{what} {value!r} is not a valid name (letters, digits, '_', '.', '-')", param)
    return value


def parse_steering(raw, engine, limits: Limits) -> list[Steer]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ApiError(
            400,
            f"steering must be a list of {{vector, scale, positions}}, got {type(raw).__name__}",
            "steering",
        )
    if len(raw) > limits.max_steering:
        raise ApiError(
            400, f"steering has {len(raw)} entries; at most {limits.max_steering} allowed", "steering"
        )
    out = []
    for i, item in enumerate(raw):
        param = f"steering[{i}]"
        if not isinstance(item, dict):
            raise ApiError(
                400, f"{param} must be an object {{vector, scale, positions}}, got {item!r:.60}", param
            )
        unknown = sorted(set(item) - {"vector", "scale", "positions"})
        if unknown:
            raise ApiError(
                400, f"{param} has unknown keys {unknown}; expected vector, scale, positions", param
            )
        name = check_name(item.get("vector"), "vector", f"{param}.vector")
        if name in engine.incompatible:
            raise ApiError(
                400,
                f"vector {name!r} does not fit this model: {engine.incompatible[name]}",
                f"{param}.vector",
            )
        if name not in engine.vectors:
            known = ", ".join(engine.vectors) or "none loaded"
            raise ApiError(404, f"no steering vector named {name!r}; available: {known}", f"{param}.vector")
        scale = item.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ApiError(400, f"{param}.scale must be a finite number, got {scale!r}", f"{param}.scale")
        if abs(scale) > limits.max_scale:
            raise ApiError(
                400,
                f"{param}.scale {scale!r} is out of range [-{limits.max_scale:g}, {limits.max_scale:g}]",
                f"{param}.scale",
            )
        positions = item.get("positions", "generated")
        if positions not in POSITIONS:
            raise ApiError(
                400,
                f"{param}.positions must be one of {', '.join(POSITIONS)}, got {positions!r}",
                f"{param}.positions",
            )
        out.append(Steer(name, float(scale), positions))
    return out


def parse_monitor(raw, engine, steering: list[Steer]) -> tuple[str | None, int | None]:
    """``monitor: {"name": NAME, "gate": [steering indices], "recheck": K}`` -> ``(the monitor's
    name, K)``; marks the gated entries of ``steering``. They apply only to rows whose prompt the
    monitor flags; with ``recheck`` also to rows it flags at every ``K``-th decoding step, from
    that step on (``vsteer.steer(when=vsteer.monitor.recheck(monitor, every=K))``)."""
    if raw is None:
        return None, None
    if not isinstance(raw, dict):
        raise ApiError(400, f"monitor must be an object {{name, gate}}, got {raw!r:.60}", "monitor")
    unknown = sorted(set(raw) - {"name", "gate", "recheck"})
    if unknown:
        raise ApiError(400, f"monitor has unknown keys {unknown}; expected name, gate, recheck", "monitor")
    name = check_name(raw.get("name"), "monitor", "monitor.name")
    if name in engine.incompatible_monitors:
        raise ApiError(
            400,
            f"monitor {name!r} does not fit this model: {engine.incompatible_monitors[name]}",
            "monitor.name",
        )
    if name not in engine.monitors:
        known = ", ".join(engine.monitors) or "none loaded"
        raise ApiError(404, f"no monitor named {name!r}; available: {known}", "monitor.name")
    gate = raw.get("gate", [])
    if gate is None:
        gate = []
    if not isinstance(gate, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in gate):
        raise ApiError(
            400, f"monitor.gate must be a list of steering entry indices, got {gate!r:.60}", "monitor.gate"
        )
    recheck = raw.get("recheck")
    if recheck is not None:
        if isinstance(recheck, bool) or not isinstance(recheck, int) or not 1 <= recheck <= 2**31:
            raise ApiError(
                400,
                f"monitor.recheck must be a positive number of decoding steps, got {recheck!r:.60}",
                "monitor.recheck",
            )
        if not gate:
            raise ApiError(
                400,
                "monitor.recheck re-decides gated steering; list the entries to gate in monitor.gate",
                "monitor.recheck",
            )
    if not gate:
        return name, None
    mon = engine.monitors[name]
    if mon.position == "completion" and recheck is None:
        raise ApiError(
            400,
            f"monitor {name!r} reads position 'completion' and has no prompt score to gate on; "
            "use a 'last' or 'mean' monitor, or decide during generation with monitor.recheck",
            "monitor.gate",
        )
    from vsteer.sites import as_site, exec_key

    last = max(exec_key(as_site(site)) for site in mon.sites)
    for j, i in enumerate(gate):
        param = f"monitor.gate[{j}]"
        if not 0 <= i < len(steering):
            raise ApiError(
                400,
                f"{param} is {i}, but steering has {len(steering)} entries (indices 0..{len(steering) - 1})"
                if steering
                else f"{param} is {i}, but the request has no steering entries to gate",
                param,
            )
        if i in gate[:j]:
            raise ApiError(400, f"{param} repeats steering entry {i}", param)
        s = steering[i]
        vec = engine.vectors[s.vector]
        # as vsteer.steer(when=): the decision exists only once the monitor's last site has run
        early = [
            f"{vec.site}.{layer}" for layer in vec.layers if exec_key(as_site((vec.site, layer))) <= last
        ]
        if s.positions != "generated" and early:
            raise ApiError(
                400,
                f"steering[{i}] is gated by monitor {name!r}, which decides after "
                f"{mon.site}.{max(mon.layers)}, so it cannot steer the prompt at {', '.join(early)}; "
                "use positions 'generated' or a vector at later layers",
                param,
            )
        s.gate = name
    return name, recheck


def parse_adapter(model, engine) -> str | None:
    if not isinstance(model, str) or not model:
        raise ApiError(400, f"model must be a non-empty string, got {model!r}", "model")
    if model == engine.model_name:
        return None
    if model in engine.adapters:
        return model
    known = ", ".join([engine.model_name, *engine.adapters])
    raise ApiError(404, f"the model {model!r} does not exist; available: {known}", "model", "model_not_found")


def parse_stop(raw, limits: Limits) -> list[str]:
    """``stop``: a string or a list of up to ``max_stop`` strings (empty strings stop nothing)."""
    if raw is None:
        return []
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
        raise ApiError(
            400,
            f"stop must be a string or a list of up to {limits.max_stop} strings, got {raw!r:.60}",
            "stop",
        )
    if len(stops) > limits.max_stop:
        raise ApiError(400, f"stop has {len(stops)} sequences; at most {limits.max_stop} allowed", "stop")
    for x in stops:
        if len(x) > limits.max_stop_chars:
            raise ApiError(
                400, f"stop sequence has {len(x)} characters; at most {limits.max_stop_chars} allowed", "stop"
            )
    return list(dict.fromkeys(x for x in stops if x))


def _chat_logprobs(body: dict, limits: Limits) -> int | None:
    """Chat: ``logprobs: true`` and ``top_logprobs`` in [0, 20] -> alternatives per token, or None."""
    want = body.get("logprobs")
    if want is not None and not isinstance(want, bool):
        raise ApiError(400, f"logprobs must be true or false, got {want!r:.40}", "logprobs")
    top = body.get("top_logprobs")
    if top is not None and not want:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    if not want:
        return None
    return int(_number(body, "top_logprobs", 0, 0, limits.max_top_logprobs, integer=True))


def _completion_logprobs(body: dict) -> int | None:
    """Completions: ``logprobs`` an integer in [0, 5] (alternatives per token), or None."""
    value = _number(body, "logprobs", None, 0, 5, integer=True)
    return None if value is None else int(value)


def context_length(engine) -> int | None:
    """The most positions the engine's model takes (its config's ``n_positions`` or
    ``max_position_embeddings``), or None where its config states none. A request may not ask for
    more: learned position embeddings fail past it (and one failing row would fail its batch)."""
    config = getattr(getattr(engine, "model", None), "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _common(
    body: dict,
    engine,
    limits: Limits,
    prompt_ids: list[int],
    default_max: int,
    logprobs: int | None,
    text_offset: int = 0,
) -> Request:
    if body.get("best_of") not in (None, 1):
        raise ApiError(
            400, f"best_of must be 1 (use n for several choices), got {body.get('best_of')!r}", "best_of"
        )
    n = _number(body, "n", 1, 1, limits.max_n, integer=True)
    stop = parse_stop(body.get("stop"), limits)
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, f"stream must be true or false, got {body.get('stream')!r}", "stream")
    adapter = parse_adapter(body.get("model"), engine)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, default_max, 1, limits.max_tokens, integer=True)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 1e-6, 1.0)
    seed = _number(body, "seed", None, 0, 2**63 - 1, integer=True)
    steering = parse_steering(body.get("steering"), engine, limits)
    monitor, recheck = parse_monitor(body.get("monitor"), engine, steering)
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise ApiError(
            400,
            f"prompt has {len(prompt_ids)} tokens; at most {limits.max_prompt_tokens} allowed",
            "messages",
        )
    if not prompt_ids:
        raise ApiError(400, "prompt is empty after tokenisation", "prompt")
    context = context_length(engine)
    if context is not None and len(prompt_ids) + max_tokens > context:
        if len(prompt_ids) >= context or body.get(key) is not None:
            raise ApiError(
                400,
                f"this model's context is {context} tokens; the prompt has {len(prompt_ids)} and "
                f"{key} asks for {max_tokens} more",
                key if len(prompt_ids) < context else "messages",
            )
        max_tokens = context - len(prompt_ids)  # not asked for: what the context leaves
    return Request(
        prompt_ids=prompt_ids,
        max_tokens=int(max_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        seed=seed,
        adapter=adapter,
        steering=steering,
        stop=stop,
        logprobs=logprobs,
        n=int(n),
        text_offset=text_offset,
        monitor=monitor,
        recheck=recheck,
    )


def _content(msg, i: int) -> str:
    content = msg.get("content")
    if isinstance(content, list):  # OpenAI content parts: text only
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise ApiError(
                    400, f"messages[{i}].content parts must be {{type: text, text}}", f"messages[{i}].content"
                )
            parts.append(part["text"])
        return "".join(parts)
    if not isinstance(content, str):
        raise ApiError(
            400, f"messages[{i}].content must be a string, got {content!r:.60}", f"messages[{i}].content"
        )
    return content


def parse_chat(body, engine, limits: Limits) -> Request:
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages")
    clean = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            role = msg.get("role") if isinstance(msg, dict) else msg
            raise ApiError(
                400,
                f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r:.40}",
                f"messages[{i}].role",
            )
        clean.append({"role": msg["role"], "content": _content(msg, i)})
    tok = engine.tokenizer
    text = tok.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    logprobs = _chat_logprobs(body, limits)
    return _common(body, engine, limits, list(ids), default_max=limits.max_tokens, logprobs=logprobs)


def parse_completion(body, engine, limits: Limits) -> Request:
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, f"prompt must be a non-empty string, got {prompt!r:.60}", "prompt")
    if body.get("echo"):
        raise ApiError(400, "echo is not supported", "echo")
    ids = engine.tokenizer(prompt)["input_ids"]
    logprobs = _completion_logprobs(body)
    return _common(
        body,
        engine,
        limits,
        list(ids),
        default_max=min(16, limits.max_tokens),
        logprobs=logprobs,
        text_offset=len(prompt),  # OpenAI's text_offset counts from the start of the prompt
    )


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body
