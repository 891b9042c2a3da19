"""`llmprune service`: prune jobs over HTTP on a real service process (127.0.0.1, real SQLite, real workers)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from llmprune.cli import main
from tests.helpers.serving import ROOT, free_port

KEY, READER = "svc-key", "reader-key"


class Service:
    """`python -m llmprune service --db DB` in its own process group, polled until /health answers."""

    def __init__(self, db: Path, port: int | None = None, flags: tuple[str, ...] = ()) -> None:
        self.db, self.port = db, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        command = [sys.executable, "-m", "llmprune", "service", "--db", str(db), "--port", str(self.port)]
        command += ["--api-key", KEY, "--read-only-key", READER, "--log-level", "warning", *flags]
        self.log = db.parent / f"service-{self.port}.log"
        self.process = subprocess.Popen(
            command, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(self.log.read_text()[-3000:])

    def call(self, method: str, path: str, key: str = KEY, **kwargs) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=60, **kwargs)

    def wait(self, job_id: str, done=lambda job: job["status"] in ("succeeded", "failed", "cancelled"), timeout=300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.call("GET", f"/v1/prune-jobs/{job_id}").json()
            if done(job):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} not done: {job}\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """One service for the tests below (each waits for its own jobs to end, so the next starts on an idle one)."""
    srv = Service(tmp_path_factory.mktemp("service") / "jobs.sqlite")
    yield srv
    if srv.process.poll() is None:
        srv.kill()


def _job(model, corpus, output=None, **extra) -> dict:
    body = {"model": str(model), "method": "sparsegpt", "sparsity": 0.5, "calibration": str(corpus)}
    body.update({"samples": 8, "seqlen": 64, "eval_samples": 2, **extra})
    return {**body, "output": str(output)} if output else body


def _cli_run(body: dict, output: Path) -> None:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in body.items() if k not in ("model", "output")]
    assert main([body["model"], *flags, "--output", str(output), "--quiet"]) == 0


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_submit_watch_finish_and_report(service, tiny_models, corpus_file, tmp_path):
    body = _job(tiny_models("llama", layers=2), corpus_file)
    headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": "a1"}
    answer = httpx.post(service.url + "/v1/prune-jobs", json=body, headers=headers, timeout=60)
    assert answer.status_code == 202 and answer.json()["status"] == "queued"
    job_id = answer.json()["id"]
    again = httpx.post(service.url + "/v1/prune-jobs", json=body, headers=headers, timeout=60)
    assert again.status_code == 200 and again.json()["id"] == job_id
    events = []
    url, auth = f"{service.url}/v1/prune-jobs/{job_id}/events", {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("GET", url, headers=auth, timeout=300) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["status"] == "succeeded" and events[-1]["report"]["method"] == "sparsegpt"
    assert events[-1]["progress"] == {**events[-1]["progress"], "layer": 2, "layers": 2, "phase": "done"}
    job = service.call("GET", f"/v1/prune-jobs/{job_id}").json()
    assert job["report"]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3) and job["finished"] >= job["started"]
    listed = service.call("GET", "/v1/prune-jobs", params={"status": "succeeded"}).json()["data"]
    assert job_id in [j["id"] for j in listed] and {j["status"] for j in listed} == {"succeeded"}
    assert service.call("POST", "/v1/prune-jobs", key=READER, json=body).status_code == 403
    assert service.call("GET", f"/v1/prune-jobs/{job_id}", key=READER).status_code == 200
    assert httpx.get(f"{service.url}/v1/prune-jobs/{job_id}").status_code == 401
    cli = tmp_path / "cli"
    _cli_run(body, cli)
    assert _shards(Path(job["settings"]["output"])) == _shards(cli)


def test_sigkill_of_the_service_mid_job_resumes_to_identical_bytes(tiny_models, corpus_file, tmp_path):
    """The worker is frozen after its first committed layer, the service SIGKILLed; a new service on the same
    DB kills the leftover worker and continues the job from the engine's resume state."""
    body = _job(tiny_models("llama", layers=12), corpus_file, tmp_path / "out", samples=64, seqlen=128)
    first = Service(tmp_path / "jobs.sqlite")
    job_id = first.call("POST", "/v1/prune-jobs", json=body).json()["id"]
    running = first.wait(job_id, lambda job: (job["progress"] or {}).get("layer", 0) >= 1 or job["finished"])
    assert running["status"] == "running", running
    worker = int((tmp_path / "jobs-jobs" / job_id / "pid").read_text())
    os.kill(worker, signal.SIGSTOP)
    first.kill()
    second = Service(tmp_path / "jobs.sqlite")
    try:
        job = second.wait(job_id)
        assert job["status"] == "succeeded", job
    finally:
        second.kill()
    cli = tmp_path / "cli"
    _cli_run({k: v for k, v in body.items() if k != "output"}, cli)
    assert _shards(tmp_path / "out") == _shards(cli)
    assert job["runs"] == 2 and json.loads((tmp_path / "jobs-jobs" / job_id / "job.json").read_text())["resume"]


