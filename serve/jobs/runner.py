"""Starts, watches and stops the worker processes of the service's jobs (first come first served, at most
`per_device` at once on each device, each worker confined to its device).

Everything the workers report (progress.json, result.json, their exit) is written to the store here, by the
service process alone. After a restart, jobs the store says were running are continued from the engine's
resume state; a worker left over from the previous service is killed first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llmprune.export.writer import partial_folder
from llmprune_serve.jobs.devices import worker_env
from llmprune_serve.jobs.store import JobStore

log = logging.getLogger("llmprune.service")


@dataclass
class Worker:
    job_id: str
    process: subprocess.Popen | None
    jobdir: Path
    device: str = "cpu"
    cancelled_at: float | None = None  # monotonic time of the cancel request
    progress: dict | None = None  # the last progress written to the store


class Runner:
    """At most `per_device` workers on each of `devices` at once. A cancelled worker gets `cancel_grace` seconds
    to reach its next layer boundary before it is killed."""

    def __init__(
        self, store: JobStore, workdir: Path, devices: list[str], per_device: int = 1, cancel_grace: float = 600.0
    ) -> None:
        self.store = store
        self.workdir = workdir
        self.devices = devices
        self.per_device = per_device
        self.cancel_grace = cancel_grace
        self.workers: dict[str, Worker] = {}

    def jobdir(self, job_id: str) -> Path:
        return self.workdir / job_id

    def free_device(self) -> str | None:
        """The first device with a free worker slot, if any."""
        busy = [worker.device for worker in self.workers.values()]
        return next((device for device in self.devices if busy.count(device) < self.per_device), None)

    def recover(self) -> None:
        """Jobs that were running when the service stopped: kill any leftover worker; record the ones whose
        worker finished before the service could (its result.json), and run the others again."""
        from llmprune.report import read_report

        for job in self.store.list("running"):
            jobdir = self.jobdir(job["id"])
            if (jobdir / "pid").is_file():
                kill_leftover(int((jobdir / "pid").read_text()))
            output = Path(job["settings"]["output"])
            finished = (jobdir / "result.json").is_file() or (
                read_report(output) is not None and not partial_folder(output).exists()
            )
            if finished:
                if not (jobdir / "result.json").is_file():  # committed, but killed before writing its result
                    (jobdir / "result.json").write_text(
                        json.dumps({"status": "succeeded", "report": read_report(output)})
                    )
                self._ended(Worker(job["id"], None, jobdir), 0)
            else:  # on a free slot if there is one (a restart with fewer devices doubles up rather than waits)
                self.launch(job, self.free_device() or self.devices[0])

    def launch(self, job: dict, device: str) -> None:
        jobdir = self.jobdir(job["id"])
        jobdir.mkdir(parents=True, exist_ok=True)
        (jobdir / "result.json").unlink(missing_ok=True)
        options = dict(job["settings"])
        model = options.pop("model")
        output = Path(options["output"])
        resume = (partial_folder(output) / ".work" / "state.json").is_file()
        (jobdir / "job.json").write_text(json.dumps({"model": model, "options": options, "resume": resume}))
        with (jobdir / "worker.log").open("ab") as log_file:  # the worker keeps its own copy of the handle
            process = subprocess.Popen(
                [sys.executable, "-m", "llmprune_serve.jobs.worker", str(jobdir)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **worker_env(device)},
            )
        (jobdir / "pid").write_text(str(process.pid))
        self.store.start(job["id"])
        self.workers[job["id"]] = Worker(job["id"], process, jobdir, device)
        self.store.progress(job["id"], {"phase": "starting", "device": device})
        log.info("job %s running on %s (pid %d%s)", job["id"], device, process.pid, ", resumed" if resume else "")

    def cancel(self, job_id: str) -> None:
        """Ask the worker to stop at its next layer boundary (SIGTERM); `tick` kills it after the grace period."""
        worker = self.workers.get(job_id)
        if worker is not None and worker.cancelled_at is None:
            worker.cancelled_at = time.monotonic()
            os.killpg(worker.process.pid, signal.SIGTERM)

    def tick(self) -> None:
        """Record progress and ends; start queued jobs on free slots."""
        for job_id, worker in list(self.workers.items()):
            self._progress(worker)
            code = worker.process.poll()
            if code is None:
                if worker.cancelled_at is not None and time.monotonic() - worker.cancelled_at > self.cancel_grace:
                    log.warning(
                        "job %s did not stop within %.0f s of its cancel; killing it", job_id, self.cancel_grace
                    )
                    os.killpg(worker.process.pid, signal.SIGKILL)
                continue
            del self.workers[job_id]
            self._ended(worker, code)
        for job in self.store.list("queued"):
            device = self.free_device()
            if device is None:
                break
            self.launch(job, device)

    def _progress(self, worker: Worker) -> None:
        """Write the worker's progress to the store when it changed (the tick runs 4 times a second)."""
        try:
            progress = {**json.loads((worker.jobdir / "progress.json").read_text()), "device": worker.device}
        except (OSError, ValueError):
            return
        if progress != worker.progress:
            self.store.progress(worker.job_id, progress)
            worker.progress = progress

    def _ended(self, worker: Worker, code: int) -> None:
        job = self.store.get(worker.job_id)
        output = Path(job["settings"]["output"])
        try:
            result = json.loads((worker.jobdir / "result.json").read_text())
        except (OSError, ValueError):
            result = None
        if worker.cancelled_at is not None and (result is None or result["status"] == "cancelled"):
            shutil.rmtree(partial_folder(output), ignore_errors=True)
            how = "at a layer boundary" if result else f"killed after {self.cancel_grace:.0f} s"
            self.store.finish(worker.job_id, "cancelled", f"cancelled by request ({how}); partial output removed")
            log.info("job %s cancelled (%s)", worker.job_id, how)
            return
        if result is None:
            why = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
            tail = (worker.jobdir / "worker.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
            self.store.finish(worker.job_id, "failed", f"worker {why} before finishing {tail[0]}".strip())
            return
        if result["status"] == "succeeded" and job["progress"] and job["progress"].get("layers"):
            layers = job["progress"]["layers"]
            self.store.progress(worker.job_id, {**job["progress"], "layer": layers, "phase": "done", "eta_s": 0})
        self.store.finish(worker.job_id, result["status"], result.get("error"), result.get("report"))
        log.info("job %s %s", worker.job_id, result["status"])

    def stop(self) -> None:
        """The service is stopping: leave running jobs running in the store (the next start continues them)."""
        for worker in self.workers.values():
            os.killpg(worker.process.pid, signal.SIGKILL)


def kill_leftover(pid: int) -> None:
    """SIGKILL a worker of a previous service process, if that pid still is one."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"llmprune_serve.jobs.worker" in command:
        os.kill(pid, signal.SIGKILL)
