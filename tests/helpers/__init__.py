"""Modules the tests share: tiny models, a fake Hub, a served llmprune process, reference solves, vLLM runs."""
