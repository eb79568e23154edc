"""Checkpoint loading that also understands torchvision ImageNet ResNets.

The detectron2 model zoo has no ResNet-18/34, so students (and small teachers)
start from torchvision's ImageNet weights: a plain ``state_dict`` saved by
``torch.save(torchvision.models.resnet18(weights=...).state_dict(), "r18.pth")``.
:class:`DistillCheckpointer` converts such a file on load to detectron2's
ResNet naming (``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``,
``layerK.i`` -> ``res{K+1}.i``, ``bnJ`` -> ``convJ.norm``, ``downsample`` ->
``shortcut``; ``fc`` dropped) and lets detectron2's name matching put it
under ``backbone.bottom_up.``. Use it as ``MODEL.WEIGHTS /path/r18.pth``
(student) or ``DISTILL.TEACHER.WEIGHTS`` (teacher).

torchvision's bottleneck ResNets (50/101) stride in the 3x3 conv: the config
needs ``MODEL.RESNETS.STRIDE_IN_1X1 False`` (checked). Their input is RGB
normalised with the ImageNet mean/std: ``INPUT.FORMAT RGB``,
``MODEL.PIXEL_MEAN [123.675, 116.28, 103.53]``, ``MODEL.PIXEL_STD [58.395, 57.12, 57.375]``
(a warning names them when the model uses others).
"""
import logging
import re

import torch
from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)

TORCHVISION_PIXEL_MEAN = [123.675, 116.28, 103.53]
TORCHVISION_PIXEL_STD = [58.395, 57.12, 57.375]


def is_torchvision_resnet(state_dict):
    return "conv1.weight" in state_dict and "layer1.0.conv1.weight" in state_dict and "bn1.running_mean" in state_dict


def convert_torchvision_resnet(state_dict):
    """torchvision ResNet ``state_dict`` -> detectron2 ``ResNet`` names (``fc`` and ``num_batches_tracked`` dropped)."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        if k.startswith("conv1."):
            nk = "stem.conv1." + k[len("conv1."):]
        elif k.startswith("bn1."):
            nk = "stem.conv1.norm." + k[len("bn1."):]
        else:
            m = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", k)
            if m is None:
                raise KeyError(f"Unexpected key {k} in a torchvision ResNet checkpoint.")
            rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", m[3])
            rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
            rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
            nk = f"res{int(m[1]) + 1}.{m[2]}.{rest}"
        out[nk] = v
    return out


class DistillCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer + torchvision ResNet state dicts (converted on load, see the module doc)."""

    def _load_file(self, filename):
        data = super()._load_file(filename)
        sd = data.get("model")
        if isinstance(sd, dict) and is_torchvision_resnet(sd):
            self._check_torchvision_compatible(sd)
            logger.info("%s is a torchvision ResNet: converted to detectron2's ResNet names", filename)
            data = {"model": convert_torchvision_resnet(sd), "__author__": "torchvision", "matching_heuristics": True}
        return data

    def _check_torchvision_compatible(self, sd):
        model = self.model
        bottleneck = "layer1.0.conv3.weight" in sd
        if bottleneck:
            conv = next((m for n, m in model.named_modules() if n.endswith("res3.0.conv1")), None)
            if conv is not None and tuple(conv.stride) != (1, 1):
                raise ValueError(
                    "torchvision's bottleneck ResNets put the stride in the 3x3 conv, but this model strides in the "
                    "1x1 conv: set MODEL.RESNETS.STRIDE_IN_1X1 False to load torchvision weights."
                )
        mean = getattr(model, "pixel_mean", None)
        if mean is not None and not torch.allclose(mean.flatten().cpu().float(),
                                                   torch.tensor(TORCHVISION_PIXEL_MEAN), atol=1.0):
            logger.warning(
                "torchvision ResNets were trained on RGB input normalised with the ImageNet mean/std; this model "
                "uses PIXEL_MEAN %s. Consider INPUT.FORMAT RGB, MODEL.PIXEL_MEAN %s, MODEL.PIXEL_STD %s.",
                mean.flatten().tolist(), TORCHVISION_PIXEL_MEAN, TORCHVISION_PIXEL_STD)
