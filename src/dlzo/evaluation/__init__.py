"""How good a (tuned) model is: accuracy, dev loss, generation metrics, lm-evaluation-harness."""
