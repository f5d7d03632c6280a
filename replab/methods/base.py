"""The method interface: what a self-supervised method declares and what the platform calls.

A method is one small file with a subclass of :class:`Method`, registered with
``@registry.register``. It declares

- ``Params``: a dataclass of its hyper-parameters with the paper's defaults (validated from the config's
  ``method`` section: ``--set method.temperature=0.2``);
- ``optimizer``: its published optimizer, base learning rate (for a batch of 256) and weight decay;
- optionally ``recipes``: named, documented variants of those defaults as ``section.key=value`` settings
  (``method.recipe: cpu``: narrower heads and the optimizer that learns at a small batch on a CPU budget; by
  default ``cpu`` changes nothing), each one measured in ``docs/RESULTS.md``; the paper's defaults stay the default;
- ``views()``: the augmented views the platform must produce for each image (:class:`ViewSpec`);
- heads built in ``__init__`` on top of the backbone it is given;
- ``forward(views, labels)``: the loss (and metrics to log) for one batch;
- optionally ``update_teacher()``: called after each optimizer step (EMA teachers, queues, centres).

The platform builds the backbone, calls ``views()`` once, turns each uint8 batch into those views on the
worker's device, calls ``forward`` (wrapped in DDP when there are several workers), steps the optimizer and
then calls ``update_teacher``. Methods read the training progress (``self.progress``) for schedules such as
EMA momentum or DINO's teacher-temperature warm-up. Losses that need the whole global batch gather across
workers with :func:`replab.methods.distributed.gather_with_grad`.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from replab.platform.data.augment import ViewSpec


@dataclass(frozen=True)
class OptimizerDefaults:
    """A method's published optimizer; ``lr`` is for a global batch of 256 and is scaled linearly."""

    name: str = "sgd"  # sgd | lars | adamw
    lr: float = 0.06
    weight_decay: float = 5e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Progress:
    """Where training is: updated by the loop before every step."""

    step: int = 0
    total_steps: int = 1
    epoch: int = 0
    epochs: int = 1

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / max(1, self.total_steps))


@dataclass(frozen=True)
class SupportSpec:
    """A labeled support set drawn every step next to the unlabeled batch (PAWS / RoPAWS).

    ``classes_per_step`` classes x ``images_per_class`` labeled images per step and per worker, sampled
    with replacement, independently of the unlabeled epoch; each gets the ``views``.
    """

    classes_per_step: int
    images_per_class: int
    views: tuple[ViewSpec, ...]


@dataclass
class Support:
    """One step's support batch: its views ``[S, 3, h, w]`` and labels ``[S]`` (0 .. C-1)."""

    views: list[torch.Tensor]
    labels: torch.Tensor


@dataclass
class StepOutput:
    """The loss to minimise and detached scalars to log (names without a prefix, e.g. ``"accuracy"``)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None
    """Optional ``[B, D]`` embeddings of the first view, used to watch for collapse (their std)."""


class Method(nn.Module, metaclass=abc.ABCMeta):
    """Base class of every self-supervised method; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    """One line for ``replab methods``: family, paper and year."""
    Params: ClassVar[type] = type("Params", (), {})
    optimizer: ClassVar[OptimizerDefaults] = OptimizerDefaults()
    recipes: ClassVar[dict[str, tuple[str, ...]]] = {"cpu": ()}
    """Named variants of the defaults (``method.recipe``), applied under the run's own config. ``cpu`` with no
    settings: the published defaults already fit the CPU reference budget; a method that needs narrower heads or
    another optimizer there overrides it."""
    find_unused_parameters: ClassVar[bool] = False
    """Set when some parameters get no gradient in some steps (DDP must be told)."""

    def __init__(self, backbone: nn.Module, params: Any, resolution: int):
        super().__init__()
        self.backbone = backbone
        self.params = params
        self.resolution = resolution
        self.progress = Progress()

    # -- what the platform asks of a method ---------------------------------------------------------
    @abc.abstractmethod
    def views(self) -> list[ViewSpec]:
        """The views to produce from each image, in the order ``forward`` receives them."""

    @abc.abstractmethod
    def forward(self, views: list[torch.Tensor], labels: torch.Tensor | None = None) -> StepOutput:
        """The loss on one batch of views (``labels``: the batch's labels, -1 where unlabeled)."""

    @torch.no_grad()
    def update_teacher(self) -> None:
        """Called after every optimizer step; EMA teachers, queues and centres update here."""

    def support(self) -> SupportSpec | None:
        """A labeled support set to receive as ``forward(..., support=Support)``; None for none."""
        return None

    @property
    def encoder(self) -> nn.Module:
        """The network whose features are evaluated and exported (the student backbone by default)."""
        return self.backbone

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups: no weight decay (and no LARS adaptation) on biases and normalisation weights."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
        ]


