from .distiller import DistillerMixin
from .rcnn import DistillGeneralizedRCNN
from .retinanet import DistillRetinaNet

__all__ = ["DistillerMixin", "DistillGeneralizedRCNN", "DistillRetinaNet"]
