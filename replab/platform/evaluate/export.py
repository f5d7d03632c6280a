"""Encoders that other code can load: ``replab eval RUN --export PATH`` and ``--register NAME``.

- ``--export PATH``: a plain ``state_dict`` (``torch.save``). For a standard torchvision ResNet (ImageNet stem:
  7x7 stride-2 convolution + max-pool; width 1.0) its keys are torchvision's, with ``fc`` set to the identity
  ``out_dim x out_dim`` map, so ``torchvision.models.resnet18(num_classes=512).load_state_dict(sd)`` loads it with
  ``strict=True`` and the model returns replab's encoder features. Every other encoder (CIFAR stem, width
  multiplier != 1, ViTs) is not a torchvision architecture: replab's own ``state_dict`` is written, to be loaded
  into ``replab.models.backbones.build_backbone(**arch)``. ``PATH.json`` always holds the architecture
  (backbone, width, cifar_stem, resolution, patch_size, out_dim) and which of the two formats was written.
- ``--register NAME``: ``mlflow.pytorch.log_model`` of the encoder (on the CPU, eval mode, pickle format) logged to the
  evaluated run (or, for a bare checkpoint folder, to a new run of the tracking experiment) and registered
  as a new version of the model NAME, so ``mlflow.pytorch.load_model("models:/NAME/<version>")`` returns it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from replab.config import ConfigError
from replab.models.backbones import RESNETS, ResNetEncoder, ViTEncoder
from replab.platform import tracking

BUILD_ARGS = ("width", "cifar_stem", "patch_size")


def architecture(encoder: nn.Module, backbone: str, resolution: int) -> dict[str, Any]:
    """The arguments of ``build_backbone`` that rebuild ``encoder``, plus its ``out_dim``."""
    arch: dict[str, Any] = {"name": backbone, "resolution": int(resolution), "out_dim": int(encoder.out_dim)}
    if isinstance(encoder, ResNetEncoder):
        arch["width"] = encoder.layer1[0].conv1.out_channels / 64
        arch["cifar_stem"] = isinstance(encoder.maxpool, nn.Identity)
    elif isinstance(encoder, ViTEncoder):
        arch["patch_size"] = int(encoder.patch_size)
    return arch


def torchvision_mismatch(encoder: nn.Module, backbone: str) -> str:
    """Why ``encoder`` is not torchvision's ``backbone`` ('' when it is, key for key)."""
    if not isinstance(encoder, ResNetEncoder) or backbone not in RESNETS:
        return f"{backbone} is replab's own module, not a torchvision ResNet"
    if isinstance(encoder.maxpool, nn.Identity):
        return f"{backbone} has the CIFAR stem (3x3 stride-1 conv, no max-pool); torchvision's has a 7x7 stem"
    if encoder.layer1[0].conv1.out_channels != 64:
        return f"{backbone} has width {encoder.layer1[0].conv1.out_channels / 64:g}; torchvision's has width 1"
    return ""


def export_encoder(encoder: nn.Module, backbone: str, resolution: int, path: str | Path) -> dict[str, Any]:
    """Write the encoder's ``state_dict`` to ``path`` and its architecture to ``path.json`` (module doc)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--export: {path} is a folder; give a file name such as encoder.pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    reason = torchvision_mismatch(encoder, backbone)
    arch = architecture(encoder, backbone, resolution)
    if reason:
        args = ", ".join(f"{k}={arch[k]!r}" for k in BUILD_ARGS if k in arch)
        info = {"format": "replab", "reason": reason,
                "load": f"replab.models.backbones.build_backbone({arch['name']!r}, {arch['resolution']}, {args})"
                        ".load_state_dict(torch.load(PATH))"}
    else:
        dim = int(encoder.out_dim)
        state["fc.weight"] = torch.eye(dim)
        state["fc.bias"] = torch.zeros(dim)
        info = {"format": "torchvision",
                "load": f"torchvision.models.{backbone}(num_classes={dim}).load_state_dict(torch.load(PATH))"}
    torch.save(state, path)
    doc = {"architecture": arch, **info, "path": str(path)}
    path.with_name(path.name + ".json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def load_exported(path: str | Path) -> nn.Module:
    """The encoder written by :func:`export_encoder` (torchvision model or replab backbone), eval mode."""
    from replab.models.backbones import build_backbone

    doc = json.loads(Path(str(path) + ".json").read_text())
    arch = doc["architecture"]
    state = torch.load(path, map_location="cpu", weights_only=True)
    if doc["format"] == "torchvision":
        import torchvision

        model = getattr(torchvision.models, arch["name"])(num_classes=arch["out_dim"])
    else:
        kw = {k: arch[k] for k in BUILD_ARGS if k in arch}
        model = build_backbone(arch["name"], arch["resolution"], **kw)
    model.load_state_dict(state, strict=True)
    return model.eval()


def register_encoder(encoder: nn.Module, name: str, uri: str, run_id: str | None, experiment: str,
                     run_name: str = "") -> dict[str, Any]:
    """Log ``encoder`` as an MLflow PyTorch model to ``run_id`` (else a new run) registered as ``name``."""
    import mlflow
    import mlflow.pytorch

    if not name.strip():
        raise ConfigError("--register: give a model name, e.g. --register simclr-r18")
    model = copy.deepcopy(encoder).cpu().eval()
    if run_id is None:
        run_id = tracking.client(uri).create_run(tracking.experiment_id(uri, experiment),
                                                 run_name=run_name or f"export-{name}").info.run_id
    # the registry follows the tracking URI unless MLFLOW_REGISTRY_URI says otherwise (then that one is used)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_id=run_id) as active:
            # explicit requirements: inferring them re-imports the model in a subprocess (slow, and needs replab).
            # pickle (MLflow 3 defaults to pt2, a traced graph): load_model then returns replab's encoder module
            # itself (out_dim, feature_map, any batch size); loading needs replab importable.
            info = mlflow.pytorch.log_model(model, name="encoder", registered_model_name=name,
                                            pip_requirements=["torch", "torchvision"],
                                            serialization_format="pickle")
            logged_run = active.info.run_id
        version = info.registered_model_version
    finally:
        mlflow.set_tracking_uri(previous)
    return {"model_uri": f"models:/{name}/{version}", "version": version, "run_id": logged_run,
            "artifact_uri": info.model_uri}
