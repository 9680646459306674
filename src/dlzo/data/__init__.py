"""The examples every task, file and scorer shares, and where they come from: the benchmarks, your own files."""
