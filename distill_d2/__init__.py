"""distill_d2: knowledge distillation of object detectors for Detectron2.

Importing the package registers the meta-architectures (``META_ARCH_REGISTRY``),
the distillation terms (``DISTILL_TERM_REGISTRY``, ``distill_d2/methods/``)
and the bundled ``synthetic_train`` / ``synthetic_val`` datasets.
"""
from . import data  # noqa: F401  (registers datasets)
from . import modeling  # noqa: F401  (registers meta-archs)
from . import methods  # noqa: F401  (registers the distillation terms)
from .config import add_distill_config

__all__ = ["add_distill_config"]
