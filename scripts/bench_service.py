"""What the prune-job service costs: the same job through `llmprune service` and through the CLI, interleaved
(wall time from submit to `succeeded` against the CLI process's), and 100 concurrent status requests while
a job runs (latency p50/p99, errors).

    python scripts/bench_service.py [--pairs 2] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from statistics import quantiles

import httpx
from benchlib import machine, publish_table, script_parser

from tests.helpers.serving import free_port

JOB = {"model": "smollm2-135m-gguf", "method": "wanda", "sparsity": 0.5, "calibration": "shakespeare"}
JOB.update(samples=16, seqlen=128, no_eval=True)
KEY = "bench-key"


def cli_seconds(output: Path) -> float:
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in JOB.items() if k != "model"]
    started = time.perf_counter()
    command = [sys.executable, "-m", "llmprune", JOB["model"], *flags, "--output", str(output), "--quiet"]
    subprocess.run([*command, "--overwrite"], check=True, capture_output=True)
    return time.perf_counter() - started


def service_seconds(url: str, output: Path, probe: bool) -> tuple[float, list[float], int]:
    """Submit, wait for `succeeded`; with `probe`, 100 concurrent status requests once the job runs."""
    headers = {"Authorization": f"Bearer {KEY}"}
    started = time.perf_counter()
    job_id = httpx.post(f"{url}/v1/prune-jobs", json={**JOB, "output": str(output)}, headers=headers).json()["id"]
    latencies, errors = [], 0
    while True:
        job = httpx.get(f"{url}/v1/prune-jobs/{job_id}", headers=headers).json()
        if probe and job["status"] == "running" and not latencies:

            def status(_: int) -> tuple[float, int]:
                begin = time.perf_counter()
                code = httpx.get(f"{url}/v1/prune-jobs/{job_id}", headers=headers, timeout=60).status_code
                return time.perf_counter() - begin, code

            with ThreadPoolExecutor(max_workers=100) as pool:
                answers = list(pool.map(status, range(100)))
            latencies = [seconds for seconds, _ in answers]
            errors = sum(code != 200 for _, code in answers)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            assert job["status"] == "succeeded", job["error"]
            return time.perf_counter() - started, latencies, errors
        time.sleep(0.2)


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--write", metavar="MARKDOWN", help="put the table into this file's bench_service section")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-service-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "llmprune", "service", "--db", str(work / "jobs.sqlite"), "--port", str(port)]
    service = subprocess.Popen(
        [*command, "--api-key", KEY, "--log-level", "warning"], start_new_session=True, stderr=subprocess.DEVNULL
    )
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        rows, probe = [], ([], 0)
        for pair in range(args.pairs):  # interleaved: CLI, service, CLI, service, ...
            cli = cli_seconds(work / f"cli-{pair}")
            served, latencies, errors = service_seconds(url, work / f"svc-{pair}", probe=pair == 0)
            rows.append((cli, served))
            probe = (latencies, errors) if pair == 0 else probe
    finally:
        os.killpg(service.pid, signal.SIGTERM)
        service.wait(timeout=60)
    latencies, errors = probe
    cuts = quantiles(latencies, n=100)
    lines = [
        f"Measured {date.today()} on {machine()}. Command: `python scripts/bench_service.py {' '.join(sys.argv[1:])}`.",
        "",
        f"Job: `{JOB}`. CLI s: the `llmprune` process; service s: from POST to `succeeded` (worker start, polling "
        "every 0.2 s included). Pairs run one after the other, CLI first.",
        "",
        "| pair | CLI s | service s | service / CLI |",
        "|---|---|---|---|",
        *(f"| {i + 1} | {cli:.1f} | {served:.1f} | {served / cli:.3f} |" for i, (cli, served) in enumerate(rows)),
        "",
        f"100 concurrent `GET /v1/prune-jobs/ID` while the first service job ran: p50 {cuts[49] * 1000:.0f} ms, "
        f"p99 {cuts[98] * 1000:.0f} ms, {errors} errors.",
    ]
    publish_table("\n".join(lines), "bench_service", None, args.write)


if __name__ == "__main__":
    main()
