"""One prune job in its own process: `python -m llmprune_serve.jobs.worker JOBDIR`.

Reads JOBDIR/job.json (`model`, `options`, `resume`), runs `llmprune.prune`, and writes JOBDIR/progress.json
(layer i of n, phase, ETA, from the engine's per-layer resume state) while it runs and JOBDIR/result.json at
the end. SIGTERM (a cancel) stops the run at its next layer boundary. It exits as soon as the service that
started it is gone (the engine's resume state stays valid, so the restarted service continues the run).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

POLL_SECONDS = 0.5


def write_json(path: Path, data: dict) -> None:
    """Atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def layer_count(model: str) -> int | None:
    from llmprune.models.resolve import resolve_model

    config = json.loads((resolve_model(model, quiet=True) / "config.json").read_text())
    config = config.get("text_config", config)
    return config.get("num_hidden_layers") or config.get("n_layer") or config.get("num_layers")


def watch(jobdir: Path, output: Path, layers: int | None, parent: int) -> None:
    """Progress from the run state the engine commits after each layer; exit if the service died."""
    state = output.parent / f".{output.name}.partial" / ".work" / "state.json"
    started, first_done = time.monotonic(), None
    while True:
        if os.getppid() != parent:
            os._exit(3)
        done = 0
        try:
            done = int(json.loads(state.read_text()).get("next_layer", 0))
        except (OSError, ValueError):
            pass
        if done and first_done is None:
            first_done = (time.monotonic(), done)
        eta = None
        if first_done is not None and layers and done > first_done[1]:
            per_layer = (time.monotonic() - first_done[0]) / (done - first_done[1])
            eta = round(per_layer * (layers - done), 1)
        phase = "preparing" if not state.exists() else "pruning" if layers is None or done < layers else "finishing"
        progress = {"layer": done, "layers": layers, "phase": phase, "eta_s": eta}
        write_json(jobdir / "progress.json", {**progress, "elapsed_s": round(time.monotonic() - started, 1)})
        time.sleep(POLL_SECONDS)


def main(jobdir: Path) -> int:
    import llmprune
    from llmprune.errors import LLMPruneError
    from llmprune.stop import StopRequested, request_stop

    signal.signal(signal.SIGTERM, lambda *_: request_stop())

    job = json.loads((jobdir / "job.json").read_text())
    options = {**job["options"], "quiet": True, "resume": job["resume"]}
    try:
        layers = layer_count(job["model"])
        threading.Thread(
            target=watch, args=(jobdir, Path(options["output"]), layers, os.getppid()), daemon=True
        ).start()
        report = llmprune.prune(job["model"], **options)
    except StopRequested as exc:
        write_json(jobdir / "result.json", {"status": "cancelled", "error": str(exc)})
        return 0
    except LLMPruneError as exc:
        write_json(jobdir / "result.json", {"status": "failed", "error": str(exc)})
        return 1
    gate = report.get("quality_gate") or {}
    if gate.get("passed") is False:
        result = {"status": "failed", "error": f"quality gate failed: {gate['reason']}", "report": report}
    else:
        result = {"status": "succeeded", "report": report}
    write_json(jobdir / "result.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
