"""Structured pruning: remove whole attention heads (KV groups) and FFN neurons, so the exported model
is physically smaller and loads in stock transformers and vLLM (Kwon et al. 2022, retrain-free)."""
