"""What a fine-tuner's process runs: the ZO optimizer, scopes, the fast path, the frozen-prefix cache, scoring,
the layer choice, distributed helpers and checkpoint files."""
