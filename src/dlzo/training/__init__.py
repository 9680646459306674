"""A training run, start to finish: options, run folder, data, loop, step, replay, export, ZOTrainer."""
