"""Load test for `llmprune serve`: N concurrent clients against a server on this machine, bounded in
request count and time; reports errors, p50/p99 latency, requests/s and generated tokens/s.

A 429 with a Retry-After header is the server shedding load as designed: the client waits as told and
goes on, and it is counted apart from errors. Exit status 1 if any other error occurred.

    python scripts/load_test.py --url http://127.0.0.1:8000 --clients 64 --requests 512 --duration 120
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import statistics
import sys
import time
from collections import Counter
from urllib.parse import urlparse

import httpx

PROMPTS = [
    "Now is the winter of our discontent",
    "Shall I compare thee to a summer's day?",
    "Friends, Romans, countrymen, lend me your ears;",
    "If music be the food of love, play on;",
    "All the world's a stage, and all the men and women",
    "Once more unto the breach, dear friends, once more;",
    "The quality of mercy is not strained;",
    "What's in a name? That which we call a rose",
]


def loopback_only(url: str) -> str:
    """The URL, if its host is on this machine (a load test never targets anything else)."""
    host = urlparse(url).hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local:
        raise SystemExit(f"load_test: refusing {url}: only loopback addresses (127.0.0.1, localhost, ::1)")
    return url.rstrip("/")


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


class Tally:
    """What the clients saw: latencies of successes, tokens, and every refusal or error by kind."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.tokens = 0
        self.outcomes: Counter = Counter()
        self.issued = 0


async def client_loop(http: httpx.AsyncClient, args, model: str, tally: Tally, end: float, number: int) -> None:
    route = "/v1/chat/completions" if args.chat else "/v1/completions"
    while tally.issued < args.requests and time.monotonic() < end:
        prompt = PROMPTS[(tally.issued + number) % len(PROMPTS)]
        tally.issued += 1
        body = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature}
        body.update({"messages": [{"role": "user", "content": prompt}]} if args.chat else {"prompt": prompt})
        started = time.monotonic()
        try:
            answer = await http.post(route, json=body, timeout=args.timeout)
        except httpx.HTTPError as exc:
            tally.outcomes[f"transport error ({type(exc).__name__})"] += 1
            continue
        if answer.status_code == 200:
            tally.latencies.append(time.monotonic() - started)
            tally.tokens += answer.json()["usage"]["completion_tokens"]
            tally.outcomes["ok"] += 1
        elif answer.status_code == 429 and answer.headers.get("Retry-After", "").isdigit():
            tally.outcomes["429 with Retry-After"] += 1
            await asyncio.sleep(min(float(answer.headers["Retry-After"]), max(0.0, end - time.monotonic())))
        else:
            tally.outcomes[f"HTTP {answer.status_code}"] += 1


async def run(args) -> dict:
    base = loopback_only(args.url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits) as http:
        models = await http.get("/v1/models", timeout=30)
        models.raise_for_status()
        model = models.json()["data"][0]["id"]
        tally = Tally()
        started = time.monotonic()
        end = started + args.duration
        await asyncio.gather(*(client_loop(http, args, model, tally, end, i) for i in range(args.clients)))
        wall = time.monotonic() - started
    errors = {k: v for k, v in tally.outcomes.items() if k not in ("ok", "429 with Retry-After")}
    return {
        "url": base,
        "model": model,
        "route": "chat" if args.chat else "completions",
        "clients": args.clients,
        "requests": tally.issued,
        "ok": tally.outcomes["ok"],
        "rejected_429_with_retry_after": tally.outcomes["429 with Retry-After"],
        "errors": errors,
        "p50_s": percentile(tally.latencies, 0.50),
        "p99_s": percentile(tally.latencies, 0.99),
        "mean_s": statistics.fmean(tally.latencies) if tally.latencies else None,
        "requests_per_s": tally.outcomes["ok"] / wall,
        "tokens_per_s": tally.tokens / wall,
        "completion_tokens": tally.tokens,
        "wall_s": wall,
    }


def format_report(report: dict) -> str:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f} s"

    errors = ", ".join(f"{k}: {v}" for k, v in report["errors"].items()) or "none"
    return "\n".join(
        [
            f"  target        {report['url']} ({report['model']}, {report['route']})",
            f"  requests      {report['requests']} from {report['clients']} clients in {report['wall_s']:.1f} s",
            f"  ok            {report['ok']}",
            f"  429 + Retry   {report['rejected_429_with_retry_after']}",
            f"  errors        {errors}",
            f"  latency       p50 {seconds(report['p50_s'])}, p99 {seconds(report['p99_s'])}",
            f"  throughput    {report['requests_per_s']:.2f} requests/s, {report['tokens_per_s']:.1f} tokens/s",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server on this machine")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (64)")
    parser.add_argument("--requests", type=int, default=256, help="requests in all, at most (256)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds, at most (120)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request (32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take (300)")
    parser.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    parser.add_argument("--api-key", default=os.environ.get("LLMPRUNE_API_KEY"), help="bearer key")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.duration <= 0:
        parser.error("--clients, --requests and --duration must be positive")
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
