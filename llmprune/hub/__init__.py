"""Hugging Face Hub publishing."""
