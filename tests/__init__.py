"""The llmprune test suite (a package, so that helpers import as `tests.helpers.*` from the repository root)."""
