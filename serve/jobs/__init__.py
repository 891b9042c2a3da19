"""`llmprune service`: prune jobs over HTTP, persisted in SQLite, each run in its own worker process."""
