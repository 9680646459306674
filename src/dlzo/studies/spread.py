"""Mean, sample standard deviation and standard error of a figure repeated over seeds: the one convention the
study (dlzo.studies.report's seeds.json) and the race (dlzo.studies.race's race.json) both report in."""

from __future__ import annotations

import statistics


def spread(values: list[float | None]) -> dict:
    """{mean, std, se, n, values} of the values that are not None (a seed that never reached a target has
    none). std is the sample standard deviation, se = std / sqrt(n). What n leaves undefined (the mean of no
    values, the std and se of one) is None, which JSON can hold, where NaN is not JSON."""
    kept = [v for v in values if v is not None]
    n = len(kept)
    std = statistics.stdev(kept) if n > 1 else None
    return {"mean": statistics.fmean(kept) if n else None, "std": std,
            "se": std / n**0.5 if std is not None else None, "n": n, "values": kept}


def format_spread(value: dict, digits: int = 4) -> str:
    """'mean ± std (se)', with '-' for what is undefined: '0.7000 ± 0.0400 (0.0231)', '0.6411 ± - (-)'."""
    show = lambda x: "-" if x is None else f"{x:.{digits}f}"  # noqa: E731
    return f"{show(value['mean'])} ± {show(value['std'])} ({show(value['se'])})"
