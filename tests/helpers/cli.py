"""Running `llmprune.cli.main` in the test process and reading what it printed."""

from __future__ import annotations

from llmprune.cli import main


def run_main(argv, capsys) -> tuple[int, str, str]:
    """main(argv) (each argument as a string): exit code, stdout, stderr."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(stderr: str) -> str:
    """The single `llmprune: error: ...` line of `stderr` (asserts there is exactly one line)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmprune: error: "), stderr
    return lines[0]


def leftovers(parent, name) -> list[str]:
    """Names of the entries of `parent` that contain `name`."""
    return sorted(p.name for p in parent.iterdir() if name in p.name)
