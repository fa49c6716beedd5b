"""`vsteer serve`: the official openai client against a real server on 127.0.0.1, on a tiny random model.

The model is conftest's tiny llama with a word-level tokenizer built here; three value-site
vectors and two value-only LoRA adapters (random, non-zero B) are saved to disk and loaded by
name, as `vsteer serve --vectors DIR --adapters DIR` does.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from conftest import VOCAB, make_tiny_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from vsteer.serve import Engine, Limits, create_app, find_adapters, load_vectors  # noqa: E402
from vsteer.serve import engine as engine_module  # noqa: E402
from vsteer.vectors import SteeringVector  # noqa: E402

KEY = "test-key-123"
BODY_LIMIT = 64 * 1024  # small enough that the refused body fits the socket buffers
WORDS = ["user", "assistant", "system", ":", "hello", "world", "tell", "me", "a", "story", "about", "the"]


def tiny_tokenizer():
    """A word-level tokenizer with VOCAB entries and a plain chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS + [f"w{i}" for i in range(VOCAB - 4 - len(WORDS))]:
        vocab[w] = len(vocab)
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.padding_side = "left"
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    return fast


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_in_thread(app):
    """``app`` served by uvicorn on 127.0.0.1 in a daemon thread, once started: (server, thread,
    port). Stop it with ``server.should_exit = True; thread.join(10)``."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):  # bounded wait for startup
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "server did not start"
    return server, thread, port


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve")
    model = make_tiny_model("llama")
    # a context the samples' max_tokens fit in (rotary positions: the weights do not depend on it)
    model.config.max_position_embeddings = 512
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked logits: no near-ties for greedy decoding to trip on
    tok = tiny_tokenizer()
    vdir, adir = root / "vectors", root / "adapters"
    vdir.mkdir()
    g = torch.Generator().manual_seed(7)
    for name in ("happy", "calm", "formal"):
        dirs = {layer: torch.randn(2, 8, generator=g) for layer in (0, 1, 2)}  # v site: [kv_heads, head_dim]
        SteeringVector.for_model(model, dirs, site="v", method="random").save(vdir / f"{name}.safetensors")
    other = SteeringVector.for_model(model, {0: torch.randn(2, 8, generator=g)}, site="v")
    other.fingerprint = "0123456789abcdef"  # made for some other model
    other.save(vdir / "foreign.safetensors")
    for i, name in enumerate(("kind-v", "terse-v")):
        torch.manual_seed(100 + i)
        base = make_tiny_model("llama")
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]))
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        peft_model.save_pretrained(adir / name)
    model.save_pretrained(root / "model")  # for the real `vsteer serve` process (before PEFT wraps it)
    tok.save_pretrained(root / "model")
    engine = Engine(
        model, tok, "tiny-llama", vectors=load_vectors(vdir), adapters=find_adapters(adir), max_batch=16
    ).start()
    # every row's next-token logits, by request id: batched rows must match their solo runs
    # closely, not only in the greedy text (a tiny random model's argmax forgives a lot)
    trace: dict[str, list[torch.Tensor]] = {}
    advance = engine._advance

    def traced(row, logits):
        trace.setdefault(row.req.id, []).append(logits.detach().clone())
        return advance(row, logits)

    engine._advance = traced
    server, thread, port = start_in_thread(
        create_app(engine, api_key=KEY, limits=Limits(max_body_bytes=BODY_LIMIT))
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
    yield {
        "client": client,
        "engine": engine,
        "trace": trace,
        "root": root,
        "url": f"http://127.0.0.1:{port}",
        "port": port,
    }
    server.should_exit = True
    thread.join(10)
    engine.stop()
    assert not thread.is_alive()


def chat(client, model="tiny-llama", steering=None, content="hello world tell me a story", **kw):
    extra = {"steering": steering} if steering is not None else None
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=kw.pop("max_tokens", 8),
        temperature=0,
        extra_body=extra,
        **kw,
    )


def test_models_and_vectors_listed(served):
    models = served["client"].models.list()
    by_id = {m.id: m for m in models.data}
    assert set(by_id) == {"tiny-llama", "kind-v", "terse-v"}
    assert by_id["kind-v"].model_extra["parent"] == "tiny-llama"
    assert by_id["tiny-llama"].model_extra["parent"] is None
    status, body = _http(served["url"] + "/v1/steering/vectors", headers={"Authorization": f"Bearer {KEY}"})
    rows = {v["name"]: v for v in body["data"]}
    assert {n for n, v in rows.items() if v["compatible"]} == {"happy", "calm", "formal"}
    assert not rows["foreign"]["compatible"] and "fingerprint" in rows["foreign"]["reason"]
    assert _http(served["url"] + "/health")[1]["status"] == "ok"


def test_chat_completion_steering_and_adapter(served):
    client = served["client"]
    plain = chat(client)
    assert plain.choices[0].message.role == "assistant"
    assert plain.usage.completion_tokens >= 1 and plain.model == "tiny-llama"
    assert plain.model_extra["vsteer"]["steering"] == [] and plain.model_extra["vsteer"]["adapter"] is None
    steering = [{"vector": "happy", "scale": 8.0, "positions": "all"}]
    steered = chat(client, steering=steering)
    info = steered.model_extra["vsteer"]
    assert info["steering"] == steering and len(info["fingerprint"]) == 16
    assert info["fingerprint"] != plain.model_extra["vsteer"]["fingerprint"]
    assert steered.choices[0].message.content != plain.choices[0].message.content
    adapted = chat(client, model="kind-v")
    assert adapted.model == "kind-v" and adapted.model_extra["vsteer"]["adapter"] == "kind-v"
    assert adapted.choices[0].message.content != plain.choices[0].message.content
    # same request, same answer and fingerprint (greedy)
    again = chat(client, steering=steering)
    assert again.choices[0].message.content == steered.choices[0].message.content
    assert again.model_extra["vsteer"]["fingerprint"] == info["fingerprint"]


def test_completion_and_streaming(served):
    client = served["client"]
    done = client.completions.create(model="tiny-llama", prompt="hello world", max_tokens=6, temperature=0)
    assert done.choices[0].finish_reason in ("stop", "length") and done.choices[0].text
    stream = client.completions.create(
        model="tiny-llama", prompt="hello world", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == done.choices[0].text
    steering = [{"vector": "calm", "scale": -6.0, "positions": "generated"}]
    whole = chat(client, model="terse-v", steering=steering)
    parts, finish = [], None
    for c in chat(client, model="terse-v", steering=steering, stream=True):
        assert c.object == "chat.completion.chunk" and c.model_extra["vsteer"]["adapter"] == "terse-v"
        parts.append(c.choices[0].delta.content or "")
        finish = c.choices[0].finish_reason or finish
    assert "".join(parts) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason


def test_sampling_is_seeded(served):
    client = served["client"]
    kw = dict(model="tiny-llama", prompt="tell me", max_tokens=8, temperature=1.5, seed=3)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


MIX = [
    ("tiny-llama", None),
    ("tiny-llama", [{"vector": "happy", "scale": 6.0, "positions": "all"}]),
    ("kind-v", [{"vector": "calm", "scale": -4.0, "positions": "generated"}]),
    ("terse-v", [{"vector": "formal", "scale": 5.0, "positions": "prompt"}]),
    ("kind-v", None),
    (
        "tiny-llama",
        [{"vector": "happy", "scale": 3.0}, {"vector": "formal", "scale": -3.0, "positions": "all"}],
    ),
    ("terse-v", None),
    ("tiny-llama", [{"vector": "calm", "scale": 9.0, "positions": "all"}]),
]
PROMPTS = ["hello world", "tell me a story", "a story about the world", "hello", "the world tell me"]


def test_concurrent_mixed_batch_equals_alone(served):
    client, engine = served["client"], served["engine"]
    jobs = [(*MIX[i % len(MIX)], PROMPTS[i % len(PROMPTS)], 4 + i % 5) for i in range(16)]

    def one(job):
        model, steering, content, max_tokens = job
        r = chat(client, model=model, steering=steering, content=content, max_tokens=max_tokens)
        return r.choices[0].message.content, r.model_extra["vsteer"]["fingerprint"], r.id.split("-", 1)[1]

    alone = [one(job) for job in jobs]
    assert len({a[0] for a in alone}) >= 6, "the mix must produce different outputs to prove anything"
    # hold the engine so the 16 requests queue up and decode as one batch (after the first)
    before, sent = engine.batches_run, engine.submitted
    engine._lock.acquire()
    try:
        pool = cf.ThreadPoolExecutor(16)
        futures = [pool.submit(one, job) for job in jobs]
        for _ in range(1000):  # bounded: all 16 submitted (the worker holds a few, blocked on the lock)
            if engine.submitted - sent >= 16:
                break
            time.sleep(0.01)
        assert engine.submitted - sent == 16
        time.sleep(0.1)  # let the worker finish collecting its first batch
    finally:
        engine._lock.release()
    together = [f.result(timeout=120) for f in futures]
    pool.shutdown()
    assert [t[:2] for t in together] == [a[:2] for a in alone]
    _same_logits(served["trace"], [a[2] for a in alone], [t[2] for t in together])
    assert engine.max_rows_seen >= 8 and engine.batches_run - before <= 2


BAD = [
    # (route, body, status, words in the message)
    ("chat", {"steering": [{"vector": "nope", "scale": 1}]}, 404, "no steering vector named 'nope'"),
    ("chat", {"steering": [{"vector": "../../etc/passwd", "scale": 1}]}, 400, "looks like a path"),
    ("chat", {"steering": [{"vector": "/tmp/x.safetensors"}]}, 400, "looks like a path"),
    ("chat", {"steering": [{"vector": "happy", "scale": "NaN"}]}, 400, "scale must be a finite number"),
    ("chat", {"steering": [{"vector": "happy", "scale": 1e6}]}, 400, "out of range"),
    ("chat", {"steering": [{"vector": "happy", "positions": "middle"}]}, 400, "positions must be one of"),
    ("chat", {"steering": [{"vector": "foreign"}]}, 400, "does not fit this model"),
    ("chat", {"steering": [{"vector": "happy", "file": "x"}]}, 400, "unknown keys"),
    ("chat", {"steering": {"vector": "happy"}}, 400, "steering must be a list"),
    ("chat", {"steering": [{"vector": "happy"}] * 9}, 400, "at most 8 allowed"),
    ("chat", {"model": "gpt-4"}, 404, "the model 'gpt-4' does not exist"),
    ("chat", {"messages": []}, 400, "messages must be a non-empty list"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role must be one of"),
    ("chat", {"max_tokens": -1}, 400, "max_tokens must be an integer in [1, 512]"),
    ("chat", {"max_tokens": 100000}, 400, "max_tokens must be an integer in [1, 512]"),
    ("chat", {"temperature": 7}, 400, "temperature must be a number in [0, 2]"),
    ("chat", {"n": 0}, 400, "n must be an integer in [1, 8], got 0"),
    ("completion", {"prompt": ""}, 400, "prompt must be a non-empty string"),
    ("completion", {"prompt": "hi", "echo": True}, 400, "echo is not supported"),
]


class _Reply:
    def __init__(self, status, body):
        self.status_code, self._body = status, body
        self.text = json.dumps(body)

    def json(self):
        return self._body


def _http(url, data=None, headers=None):
    """(status, parsed JSON) of one plain HTTP request, errors included."""
    req = urllib.request.Request(
        url, data=data, headers=headers or {}, method="POST" if data is not None else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post(url, route, body, key=KEY, raw=None):
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    base = {"model": "tiny-llama", "max_tokens": 4}
    base.update(
        {"messages": [{"role": "user", "content": "hello"}]} if route == "chat" else {"prompt": "hello"}
    )
    base.update(body)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    data = raw if raw is not None else json.dumps(base).encode()
    return _Reply(*_http(url + path, data=data, headers=headers))


@pytest.mark.parametrize("route,body,status,words", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_refused(served, route, body, status, words):
    r = _post(served["url"], route, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and "\n" not in err["message"]
    assert chat(served["client"], max_tokens=2).choices[0].message.content is not None  # still serving


def test_bad_transport_refused(served):
    url = served["url"]
    r = _post(url, "chat", {}, key="wrong-key")
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = _post(url, "chat", {}, raw=b'{"model": "tiny-llama", "messages": [')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = _post(
        url, "chat", {}, raw=b'{"model": "tiny-llama", "steering": [{"vector": "happy", "scale": NaN}]}'
    )
    assert r.status_code == 400
    r = _post(url, "chat", {}, raw=b"[1, 2]")
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = _post(url, "chat", {}, raw=b'{"x": "' + b"a" * (BODY_LIMIT + 10) + b'"}')
    assert r.status_code == 413 and f"at most {BODY_LIMIT} allowed" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as exc:
        chat(served["client"], steering=[{"vector": "missing", "scale": 1.0}])
    assert "no steering vector named 'missing'" in str(exc.value)
    assert chat(served["client"], max_tokens=2).choices  # still serving


def test_rows_join_and_leave_a_running_batch(served):
    """Continuous batching: requests join while another decodes, finish first, and match alone."""
    from vsteer.serve.schema import parse_chat

    engine = served["engine"]

    def request(content, model="tiny-llama", steering=None, max_tokens=6):
        body = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0}
        return parse_chat({**body, "max_tokens": max_tokens, "steering": steering}, engine, Limits())

    specs = [
        ("hello world", "tiny-llama", None, 40),
        ("tell me a story", "kind-v", [{"vector": "calm", "scale": 5.0, "positions": "all"}], 5),
        ("the world", "terse-v", [{"vector": "happy", "scale": -4.0, "positions": "generated"}], 7),
    ]
    solo = [request(*spec) for spec in specs]
    alone = [engine.generate(r) for r in solo]
    assert alone[0]["finish_reason"] == "length", "the long row must run its 40 tokens"
    events: list[tuple[int, str, object]] = []
    lock = threading.Lock()

    reqs = [request(*spec) for spec in specs]

    def sink(i):
        def emit(kind, payload):
            with lock:
                events.append((i, kind, payload))
                deltas = sum(1 for j, k, _ in events if j == 0 and k == "delta")
            if i == 0 and kind == "delta" and deltas == 3:
                # queued from the worker thread itself, after the long row's third decoding step,
                # so the others join mid-decode whatever the machine's speed (no timing race)
                engine.submit(reqs[1])
                engine.submit(reqs[2])

        return emit

    for i, r in enumerate(reqs):
        r.emit = sink(i)
    joins = engine.joins
    engine.submit(reqs[0])
    for _ in range(4000):
        if sum(1 for _, k, _ in events if k == "done") == 3:
            break
        time.sleep(0.005)
    done = [(i, p) for i, k, p in events if k == "done"]
    assert len(done) == 3
    assert engine.joins - joins == 2
    assert [i for i, _ in done][-1] == 0, "the short rows finish while the long one still decodes"
    assert [p for _, p in sorted(done)] == alone
    _same_logits(served["trace"], [r.id for r in solo], [r.id for r in reqs])


def _same_logits(trace, alone_ids, together_ids):
    for a, b in zip(alone_ids, together_ids):
        la, lb = torch.stack(trace[a]), torch.stack(trace[b])
        assert la.shape == lb.shape
        assert torch.allclose(la, lb, atol=1e-4, rtol=0), f"max diff {(la - lb).abs().max():.2e}"


def serve_process(*args: str):
    """``vsteer serve ARGS --port P`` as its own process, once ``/health`` answers: (process, URL).
    The caller stops it (``proc.terminate()``) and may read its output."""
    port = _free_port()
    cmd = [sys.executable, "-m", "vsteer.cli", "serve", *args, "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):  # bounded wait (60 s) for the model to load and the port to open
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        try:
            if _http(url + "/health")[0] == 200:
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise AssertionError(f"vsteer serve did not answer /health within 60 s: {' '.join(cmd)}")


def test_real_vsteer_serve_process(served):
    """`vsteer serve` as its own process: same answers as the in-process server on the same weights."""
    root = served["root"]
    proc, url = serve_process(
        *("--model", str(root / "model"), "--device", "cpu", "--vectors", str(root / "vectors")),
        *("--adapters", str(root / "adapters"), "--api-key", KEY),
    )
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        models = client.models.list().data
        base = models[0].id
        assert {m.id for m in models[1:]} == {"kind-v", "terse-v"}
        assert all(m.model_extra["parent"] == base for m in models[1:])
        steering = [{"vector": "formal", "scale": 6.0, "positions": "all"}]
        for model, steer in ((base, None), (base, steering), ("kind-v", steering)):
            theirs = chat(client, model=model, steering=steer).choices[0].message.content
            ours = chat(served["client"], model=model if model != base else "tiny-llama", steering=steer)
            assert theirs == ours.choices[0].message.content
        text = "".join(c.choices[0].delta.content or "" for c in chat(client, model=base, stream=True))
        assert text == chat(client, model=base).choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_playground_page_is_served_without_outside_resources(served):
    req = urllib.request.Request(served["url"] + "/")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/html")
        page = r.read().decode()
    assert "/v1/chat/completions" in page and "/v1/steering/vectors" in page and "steering" in page
    assert "http://" not in page and "https://" not in page and " src=" not in page  # no CDN, one file


@pytest.mark.slow
def test_real_model_mixed_batch_equals_alone(tmp_path):
    """The embedded SmolLM2: a mixed batch (vectors, adapter, base) gives each row its solo answer."""
    from peft import LoraConfig, get_peft_model

    from vsteer.arch import get_arch
    from vsteer.hooks import site_shape
    from vsteer.models import load_model
    from vsteer.serve.schema import parse_chat

    model, tok = load_model("smollm2-135m-instruct", device="cpu")
    arch = get_arch(model)
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector.for_model(
        model, {layer: torch.randn(site_shape(arch, "v"), generator=g) for layer in range(8, 16)}, site="v"
    )
    other, _ = load_model("smollm2-135m-instruct", device="cpu")
    torch.manual_seed(1)
    peft_model = get_peft_model(other, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "arm")
    engine = Engine(
        model, tok, "smollm2-135m-instruct", vectors={"rand": vec}, adapters={"arm": tmp_path / "arm"}
    )
    engine.start()
    try:
        bodies = [
            {"model": m, "steering": s, "messages": [{"role": "user", "content": c}]}
            for m, s, c in [
                ("smollm2-135m-instruct", None, "Tell me about the sea."),
                ("smollm2-135m-instruct", [{"vector": "rand", "scale": 2.0, "positions": "all"}], "Hi!"),
                ("arm", None, "What is a good breakfast?"),
                ("arm", [{"vector": "rand", "scale": -2.0}], "Tell me about the sea."),
            ]
        ]
        limits = Limits()
        make = lambda b: parse_chat({**b, "temperature": 0, "max_tokens": 6}, engine, limits)  # noqa: E731
        alone = [engine.generate(make(b)) for b in bodies]
        assert len({a["text"] for a in alone}) == len(alone)
        with cf.ThreadPoolExecutor(len(bodies)) as pool:
            together = list(pool.map(lambda b: engine.generate(make(b)), bodies))
        assert together == alone
    finally:
        engine.stop()


def test_full_queue_is_refused_with_429(served):
    engine = served["engine"]
    limit = engine.max_queue
    engine.max_queue = 0
    try:
        r = _post(served["url"], "chat", {})
    finally:
        engine.max_queue = limit
    assert r.status_code == 429 and "queue is full" in r.json()["error"]["message"]
    assert chat(served["client"], max_tokens=2).choices


def test_client_that_disconnects_mid_stream_frees_its_row(served):
    import http.client

    body = {
        "model": "tiny-llama",
        "prompt": "hello world",
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=30)
    conn.request(
        "POST",
        "/v1/completions",
        body=json.dumps(body),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.readline().decode()
    rid = json.loads(first[len("data: ") :])["id"].split("-", 1)[1]
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
    conn.close()
    trace = served["trace"]
    steps = -1
    for _ in range(400):  # bounded: the row stops decoding soon after the disconnect
        time.sleep(0.02)
        if len(trace[rid]) == steps:
            break
        steps = len(trace[rid])
    time.sleep(0.2)
    assert len(trace[rid]) == steps < 400, "the row went on decoding after its client left"
    assert chat(served["client"], max_tokens=2).choices  # still serving


# --- stop, n, logprobs (issue 12) -----------------------------------------------------------


def _cut(text: str, stops: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string (OpenAI's rule)."""
    found = [text.find(s) for s in stops if s in text]
    return text[: min(found)] if found else text


