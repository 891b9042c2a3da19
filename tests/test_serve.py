"""`llmprune serve`: one API suite run against a real server process per engine (transformers and vLLM),
plus the start-up perplexity check on corrupted weights, a failed quality gate and a plain model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from contextlib import ExitStack

import httpx
import pytest
import torch
from openai import OpenAI, RateLimitError
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import llmprune
from llmprune.cli import main
from llmprune.data.windows import Windows
from llmprune.eval.perplexity import perplexity
from llmprune.export.gate import quality_gate as recorded_gate
from tests.helpers.serving import ROOT, Server

FLAG_KEY = "flag-key"
ENV_KEYS = "env-key-1, env-key-2"
CONTEXT = 256  # max_position_embeddings of the tiny test models
CHAT_TEMPLATE = ROOT / "tests" / "data" / "plain-chat.jinja"  # the transformers app's plain `role: content` lines


@pytest.fixture(scope="session")
def pruned_tiny(tiny_models, corpus_file, tmp_path_factory):
    """A tiny Llama (head_dim 32, which vLLM's CPU attention supports), pruned by llmprune with eval windows."""
    model = tiny_models("llama", layers=2, hidden=128, inter=256)
    out = tmp_path_factory.mktemp("serve") / "tiny-pruned"
    common = dict(calibration=str(corpus_file), samples=4, seqlen=64, eval_samples=8, quiet=True)
    llmprune.prune(str(model), method="magnitude", sparsity=0.5, output=str(out), **common)
    return out


@pytest.fixture(scope="module")
def servers(pruned_tiny):
    """One server per engine for this module, started on first use and stopped after it (an idle vLLM engine
    still polls, which would slow every later test): keys from the flag and the environment, small limits
    (2 running, 1 queued)."""
    started: dict[str, Server] = {}

    def start(engine: str) -> Server:
        if engine not in started:
            flags = ["--engine", engine, "--api-key", FLAG_KEY, "--max-queue", "1", "--max-tokens", "200"]
            env = {"LLMPRUNE_API_KEYS": ENV_KEYS}
            if engine == "vllm":
                flags += ["--max-num-seqs", "2", "--enforce-eager", "--kv-cache-gib", "0.25"]
                flags += ["--chat-template", str(CHAT_TEMPLATE)]  # vLLM's flag: the tiny tokenizer has none
                env["OMP_NUM_THREADS"] = "1"
            else:
                flags += ["--max-concurrency", "2"]
            srv = Server(pruned_tiny, *flags, key=FLAG_KEY, env=env)
            srv.engine = engine
            started[engine] = srv
            body = srv.wait_checked()
            assert body["ready"], srv.log()[-3000:]
        return started[engine]

    yield start
    for srv in started.values():
        srv.stop()


@pytest.fixture(scope="module", params=["transformers", pytest.param("vllm", marks=pytest.mark.slow)])
def server(request, servers):
    """The API suite runs against both engines: vLLM's own server and llmprune's transformers app."""
    return servers(request.param)


@pytest.fixture(scope="module")
def hf_server(servers):
    return servers("transformers")


@pytest.fixture
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key=FLAG_KEY, max_retries=0, timeout=120)


def _model(client) -> str:
    return client.models.list().data[0].id


def _metrics(server) -> dict[str, float]:
    samples = {}
    for family in text_string_to_metric_families(server.get("/metrics").text):
        for s in family.samples:
            samples[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
    return samples


def test_health_ready_and_models(server, client, pruned_tiny):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]
    ready = server.get("/ready")
    assert ready.status_code == 200
    check = ready.json()["check"]
    assert check["status"] == "passed" and check["windows"] == 8 and check["seqlen"] == 64
    # the serving engine's perplexity on the prune run's eval windows vs llmprune's float32 result then
    recorded = json.loads((pruned_tiny / "llmprune.json").read_text())["perplexity"]["pruned"]
    assert check["reference"] == pytest.approx(recorded)
    assert check["perplexity"] == pytest.approx(recorded, rel=0.01)
    models = client.models.list().data
    assert [m.id for m in models] == [pruned_tiny.name]


