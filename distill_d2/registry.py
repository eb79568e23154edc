"""Every registry of distill_d2 (ground floor: imports nothing of distill_d2).

* ``DISTILL_TERM_REGISTRY``: distillation terms, ``Term(cfg, ctx)`` (``distill_d2/methods/``).
* ``RECORD_REGISTRY``: what the step record can supply beyond its fixed fields, by name
  (``provider(rec) -> value``, registered in ``distill_d2/modeling/``); a term lists the names
  it reads in ``needs``.
* ``MASK_REGISTRY``: spatial feature masks, ``fn(gt_boxes, level_shapes, cfg) -> {level: (N, H, W)}``.
* ``ADAPTER_REGISTRY``: student->teacher adapters, ``fn(in_channels, out_channels) -> nn.Module``.
"""
from fvcore.common.registry import Registry

DISTILL_TERM_REGISTRY = Registry("DISTILL_TERM")
DISTILL_TERM_REGISTRY.__doc__ = """
Distillation terms (``nn.Module``): ``Term(cfg, ctx)``; ``forward(record) -> (losses, scalars)``.
"""

RECORD_REGISTRY = Registry("DISTILL_RECORD")
RECORD_REGISTRY.__doc__ = """
Named entries of the step record: ``fn(rec) -> value``, computed on first use in a step and cached;
attributes ``families`` (student families it works for) and ``same_family`` (needs a teacher of the
student's family).
"""

MASK_REGISTRY = Registry("DISTILL_MASK")
MASK_REGISTRY.__doc__ = "Feature-distillation masks: fn(gt_boxes, level_shapes, cfg) -> {level: (N,H,W)}."

ADAPTER_REGISTRY = Registry("DISTILL_ADAPTER")
ADAPTER_REGISTRY.__doc__ = "fn(in_channels, out_channels) -> nn.Module mapping (N,Cs,H,W) to (N,Ct,H,W)."
