"""`python -m llmprune_serve DIR_OR_MODEL ...`: the same as `llmprune serve DIR_OR_MODEL ...`."""

import sys

from llmprune.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
