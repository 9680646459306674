"""The `dlzo` command: the command table, dataclass -> flags, each command's options and argument handling.
Nothing outside this package imports from it."""
