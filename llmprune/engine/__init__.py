"""The layer-streaming engine: input capture, per-layer streaming, per-layer pruning, devices."""
