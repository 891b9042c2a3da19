"""settings.py (export/publish.py's option checks before the refactor): bad publishing options fail before
any work."""

from __future__ import annotations

import pytest

from tests.helpers.cli import one_error_line as _one_error_line
from tests.helpers.cli import run_main as _run
from tests.helpers.publish import prune_args as _prune_args


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-ppl-increase", "-0.1"], "--max-ppl-increase must be >= 0"),
        (["--push-to-hub", "no-slash"], "Hub repository must be ORG/NAME"),
        (["--push-to-hub", "org/name", "--no-eval"], "--push-to-hub needs the quality gate"),
        (["--save-format", "zip"], "--save-format must be one of dense, packed-2:4"),
    ],
)
def test_bad_publish_options_fail_before_any_work(argv, message, trained, corpus_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(_prune_args(trained, corpus_file, out, *argv), capsys)
    assert code == 2 and message in _one_error_line(err)
    assert not out.exists() and not list(tmp_path.iterdir())
