from .distiller import DistillerMixin
from .rcnn import DistillGeneralizedRCNN

__all__ = ["DistillerMixin", "DistillGeneralizedRCNN"]
