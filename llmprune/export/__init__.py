"""Export: the output folder, shards, reports."""
