"""`python -m llmprune` is the `llmprune` command."""

from llmprune.cli import main

raise SystemExit(main())