def test_completion(client):
    result = client.completions.create(model=_model(client), prompt="Good morrow, sweet", max_tokens=6, temperature=0)
    choice = result.choices[0]
    assert result.object == "text_completion" and choice.finish_reason in ("length", "stop")
    assert result.usage.completion_tokens <= 6 and result.usage.prompt_tokens > 0
    assert choice.text
    batch = client.completions.create(model=_model(client), prompt=["To be", "or not"], max_tokens=3, n=2)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]


def test_stop_sequence_cuts_the_text(client):
    model = _model(client)
    full = client.completions.create(model=model, prompt="My lord,", max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = client.completions.create(model=model, prompt="My lord,", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_streamed_matches_unstreamed(client, server):
    messages = [{"role": "user", "content": "Speak, what say you?"}]
    kwargs = dict(model=_model(client), messages=messages, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    raw = server.post("/v1/chat/completions", {**kwargs, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_perplexity_matches_llmprune_eval(server, pruned_tiny, corpus_file):
    """/v1/perplexity (serving engine) vs llmprune's streamed float32 evaluator on the same tokens."""
    text = corpus_file.read_text()
    texts = [text[1000:1400], text[5000:5300]]
    answer = server.post("/v1/perplexity", {"text": texts})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    tokenizer = AutoTokenizer.from_pretrained(pruned_tiny)
    nll, tokens = 0.0, 0
    for text_part, served in zip(texts, body["texts"]):
        ids = torch.tensor([tokenizer(text_part)["input_ids"]])
        assert ids.shape[1] < CONTEXT
        reference = perplexity(pruned_tiny, Windows(ids, "text"), torch.device("cpu"))
        assert served["tokens"] == reference.tokens
        assert served["perplexity"] == pytest.approx(reference.perplexity, rel=0.01)
        nll, tokens = nll + reference.nll * reference.tokens, tokens + reference.tokens
    assert body["tokens"] == tokens
    assert body["perplexity"] == pytest.approx(torch.tensor(nll / tokens).exp().item(), rel=0.01)


def test_metrics(server, client):
    client.completions.create(model=_model(client), prompt="Hark", max_tokens=4)
    samples = _metrics(server)
    assert samples['llmprune_requests_total{"route": "/v1/completions", "status": "200"}'] >= 1
    assert samples['llmprune_request_seconds_count{"route": "/v1/completions"}'] >= 1
    if server.engine == "vllm":  # vLLM's own metrics, exported beside llmprune's
        generated = [v for k, v in samples.items() if k.startswith("vllm:generation_tokens_total")]
        assert sum(generated) >= 4
    else:
        assert samples["llmprune_generated_tokens_total{}"] >= 4
    assert samples["llmprune_ppl_check_state{}"] == 1
    assert samples["llmprune_ppl_check_perplexity{}"] > 1
    assert samples["llmprune_ready{}"] == 1


@pytest.mark.parametrize("route", ["/v1/models", "/v1/completions", "/v1/perplexity"])
def test_api_key_required(server, route):
    """As in `vllm serve`: the /v1 routes need a key (any of --api-key and LLMPRUNE_API_KEYS); /health,
    /version, /tokenize, and (without --protect-metrics) /ready and /metrics do not."""
    call = server.get if route == "/v1/models" else server.post
    for headers in ({}, server.headers("wrong-key"), {"Authorization": FLAG_KEY}):
        answer = call(route, headers=headers)
        assert answer.status_code == 401
        assert answer.json()["error"]["type"] == "authentication_error"
    for key in (FLAG_KEY, "env-key-1", "env-key-2"):
        assert call(route, headers=server.headers(key)).status_code != 401
    for open_route in ("/health", "/version", "/ready", "/metrics"):
        assert httpx.get(server.url + open_route).status_code == 200
    assert httpx.post(server.url + "/tokenize", json={"prompt": "Hark"}).status_code == 200


LONG_PROMPT = "So " * 400
# refused by both engines (vLLM's own validation, or llmprune's)
INVALID = {
    "max_tokens zero": ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    "prompt longer than context": ("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 1}, "prompt"),
    "top_p zero": ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    "top_p above one": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5},
        "top_p",
    ),
    "no prompt": ("/v1/completions", {"max_tokens": 3}, "prompt"),
    "no messages": ("/v1/chat/completions", {"messages": []}, "messages"),
    "token id out of vocab": ("/v1/completions", {"prompt": [1, 2, 10**6]}, "prompt"),
    "perplexity of nothing": ("/v1/perplexity", {"text": "x"}, "text"),
}
# bounds of llmprune's transformers app (vLLM accepts these as `vllm serve` does; it shortens max_tokens)
INVALID_TRANSFORMERS = {
    "prompt plus max_tokens": ("/v1/completions", {"prompt": "So " * 100, "max_tokens": 200}, "max_tokens"),
    "max_tokens above --max-tokens": ("/v1/completions", {"prompt": "hi", "max_tokens": 201}, "max_tokens"),
    "temperature": ("/v1/completions", {"prompt": "hi", "temperature": 3}, "temperature"),
    "n zero": ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    "n too large": ("/v1/completions", {"prompt": "hi", "n": 100}, "n"),
    "bad role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    "logprobs above 5": ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
    "echo streamed": ("/v1/completions", {"prompt": "hi", "echo": True, "stream": True}, "stream"),
    "logprobs with stop": ("/v1/completions", {"prompt": "hi", "logprobs": 1, "stop": ["x"]}, "stop"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_body_is_400(server, case):
    route, body, param = INVALID[case]
    answer = server.post(route, body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    if server.engine == "vllm" and route != "/v1/perplexity":
        assert error["message"]  # vLLM's own error body, as `vllm serve` answers
        return
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param in error["message"] or "context" in error["message"] or "tokens" in error["message"]


@pytest.mark.parametrize("case", sorted(INVALID_TRANSFORMERS))
def test_invalid_body_is_400_transformers(hf_server, case):
    route, body, param = INVALID_TRANSFORMERS[case]
    answer = hf_server.post(route, body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param in error["message"] or "context length" in error["message"]


# fields `vllm serve` takes beyond llmprune's transformers app: honoured by one, refused by name by the other
VLLM_FIELDS = {
    "top_k": 1,
    "frequency_penalty": 0.5,
    "presence_penalty": 0.5,
    "repetition_penalty": 1.2,
    "min_p": 0.1,
    "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "logit_bias": {"50": 100},
}


@pytest.mark.parametrize("field", sorted(VLLM_FIELDS))
def test_vllm_sampling_fields_are_honoured_or_refused_by_name(server, field):
    route = "/v1/chat/completions" if field in ("tools", "response_format") else "/v1/completions"
    prompt = {"messages": [{"role": "user", "content": "Speak"}]} if "chat" in route else {"prompt": "Good morrow"}
    body = {**prompt, "max_tokens": 4, field: VLLM_FIELDS[field]}
    if field == "tools":
        body["tool_choice"] = "none"  # "auto" needs a tool-call parser (--enable-auto-tool-choice)
    answer = server.post(route, body)
    if server.engine == "transformers":
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == field and f"{field} is not supported" in error["message"]
        return
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    if field == "top_k":  # top_k 1 is greedy decoding, whatever the temperature
        greedy = server.post(route, {**prompt, "max_tokens": 4, "temperature": 0}).json()["choices"][0]
        assert choice["text"] == greedy["text"]
    if field == "logit_bias":  # +100 on one token makes it the only choice
        tokens = server.post("/tokenize", {"prompt": choice["text"], "add_special_tokens": False}).json()["tokens"]
        assert set(tokens) == {50}


def test_echo_and_logprobs_as_lm_eval_sends_them(server, pruned_tiny):
    """lm-evaluation-harness's loglikelihood request (token ids, echo, logprobs 1, max_tokens 1): the prompt's
    logprobs equal transformers' float32 log-softmax on both engines."""
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(pruned_tiny)
    ids = tokenizer("Good morrow, sweet lady, what news?")["input_ids"]
    body = {"prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234}
    answer = server.post("/v1/completions", body)
    assert answer.status_code == 200, answer.text
    logprobs = answer.json()["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(ids) + 1 and logprobs["token_logprobs"][0] is None
    model = AutoModelForCausalLM.from_pretrained(pruned_tiny, dtype=torch.float32)
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    expected = reference.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert logprobs["token_logprobs"][1 : len(ids)] == pytest.approx(expected, abs=1e-3)
    for token_logprob, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]):
        assert max(top.values()) >= token_logprob - 1e-6 and token_logprob in top.values()


def test_lm_eval_through_the_server_scores_the_task_as_the_folder(server, pruned_tiny, capsys):
    """lm-eval's local-completions client against the running server (vLLM's own, or llmprune's app) scores the
    local task as `llmprune eval --tasks` does on the same folder (20 documents)."""
    tasks = ["--tasks", "shakespeare_cloze", "--include-path", str(ROOT / "tests" / "data" / "tasks"), "--limit", "20"]

    def score(*extra: str) -> dict:
        assert main(["eval", str(pruned_tiny), *tasks, *extra, "--quiet", "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    local, served = score(), score("--base-url", server.url, "--api-key", FLAG_KEY)
    assert served["backend"] == "server" and served["tasks"]["shakespeare_cloze"]["samples"] == 20
    accuracy = served["tasks"]["shakespeare_cloze"]["accuracy"]
    assert accuracy == pytest.approx(local["tasks"]["shakespeare_cloze"]["accuracy"], abs=0.02)


def test_malformed_json_is_400(server):
    answer = httpx.post(
        server.url + "/v1/completions",
        content=b"{not json",
        headers={**server.headers(), "content-type": "application/json"},
    )
    assert answer.status_code == 400 and "JSON" in answer.json()["error"]["message"]


def test_overload_is_429_with_retry_after_then_serves_again(server, client):
    """Two long streams run (the transformers app's 2 slots, vLLM's --max-num-seqs 2) and a third request
    takes the one queue place: the next is refused with 429 and Retry-After; once the streams are dropped
    (the requests aborted, not run to their end) the server answers again."""
    model = _model(client)
    heavy = {"model": model, "prompt": ["Now"] * 32, "n": 8, "max_tokens": 200, "stream": True}
    queued: dict = {}
    with ExitStack() as stack:
        for _ in range(3 if server.engine == "vllm" else 2):  # vLLM batches the third; the app queues it
            http = stack.enter_context(httpx.Client(timeout=120, headers=server.headers()))
            stream = stack.enter_context(http.stream("POST", server.url + "/v1/completions", json=heavy))
            assert stream.status_code == 200
        waiter = threading.Thread(
            target=lambda: queued.update(answer=server.post("/v1/completions", {"prompt": "Soft", "max_tokens": 2}))
        )
        if server.engine == "transformers":
            waiter.start()
        deadline = time.monotonic() + 60
        while _metrics(server)["llmprune_requests_queued{}"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _metrics(server)["llmprune_requests_queued{}"] == 1
        refused = server.post("/v1/completions", {"prompt": "Soft", "max_tokens": 2})
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(RateLimitError):
            client.completions.create(model=model, prompt="Soft", max_tokens=2)
    if server.engine == "transformers":
        waiter.join(timeout=120)
        assert queued["answer"].status_code == 200
    deadline = time.monotonic() + 30  # dropped streams are aborted at once (their 256 sequences would take minutes)
    while _metrics(server)["llmprune_requests_running{}"] > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    samples = _metrics(server)
    assert samples["llmprune_requests_running{}"] == 0 and samples["llmprune_requests_queued{}"] == 0
    again = client.completions.create(model=model, prompt="Soft you now", max_tokens=3)
    assert again.usage.completion_tokens >= 1
    assert samples['llmprune_requests_total{"route": "/v1/completions", "status": "429"}'] >= 2


def test_load_test_script(server):
    """scripts/load_test.py against the server: more clients than slots, so some are shed with 429 and
    Retry-After, and nothing else goes wrong."""
    command = [sys.executable, str(ROOT / "scripts" / "load_test.py"), "--url", server.url, "--api-key", FLAG_KEY]
    command += ["--clients", "6", "--requests", "12", "--duration", "60", "--max-tokens", "4", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["errors"] == {} and report["ok"] >= 1
    assert report["ok"] + report["rejected_429_with_retry_after"] == report["requests"] <= 12
    assert report["p50_s"] <= report["p99_s"] and report["tokens_per_s"] > 0


def _corrupt(folder, target):
    shutil.copytree(folder, target)
    for shard in target.glob("*.safetensors"):
        tensors = load_file(shard)
        if "model.norm.weight" in tensors:
            tensors["model.norm.weight"] = tensors["model.norm.weight"] * 10
            save_file(tensors, shard, metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=pytest.mark.slow)])
def test_corrupted_weights_fail_the_check(pruned_tiny, tmp_path, engine):
    """Weights changed after pruning: the engine's perplexity is far from the recorded one, so the service
    stays not ready (503 on /ready and on generation) and logs why, while /v1/perplexity still answers.
    vLLM's engine-core process then killed: the server stays up and says so (/health and /ready 503,
    generation refused as died) instead of the port going dark."""
    vllm_flags = ["--enforce-eager", "--kv-cache-gib", "0.25", "--chat-template", str(CHAT_TEMPLATE)]
    flags = vllm_flags if engine == "vllm" else []
    env = {"OMP_NUM_THREADS": "1"} if engine == "vllm" else None
    srv = Server(_corrupt(pruned_tiny, tmp_path / "corrupt"), "--engine", engine, *flags, env=env)
    try:
        body = srv.wait_checked()
        assert body["ready"] is False and body["check"]["status"] == "failed"
        assert "engine mismatch or corrupted weights" in body["check"]["reason"]
        assert srv.get("/ready").status_code == 503
        assert httpx.get(srv.url + "/health").status_code == 200
        refused = srv.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503 and "not ready" in refused.json()["error"]["message"]
        assert srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}).status_code == 503
        live = srv.post("/v1/perplexity", {"text": "Good morrow, good morrow, my lord."})
        assert live.status_code == 200 and live.json()["perplexity"] > body["check"]["reference"]
        samples = _metrics(srv)
        assert samples["llmprune_ppl_check_state{}"] == 0 and samples["llmprune_ready{}"] == 0
        assert "NOT READY" in srv.log() and "corrupted weights" in srv.log()
        if engine == "vllm":
            _kill_the_engine_and_see_health_turn_503(srv)
    finally:
        srv.stop()


def _kill_the_engine_and_see_health_turn_503(srv: Server) -> None:
    import psutil

    children = psutil.Process(srv.process.pid).children(recursive=True)
    engine = [p for p in children if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())]
    assert engine, [p.name() for p in children]
    for process in engine:
        process.kill()
    deadline = time.monotonic() + 60
    while httpx.get(srv.url + "/health").status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert httpx.get(srv.url + "/health").status_code == 503
    ready = srv.get("/ready")
    assert ready.status_code == 503 and ready.json()["engine_alive"] is False
    refused = srv.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert refused.status_code == 503 and "died" in refused.json()["error"]["message"]


def test_failed_quality_gate_and_request_timeout(pruned_tiny, tmp_path):
    """A folder whose recorded quality gate failed (dense perplexity half the pruned one) stays not ready,
    though the engine reproduces its pruned perplexity; a request past --request-timeout gets 504."""
    folder = tmp_path / "failed-gate"
    shutil.copytree(pruned_tiny, folder)
    report = json.loads((folder / "llmprune.json").read_text())
    report["perplexity"]["dense"] = report["perplexity"]["pruned"] / 2
    report["quality_gate"] = recorded_gate(report["perplexity"], 0.5)
    (folder / "llmprune.json").write_text(json.dumps(report))
    srv = Server(folder, "--engine", "transformers", "--request-timeout", "1e-9")
    try:
        body = srv.wait_checked()
        assert body["check"]["status"] == "failed" and "above the limit of +50%" in body["check"]["reason"]
        assert "within ±5%" in body["check"]["reason"]
        timed_out = srv.post("/v1/perplexity", {"text": "Good morrow"})
        assert timed_out.status_code == 504 and timed_out.json()["error"]["code"] == "timeout"
    finally:
        srv.stop()


def test_plain_model_with_check_text(tiny_models, corpus_file):
    """A model without llmprune.json, checked on --check-text against llmprune's own evaluator."""
    model = tiny_models("llama", layers=2, hidden=128, inter=256)
    flags = ["--engine", "transformers", "--check-text", str(corpus_file), "--check-seqlen", "64"]
    srv = Server(model, *flags, "--check-samples", "4")
    try:
        body = srv.wait_checked()
        check = body["check"]
        assert body["ready"] and check["status"] == "passed", check
        assert check["reference_source"] == "perplexity from llmprune's streamed evaluator on the same windows"
        assert check["windows"] == 4 and check["perplexity"] == pytest.approx(check["reference"], rel=0.01)
    finally:
        srv.stop()


def test_bad_serve_arguments_one_line_error(tiny_models, pruned_tiny, corpus_file, tmp_path, capsys):
    plain = tiny_models("llama", layers=2, hidden=128, inter=256)
    packed = tmp_path / "packed"
    common = dict(calibration=str(corpus_file), samples=2, seqlen=32, no_eval=True, quiet=True)
    llmprune.prune(
        str(plain), method="magnitude", pattern="2:4", save_format="packed-2:4", output=str(packed), **common
    )
    cases = {
        "plain model needs --check-text": ([plain], "no llmprune.json"),
        "engine": ([pruned_tiny, "--engine", "tgi"], "--engine must be one of"),
        "concurrency": ([pruned_tiny, "--engine", "transformers", "--max-concurrency", "0"], "must be positive"),
        "concurrency on vllm": ([pruned_tiny, "--engine", "vllm", "--max-concurrency", "4"], "--max-num-seqs"),
        "vllm flag on transformers": (
            [pruned_tiny, "--engine", "transformers", "--tensor-parallel-size", "2"],
            "unknown flags for the transformers engine: --tensor-parallel-size 2",
        ),
        "queue": ([pruned_tiny, "--max-queue", "-1"], "--max-queue must be 0 or more"),
        "port": ([pruned_tiny, "--port", "70000"], "--port must be in"),
        "check text": ([pruned_tiny, "--check-text", tmp_path / "nope.txt"], "no such file"),
        "expect without text": ([pruned_tiny, "--expect-ppl", "12"], "--expect-ppl needs --check-text"),
        "context": ([pruned_tiny, "--max-model-len", "100000"], "exceeds the model's context of 256"),
        "dtype": ([pruned_tiny, "--dtype", "int3"], "--dtype must be one of"),
        "gate": ([pruned_tiny, "--max-ppl-increase", "-0.5"], "--max-ppl-increase must be >= 0"),
        "packed": ([packed, "--skip-ppl-check"], "packed 2:4 format"),
        "missing model": ([tmp_path / "no-model"], "cannot find model"),
    }
    for case, (argv, message) in cases.items():
        code = main(["serve", *map(str, argv)])
        err = capsys.readouterr().err
        assert code == 2, case
        assert err.startswith("llmprune: error: ") and message in err and err.count("\n") == 1, (case, err)
    # flags vLLM's own parser refuses (its import may log first: the error is the last line)
    code = main(["serve", str(pruned_tiny), "--engine", "vllm", "--skip-ppl-check", "--tensor-parallel-size", "x"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("llmprune: error: vLLM rejects the engine flags --tensor-parallel-size x")


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_unknown_fields_are_refused_by_name(server, route):
    """No field is silently dropped: vLLM's own models would ignore an unknown field, llmprune refuses it."""
    prompt = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": "hi"}
    answer = server.post(route, {**prompt, "max_tokens": 2, "frobnicate": 1})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "frobnicate" and "frobnicate" in error["message"]
