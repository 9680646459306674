"""The paper's premise at the sun rule's layer (the default `--rule guarded`, docs/rules.md): Sun et al.'s massive
activations appear suddenly at one layer, on the starting token of every sequence, and then stay about constant.
Where they do not, the rule's layer was not the one to tune on the models measured (docs/results/study.md, 7).
"""

from __future__ import annotations

from typing import Protocol


class CurvePoint(Protocol):
    """One layer of the probe's curve (dlzo.model.probe.LayerStats)."""

    max_abs: float  # max |h| over every calibration token and channel
    carriers: int  # calibration sequences whose own max |h| passes the sun thresholds


def premise_decision(layers: list[CurvePoint], layer: int | None, num_sequences: int, min_share: float = 0.9,
                     max_climb: float = 4.0) -> dict:
    """Whether the premise holds at the sun rule's `layer`: at least `min_share` of the calibration sequences
    carry the outlier there, and no later non-final layer (the final one is often renormalised) climbs to
    `max_climb` times its max|h|. Measured on the training texts `dlzo train` probes (docs/results/study.md,
    section 7): SmolLM2-135M's layer 11 is carried by every sequence of SST-2, RTE, CB and COPA, 3 seeds each, and
    the later layers stay within 1.0x; Qwen2.5-Coder-0.5B's layers 3 and 5 by 1-4 of 30-42 SST-2 sequences (one
    token of one sentence) and at most 22 of 34 on COPA; a third family's layer 0 keeps climbing 35x.
    Returns {"layer", "holds", "carriers", "sequences", "climb", "min_share", "max_climb", "reason"}."""
    if layer is None:
        return {"layer": None, "holds": False, "reason": "the sun rule finds no layer"}
    body = [s.max_abs for s in layers[layer + 1 : len(layers) - 1]]
    here = layers[layer].max_abs
    climb = max(body) / here if body and here > 0 else 1.0
    carriers = layers[layer].carriers
    share = carriers / num_sequences if num_sequences else 0.0
    failures = []
    if share < min_share:
        failures.append(f"only {carriers} of {num_sequences} calibration sequences carry it (at least "
                        f"{min_share:.0%} wanted)")
    if climb >= max_climb:
        failures.append(f"the later layers climb {climb:.3g}x above it (below {max_climb:g}x wanted: the regime is "
                        f"still building)")
    carried = f"carried by {carriers} of {num_sequences} calibration sequences, later layers within {climb:.2f}x"
    return {"layer": layer, "holds": not failures, "carriers": carriers, "sequences": num_sequences,
            "climb": round(climb, 4), "min_share": min_share, "max_climb": max_climb,
            "reason": "; ".join(failures) if failures else carried}
