"""The serving parts that need no server: the limiter's queue, stop sequences, the quality gate."""

from __future__ import annotations

import asyncio
import time

import pytest

from llmprune.export.gate import quality_gate as recorded_gate
from llmprune_serve.check import quality_gate
from llmprune_serve.errors import APIError
from llmprune_serve.generation import StopScanner
from llmprune_serve.limits import Limiter


def test_limiter_is_first_come_first_served_and_refuses_past_the_queue():
    async def scenario():
        events = []
        limiter = Limiter(concurrency=1, queue=2, on_change=lambda active, waiting: events.append((active, waiting)))
        later = time.monotonic() + 60
        first = await limiter.acquire(later)
        order = []

        async def wait(name):
            taken = await limiter.acquire(later)
            order.append(name)
            return taken

        second, third = asyncio.create_task(wait("second")), asyncio.create_task(wait("third"))
        await asyncio.sleep(0)
        assert (limiter.active, limiter.waiting) == (1, 2)
        with pytest.raises(APIError) as refused:
            await limiter.acquire(later)
        assert refused.value.status == 429 and int(refused.value.headers["Retry-After"]) >= 1
        limiter.release(first)
        limiter.release(await second)
        limiter.release(await third)
        assert order == ["second", "third"] and (limiter.active, limiter.waiting) == (0, 0)
        assert events[-1] == (0, 0)

    asyncio.run(scenario())


def test_limiter_waiter_past_its_deadline_gets_504_and_leaves_the_queue():
    async def scenario():
        limiter = Limiter(concurrency=1, queue=1)
        held = await limiter.acquire(time.monotonic() + 60)
        with pytest.raises(APIError) as late:
            await limiter.acquire(time.monotonic())
        assert late.value.status == 504 and limiter.waiting == 0
        limiter.release(held)
        assert limiter.active == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("pieces", [["Good morrow, ", "my lord. ", "How now?"], list("Good morrow, my lord. How now?")])
@pytest.mark.parametrize("stops", [["lord"], ["How", "morrow"], ["absent"]])
def test_stop_scanner_cuts_streamed_text_like_the_whole(pieces, stops):
    whole = "".join(pieces)
    cuts = [whole.find(s) for s in stops if s in whole]
    expected = whole[: min(cuts)] if cuts else whole
    scanner, out, stopped = StopScanner(stops), "", False
    for piece in pieces:
        text, stopped = scanner.push(piece)
        out += text
        if stopped:
            break
    if not stopped:
        out += scanner.flush()
    assert out == expected and stopped == bool(cuts)


def test_quality_gate_flag_overrides_the_recorded_block():
    perplexity = {"dense": 20.0, "pruned": 28.0}  # +40%
    recorded_fail = {"perplexity": perplexity, "quality_gate": recorded_gate(perplexity, 0.2)}
    assert quality_gate(recorded_fail, None)[0] is False
    assert quality_gate(recorded_fail, 0.5)[0] is True
    assert quality_gate({"perplexity": perplexity}, None)[0] is True  # a report from before the gate: +50%
    assert quality_gate({"perplexity": perplexity}, 0.3)[0] is False
    assert quality_gate({"perplexity": {"dense": None, "pruned": None}}, None) is None
    assert quality_gate(None, None) is None


def test_api_keys_guard_the_api_routes_and_monitoring_only_when_asked():
    """The key rule of both engines: vLLM's guarded prefixes always; /metrics and /ready with --protect-metrics."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from llmprune_serve.auth import APIKeyMiddleware, api_keys

    paths = ["/health", "/version", "/tokenize", "/metrics", "/ready", "/v1/models", "/v2/x", "/inference/v1/generate"]
    routes = [Route(path, lambda request: PlainTextResponse("ok"), methods=["GET"]) for path in paths]
    for protect in (False, True):
        app = APIKeyMiddleware(Starlette(routes=routes), keys=("k",), protect_metrics=protect)
        with TestClient(app) as client:
            refused = {path for path in paths if client.get(path).status_code == 401}
            assert all(client.get(p, headers={"Authorization": "Bearer k"}).status_code == 200 for p in paths)
        guarded = {"/v1/models", "/v2/x", "/inference/v1/generate"} | ({"/metrics", "/ready"} if protect else set())
        assert refused == guarded
    assert api_keys(["a"], {"LLMPRUNE_API_KEYS": "b, c", "VLLM_API_KEY": "d"}) == ("a", "b", "c", "d")


def test_vllm_flags_go_to_vllms_own_parser(tmp_path):
    """Flags llmprune does not define, a vLLM-style --config YAML included, reach vLLM's serve arguments."""
    from pathlib import Path

    from llmprune.errors import LLMPruneError
    from llmprune_serve.config import ServeConfig
    from llmprune_serve.vllm_server import vllm_namespace

    config = ServeConfig(model="m", folder=Path(tmp_path), api_keys=("a", "b"), max_model_len=128)
    (tmp_path / "serve.yaml").write_text("max-num-seqs: 3\ngpu-memory-utilization: 0.5\n")
    args = vllm_namespace(config, "float32", ["--config", str(tmp_path / "serve.yaml"), "--trust-remote-code"])
    assert args.max_num_seqs == 3 and args.gpu_memory_utilization == 0.5 and args.trust_remote_code
    assert args.model == str(tmp_path) and args.max_model_len == 128 and args.api_key == ["a", "b"]
    assert args.dtype == "float32" and args.served_model_name == [tmp_path.name]
    with pytest.raises(LLMPruneError, match="vLLM rejects the engine flags --max-num-seqs x"):
        vllm_namespace(config, "float32", ["--max-num-seqs", "x"])