def _stream_completion(client, **kw):
    parts, finish = [], None
    for c in client.completions.create(stream=True, **kw):
        parts.append(c.choices[0].text)
        finish = c.choices[0].finish_reason or finish
    return "".join(parts), finish


def test_stop_ends_before_the_stop_string(served):
    client = served["client"]
    kw = dict(model="tiny-llama", prompt="tell me a story", max_tokens=12, temperature=0)
    plain = client.completions.create(**kw).choices[0]
    words = plain.text.split()
    assert len(words) >= 6, plain.text
    cases = [
        words[3],  # one token
        [" zzz-never", f"{words[3]} {words[4]}"],  # two tokens: the first is held back, then cut
        [f"{words[2]} zzz-never"],  # a prefix that never completes: held back, then released
    ]
    for stop in cases:
        stops = [stop] if isinstance(stop, str) else stop
        want = _cut(plain.text, stops)
        done = client.completions.create(**kw, stop=stop).choices[0]
        assert done.text == want, (stop, done.text, plain.text)
        assert done.finish_reason == ("stop" if want != plain.text else plain.finish_reason)
        assert not any(s in done.text for s in stops)
        streamed, finish = _stream_completion(client, **kw, stop=stop)
        assert (streamed, finish) == (done.text, done.finish_reason), stop
    assert words[3] in plain.text and _cut(plain.text, [words[3]]) != plain.text  # the cut bites
    # chat, streamed and not, with a stop string from its own unstopped answer
    whole = chat(served["client"], max_tokens=10).choices[0].message.content
    stop = whole.split()[2]
    done = chat(client, max_tokens=10, stop=[stop]).choices[0]
    assert done.message.content == _cut(whole, [stop]) and done.finish_reason == "stop"
    parts, finish = [], None
    for c in chat(client, max_tokens=10, stop=[stop], stream=True):
        parts.append(c.choices[0].delta.content or "")
        finish = c.choices[0].finish_reason or finish
    assert "".join(parts) == done.message.content and finish == "stop"


