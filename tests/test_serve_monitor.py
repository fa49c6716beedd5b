"""`vsteer serve` with per-request monitors: scores in the response, gated steering, batching, errors.

Tiny random llama and word-level tokenizer as in test_serve.py; monitors are built by hand with
a threshold between two prompts' scores, so one prompt fires and the other does not.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import make_tiny_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from test_serve import _http, serve_process, start_in_thread, tiny_tokenizer  # noqa: E402

import vsteer  # noqa: E402
from vsteer.models import config_fingerprint  # noqa: E402
from vsteer.monitor import Monitor, MonitorError  # noqa: E402
from vsteer.serve import Engine, Limits, create_app, load_monitors, load_vectors  # noqa: E402
from vsteer.serve.schema import parse_chat  # noqa: E402
from vsteer.vectors import SteeringVector  # noqa: E402

KEY = "monitor-key"
PROMPTS = ["hello world tell me", "a story about the world"]


def chat_ids(tok, content: str) -> list[int]:
    """The prompt ids the server builds for one user message (its chat route)."""
    text = tok.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return list(tok(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve-monitor")
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked logits: no near-ties for greedy decoding
    tok = tiny_tokenizer()
    g = torch.Generator().manual_seed(11)
    vdir, mdir = root / "vectors", root / "monitors"
    vdir.mkdir()
    mdir.mkdir()
    late = {2: torch.randn(2, 8, generator=g)}  # after the monitor at v.1
    SteeringVector.for_model(model, late, site="v").save(vdir / "boost.safetensors")
    SteeringVector.for_model(model, {0: torch.randn(2, 8, generator=g)}, site="v").save(
        vdir / "early.safetensors"
    )
    fp = config_fingerprint(model.config)

    def monitor(layer, position, threshold=0.0):
        w = {layer: torch.randn(2, 8, generator=g)}
        return Monitor(w, bias=0.1, threshold=threshold, site="v", position=position, fingerprint=fp)

    trig = monitor(1, "last")  # v.0 at the last token sees only that token; v.1 has context
    ids = [chat_ids(tok, p) for p in PROMPTS]
    scores = trig.score(model, tok, ids)
    hi, lo = (0, 1) if scores[0] > scores[1] else (1, 0)
    trig.threshold = float(scores.mean())  # between the two: PROMPTS[hi] fires, PROMPTS[lo] does not
    trig.save(mdir / "trig.safetensors")
    # for monitor.recheck: a monitor that passes PROMPTS[lo] at the prompt but fires while it decodes
    # (threshold between the prompt's score and the highest of its first 3 unsteered steps)
    calm = torch.tensor([ids[lo]])
    for _ in range(50):
        late = monitor(1, "last")
        with vsteer.watch(model, late) as flags, torch.no_grad():
            model.generate(calm, max_new_tokens=4, do_sample=False)
        prompt_score, early_max = float(flags.scores[0, 0]), float(flags.scores[0, 1:4].max())
        if early_max > prompt_score + 0.5:
            late.threshold = (prompt_score + early_max) / 2
            break
    else:
        raise AssertionError("no monitor for the recheck tests")
    late.save(mdir / "late.safetensors")
    monitor(0, "mean").save(mdir / "avg.safetensors")
    monitor(2, "completion").save(mdir / "comp.safetensors")
    foreign = monitor(0, "last")
    foreign.fingerprint = "0123456789abcdef"
    foreign.save(mdir / "foreign.safetensors")
    model.save_pretrained(root / "model")  # for the real `vsteer serve` process
    tok.save_pretrained(root / "model")
    engine = Engine(
        model, tok, "tiny-llama", vectors=load_vectors(vdir), monitors=load_monitors(mdir)
    ).start()
    server, thread, port = start_in_thread(create_app(engine, api_key=KEY))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
    yield {
        "client": client,
        "engine": engine,
        "model": model,
        "tok": tok,
        "fire": PROMPTS[hi],
        "pass": PROMPTS[lo],
        "url": f"http://127.0.0.1:{port}",
        "root": root,
    }
    server.should_exit = True
    thread.join(10)
    engine.stop()


def chat(client, content, monitor=None, steering=None, model="tiny-llama", **kw):
    extra = {k: v for k, v in (("monitor", monitor), ("steering", steering)) if v is not None}
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=kw.pop("max_tokens", 6),
        temperature=0,
        extra_body=extra or None,
        **kw,
    )


def test_monitors_listed_and_misfits_refused(served, tmp_path):
    status, body = _http(served["url"] + "/v1/monitors", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200
    rows = {m["name"]: m for m in body["data"]}
    assert {n for n, m in rows.items() if m["compatible"]} == {"avg", "comp", "late", "trig"}
    assert rows["trig"]["site"] == "v" and rows["trig"]["layers"] == [1] and len(rows["trig"]["digest"]) == 16
    assert not rows["foreign"]["compatible"] and "fingerprint" in rows["foreign"]["reason"]
    lines = served["engine"].refusals()  # what `vsteer serve` prints at startup
    assert [line for line in lines if "foreign" in line] == [
        f"monitor 'foreign' refused: {rows['foreign']['reason']}"
    ]
    with pytest.raises(MonitorError, match="is not a directory"):
        load_monitors(tmp_path / "missing")


def test_scores_equal_monitor_score_and_watch(served):
    """The prompt score is Monitor.score of the same prompt; the generated max is vsteer.watch's."""
    client, engine, model, tok = served["client"], served["engine"], served["model"], served["tok"]
    for name in ("trig", "avg"):
        mon = engine.monitors[name]
        for content in (served["fire"], served["pass"]):
            r = chat(client, content, monitor={"name": name}, max_tokens=6)
            info = r.model_extra["vsteer"]["monitor"]
            ids = chat_ids(tok, content)
            with engine._lock:  # the model is idle while the test uses it directly
                ref = float(mon.score(model, tok, [ids])[0])
                with vsteer.watch(model, mon) as flags:
                    out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
            assert info["name"] == name and info["gate"] == [] and info["threshold"] == mon.threshold
            assert info["prompt"]["score"] == pytest.approx(ref, abs=1e-4)
            assert info["prompt"]["flagged"] == (ref > mon.threshold)
            assert tok.decode(out[0, len(ids) :], skip_special_tokens=True) == r.choices[0].message.content
            (gen,) = info["generated"]
            steps = flags.scores[0, 1:]
            assert gen["steps"] == len(steps) >= 1
            assert gen["max_score"] == pytest.approx(float(steps.max()), abs=1e-4)
            assert gen["flagged"] == bool(steps.max() > mon.threshold)
    # the fixture's threshold splits the two prompts
    fire = chat(client, served["fire"], monitor={"name": "trig"}).model_extra["vsteer"]["monitor"]
    calm = chat(client, served["pass"], monitor={"name": "trig"}).model_extra["vsteer"]["monitor"]
    assert fire["prompt"]["flagged"] and not calm["prompt"]["flagged"]


