"""A recorded run's model: the base model with the run's scope (adapters added, the layer it chose), what
replay, export, eval and generate start from, and with one of its checkpoints loaded. The run's options come
from its folder (dlzo.training.run_folder.RunFolder), so a damaged run.json is one line here too."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from safetensors import SafetensorError, safe_open

from dlzo.errors import DlzoError
from dlzo.model.checkpoint import checked_load
from dlzo.model.loading import resolve_device
from dlzo.training.config import TrainConfig
from dlzo.training.prepare import Prepared, load_into, prepare_model
from dlzo.training.run_folder import RunFolder


def build_for_run(run: str | Path, base_model: str | None = None, device: str = "", dtype: str = "",
                  quantize: str = "") -> tuple[Prepared, dict]:
    """The model of a recorded run with its scope resolved (tuned tensors still at their base values),
    and the run's record: what replay, export and eval start from. `device` and `dtype` (eval's and
    generate's flags), when given (not auto), replace the run's; a run trained on a device this machine lacks
    (--device cuda) is loaded on auto (it failed on a flag the user never passed)."""
    run = Path(run)
    record = RunFolder(run, "--run").record()
    known = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in record["config"].items() if k in known}
    if not (base_model or values.get("model")):
        raise DlzoError(f"{run / 'run.json'}: its config names no model: the run folder is damaged")
    given = {name: value for name, value in (("device", device), ("dtype", dtype)) if value and value != "auto"}
    if quantize:  # export: the frozen layers as the base model holds them, not as the run quantized them
        given["quantize"] = quantize
    if "device" not in given and not _available(values.get("device", "auto")):
        print(f"the run was trained on --device {values['device']}, which this machine lacks: using auto")
        given["device"] = "auto"
    config = TrainConfig(**{**values, "model": base_model or values["model"], "quiet": True, **given})
    prepared = prepare_model(config, [], record.get("layer_choice"))
    if base_model:
        _check_base_fits(prepared, record, run, base_model)
    return prepared, record


def _check_base_fits(prepared: Prepared, record: dict, run: Path, base_model: str) -> None:
    """Another base model than the run's (--base, --model) must have the tensors the run tuned, of their shapes:
    else one line before any work (replay wrote --to and then raised a traceback; generate raised in copy_)."""
    params = dict(prepared.model.named_parameters())
    missing = [name for name in record.get("tuned_names", []) if name not in params]
    if missing:
        raise DlzoError(f"{base_model}: has no tensor {missing[0]}, which the run in {run} tuned; is it the run's "
                        f"base model ({record['config']['model']})?")
    checkpoint = next((run / f"{n}.safetensors" for n in ("final", "last", "best")
                       if (run / f"{n}.safetensors").exists()), None)
    if checkpoint is None:
        return
    try:
        with safe_open(str(checkpoint), "pt") as handle:
            shapes = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError):
        return  # a damaged checkpoint: checked_load names it when it is read
    for name, shape in shapes.items():
        if name in params and list(params[name].shape) != shape:
            raise DlzoError(f"{base_model}: tensor {name} is {list(params[name].shape)}, the run in {run} tuned "
                            f"it as {shape}; is it the run's base model ({record['config']['model']})?")


def _available(device: str) -> bool:
    try:
        resolve_device(device)
    except DlzoError:
        return False
    return True


def load_checkpoint_of_run(run: str | Path, which: str = "best", base_model: str | None = None, device: str = "",
                           dtype: str = "", quantize: str = "") -> Prepared:
    """The run's model with the tuned tensors of its `which` checkpoint (best, last or final) loaded
    (`quantize`, when given, replaces the run's --quantize)."""
    checkpoint = Path(run) / f"{which}.safetensors"
    if not checkpoint.exists():
        raise DlzoError(f"--run {run}: {checkpoint.name} not found")
    prepared, _ = build_for_run(run, base_model, device, dtype, quantize)
    load_into(prepared.model, checked_load(checkpoint))
    return prepared