def test_a_killed_worker_fails_its_job_and_the_next_runs(service, tiny_models, corpus_file):
    model = tiny_models("llama", layers=12)
    doomed = service.call("POST", "/v1/prune-jobs", json=_job(model, corpus_file)).json()["id"]
    nxt = service.call("POST", "/v1/prune-jobs", json=_job(tiny_models("llama", layers=2), corpus_file)).json()["id"]
    service.wait(doomed, lambda job: job["status"] == "running")
    pid = int((service.db.parent / "jobs-jobs" / doomed / "pid").read_text())
    os.kill(pid, signal.SIGKILL)
    failed = service.wait(doomed)
    assert failed["status"] == "failed" and "killed by signal 9" in failed["error"]
    assert service.wait(nxt)["status"] == "succeeded"


def test_concurrent_bad_submissions_are_refused_and_nothing_is_queued(service, tiny_models):
    model = str(tiny_models("llama", layers=2))
    bodies = [b"", b"{not json", json.dumps({"model": model, "sparsity": 1.5}).encode()]
    bodies += [json.dumps({"model": model, "method": "nope"}).encode(), json.dumps({"sparsity": 0.5}).encode()]
    bodies += [json.dumps({"model": model, "resume": True}).encode(), b"[1, 2]"]
    bodies += [json.dumps({"model": model, "trust_remote_code": True}).encode()]

    def post(content: bytes) -> httpx.Response:
        return service.call("POST", "/v1/prune-jobs", content=content)

    before = service.call("GET", "/v1/prune-jobs").json()["data"]
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(post, [bodies[i % len(bodies)] for i in range(20)]))
    assert all(400 <= a.status_code < 500 for a in answers), [a.text for a in answers]
    assert "--sparsity must be in [0, 1) (got 1.5)" in post(bodies[2]).json()["error"]["message"]
    assert "--allow-remote-code" in post(bodies[-1]).json()["error"]["message"]
    planned = post(json.dumps({"model": model, "plan_ranks": 2}).encode()).json()["error"]["message"]
    assert planned == "plan_ranks is set by the service, not by a job"
    assert service.call("GET", "/v1/prune-jobs").json()["data"] == before


def test_cancel_a_queued_and_a_running_job(service, tiny_models, corpus_file, tmp_path):
    running = service.call(
        "POST", "/v1/prune-jobs", json=_job(tiny_models("llama", layers=12), corpus_file, tmp_path / "r")
    ).json()["id"]
    queued = service.call("POST", "/v1/prune-jobs", json=_job(tiny_models("llama", layers=2), corpus_file)).json()["id"]
    service.wait(running, lambda job: job["status"] == "running")
    assert service.call("DELETE", f"/v1/prune-jobs/{queued}").json()["status"] == "cancelled"
    assert service.call("DELETE", f"/v1/prune-jobs/{running}").json()["cancel_requested"] is True
    job = service.wait(running)
    assert job["status"] == "cancelled" and "at a layer boundary" in job["error"], job
    assert not (tmp_path / ".r.partial").exists() and not (tmp_path / "r").exists()


def test_devices_are_parsed_checked_and_confine_each_worker():
    from llmprune.errors import LLMPruneError
    from llmprune_serve.jobs.devices import parse_devices, worker_env

    assert parse_devices("auto", 0) == ["cpu"] and parse_devices("auto", 2) == ["cuda:0", "cuda:1"]
    assert parse_devices("1,3", 4) == ["cuda:1", "cuda:3"] and parse_devices("cpu", 8) == ["cpu"]
    for spec, count, message in [("0,1", 1, "no GPU 1 (this machine has 1 CUDA devices)"), ("a", 2, "auto, cpu or")]:
        with pytest.raises(LLMPruneError, match=re.escape(message)):
            parse_devices(spec, count)
    with pytest.raises(LLMPruneError, match="named twice"):
        parse_devices("0,0", 2)
    assert worker_env("cuda:3") == {"CUDA_VISIBLE_DEVICES": "3"} and worker_env("cpu") == {"CUDA_VISIBLE_DEVICES": ""}


