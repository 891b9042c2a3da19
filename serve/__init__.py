"""`llmprune serve`: an OpenAI-compatible HTTP service for pruned (or plain) causal LMs, backed by vLLM or
transformers, that checks the model's perplexity before it calls itself ready."""
