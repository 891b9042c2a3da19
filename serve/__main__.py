"""`python -m llmprune_serve DIR_OR_MODEL ...`: the same as `llmprune serve DIR_OR_MODEL ...`."""

import os
import sys

from llmprune.cli import guarded
from llmprune_serve.cli import main

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.exit(guarded(main, sys.argv[1:]))
