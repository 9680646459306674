"""A model on this machine: loading (hub id, folder, GGUF), its decoder layers, the massive-activation probe."""