def test_bad_service_flags_are_one_line_and_start_nothing(tmp_path, capsys):
    db = tmp_path / "jobs.sqlite"
    cases = {
        "--cancel-grace": (["--cancel-grace", "-1"], "--cancel-grace must be at least 0 seconds (got -1)"),
        "--devices": (["--devices", "0,9"], "--devices 0,9: no GPU"),
        "--workers-per-device": (["--workers-per-device", "0"], "--workers-per-device must be at least 1 (got 0)"),
    }
    for case, (flags, message) in cases.items():
        assert main(["service", "--db", str(db), *flags]) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("llmprune: error: ") and message in err and err.count("\n") == 1, (case, err)
    assert list(tmp_path.iterdir()) == []


def test_workers_per_device_run_jobs_side_by_side_each_confined_to_its_device(tmp_path, tiny_models, corpus_file):
    srv = Service(tmp_path / "jobs.sqlite", flags=("--devices", "cpu", "--workers-per-device", "2"))
    try:
        model = tiny_models("llama", layers=12)
        ids = [
            srv.call("POST", "/v1/prune-jobs", json=_job(model, corpus_file, tmp_path / f"o{i}")).json()["id"]
            for i in range(2)
        ]
        deadline = time.monotonic() + 120
        while len(srv.call("GET", "/v1/prune-jobs?status=running").json()["data"]) < 2:
            assert time.monotonic() < deadline and not srv.call("GET", "/v1/prune-jobs?status=succeeded").json()["data"]
            time.sleep(0.05)
        for job_id in ids:
            pid = int((tmp_path / "jobs-jobs" / job_id / "pid").read_text())
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert b"CUDA_VISIBLE_DEVICES=" in environ  # the CPU slot: no GPU visible
        jobs = [srv.wait(job_id) for job_id in ids]
        assert [job["status"] for job in jobs] == ["succeeded"] * 2
        assert [job["progress"]["device"] for job in jobs] == ["cpu"] * 2
    finally:
        srv.kill()


def _browser_dom(url: str) -> str:
    """The page's DOM after its scripts ran, in a real headless Chromium (Debian's `chromium` package)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("the dashboard test needs a headless Chromium: apt-get install chromium")
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom", url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_dashboard_in_headless_chromium_shows_a_job_and_its_progress(service, tiny_models, corpus_file):
    job_id = service.call("POST", "/v1/prune-jobs", json=_job(tiny_models("llama", layers=12), corpus_file)).json()[
        "id"
    ]
    service.wait(job_id, lambda job: (job["progress"] or {}).get("layer", 0) >= 1 or job["finished"])
    listing = _browser_dom(f"{service.url}/#key={KEY}").split("<script>")[0]
    row = re.search(rf'<tr id="row-{job_id}">(.*?)</tr>', listing, re.DOTALL)
    assert row is not None, listing[-3000:]
    assert re.search(r'class="status (running|succeeded)"', row.group(1))
    assert (
        re.search(r"layer (\d+) / 12", row.group(1)) and int(re.search(r"layer (\d+) / 12", row.group(1)).group(1)) >= 1
    )
    job = service.wait(job_id)
    page = _browser_dom(f"{service.url}/#job={job_id}&key={KEY}").split('<div id="job">')[1].split("<script>")[0]
    ppl = job["report"]["perplexity"]
    assert 'class="status succeeded">succeeded' in page
    assert f"dense {ppl['dense']:.3f} → pruned {ppl['pruned']:.3f}" in page
    for title in ("achieved sparsity", "reconstruction error per module", "seconds per layer"):
        assert f'<svg width="520" height="150" role="img" aria-label="{title}">' in page
    sparsity = re.search(r'aria-label="achieved sparsity"><polyline [^>]*points="([^"]+)"', page).group(1)
    assert len(sparsity.split()) == 12  # one point per layer of the report
    assert "layer 12 / 12" in page and 'id="cancel"' not in page
