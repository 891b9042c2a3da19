"""Evaluation: streamed perplexity."""
