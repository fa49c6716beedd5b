"""The batching scheduler behind ``vsteer serve``: one worker thread, one model, continuous batching.

Requests queue up. Between decoding steps the worker admits what is waiting (up to
``max_batch`` rows): it prefills the new prompts (left-padded) into their own KV cache, then
pads and concatenates that cache onto the running batch's, so new rows join without waiting
for the others; a row that finishes (EOS, ``max_tokens``, client gone) leaves the batch and
its cache at once. Each row carries its own steering (per-row scales of a ``[batch, ...]``
vector through the hook layer; a row outside a vector's group gets scale 0, which adds
exactly nothing) and its own adapter (PEFT's mixed-adapter batches, ``adapter_names=``).
``positions``: a prefill holds only prompt tokens and a decoding step only generated ones,
so each forward applies the entries whose rule covers its tokens. Position ids come from the
attention mask, so a padded row sees the positions it has alone: greedy outputs of a row
equal the same request served by itself.

A request with ``n`` choices becomes ``n`` rows (:func:`split_choices`), each with its own
sampler, steering and adapter. ``stop`` strings end a row before their first occurrence, and
text that may be the start of a stop string is held back from the stream until it is not.
``logprobs`` come from the very logits the sampler picks from (after steering and adapter).

A request may name a preloaded :class:`~vsteer.monitor.Monitor`: its op (the one
:func:`vsteer.watch` installs) scores every row of each forward that uses it, at the prompt and at
each decoding step, and steering entries gated on it apply only to rows whose prompt it flags, as
``vsteer.steer(..., when=monitor)`` does: in the prefill a per-row select
(:class:`~vsteer.monitor.Gated`) set by the monitor mid-forward, in decoding steps the row's own
decision (scale 0 where it did not fire). Running sums for ``mean``/``completion`` monitors live on
the row, so rows joining and leaving change nothing.

Caches with sliding-window layers (Gemma 3) are not padded and merged: there new requests
wait until the running batch has finished (static batching).
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from vsteer.errors import VectorError
from vsteer.models import eos_ids
from vsteer.monitor import Flags, Gated, Monitor, MonitorError, WatchState
from vsteer.vectors import SteeringVector

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests already."""


@dataclass
class Steer:
    """One steering entry of a request, resolved: a preloaded vector by name."""

    vector: str
    scale: float
    positions: str  # "generated" | "prompt" | "all"
    gate: str | None = None  # a monitor's name: applies only to rows whose prompt it flags


@dataclass
class Request:
    """A validated generation request; events go to ``emit(kind, payload)`` from the worker thread.

    Events: ``("delta", text)``, ``("logprobs", [entry, ...])`` (before the delta or done that
    first shows those tokens' text), ``("done", {"finish_reason", "completion_tokens", "text",
    "logprobs"})``, ``("error", message)``. An entry is ``{"token", "logprob", "top": [(token,
    logprob), ...], "offset"}`` (``offset``: where the token's text starts in the completion).

    ``stop``: strings that end generation before their first occurrence (excluded from the
    text). ``logprobs``: how many top alternatives to return per token (0 = only the chosen
    token's), ``None`` for no logprobs. ``n``: choices wanted; ``index``: which one this is.
    ``monitor``: a preloaded monitor's name; with it, ``done`` carries ``"monitor": {"prompt_score",
    "prompt_flagged", "max_score", "max_flagged", "steps", "steered_from"}`` (scores of the row's
    own activations; ``steered_from``: the step from which gated entries applied, 0 for the prompt,
    ``None`` if never or nothing is gated). ``recheck``: rows not flagged at the prompt are scored
    again at every ``recheck``-th decoding step and steered from the first that fires.
    """

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    adapter: str | None = None
    steering: list[Steer] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    n: int = 1
    index: int = 0
    text_offset: int = 0  # characters before the completion text (the prompt, for completions)
    monitor: str | None = None
    recheck: int | None = None  # gated entries: decide again every ``recheck`` decoding steps
    emit: object = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])


