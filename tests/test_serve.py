"""``hybrid serve``: the real server in a subprocess on a free port, driven by OpenAI's own client.

Greedy outputs are checked against ``Transformer`` + ``generate`` run here on the same
token ids (what ``hybrid run`` does); the prompt cache, the stream, cancellation, errors
and auth through the HTTP API. The parts without a server (KV cache rewind, the text
stream's stop strings, request checks) are tested directly.
"""
import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from hybrid.model import Tokenizer, Transformer, ensure_default_model, generate, load, write_tiny
from hybrid.serve import protocol
from hybrid.serve.engine import TextStream

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
N_CTX = 2048
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None):
    """(status, parsed JSON body) of a raw request: what clients other than openai's see."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def model_path():
    return ensure_default_model()


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    """The server on a free port of 127.0.0.1, for this module; it stops itself after 5 minutes."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "hybrid", "serve", "-m", str(model_path), "--port", str(port),
           "--device", "cpu", "-t", "1", "-c", str(N_CTX), "--api-key", KEY, "--log-level", "warning", "--f32"]
    if shutil.which("timeout"):  # a bound even if this process is killed before its teardown
        cmd = ["timeout", "300"] + cmd
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if http("GET", base + "/health")[0] == 200:
                break
        except OSError:
            pass
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"the server did not start (exit {p.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    yield base
    p.terminate()
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        p.kill()
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ref(model_path):
    """Greedy generation here, as `hybrid run --f32` does it: (token ids) -> (text, n tokens, finish_reason).
    (float32 activations on both sides: a reused prompt cache then moves logits by float rounding only)"""
    import numba
    model = load(model_path)
    tok = Tokenizer.from_model(model)
    tr = Transformer(model, n_ctx=N_CTX, f32=True)
    numba.set_num_threads(1)  # as the server's -t 1

    def run(ids, n):
        g = generate(tr, ids, n, stop=tok.stop)
        return tok.decode(g.tokens), len(g.tokens), "stop" if g.stopped == "eos" else "length"

    run.tok = tok
    run.chat_ids = lambda msgs: tok.encode_messages(msgs)[1]  # as `run --chat`: specials in the template only
    return run


# ------------------------------------------------------------------ through the server

def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == ["tiny-gpt-oss-32x4-tok"]
    status, body = http("GET", server + "/health")  # no key needed
    assert status == 200 and body["status"] == "ok" and not body["busy"]


def test_chat_greedy_equals_generate(client, ref):
    r = client.chat.completions.create(model="any", messages=CHAT, max_tokens=10, temperature=0)
    ids = ref.chat_ids(CHAT)
    text, n, finish = ref(ids, 10)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)


def test_completion_of_text_and_of_token_ids(client, ref):
    ids = ref.tok.encode("Light from the sun holds every colour")
    text, n, finish = ref(ids, 8)
    for prompt in ("Light from the sun holds every colour", ids):
        r = client.completions.create(model="x", prompt=prompt, max_tokens=8, temperature=0)
        assert r.object == "text_completion"
        assert (r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason) == (text, n, finish)
        assert r.usage.prompt_tokens == len(ids)


