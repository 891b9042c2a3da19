"""`llmprune service --db jobs.sqlite`: the prune-job service (see docs/service.md)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from llmprune.argparsing import Parser
from llmprune.errors import LLMPruneError

log = logging.getLogger("llmprune.service")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def service_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llmprune service", description="Run prune jobs submitted over HTTP, kept in SQLite.")
    parser.add_argument("--db", type=Path, required=True, metavar="FILE", help="the SQLite job database")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8100, help="port (default 8100)")
    parser.add_argument("--workdir", type=Path, default=None, metavar="DIR", help="job folders (default: beside --db)")
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY", help="accepted key (repeatable)")
    parser.add_argument("--read-only-key", action="append", default=[], metavar="KEY", help="a key that may only read")
    parser.add_argument(
        "--devices", default="auto", metavar="LIST", help="auto (every GPU, else the CPU), cpu, or GPU indices 0,1"
    )
    parser.add_argument("--workers-per-device", type=int, default=1, metavar="N", help="jobs at once per device (1)")
    parser.add_argument("--max-queued-per-key", type=int, default=16, metavar="N", help="queued jobs per key (16)")
    parser.add_argument(
        "--cancel-grace",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds a cancelled job gets to reach its next layer boundary before it is killed (600)",
    )
    parser.add_argument(
        "--allow-remote-code", action="store_true", help="accept jobs with trust_remote_code (they run model code)"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str]) -> int:
    import torch
    import uvicorn

    from llmprune_serve.auth import api_keys
    from llmprune_serve.jobs.app import create_service_app
    from llmprune_serve.jobs.devices import parse_devices
    from llmprune_serve.jobs.runner import Runner
    from llmprune_serve.jobs.store import JobStore

    args = service_parser().parse_args(argv)
    counts = {"--workers-per-device": args.workers_per_device, "--max-queued-per-key": args.max_queued_per_key}
    for flag, value in counts.items():
        if value < 1:
            raise LLMPruneError(f"{flag} must be at least 1 (got {value})")
    if args.cancel_grace < 0:
        raise LLMPruneError(f"--cancel-grace must be at least 0 seconds (got {args.cancel_grace:g})")
    if not 0 < args.port < 65536:
        raise LLMPruneError(f"--port must be in 1..65535 (got {args.port})")
    if not args.db.parent.is_dir():
        raise LLMPruneError(f"--db {args.db}: no folder {args.db.parent}")
    devices = parse_devices(args.devices, torch.cuda.device_count())
    workdir = args.workdir or args.db.parent / f"{args.db.stem}-jobs"
    workdir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    keys = api_keys(args.api_key)
    if args.host not in LOOPBACK and not keys:
        log.warning("listening on %s without an API key: anyone who can reach it may submit jobs", args.host)
    log.info("jobs run on %s, %d at a time on each", ", ".join(devices), args.workers_per_device)
    store = JobStore(args.db)
    app = create_service_app(
        store,
        Runner(store, workdir.resolve(), devices, args.workers_per_device, args.cancel_grace),
        keys,
        tuple(args.read_only_key),
        args.max_queued_per_key,
        args.allow_remote_code,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