def ema_momentum(base: float, progress: Progress) -> float:
    """BYOL's cosine schedule from ``base`` to 1: tau = 1 - (1 - base) * (cos(pi * k / K) + 1) / 2."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress.fraction) + 1.0) / 2.0


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_teacher <- m * theta_teacher + (1 - m) * theta_student (buffers are copied)."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers()):
        t_buf.copy_(s_buf)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False`` everywhere (EMA teachers / momentum encoders)."""
    import copy

    clone = copy.deepcopy(module)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


_POSITIVE_INTS = ("_dim", "_layers", "_depth", "_heads", "_iterations", "_size", "_views", "_per_class")
_UNIT_FLOATS = ("_fraction", "momentum", "_p", "tau_base", "mask_ratio", "smoothing")


def param_range(field_: dataclasses.Field) -> tuple[float | None, float | None, bool] | None:
    """The valid ``(lowest, highest, lowest excluded)`` of a ``Params`` field, or None for no range.

    A field's ``metadata={"range": (lo, hi, lo_open)}`` wins; otherwise the name decides, so a new method gets
    ranges without declaring them: temperatures (``*temp*``, ``tau``, ``*_tau``, ``epsilon``, ``*sigma*``) are
    > 0 (a softmax over logits / 0 is inf, then NaN); fractions, probabilities, momenta, ``tau_base``,
    ``mask_ratio``, ``crop_*`` scales and label smoothing lie in [0, 1]; weights and margins are >= 0;
    dims, layers, heads, sizes, ``num_*`` are >= 1 when their default is, every other integer >= 0 (a count of
    local crops may be 0).
    """
    if "range" in field_.metadata:
        return tuple(field_.metadata["range"])
    name, default = field_.name, field_.default
    if name.endswith(_UNIT_FLOATS) or name.startswith("crop_"):
        return (0, 1, name.startswith("crop_"))
    if "temp" in name or name in ("tau", "epsilon") or name.endswith("_tau") or "sigma" in name:
        return (0, None, True)
    if name.endswith(("_weight", "margin")) or "lambda" in name:
        return (0, None, False)
    if isinstance(default, int) and not isinstance(default, bool):
        positive = default > 0 and (name.endswith(_POSITIVE_INTS) or name.startswith("num_"))
        return (1 if positive else 0, None, False)
    return None


def params_from_dict(cls: type, values: dict[str, Any], method: str) -> Any:
    """Validate ``values`` against the dataclass ``cls`` (the method's ``Params``): types, then
    :func:`param_range`."""
    import typing

    from replab.config import ConfigError, check_range, coerce

    if not dataclasses.is_dataclass(cls):
        if values:
            key = next(iter(values))
            raise ConfigError(f"method.{key}: unknown key; method {method!r} takes no parameters")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"method.{key}: unknown key for method {method!r}; valid keys: name, {', '.join(hints)}")
        kwargs[key] = coerce(f"method.{key}", value, hints[key])
        bounds = param_range(fields[key])
        if bounds is not None:
            check_range(f"method.{key}", kwargs[key], *bounds)
    return cls(**kwargs)