def test_stream_chunks_join_to_the_whole_answer(client, ref):
    text, n, finish = ref(ref.chat_ids(CHAT), 12)
    chunks = list(client.chat.completions.create(model="x", messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    last, usage = chunks[-2], chunks[-1]
    assert last.choices[0].finish_reason == finish and all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert usage.choices == [] and usage.usage.completion_tokens == n
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_raw_stream_ends_with_done(server):
    req = urllib.request.Request(server + "/v1/completions", method="POST",
                                 data=json.dumps({"prompt": "Why", "max_tokens": 3, "stream": True}).encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 3


def test_two_clients_at_once(client, ref):
    prompts = [ref.tok.encode("Why is the sky blue?"), ref.tok.encode("At sunset the light travels")]
    want = [ref(p, 16)[0] for p in prompts]

    def ask(p):
        return client.completions.create(model="x", prompt=p, max_tokens=16, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        got = list(pool.map(ask, prompts))
    assert got == want


def test_prompt_cache_reuse_gives_a_fresh_runs_answer(client, ref):
    first = client.chat.completions.create(model="x", messages=CHAT, max_tokens=6, temperature=0)
    chat = CHAT + [{"role": "assistant", "content": first.choices[0].message.content},
                   {"role": "user", "content": "And at sunset?"}]
    r = client.chat.completions.create(model="x", messages=chat, max_tokens=10, temperature=0)
    text, n, finish = ref(ref.chat_ids(chat), 10)
    assert r.usage.prompt_tokens_details.cached_tokens >= len(ref.chat_ids(CHAT)) - 1  # the first prompt
    assert (r.choices[0].message.content, r.usage.completion_tokens) == (text, n)


def test_sampling_with_a_seed_repeats(client):
    ask = lambda: client.completions.create(model="x", prompt="Why", max_tokens=8, temperature=0.9,  # noqa: E731
                                            top_p=0.9, seed=7).choices[0].text
    assert ask() == ask()


def test_stop_string_ends_the_text(client, ref):
    text, _, _ = ref(ref.chat_ids(CHAT), 10)
    stop = text[3:5]
    r = client.chat.completions.create(model="x", messages=CHAT, max_tokens=10, temperature=0, stop=[stop])
    assert r.choices[0].message.content == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"


def test_a_cancelled_stream_frees_the_model(server, client, ref):
    before = http("GET", server + "/health")[1]
    stream = client.completions.create(model="x", prompt="Why", max_tokens=N_CTX - 10, temperature=0,
                                       stream=True)
    got = [next(iter(stream)) for _ in range(3)]
    assert all(c.choices[0].finish_reason is None for c in got)  # still generating when we leave
    stream.close()
    t0 = time.monotonic()
    ids = ref.tok.encode("Why is the sky blue?")
    r = client.completions.create(model="x", prompt=ids, max_tokens=4, temperature=0)
    assert r.choices[0].text == ref(ids, 4)[0]
    after = http("GET", server + "/health")[1]
    assert after["cancelled"] == before["cancelled"] + 1, (before, after)
    assert after["generated_tokens"] - before["generated_tokens"] < N_CTX - 10 and time.monotonic() - t0 < 20


def test_a_client_that_leaves_before_its_answer_cancels_it(server):
    before = http("GET", server + "/health")[1]
    host, port = server.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port))) as s:  # a request, then gone without reading
        body = json.dumps({"prompt": "Why", "max_tokens": N_CTX - 10, "temperature": 0}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.3)
    deadline = time.monotonic() + 20
    while (h := http("GET", server + "/health")[1])["busy"] or h["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert h["generated_tokens"] - before["generated_tokens"] < N_CTX - 10


def test_bad_requests_get_openai_error_bodies(server, client):
    cases = [(dict(messages=CHAT, temperature=5), "temperature"), (dict(messages=[]), "messages"),
             (dict(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
             (dict(messages=CHAT, max_tokens=N_CTX), "messages"), (dict(messages=CHAT, n=2), "n"),
             (dict(messages=CHAT, max_tokens=0), "max_tokens"), (dict(messages=CHAT, stop=[""]), "stop")]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="x", **kw)
        err = e.value.body if "message" in e.value.body else e.value.body["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], (kw, err)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="x", prompt="Why " * (N_CTX + 1), max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    auth = {"Authorization": f"Bearer {KEY}"}
    for method, path, body, status in [("POST", "/v1/chat/completions", b"{not json", 400),
                                       ("POST", "/v1/completions", [1, 2], 400),
                                       ("POST", "/v1/completions", {"prompt": [10**9]}, 400),
                                       ("POST", "/v1/completions", {"prompt": ""}, 400),
                                       ("POST", "/v1/completions", {"prompt": "\ud800 lone"}, 400),
                                       ("POST", "/v1/completions", b"\xff\xfe not utf-8", 400),
                                       ("POST", "/v1/completions", {"prompt": "x", "temperature": 1e400}, 400),
                                       ("GET", "/v1/nothing", None, 404), ("GET", "/v1/completions", None, 405),
                                       ("GET", "/v1/models/other", None, 404)]:
        got, err = http(method, server + path, body, auth)
        assert got == status and set(err["error"]) == {"message", "type", "param", "code"}, (path, err)
    assert http("GET", server + "/health")[0] == 200  # and the server is still up


def test_auth(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, err = http("GET", server + "/v1/models", headers=headers)
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()


# ------------------------------------------------------------------ without a server

def test_kv_cache_rewind_is_refused_where_the_window_ring_lost_keys(tmp_path):
    m = load(write_tiny(tmp_path / "m.gguf", n_layers=2, n_embd=64, n_ff=64, n_experts=8, k=2, n_vocab=300,
                        n_swa=4, tokenizer=False))
    tr = Transformer(m, n_ctx=32, n_ubatch=4, f32=True)  # window layers: a ring of 4 + 4 slots; splits agree
    toks = np.random.default_rng(0).integers(0, 300, 20)
    full = tr.prefill(toks)
    tr.prefill(toks[:12])
    assert not tr.cache.rewind(13) and not tr.cache.rewind(3)  # beyond what it holds; key 0 overwritten
    assert tr.cache.rewind(9) and tr.n_past == 9  # keys 6.. still held
    np.testing.assert_allclose(tr.eval(toks[9:20]), full[9:20], rtol=1e-4, atol=1e-4 * np.abs(full).max())


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="needs the simulator")
def test_device_kv_cache_rewinds_as_the_host_one(tmp_path):
    from hybrid.model.tiny import simulator_tiles
    from hybrid.moe.scheduler import HybridMoE
    m = load(write_tiny(tmp_path / "m.gguf", n_layers=1, n_embd=32, n_ff=32, n_experts=4, k=2, n_head=2,
                        n_head_kv=1, head_dim=32, n_vocab=40, n_swa=3, tokenizer=False))
    sim = simulator_tiles()
    toks = np.random.default_rng(1).integers(0, 40, 12)
    full = Transformer(m, n_ctx=12, n_ubatch=4, f32=True).prefill(toks)
    moe = HybridMoE(m.layers, device="sim", tiles=sim.moe, dense_tiles=sim.dense)
    tr = Transformer(m, moe, n_ctx=12, n_ubatch=4, f32=True, dense_tiles=sim.dense, attention_config=sim.attention)
    tr.prefill(toks[:10])  # block 0 has the window: a ring of 3 + 4 slots, positions 3..9 held
    assert not tr.cache.rewind(2) and not tr.cache.rewind(11)
    assert tr.cache.rewind(7) and tr.n_past == 7
    got = tr.eval(toks[7:])
    np.testing.assert_allclose(got, full[7:], rtol=0, atol=2e-5 * np.abs(full).max())


def test_text_stream_holds_back_and_cuts_at_stop_strings(model_path):
    tok = Tokenizer.from_model(load(model_path))
    ids = tok.encode("the sky is blue at noon and red at sunset")
    for stops in ((), ("blue",), ("red at", "sky is"), ("no such text",)):
        ts = TextStream(tok, stops)
        deltas = [ts.push(t) for t in ids if not ts.stopped] + [ts.flush()]
        text = tok.decode(ids)
        cut = min([text.find(s) for s in stops if s in text], default=len(text))
        assert "".join(deltas) == text[:cut] and ts.stopped == (cut < len(text)), stops
    bytes_ = [i for i, t in enumerate(tok.tokens) if len(t) == 1][-8:]  # lone high bytes: never one character
    ts = TextStream(tok)
    assert "".join([ts.push(t) for t in bytes_] + [ts.flush()]) == tok.decode(bytes_)


def test_a_full_queue_is_refused():
    from hybrid.serve.engine import Busy, Engine, Params
    eng = Engine(None, None, max_queue=2)  # not started: jobs only queue
    for _ in range(2):
        eng.submit(Params([1], 1), loop=None)
    with pytest.raises(Busy):
        eng.submit(Params([1], 1), loop=None)


def test_request_checks():
    ok = protocol.parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                              "stop": "x", "seed": -1, "max_completion_tokens": 5})
    assert ok.messages == [{"role": "user", "content": "hi"}] and ok.stop == ("x",) and ok.seed is None
    assert ok.max_tokens == 5
    for body, param in [({"messages": CHAT, "top_p": 0}, "top_p"), ({"messages": CHAT, "stream": "yes"}, "stream"),
                        ({"messages": CHAT, "temperature": float("nan")}, "temperature"),
                        ({"messages": CHAT, "seed": 1.5}, "seed"), ({"messages": CHAT, "logprobs": True}, "logprobs"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content")]:
        with pytest.raises(protocol.ApiError) as e:
            protocol.parse_chat(body)
        assert e.value.status == 400 and e.value.param == param
    with pytest.raises(protocol.ApiError):
        protocol.parse_completion({"prompt": ["a", "b"]})  # one prompt per request
    with pytest.raises(protocol.ApiError):
        protocol.parse_json(b"[" * 100000)  # deeper than the parser goes: a 400, not a crash


def test_serve_imports_without_the_extra():
    code = ("import sys; sys.modules['starlette'] = None; sys.modules['uvicorn'] = None\n"
            "from hybrid.cli import main\n"
            "try:\n    main(['serve', '--port', '0'])\nexcept SystemExit as e:\n    sys.exit(e.code)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2 and "pip install 'hybrid-moe[serve]'" in p.stderr and "Traceback" not in p.stderr
