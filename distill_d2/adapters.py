"""Student->teacher feature adapters (one per distilled level).

Adapters belong to the term that uses them: trained with the student, saved
in the distillation checkpoint under ``kd_terms.<Term>.adapters.*`` and
dropped by ``distill_d2.export``.
"""
import torch
import torch.nn as nn
from detectron2.layers import NaiveSyncBatchNorm

from .registry import ADAPTER_REGISTRY


@ADAPTER_REGISTRY.register()
def conv1x1(cin, cout):
    return nn.Conv2d(cin, cout, kernel_size=1)


@ADAPTER_REGISTRY.register()
def conv3x3(cin, cout):
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1)


@ADAPTER_REGISTRY.register()
def conv3x3_defeat(cin, cout):
    """DeFeat's neck adapter: 3x3 conv, weights ~ N(0,1) truncated at 2 std, x 1e-4; default bias."""
    conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1)
    with torch.no_grad():
        nn.init.trunc_normal_(conv.weight, mean=0.0, std=1.0, a=-2.0, b=2.0)
        conv.weight.mul_(1e-4)
    return conv


@ADAPTER_REGISTRY.register()
def conv3x3_relu(cin, cout):
    """3x3 conv + ReLU (DeFeat's backbone adapter)."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.ReLU(inplace=True))


@ADAPTER_REGISTRY.register()
def identity(cin, cout):
    if cin != cout:
        raise ValueError(f"'identity' needs equal channels, got student {cin} vs teacher {cout}: use 'conv1x1' or 'conv3x3'.")
    return nn.Identity()


def build_adapters(kind, levels, student_channels, teacher_channels, key="DISTILL.FEAT.ADAPTER"):
    """``nn.ModuleDict`` {level: adapter(student C_l -> teacher C_l)}; ``key`` names the setting in errors."""
    try:
        fn = ADAPTER_REGISTRY.get(kind)
    except KeyError:
        raise ValueError(f"Unknown {key} '{kind}'; registered: {sorted(k for k, _ in ADAPTER_REGISTRY)}")
    try:
        return nn.ModuleDict({lv: fn(student_channels[lv], teacher_channels[lv]) for lv in levels})
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def _batch_norm(c):
    """BatchNorm over the images of every process (one process: exactly ``nn.BatchNorm2d``; several:
    the statistics of the whole batch, weighted by each process's image count, so the loss does not
    depend on the process count)."""
    return NaiveSyncBatchNorm(c, stats_mode="N")


@ADAPTER_REGISTRY.register()
def conv1x1_bn(cin, cout):
    """1x1 conv + BatchNorm (HGD's stage adapter: maps 64..512 student channels to 256..2048)."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, bias=False), _batch_norm(cout))


@ADAPTER_REGISTRY.register()
def conv3x3_bn(cin, cout):
    """3x3 conv + BatchNorm."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False), _batch_norm(cout))