def test_n_choices_greedy_identical_and_sampled_reproducible(served):
    client = served["client"]
    one = chat(client, max_tokens=8)
    three = chat(client, max_tokens=8, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    # each choice is a batch row with the request's steering and adapter
    steering = [{"vector": "happy", "scale": 8.0, "positions": "all"}]
    alone = chat(client, model="kind-v", steering=steering).choices[0].message.content
    both = chat(client, model="kind-v", steering=steering, n=2)
    assert [c.message.content for c in both.choices] == [alone, alone]
    kw = dict(model="tiny-llama", prompt="tell me", max_tokens=12, temperature=1.0, seed=11)
    a = [c.text for c in client.completions.create(**kw, n=3).choices]
    b = [c.text for c in client.completions.create(**kw, n=3).choices]
    assert a == b, "a seeded request gives the same choices every time"
    assert len(set(a)) == 3, f"the choices must differ: {a}"
    assert a[0] == client.completions.create(**kw).choices[0].text  # choice 0 is the n=1 answer
    # streamed: chunks carry their choice's index
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for c in client.completions.create(**kw, n=3, stream=True):
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert [texts[i] for i in range(3)] == a and set(finishes) == {0, 1, 2}


def _direct_logprobs(served, ids: list[int]) -> torch.Tensor:
    """log_softmax of the plain model's next-token logits ``[vocab]`` after ``ids``, adapters off."""
    engine = served["engine"]
    with engine._lock, torch.no_grad(), engine.model.disable_adapter():
        out = engine.model(input_ids=torch.tensor([ids]))
    return torch.log_softmax(out.logits[0, -1].float(), dim=-1)


def test_completion_logprobs_match_a_direct_forward(served):
    client, tok = served["client"], served["engine"].tokenizer
    prompt = "hello world"
    r = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    choice = r.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) >= 1
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [len(prompt) + len("".join(lp.tokens[:j])) for j in range(len(lp.tokens))]
    logp = _direct_logprobs(served, tok(prompt)["input_ids"])
    assert abs(lp.token_logprobs[0] - float(logp.max())) < 1e-4  # greedy: the most likely token
    top = torch.topk(logp, 3).values.tolist()
    assert sorted(lp.top_logprobs[0].values(), reverse=True) == pytest.approx(top, abs=1e-4)
    for j, alts in enumerate(lp.top_logprobs):
        assert alts[lp.tokens[j]] == lp.token_logprobs[j] and len(alts) <= 4
    zero = client.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=6, temperature=0, logprobs=0
    )
    assert zero.choices[0].logprobs.token_logprobs == lp.token_logprobs
    assert all(len(d) == 1 for d in zero.choices[0].logprobs.top_logprobs)
    assert (
        client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=2).choices[0].logprobs is None
    )