def _request(engine, content, steering=None, monitor=None, max_tokens=6):
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": content}], "temperature": 0}
    return parse_chat(
        {**body, "max_tokens": max_tokens, "steering": steering, "monitor": monitor}, engine, Limits()
    )


def _served_together(engine, specs) -> list[dict]:
    """The ``done`` payloads of ``specs`` (``_request`` arguments) queued at once, so that they
    prefill as one batch, in the order of ``specs``."""
    events: dict[int, dict] = {}
    reqs = [_request(engine, *spec) for spec in specs]
    for i, r in enumerate(reqs):
        r.emit = lambda kind, payload, i=i: events.__setitem__(i, payload) if kind == "done" else None
    with engine._lock:  # queue them all, so they prefill as one batch
        for r in reqs:
            engine.submit(r)
    for _ in range(4000):
        if len(events) == len(reqs):
            break
        time.sleep(0.005)
    return [events[i] for i in range(len(reqs))]


def test_gated_rows_batch_together_and_match_alone(served):
    engine, fire, calm = served["engine"], served["fire"], served["pass"]
    boost = [{"vector": "boost", "scale": 8.0, "positions": "all"}]
    early = [{"vector": "early", "scale": 8.0, "positions": "generated"}]
    gate = {"name": "trig", "gate": [0]}
    specs = [
        (fire, boost, gate),  # fires: steered, prompt included (gated mid-prefill)
        (calm, boost, gate),  # does not fire: unsteered
        (fire, early, gate),  # fires: steered while decoding, at a layer before the monitor
        (calm, early, gate),
        (calm, boost, {"name": "avg"}),  # another monitor, score only, ungated steering
        (fire, None, None),
    ]
    alone = [engine.generate(_request(engine, *spec)) for spec in specs]
    # gating means exactly: fired rows get the entry, the others do not
    same = [
        engine.generate(_request(engine, fire, boost)),
        engine.generate(_request(engine, calm)),
        engine.generate(_request(engine, fire, early)),
        engine.generate(_request(engine, calm)),
    ]
    assert [a["text"] for a in alone[:4]] == [s["text"] for s in same]
    assert alone[0]["text"] != alone[5]["text"] and alone[2]["text"] != alone[5]["text"], "steering must show"
    assert [a["monitor"]["prompt_flagged"] for a in alone[:4]] == [True, False, True, False]

    before = engine.batches_run
    together = _served_together(engine, specs)
    assert engine.batches_run - before == 1 and engine.max_rows_seen >= len(specs)
    for a, t in zip(alone, together, strict=True):
        am, tm = a.pop("monitor", None), t.pop("monitor", None)
        assert t == a
        assert (am is None) == (tm is None)
        if am is not None:
            assert tm["prompt_flagged"] == am["prompt_flagged"] and tm["steps"] == am["steps"]
            assert tm["prompt_score"] == pytest.approx(am["prompt_score"], abs=1e-4)
            assert tm["max_score"] == pytest.approx(am["max_score"], abs=1e-4)


