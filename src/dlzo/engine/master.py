"""Float32 master weights for the tuned tensors of a half-precision model.

In bfloat16 an update lr·g·z smaller than half a unit in the last place of the weight is rounded away: at the
paper's lr 1e-6, 99.9% of a layer's elements do not move (99.0% in float16). So each tuned bfloat16/float16
tensor is replaced in the model, under its own name, by a float32 Parameter (its master), and the module that
owns it casts the master to the working dtype when its forward starts and drops the cast when it ends. Everything
that reads or writes the model's parameters (the ZO update and its optimizer state, checkpoints, replay, resume,
`load_into`) then acts on the masters unchanged, and the forward still runs in the working dtype.

Memory: the tuned tensors take 4 bytes an element instead of 2 (one layer of 32: +3% of a bfloat16 model), plus
one module's cast while it runs; the model never holds a second full copy of the layer. A step of the fast path
draws its perturbed tensors through `PerturbedMasters`: θ ± εz of one tensor, computed in float32 from the master
and cast, when the module that reads it starts (dlzo.engine.fastpath.deferred_tensors), so the ± branches do not
hold two perturbed copies of the layer either.

The one assumption: a tuned tensor is read inside its own module's forward (true of linear, embedding and norm
modules; a module that read another's weight directly would see the float32 master).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from dlzo.choices import MasterPolicy

HALF = (torch.bfloat16, torch.float16)


class MasterWeights:
    """Float32 masters in place of the model's half-precision tensors among `names` (tied copies included),
    cast to their working dtype around each forward of the modules that own them."""

    def __init__(self, model: nn.Module, names: Iterable[str]):
        params = dict(model.named_parameters())
        half = {id(params[n]): n for n in names if params[n].dtype in HALF}
        self.working: dict[str, torch.dtype] = {}  # name -> the dtype the forward runs in
        self.masters: dict[str, nn.Parameter] = {}
        self._owners: dict[nn.Module, list[tuple[str, nn.Parameter, torch.dtype]]] = {}
        for module in model.modules():
            for leaf, param in list(module._parameters.items()):
                name = half.get(id(param)) if param is not None else None
                if name is None:
                    continue
                if name not in self.masters:
                    self.masters[name] = nn.Parameter(param.detach().float(), requires_grad=param.requires_grad)
                    self.working[name] = param.dtype
                module._parameters[leaf] = self.masters[name]
                self._owners.setdefault(module, []).append((leaf, self.masters[name], self.working[name]))
        self._cast: dict[nn.Module, list[tuple[str, torch.Tensor]]] = {}  # module -> what its cast replaced
        self._handles = [h for module in self._owners for h in (module.register_forward_pre_hook(self._cast_in),
                                                                 module.register_forward_hook(self._cast_out))]

    def __bool__(self) -> bool:
        return bool(self.masters)

    def _cast_in(self, module: nn.Module, args) -> None:
        for leaf, previous in self._cast.pop(module, []):  # a forward that raised left its cast in place
            module._parameters[leaf] = previous
        replaced = []
        for leaf, master, dtype in self._owners[module]:
            current = module._parameters[leaf]
            if current is master or current.dtype != dtype:  # the master, or float32 tensors swapped in for it
                module._parameters[leaf] = current.to(dtype)
                replaced.append((leaf, current))
        self._cast[module] = replaced

    def _cast_out(self, module: nn.Module, args, output) -> None:
        for leaf, previous in self._cast.pop(module, []):
            module._parameters[leaf] = previous

    def remove(self) -> None:
        """Put working-dtype parameters (the masters, cast) back into the model and drop the hooks: for a
        merged export, which holds the model in its own dtype, as its forward ran."""
        for handle in self._handles:
            handle.remove()
        cast = {name: nn.Parameter(master.detach().to(self.working[name]), requires_grad=master.requires_grad)
                for name, master in self.masters.items()}
        by_master = {id(master): name for name, master in self.masters.items()}
        for module, leaves in self._owners.items():
            for leaf, master, _ in leaves:
                module._parameters[leaf] = cast[by_master[id(master)]]
        self._owners, self._cast, self.masters = {}, {}, {}


# Scopes over (nearly) every tensor of the model: there a master costs 2 bytes more for each of its parameters,
# so they get masters only when asked (--master-weights on).
WHOLE_MODEL_SCOPES = ("full", "lezo")


def install_masters(model: nn.Module, names: Iterable[str], policy: MasterPolicy, scope_kind: str
                    ) -> MasterWeights | None:
    """Masters for the half-precision tensors among `names` when `policy` asks: on, or auto for a scope (its
    ScopeSpec.kind) outside WHOLE_MODEL_SCOPES. None when none were made."""
    if policy == "off" or (policy == "auto" and scope_kind in WHOLE_MODEL_SCOPES):
        return None
    masters = MasterWeights(model, names)
    return masters if masters else None


class PerturbedMasters(Mapping):
    """θ + scale·(z / sqrt(D)) of each tensor, made when it is read (and not kept): z drawn in the master's float32
    from the same seeds, the sum in float32, then cast to the working dtype. `sample(index, like)` is z of the
    direction, `step_scale(index, like)` HiZOO's 1/sqrt(D) or None."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], sample: Callable[[int, torch.Tensor], torch.Tensor],
                 scale: float, working: Mapping[str, torch.dtype],
                 step_scale: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None):
        self.named, self.sample, self.scale, self.working = named, sample, scale, working
        self.step_scale = step_scale
        self.index = {name: i for i, (name, _) in enumerate(named)}

    def __getitem__(self, name: str) -> torch.Tensor:
        index = self.index[name]
        master = self.named[index][1].detach()
        shift = self.sample(index, master)
        scale = self.step_scale(index, master) if self.step_scale is not None else None
        if scale is not None:
            shift.mul_(scale)
        # (scale·z) + θ: the bits of θ + scale·z, in z's buffer
        value = shift.mul_(self.scale).add_(master)
        return value.to(self.working.get(name, value.dtype))

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


@torch.no_grad()
def round_trip_drift(named: list[tuple[str, torch.Tensor]], sample: Callable[[int, torch.Tensor], torch.Tensor],
                     eps: float) -> tuple[float, float]:
    """(max |θ after +εz, -2εz, +εz - θ|, the fraction of elements that do not come back) of MeZO's in-place
    round trip along one direction, with the same arithmetic, on a copy of one tensor at a time."""
    worst, moved, total = 0.0, 0, 0
    for index, (_, param) in enumerate(named):
        z = sample(index, param)
        trip = param.detach().clone()
        trip.add_(z, alpha=eps).add_(z, alpha=-2 * eps).add_(z, alpha=eps)
        diff = (trip.float() - param.detach().float()).abs()
        worst, moved, total = max(worst, float(diff.max())), moved + int((diff > 0).sum()), total + diff.numel()
    return worst, moved / max(total, 1)
