"""dlzo: dominant-layer zeroth-order fine-tuning. The five-line API:

    model, tokenizer = AutoModelForCausalLM.from_pretrained(name), AutoTokenizer.from_pretrained(name)
    layer = dlzo.find_dominant_layer(model, tokenizer).dominant_layer
    trainer = dlzo.ZOTrainer(model=model, args=TrainingArguments(...), zo_args=dlzo.ZOArguments(layer=layer), ...)
    trainer.train()
    trainer.save_model()

Names are imported on first use (PEP 562), so `import dlzo` stays cheap for the command line.
"""

from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"

# torchao (dlzo's --quantize library, imported by transformers whenever it is installed) warns at import about
# CUDA-only kernels a CPU build cannot load, and torch's pytree about an enum torchao registers: noise on every
# command's stderr, where dlzo's own errors are one line. Errors from both still show.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

_EXPORTS = {
    "find_dominant_layer": "dlzo.model.probe",
    "ZOOptimizer": "dlzo.engine.zo",
    "ZOTrainer": "dlzo.training.hf_trainer",
    "ZOArguments": "dlzo.training.config",
    "TrainConfig": "dlzo.training.config",
    "train": "dlzo.training.loop",
    "load_tuned": "dlzo.training.export",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dlzo' has no attribute {name!r}")