def test_stream_carries_scores_in_the_last_chunk(served):
    client, fire = served["client"], served["fire"]
    kw = dict(monitor={"name": "trig", "gate": [0]}, steering=[{"vector": "boost", "scale": 8.0}])
    whole = chat(client, fire, **kw)
    chunks = list(chat(client, fire, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert all("prompt" not in c.model_extra["vsteer"]["monitor"] for c in chunks[:-1])
    last = chunks[-1].model_extra["vsteer"]
    assert chunks[-1].choices[0].finish_reason is not None
    assert last == whole.model_extra["vsteer"] and last["monitor"]["gate"] == [0]
    assert last["monitor"]["prompt"]["flagged"]
    plain = chat(client, fire, steering=kw["steering"]).model_extra["vsteer"]
    assert plain["fingerprint"] != last["fingerprint"] and "monitor" not in plain


BOOST = [{"vector": "boost", "scale": 2.0}]
BAD = [
    # (body, status, words in the message, param)
    (
        {"monitor": {"name": "nope"}},
        404,
        "no monitor named 'nope'; available: avg, comp, late, trig",
        "monitor.name",
    ),
    ({"monitor": {"name": "foreign"}}, 400, "does not fit this model", "monitor.name"),
    ({"monitor": {"name": "../trig"}}, 400, "looks like a path", "monitor.name"),
    ({"monitor": "trig"}, 400, "monitor must be an object {name, gate}", "monitor"),
    ({"monitor": {"name": "trig", "when": 1}}, 400, "unknown keys ['when']", "monitor"),
    ({"monitor": {"name": "trig", "gate": 0}, "steering": BOOST}, 400, "gate must be a list", "monitor.gate"),
    (
        {"monitor": {"name": "trig", "gate": [True]}, "steering": BOOST},
        400,
        "gate must be a list",
        "monitor.gate",
    ),
    (
        {"monitor": {"name": "trig", "gate": [1]}, "steering": BOOST},
        400,
        "monitor.gate[0] is 1, but steering has 1 entries (indices 0..0)",
        "monitor.gate[0]",
    ),
    ({"monitor": {"name": "trig", "gate": [0]}}, 400, "no steering entries to gate", "monitor.gate[0]"),
    ({"monitor": {"name": "trig", "gate": [0, 0]}, "steering": BOOST}, 400, "repeats steering entry 0", None),
    (
        {"monitor": {"name": "comp", "gate": [0]}, "steering": BOOST},
        400,
        "has no prompt score",
        "monitor.gate",
    ),
    (
        {"monitor": {"name": "trig", "gate": [0], "recheck": 0}, "steering": BOOST},
        400,
        "monitor.recheck must be a positive number of decoding steps, got 0",
        "monitor.recheck",
    ),
    (
        {"monitor": {"name": "trig", "gate": [0], "recheck": True}, "steering": BOOST},
        400,
        "monitor.recheck must be a positive number",
        "monitor.recheck",
    ),
    ({"monitor": {"name": "trig", "recheck": 2}, "steering": BOOST}, 400, "list the entries to gate", None),
    (
        {"monitor": {"name": "trig", "gate": [0]}, "steering": [{"vector": "early", "positions": "all"}]},
        400,
        "cannot steer the prompt at v.0",
        "monitor.gate[0]",
    ),
]


@pytest.mark.parametrize("body,status,words,param", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_monitor_refused(served, body, status, words, param):
    base = {"model": "tiny-llama", "max_tokens": 2, "messages": [{"role": "user", "content": "hello"}]}
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    code, reply = _http(
        served["url"] + "/v1/chat/completions", json.dumps({**base, **body}).encode(), headers
    )
    assert code == status, reply
    err = reply["error"]
    assert words in err["message"] and "\n" not in err["message"]
    if param is not None:
        assert err["param"] == param


def test_real_vsteer_serve_process_with_monitors(served):
    """`vsteer serve --monitors DIR`: one startup line per misfit, same gated answers and scores."""
    root = served["root"]
    proc, url = serve_process(
        *("--model", str(root / "model"), "--device", "cpu", "--vectors", str(root / "vectors")),
        *("--monitors", str(root / "monitors")),
    )
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        kw = dict(monitor={"name": "trig", "gate": [0]}, steering=[{"vector": "boost", "scale": 8.0}])
        for content in (served["fire"], served["pass"]):
            base = client.models.list().data[0].id  # the model's path, as the process names it
            theirs, ours = chat(client, content, model=base, **kw), chat(served["client"], content, **kw)
            assert theirs.choices[0].message.content == ours.choices[0].message.content
            a, b = theirs.model_extra["vsteer"]["monitor"], ours.model_extra["vsteer"]["monitor"]
            assert a["prompt"]["flagged"] == b["prompt"]["flagged"]
            assert a["prompt"]["score"] == pytest.approx(b["prompt"]["score"], abs=1e-4)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    refused = [line for line in out.splitlines() if "refused" in line]
    assert len(refused) == 1
    assert refused[0].startswith("vsteer serve: monitor 'foreign' refused: monitor was fitted")
    assert "4 monitors" in out


def test_monitored_rows_join_a_running_batch(served):
    """Rows that join mid-decode keep their own running sums and gate decisions."""
    engine, fire, calm = served["engine"], served["fire"], served["pass"]
    boost = [{"vector": "boost", "scale": 8.0, "positions": "all"}]
    specs = [
        (calm, None, {"name": "avg"}, 30),
        (fire, boost, {"name": "trig", "gate": [0]}, 6),
        (calm, boost, {"name": "avg", "gate": [0]}, 6),
    ]
    alone = [engine.generate(_request(engine, *spec)) for spec in specs]
    reqs = [_request(engine, *spec) for spec in specs]
    events: dict[int, dict] = {}
    deltas = []

    def sink(i):
        def emit(kind, payload):
            if kind == "done":
                events[i] = payload
            if i == 0 and kind == "delta":
                deltas.append(payload)
                if len(deltas) == 3:  # from the worker thread: the others join mid-decode
                    engine.submit(reqs[1])
                    engine.submit(reqs[2])

        return emit

    for i, r in enumerate(reqs):
        r.emit = sink(i)
    joins = engine.joins
    engine.submit(reqs[0])
    for _ in range(4000):
        if len(events) == 3:
            break
        time.sleep(0.005)
    assert engine.joins - joins == 2 and len(events) == 3
    for a, i in zip(alone, range(3), strict=True):
        t = dict(events[i])
        am, tm = a["monitor"], t.pop("monitor")
        assert t == {k: v for k, v in a.items() if k != "monitor"}
        assert tm["prompt_flagged"] == am["prompt_flagged"] and tm["steps"] == am["steps"]
        assert tm["max_score"] == pytest.approx(am["max_score"], abs=1e-4)


def _first_recheck(flags, threshold: float, every: int) -> int | None:
    """The step vsteer.steer(when=recheck(..., every)) starts steering at: 0 if the prompt fires,
    else the first generated step ``s`` with ``s % every == 0`` whose score exceeds the threshold."""
    scores = flags.scores[0]
    if scores[0] > threshold:
        return 0
    hits = [s for s in range(1, len(scores)) if s % every == 0 and scores[s] > threshold]
    return hits[0] if hits else None


def test_recheck_steers_from_the_step_that_fires_as_the_library_does(served):
    """``monitor.recheck``: a row the prompt does not flag is steered from the first decoding step
    (every k-th) that fires; the text, scores and that step equal vsteer.steer(when=recheck(...)),
    alone and batched with other gated and plain rows."""
    engine, model, tok, calm, fire = (served[k] for k in ("engine", "model", "tok", "pass", "fire"))
    boost = [{"vector": "boost", "scale": 8.0, "positions": "all"}]
    after = [{"vector": "boost", "scale": 8.0, "positions": "generated"}]
    ids = torch.tensor([chat_ids(tok, calm)])
    specs, expected = [], []
    for name, every, steering in (("late", 1, boost), ("late", 2, boost), ("comp", 1, after)):
        mon = engine.monitors[name]
        with engine._lock:  # the model is idle while the test uses it directly
            vec = engine.vectors["boost"]
            when = vsteer.monitor.recheck(mon, every=every)
            with vsteer.steer(model, vec, 8.0, positions=steering[0]["positions"], when=when) as flags:
                out = model.generate(ids, max_new_tokens=8, do_sample=False)
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        specs.append((calm, steering, {"name": name, "gate": [0], "recheck": every}, 8))
        expected.append((text, _first_recheck(flags, mon.threshold, every)))
    assert expected[0][1] is not None and expected[0][1] >= 1, "the fixture's monitor fires while decoding"
    plain = engine.generate(_request(engine, calm, max_tokens=8))["text"]
    assert expected[0][0] != plain, "steering from the recheck on must show"
    specs += [(fire, boost, {"name": "trig", "gate": [0]}, 8), (calm, None, None, 8)]

    alone = [engine.generate(_request(engine, *spec)) for spec in specs]
    for got, (text, step) in zip(alone, expected):
        assert got["text"] == text
        assert got["monitor"]["steered_from"] == step and got["monitor"]["prompt_flagged"] is False
    assert alone[3]["monitor"]["steered_from"] == 0  # flagged at the prompt
    together = _served_together(engine, specs)
    for a, t in zip(alone, together, strict=True):
        assert t["text"] == a["text"]
        if "monitor" in a:
            assert t["monitor"]["steered_from"] == a["monitor"]["steered_from"]
            assert t["monitor"]["max_score"] == pytest.approx(a["monitor"]["max_score"], abs=1e-4)


def test_recheck_in_the_response(served):
    client, calm = served["client"], served["pass"]
    kw = dict(
        monitor={"name": "late", "gate": [0], "recheck": 1},
        steering=[{"vector": "boost", "scale": 8.0}],
        max_tokens=8,
    )
    info = chat(client, calm, **kw).model_extra["vsteer"]
    assert info["monitor"]["recheck"] == 1 and not info["monitor"]["prompt"]["flagged"]
    (gen,) = info["monitor"]["generated"]
    assert gen["steered_from"] >= 1 and gen["flagged"]
    once = chat(client, calm, **{**kw, "monitor": {"name": "late", "gate": [0]}}).model_extra["vsteer"]
    assert once["monitor"]["recheck"] is None and once["monitor"]["generated"][0]["steered_from"] is None
    assert once["fingerprint"] != info["fingerprint"]