def test_chat_logprobs_come_from_the_steered_logits(served):
    client, engine = served["client"], served["engine"]
    content = "hello world tell me a story"
    plain = chat(client, content=content, max_tokens=6, logprobs=True, top_logprobs=5)
    first = plain.choices[0].logprobs.content[0]
    text = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    logp = _direct_logprobs(served, engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert abs(first.logprob - float(logp.max())) < 1e-4
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(
        torch.topk(logp, 5).values.tolist(), abs=1e-4
    )
    steering = [{"vector": "happy", "scale": 8.0, "positions": "all"}]
    r = chat(client, content=content, steering=steering, max_tokens=6, logprobs=True, top_logprobs=5)
    entries = r.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    trace = served["trace"][r.id.split("-", 1)[1]]  # the logits the sampler picked from
    for j, e in enumerate(entries):
        step = torch.log_softmax(trace[j].float(), dim=-1)
        assert abs(e.logprob - float(step.max())) < 1e-4 and e.top_logprobs[0].token == e.token
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(
            torch.topk(step, 5).values.tolist(), abs=1e-4
        )
        assert e.bytes == list(e.token.encode("utf-8")) and len(e.top_logprobs) == 5
    assert abs(entries[0].logprob - first.logprob) > 1e-3, "steering must change the logprobs"
    # streamed: the chunks' entries add up to the same list
    streamed = []
    for c in chat(
        client, content=content, steering=steering, max_tokens=6, logprobs=True, top_logprobs=5, stream=True
    ):
        if c.choices[0].logprobs is not None:
            streamed += c.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    assert chat(client, max_tokens=2).choices[0].logprobs is None


BAD_CHOICES = [
    ("chat", {"n": 9}, 400, "n must be an integer in [1, 8], got 9"),
    ("completion", {"n": 0}, 400, "n must be an integer in [1, 8], got 0"),
    ("chat", {"n": 2.5}, 400, "n must be an integer"),
    ("chat", {"best_of": 3}, 400, "best_of must be 1"),
    ("chat", {"top_logprobs": 2}, 400, "top_logprobs needs logprobs: true"),
    (
        "chat",
        {"logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs must be an integer in [0, 20], got 21",
    ),
    ("chat", {"logprobs": "yes"}, 400, "logprobs must be true or false"),
    ("completion", {"logprobs": 6}, 400, "logprobs must be an integer in [0, 5], got 6"),
    ("completion", {"logprobs": True}, 400, "logprobs must be an integer"),
    ("chat", {"stop": 5}, 400, "stop must be a string or a list of up to 4 strings"),
    ("completion", {"stop": ["a", 3]}, 400, "stop must be a string or a list of up to 4 strings"),
    ("chat", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop has 5 sequences; at most 4 allowed"),
    ("chat", {"stop": "x" * 300}, 400, "at most 256 allowed"),
]


@pytest.mark.parametrize(
    "route,body,status,words", BAD_CHOICES, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_CHOICES)]
)
def test_bad_stop_n_logprobs_refused(served, route, body, status, words):
    test_bad_input_refused(served, route, body, status, words)


def test_a_request_past_the_models_context_is_refused_alone(served):
    """A prompt plus max_tokens past the model's positions is a 400 naming both, and a request
    that does not set max_tokens gets what the context leaves; before the review such a row (on a
    model with learned positions) failed inside the forward and took every row of its batch with
    it (HTTP 500)."""
    url = served["url"]
    ctx = served["engine"].model.config.max_position_embeddings
    long = " ".join(["hello"] * (ctx - 4))
    n_prompt = len(served["engine"].tokenizer(long)["input_ids"])
    assert ctx - 16 < n_prompt < ctx
    r = _post(url, "completion", {"prompt": long, "max_tokens": ctx - n_prompt + 1})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert (
        f"context is {ctx} tokens" in message and f"prompt has {n_prompt}" in message and "\n" not in message
    )
    r = _post(url, "completion", {"prompt": " ".join(["hello"] * (ctx + 10)), "max_tokens": 1})
    assert r.status_code == 400 and f"context is {ctx} tokens" in r.json()["error"]["message"]
    body = {"model": "tiny-llama", "prompt": long, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    status, reply = _http(url + "/v1/completions", data=json.dumps(body).encode(), headers=headers)
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] <= ctx - n_prompt
    r = _post(url, "completion", {"prompt": long, "max_tokens": ctx - n_prompt})
    assert r.status_code == 200, r.text


def test_one_rows_failure_ends_that_row_alone(served, monkeypatch):
    """Found in review: a row whose logits went NaN (a steering scale that overflows a half dtype)
    or whose sampling raised failed every row of its batch. Now that row ends with one error line
    and the others finish as they would alone."""
    from vsteer.serve.schema import parse_chat

    engine = served["engine"]

    def request(content):
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": content}], "temperature": 0}
        return parse_chat({**body, "max_tokens": 6}, engine, Limits())

    contents = ("hello world", "tell me a story", "the world")
    alone = [engine.generate(request(c)) for c in contents]
    reqs = [request(c) for c in contents]
    bad, raising = reqs[0].id, reqs[2].id
    forward, pick = engine._forward, engine_module._pick
    steps = {"n": 0}

    def nan_forward(rows, *args):
        logits = forward(rows, *args)
        steps["n"] += 1
        if steps["n"] >= 3:  # the bad row breaks at its third token
            for i, row in enumerate(rows):
                if row.req.id == bad:
                    logits[i] = float("nan")
        return logits

    def raising_pick(logits, temperature, top_p, gen):
        if current["id"] == raising and steps["n"] >= 2:
            raise RuntimeError("sampler broke")
        return pick(logits, temperature, top_p, gen)

    current = {"id": None}
    advance = engine._advance

    def tracked(row, logits):
        current["id"] = row.req.id
        return advance(row, logits)

    monkeypatch.setattr(engine, "_forward", nan_forward)
    monkeypatch.setattr(engine, "_advance", tracked)
    monkeypatch.setattr(engine_module, "_pick", raising_pick)
    events: dict[int, list] = {0: [], 1: [], 2: []}
    for i, r in enumerate(reqs):
        r.emit = lambda kind, payload, i=i: events[i].append((kind, payload))
    with engine._lock:  # all three join one batch
        engine.submit_all(reqs)
    for _ in range(4000):
        if all(any(k in ("done", "error") for k, _ in ev) for ev in events.values()):
            break
        time.sleep(0.005)
    ends = {i: [(k, p) for k, p in ev if k in ("done", "error")] for i, ev in events.items()}
    assert (
        [k for k, _ in ends[0]] == ["error"] and "not finite" in ends[0][0][1] and "\n" not in ends[0][0][1]
    )
    assert [k for k, _ in ends[2]] == ["error"] and "RuntimeError: sampler broke" in ends[2][0][1]
    assert ends[1] == [("done", alone[1])]
    monkeypatch.undo()
    assert engine.generate(request(contents[0])) == alone[0]  # the engine goes on serving
