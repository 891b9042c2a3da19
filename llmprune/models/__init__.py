"""Model resolution (aliases, Hub, GGUF), safetensors checkpoints and the meta-device skeleton."""