def split_choices(req: Request) -> list[Request]:
    """One request per choice: ``req`` itself for choice 0, copies with their own id and seed.

    The copies share ``cancelled`` (a client that leaves frees all its rows). Choice ``i > 0``
    of a seeded request samples with a seed derived from ``(seed, i)``: the choices differ
    from each other and each is reproducible; choice 0 is what ``n=1`` gives.
    """
    out = [req]
    for i in range(1, req.n):
        seed = None
        if req.seed is not None:
            digest = hashlib.sha256(f"{req.seed}:{i}".encode()).digest()
            seed = int.from_bytes(digest[:8], "big") >> 1
        out.append(replace(req, id=f"{req.id}-{i}", seed=seed, index=i, emit=None))
    return out


def vector_digest(vec: SteeringVector) -> str:
    """sha256 (16 hex) of a vector's site, layers and float32 tensors: what a fingerprint names."""
    h = hashlib.sha256(vec.site.encode())
    for layer, t in vec.directions.items():
        h.update(str(layer).encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def monitor_digest(mon: Monitor) -> str:
    """sha256 (16 hex) of a monitor's site, position, layers, tensors, bias and threshold."""
    h = hashlib.sha256(f"{mon.site}:{mon.position}:{mon.bias!r}:{mon.threshold!r}".encode())
    for layer, t in mon.weights.items():
        h.update(str(layer).encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class Engine:
    """Owns the model, the preloaded vectors and adapters, and the worker thread.

    ``vectors``: ``{name: SteeringVector}``; those that do not fit the model are kept out and
    listed in ``incompatible`` (``{name: reason}``). ``adapters``: ``{name: PEFT directory}``.
    ``monitors``: ``{name: Monitor}``, likewise checked (misfits in ``incompatible_monitors``).
    """

    def __init__(
        self,
        model,
        tokenizer,
        model_name: str,
        vectors: dict[str, SteeringVector] | None = None,
        adapters: dict[str, str | Path] | None = None,
        max_batch: int = 16,
        max_queue: int = 256,
        monitors: dict[str, Monitor] | None = None,
    ):
        self.base = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.vectors: dict[str, SteeringVector] = {}
        self.digests: dict[str, str] = {}
        self.incompatible: dict[str, str] = {}
        for name, vec in sorted((vectors or {}).items()):
            try:
                vec.check(model)
            except VectorError as exc:
                self.incompatible[name] = str(exc)
                continue
            self.vectors[name] = vec
            self.digests[name] = vector_digest(vec)
        self.monitors: dict[str, Monitor] = {}
        self.monitor_digests: dict[str, str] = {}
        self.incompatible_monitors: dict[str, str] = {}
        for name, mon in sorted((monitors or {}).items()):
            try:
                mon.check(model)
            except MonitorError as exc:
                self.incompatible_monitors[name] = str(exc)
                continue
            self.monitors[name] = mon
            self.monitor_digests[name] = monitor_digest(mon)
        self.adapters: dict[str, str] = {}  # public name -> PEFT adapter name
        self.model = model
        if adapters:
            from peft import PeftModel

            for i, (name, path) in enumerate(sorted(adapters.items())):
                internal = f"adapter{i}"  # PEFT names become module keys: no dots or dashes
                if i == 0:
                    self.model = PeftModel.from_pretrained(model, str(path), adapter_name=internal)
                else:
                    self.model.load_adapter(str(path), adapter_name=internal)
                self.adapters[name] = internal
            self.model.eval()
        self.device = next(model.parameters()).device
        self.eos = eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (min(self.eos) if self.eos else 0)
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        import inspect

        from vsteer.arch import unwrap

        # transformers 5.x renames past_key_values to cache; use whichever this version takes
        params = inspect.signature(unwrap(model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._queue: queue.Queue[Request] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # held for each scheduler iteration (tests hold it to queue requests)
        self._thread: threading.Thread | None = None
        self.batches_run = 0
        self.submitted = 0
        self.joins = 0  # requests that joined a batch already decoding
        self._ops_cache: dict = {}
        self._gates: dict[str, dict] = {}  # monitor name -> its gate dict (see _watchers)
        self.max_rows_seen = 0

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="vsteer-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, req: Request) -> None:
        self.submit_all([req])

    def submit_all(self, reqs: list[Request]) -> None:
        """Queue all of ``reqs`` (the choices of one request) or none of them."""
        if self._queue.qsize() + len(reqs) > self.max_queue:
            raise QueueFull(f"server queue is full ({self.max_queue} requests waiting); retry later")
        for req in reqs:
            self._queue.put(req)
            self.submitted += 1

    def refusals(self) -> list[str]:
        """One line per preloaded vector or monitor kept out because it does not fit the model."""
        return [f"vector {n!r} refused: {why}" for n, why in self.incompatible.items()] + [
            f"monitor {n!r} refused: {why}" for n, why in self.incompatible_monitors.items()
        ]

    def waiting(self) -> int:
        return self._queue.qsize()

    def _loop(self) -> None:
        active: list[_Row] = []
        state: dict = {}
        while not self._stop.is_set():
            if not active:
                try:
                    first = self._queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                fresh = [first]
            else:
                fresh = []
            with self._lock:
                try:
                    active = self._iteration(active, fresh, state)
                except Exception as exc:  # one bad batch must not kill the server
                    for row in active + [_Row(r) for r in fresh]:
                        _emit(row.req, "error", f"generation failed: {type(exc).__name__}: {exc}")
                    active, state = [], {}
        for row in active:
            _emit(row.req, "error", "server is shutting down")

    # --- fingerprint ---------------------------------------------------------------------------
    def fingerprint(
        self,
        adapter: str | None,
        steering: list[Steer],
        monitor: str | None = None,
        recheck: int | None = None,
    ) -> str:
        """sha256 (16 hex) of the base model, adapter and steering entries (with vector digests),
        and the monitor (with its digest), gates and recheck interval when there is one."""
        entries = []
        for s in steering:
            entry = {
                "vector": s.vector,
                "digest": self.digests[s.vector],
                "scale": s.scale,
                "positions": s.positions,
            }
            if s.gate is not None:
                entry["gate"] = s.gate
            entries.append(entry)
        cfg = {"model": self.model_name, "adapter": adapter, "steering": entries}
        if monitor is not None:
            cfg["monitor"] = {"name": monitor, "digest": self.monitor_digests[monitor]}
            if recheck is not None:
                cfg["monitor"]["recheck"] = recheck
        return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]

    # --- one batch -----------------------------------------------------------------------------
    def _ops(self, rows: list[_Row], kinds: tuple[str, ...], prompt: bool, due: list[bool]) -> dict:
        """Hook operations for one forward: one add per vector and layer, with per-row scales.

        Only entries whose ``positions`` is in ``kinds`` apply; a row outside a group gets scale
        0, which adds exactly nothing. Gated entries are decided mid-forward where a decision is
        due (the prefill, and rows ``due`` for a recheck at this step): their group is wrapped in
        :class:`~vsteer.monitor.Gated`, reading the gate dict that the monitor's op fills at its
        last layer (``self._gates``); rows already decided count as plain entries (fired) or not
        at all.
        """
        from vsteer.steering import steering_ops

        n = len(rows)
        groups: dict[str, torch.Tensor] = {}
        for i, row in enumerate(rows):
            for s in row.req.steering:
                if s.positions not in kinds:
                    continue
                gate = s.gate or ""
                if gate and not prompt:
                    if row.fired:
                        gate = ""  # decided: from here on a plain entry of this row
                    elif not due[i]:
                        continue
                scales = groups.setdefault((s.vector, s.positions, gate), torch.zeros(n))
                scales[i] += s.scale
        ops: dict = {}
        for (name, positions, gate), scales in sorted(groups.items()):
            for key, op in steering_ops(
                self.base, [(self.vectors[name], scales)], positions=positions
            ).items():
                ops.setdefault(key, []).append(Gated(op, self._gates.setdefault(gate, {})) if gate else op)
        return ops

    def _due(self, rows: list[_Row], prompt: bool) -> list[bool]:
        """Rows whose gated entries are re-decided in this decoding step: a recheck request not
        yet steered, at its every ``recheck``-th generated token."""
        if prompt:
            return [False] * len(rows)
        return [
            row.req.recheck is not None and not row.fired and (row.steps + 1) % row.req.recheck == 0
            for row in rows
        ]

    def _row_scores(self, rows: list[_Row], name: str, state: WatchState, prompt: bool) -> torch.Tensor:
        """``[rows]`` float32 scores of this forward: the prompt's, or at a decoding step the
        token's own (``last``) or the row's running mean over its text so far (``mean``,
        ``completion``: the row's stored sums plus this forward's), as one watch over the row's
        whole generation gives."""
        mon = self.monitors[name]
        score = state.flags.steps[-1]
        if prompt or mon.position == "last":
            return score
        sums = {layer: t.tolist() for layer, t in state.sums.items()}
        counts = state.count.tolist()
        out = []
        for i, row in enumerate(rows):
            total = sum(row.sums.get(layer, 0.0) + sums[layer][i] for layer in mon.layers)
            count = row.count + counts[i]
            out.append(total / count + mon.bias if count else math.nan)
        return torch.tensor(out, dtype=torch.float32)

    def _watchers(self, rows: list[_Row], prompt: bool, due: list[bool]) -> tuple[dict, dict]:
        """``(watch states, hook ops)`` of the monitors the rows of one forward use.

        Each is :func:`vsteer.watch`'s op, fresh per forward (rows join and leave between
        forwards). Where a decision is due (the prompt; ``due`` rows of a decoding step) it sets
        its gate dict (``self._gates[name]``, emptied first) to the rows it flags when its last
        layer has run, which the :class:`~vsteer.monitor.Gated` entries read in the same forward.
        """
        states, ops = {}, {}
        for name in sorted({row.req.monitor for row in rows if row.req.monitor}):
            mon = self.monitors[name]
            gate = self._gates.setdefault(name, {})
            gate.clear()
            state = states[name] = WatchState(mon, Flags(mon))
            mine = [d and row.req.monitor == name for d, row in zip(due, rows)]
            if prompt:
                state.on_prompt = lambda fired, g=gate: g.__setitem__("rows", fired)
            elif any(mine):
                mask = torch.tensor(mine)

                def on_step(_step, _fired, g=gate, st=state, n=name, m=mask, th=mon.threshold):
                    g["scores"] = self._row_scores(rows, n, st, False)  # _read_monitors reuses them
                    g["rows"] = m & (g["scores"] > th)

                state.on_step = on_step
            for key, op in state.ops().items():
                ops.setdefault(key, []).append(op)
        return states, ops

    def _read_monitors(self, rows: list[_Row], states: dict, prompt: bool) -> None:
        """Store each monitored row's score of this forward: the prompt score and decision, or one
        more generated step (``mean``/``completion``: the running mean from the row's own sums)."""
        for name, state in states.items():
            mon = self.monitors[name]
            if not state.flags.steps:
                continue
            gate = self._gates.get(name, {})
            scores = gate.get("scores")  # computed mid-forward where a recheck was due
            if scores is None:
                scores = self._row_scores(rows, name, state, prompt)
            # the very comparison the gates used mid-forward (float32 scores against the threshold)
            above = (scores > mon.threshold).tolist()
            decided = gate.get("rows")
            decided = decided.tolist() if decided is not None else [False] * len(rows)
            sums = {layer: t.tolist() for layer, t in state.sums.items()}
            counts = state.count.tolist() if state.count is not None else None
            gated = [any(s.gate for s in row.req.steering) for row in rows]
            for i, (row, score) in enumerate(zip(rows, scores.tolist(), strict=True)):
                if row.req.monitor != name:
                    continue
                if mon.position != "last":  # per-forward sums -> the row's running sums
                    for layer in mon.layers:
                        row.sums[layer] = row.sums.get(layer, 0.0) + sums[layer][i]
                    row.count += counts[i]
                if math.isnan(score):
                    score = None  # a completion monitor before any completion token
                if prompt:
                    row.prompt_score = score
                    row.prompt_flagged = row.fired = bool(above[i])
                    if row.fired and gated[i]:
                        row.steered_from = 0
                else:
                    row.steps += 1
                    if score is not None:
                        row.step_max = score if row.step_max is None else max(row.step_max, score)
                    if decided[i]:  # a recheck fired: steered from this step's later sites on
                        row.fired, row.steered_from = True, row.steps

    def _monitor_result(self, row: _Row) -> dict:
        mon = self.monitors[row.req.monitor]
        return {
            "prompt_score": row.prompt_score,
            "prompt_flagged": row.prompt_flagged,
            "max_score": row.step_max,
            "max_flagged": row.step_max is not None and row.step_max > mon.threshold,
            "steps": row.steps,
            "steered_from": row.steered_from,
        }

    def _admit(self, fresh: list[Request], n_active: int) -> list[Request]:
        """Waiting requests that fit the batch (with ``fresh``, those already taken from the queue)."""
        while n_active + len(fresh) < self.max_batch:
            try:
                fresh.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return [r for r in fresh if not r.cancelled.is_set()]

    @torch.no_grad()
    def _iteration(self, active: list[_Row], fresh: list[Request], state: dict) -> list[_Row]:
        """Admit waiting requests (prefill, merge into the running cache), then one decoding step.

        ``state``: the running batch's ``cache``, ``mask`` ``[rows, T]`` and last ``positions``
        ``[rows, 1]``, row-aligned with ``active``.
        """
        # rows join only where the cache can be padded and concatenated (plain, non-sliding layers)
        if not active or state.get("mergeable", False):
            fresh = self._admit(fresh, len(active))
        if fresh:
            self.batches_run += 1
            if active:
                self.joins += len(fresh)
            rows, new = self._prefill(fresh)
            if active:
                _merge(state, new)
            else:
                state.clear()
                state.update(new)
            active = active + rows
            active, state = _drop_finished(active, state)
        if not active:
            return active
        self.max_rows_seen = max(self.max_rows_seen, len(active))
        n = len(active)
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones((n, 1))], dim=1)
        state["positions"] = state["positions"] + 1
        ids = torch.tensor([row.pending for row in active], device=self.device)[:, None]
        logits = self._forward(
            active,
            ("generated", "all"),
            ids,
            state["mask"],
            state["positions"],
            state["cache"],
        )
        self._advance_rows(active, logits)
        return _drop_finished(active, state)[0]

    def _prefill(self, reqs: list[Request]) -> tuple[list[_Row], dict]:
        """Run the prompts of ``reqs`` (left-padded) into a fresh cache; pick each row's first token."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        n = len(reqs)
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, r in enumerate(reqs):
            ids[row, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        # position ids from the mask: a padded row sees the positions it has alone
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.base.config)
        rows = [_Row(r) for r in reqs]
        logits = self._forward(rows, ("prompt", "all"), ids, mask, positions, cache)
        self._advance_rows(rows, logits)
        mergeable = all(type(layer) is DynamicLayer for layer in cache.layers)
        return rows, {"cache": cache, "mask": mask, "positions": positions[:, -1:], "mergeable": mergeable}

    def _forward(self, rows: list[_Row], kinds: tuple[str, ...], ids, mask, positions, cache) -> torch.Tensor:
        """Last-token logits ``[rows, vocab]`` of one forward, each row with its steering, adapter
        and monitor (whose scores land on the rows).

        ``kinds``: the position rules that apply to these tokens (a prefill is all prompt, a
        decoding step all generated), so each group's op covers every (non-padding) token.
        """
        from vsteer.hooks import intervene

        reqs = [row.req for row in rows]
        prompt = kinds == ("prompt", "all")
        extra = {}
        if self.adapters:
            extra["adapter_names"] = [self.adapters[r.adapter] if r.adapter else BASE for r in reqs]
        due = self._due(rows, prompt)
        states, watch_ops = self._watchers(rows, prompt, due)
        # the ops change only when rows join or leave or a gate decision changes: build them once
        # per batch composition and decision state
        key = (kinds, tuple((r.id, row.fired, d) for r, row, d in zip(reqs, rows, due)))
        ops = self._ops_cache.get(key)
        if ops is None:
            ops = self._ops(rows, kinds, prompt, due)
            if not prompt:
                if len(self._ops_cache) >= 4:  # a recheck interval alternates between a few
                    self._ops_cache = {}
                self._ops_cache[key] = ops
        if watch_ops:  # the monitors read first, so at their own site they see the unsteered value
            merged = {k: list(v) for k, v in watch_ops.items()}
            for k, v in ops.items():
                merged.setdefault(k, []).extend(v)
            ops = merged
        with intervene(self.base, ops) if ops else nullcontext():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_kw: cache},
                **extra,
            )
        self._read_monitors(rows, states, prompt)
        return out.logits[:, -1, :].float()

    def _advance_rows(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Advance each row on its logits; a row that fails (logits that are not finite: a steering
        scale that overflows the dtype, say) ends alone with an error, and the batch goes on."""
        broken = (torch.isnan(logits) | torch.isposinf(logits)).any(-1).tolist()  # one sync
        for i, row in enumerate(rows):
            try:
                if broken[i]:
                    raise _RowFailure(
                        f"the model's logits at completion token {len(row.ids)} are not finite "
                        "(NaN or inf): a smaller steering scale or a wider dtype may help"
                    )
                self._advance(row, logits[i])
            except Exception as exc:  # noqa: BLE001 - one row's failure is that row's error
                row.done = True
                detail = str(exc) if isinstance(exc, _RowFailure) else f"{type(exc).__name__}: {exc}"
                _emit(row.req, "error", f"generation failed: {detail}")

    def _advance(self, row: _Row, logits: torch.Tensor) -> None:
        """Pick the row's next token from ``logits`` ``[vocab]``, emit its text, finish it on EOS,
        a stop string or length."""
        r = row.req
        if r.cancelled.is_set():
            row.done = True  # the client left: its row leaves the batch
            return
        if row.gen is None and r.seed is not None:
            row.gen = torch.Generator(device=logits.device).manual_seed(r.seed)
        tok = _pick(logits, r.temperature, r.top_p, row.gen)
        row.pending = tok
        finish = None
        if tok in self.eos:
            finish = "stop"
            text = row.full
        else:
            if r.logprobs is not None:
                row.lps.append(self._logprob_entry(row, logits, tok))
            row.ids.append(tok)
            text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
            row.full = text
            cut = _find_stop(text, r.stop)
            if cut >= 0:
                finish, text = "stop", text[:cut]
            elif len(row.ids) >= r.max_tokens:
                finish = "length"
        if finish is None:
            # hold back what may be the start of a stop string, and an incomplete character
            visible = text[: len(text) - _stop_prefix(text, r.stop)]
            if not visible.endswith("\ufffd") and len(visible) > len(row.text):
                self._send(row, visible)
            return
        row.done = True
        if r.stop and row.lps:  # tokens that start after the cut belong to the stop string
            row.lps = [e for e in row.lps if e["offset"] < len(text)]
        self._send(row, text, final=True)
        _emit(
            r,
            "done",
            {
                "finish_reason": finish,
                "completion_tokens": len(row.ids),
                "text": text,
                "logprobs": row.lps if r.logprobs is not None else None,
                **({"monitor": self._monitor_result(row)} if r.monitor else {}),
            },
        )

    def _send(self, row: _Row, visible: str, final: bool = False) -> None:
        """Emit the text past what the client has (with the logprobs of the tokens it starts)."""
        r = row.req
        shown = len(visible)
        ready = [e for e in row.lps[row.lp_sent :] if final or e["offset"] < shown]
        if ready:
            row.lp_sent += len(ready)
            _emit(r, "logprobs", ready)
        if shown > len(row.text):
            _emit(r, "delta", visible[len(row.text) :])
            row.text = visible

    def _logprob_entry(self, row: _Row, logits: torch.Tensor, tok: int) -> dict:
        """The chosen token's log-probability and the ``r.logprobs`` most likely alternatives,
        from ``log_softmax(logits)`` (the model's distribution, before temperature and top_p)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        ctx = row.ids[-4:]  # a few tokens of context, so a token's text has its leading space
        head = self.tokenizer.decode(ctx, skip_special_tokens=True)
        top = []
        k = row.req.logprobs
        if k:
            values, idx = torch.topk(logp, min(k, logp.shape[-1]))
            top = [(self._token_text(ctx, head, int(i)), float(v)) for v, i in zip(values, idx)]
        return {
            "token": self._token_text(ctx, head, tok),
            "logprob": float(logp[tok]),
            "top": top,
            "offset": len(row.full),
        }

    def _token_text(self, ctx: list[int], head: str, tok: int) -> str:
        """The text ``tok`` adds after ``ctx`` (decoded ``head``); special tokens by their name."""
        if tok in self._special:
            return self.tokenizer.convert_ids_to_tokens(tok)
        both = self.tokenizer.decode(ctx + [tok], skip_special_tokens=True)
        if both.startswith(head):
            return both[len(head) :]
        return self.tokenizer.decode([tok], skip_special_tokens=True)

    def generate(self, req: Request, timeout: float = 300.0) -> dict:
        """Run one request through the queue and wait for it (for benchmarks and tests)."""
        box: queue.Queue = queue.Queue()
        req.emit = lambda kind, payload: box.put((kind, payload))
        self.submit(req)
        deadline = time.monotonic() + timeout
        while True:
            kind, payload = box.get(timeout=max(0.01, deadline - time.monotonic()))
            if kind == "done":
                return payload
            if kind == "error":
                raise RuntimeError(payload)


class _RowFailure(Exception):
    """A row's own failure, told to its client in these words."""


@dataclass
class _Row:
    """A request in the running batch: its tokens so far, emitted text, sampler, next input token."""

    req: Request
    ids: list[int] = field(default_factory=list)
    text: str = ""  # what the client has been sent
    full: str = ""  # all generated text so far (stop strings and held-back text included)
    lps: list[dict] = field(default_factory=list)
    lp_sent: int = 0
    pending: int = 0
    done: bool = False
    gen: torch.Generator | None = None
    prompt_score: float | None = None  # the monitor's score of the prompt (None: no prompt score)
    prompt_flagged: bool = False  # the prompt score exceeds the threshold
    fired: bool = False  # gated entries apply (flagged at the prompt or at a recheck)
    steered_from: int | None = None  # the step gated entries began at (0: the prompt)
    step_max: float | None = None  # highest score over the generated tokens fed back so far
    steps: int = 0
    sums: dict = field(default_factory=dict)  # mean/completion monitors: running sums per layer
    count: float = 0.0


def _merge(state: dict, new: dict) -> None:
    """Append ``new``'s rows to the running batch: left-pad the shorter cache (masked out) and concatenate."""
    cache, other = state["cache"], new["cache"]
    t_old, t_new = state["mask"].shape[1], new["mask"].shape[1]
    width = max(t_old, t_new)

    def pad(x: torch.Tensor, t: int, dim: int) -> torch.Tensor:
        if t == width:
            return x
        shape = list(x.shape)
        shape[dim] = width - t
        return torch.cat([x.new_zeros(shape), x], dim=dim)

    for mine, theirs in zip(cache.layers, other.layers):
        mine.keys = torch.cat([pad(mine.keys, t_old, -2), pad(theirs.keys, t_new, -2)], dim=0)
        mine.values = torch.cat([pad(mine.values, t_old, -2), pad(theirs.values, t_new, -2)], dim=0)
    state["mask"] = torch.cat([pad(state["mask"], t_old, 1), pad(new["mask"], t_new, 1)], dim=0)
    state["positions"] = torch.cat([state["positions"], new["positions"]], dim=0)


def _drop_finished(active: list[_Row], state: dict) -> tuple[list[_Row], dict]:
    """Remove finished rows from the batch and its cache, so they cost nothing more."""
    keep = [i for i, row in enumerate(active) if not row.done]
    if len(keep) == len(active):
        return active, state
    if keep:
        idx = torch.tensor(keep, device=state["mask"].device)
        state["cache"].batch_select_indices(idx)
        state["mask"] = state["mask"][idx]
        state["positions"] = state["positions"][idx]
    else:
        state.clear()
    return [active[i] for i in keep], state


def _find_stop(text: str, stops: list[str]) -> int:
    """Where the first stop string starts in ``text``, or -1."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else -1


def _stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop string (0 if none)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _emit(req: Request, kind: str, payload) -> None:
    if req.emit is not None:
        req.emit(kind, payload)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen) -> int:
    """Greedy at temperature 0; else nucleus sampling with the request's own generator."""
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
