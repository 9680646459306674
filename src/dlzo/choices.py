"""The values an option may take, written once and importable without torch: the `Literal` types of options with
a fixed set of values, and the --scope syntax. The option dataclasses (training/config.py, studies/options.py,
cli/options.py) read them from here, so that `dlzo train --help` builds its flags without loading torch, and the
modules that act on an option import its values from here too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from dlzo.errors import DlzoError
from dlzo.fields import comma_list

# --- the model ---
Dtype = Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]
DTYPES = get_args(Dtype)
Quantize = Literal["none", "int8", "int4"]
QUANTIZE_MODES = get_args(Quantize)
QUANTIZE_HELP = ("hold every linear layer outside the tuned scope in 8 or 4 bits, weight-only (torchao: int8 per "
                 "row, int4 as QLoRA's NF4; the LM head, embeddings and tuned tensors stay in --dtype): none, int8, "
                 "int4")
ProbeRule = Literal["sun", "onset"]  # the paper's absolute thresholds, or the largest persistent jump of max|h|
GgufType = Literal["f16", "q8_0", "f32"]  # --gguf-type: half, llama.cpp's 8-bit blocks, single
GGUF_TYPES = get_args(GgufType)
ExportDtype = Literal["float32", "bfloat16", "float16"]  # dlzo export --dtype
EXPORT_DTYPES = get_args(ExportDtype)

# --- the ZO step ---
# of each element of z; lowrank: z = U·Vᵀ/sqrt(r) per matrix (LOZO, arXiv 2410.07698), V kept for --lowrank-lazy steps
Distribution = Literal["gaussian", "rademacher", "lowrank"]
DISTRIBUTIONS = get_args(Distribution)
# how the estimate g·z becomes a step; normalized: divided by the spread of the q projected gradients (FZOO);
# orthogonal: each matrix's step replaced by its polar factor (ZO-Muon, arXiv 2602.17155)
UpdateRule = Literal["sgd", "momentum", "adam", "hizoo", "normalized", "orthogonal"]
UPDATE_RULES = get_args(UpdateRule)
Estimator = Literal["two-sided", "one-sided"]  # (L+ - L-)/2ε, or (L+ - L(θ))/ε with L(θ) shared
ESTIMATORS = get_args(Estimator)
# --master-weights: auto (every scope but full), on (full too) or off (the tensors' own dtype)
MasterPolicy = Literal["auto", "on", "off"]
# how --scope dominant picks its layer: the sun rule's layer where the paper's premise holds there, else the last
# layer (guarded); a probe rule alone; or the screen that trains the candidates
LayerRule = Literal["guarded", ProbeRule, "screen"]

# --- a run ---
Objective = Literal["loss", "accuracy", "f1", "exact-match"]  # --objective
OBJECTIVES = get_args(Objective)
GENERATED = ("f1", "exact-match")  # read from completions (as is a reward)
ReportTo = Literal["none", "tensorboard", "wandb"]  # each backend --report-to may name
REPORT_TARGETS = get_args(ReportTo)

# --- the scope ---
SCOPE_HELP = ("full | dominant | layer:K | layers:K1,K2 | lora | dominant-lora | lezo:K  (dominant: the layer "
              "--rule picks; lezo:K: LeZO, K random decoder layers perturbed and updated per step)")


@dataclass
class ScopeSpec:
    kind: str  # "full" | "layers" | "lora" | "dominant" | "dominant-lora" | "lezo"
    layers: list[int]
    sampled_layers: int = 0  # lezo:K: layers drawn per step

    @property
    def needs_dominant_layer(self) -> bool:
        return self.kind in ("dominant", "dominant-lora")

    @property
    def uses_lora(self) -> bool:
        return self.kind in ("lora", "dominant-lora")


def parse_scope(text: str) -> ScopeSpec:
    text = text.strip().lower()
    if text in ("full", "lora", "dominant", "dominant-lora"):
        return ScopeSpec(text, [])
    lezo = re.fullmatch(r"lezo:(\d+)", text)
    if lezo and int(lezo.group(1)) >= 1:
        return ScopeSpec("lezo", [], sampled_layers=int(lezo.group(1)))
    match = re.fullmatch(r"(layer|layers):([\d,\s]+)", text)
    if match:
        layers = sorted(set(comma_list(match.group(2), int)))  # the pattern admits digits only
        if layers and (match.group(1) == "layers" or len(layers) == 1):
            return ScopeSpec("layers", layers)
    raise DlzoError(f"--scope {text!r} is not one of: {SCOPE_HELP}")


def report_targets(report_to: str) -> list[str]:
    """--report-to's backends ("tensorboard,wandb" -> both; "none" -> none), each one of REPORT_TARGETS and
    "none" alone: else one line naming the flag."""
    names = comma_list(report_to)
    unknown = [name for name in names if name not in REPORT_TARGETS]
    if unknown:
        raise DlzoError(f"--report-to {unknown[0]!r} is not one of {', '.join(REPORT_TARGETS)}")
    if "none" in names and len(names) > 1:
        raise DlzoError(f"--report-to {report_to!r}: none goes alone")
    return [name for name in dict.fromkeys(names) if name != "none"]
