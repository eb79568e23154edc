from .builtin import register_builtin_voc, register_coco, register_voc, voc_class_names
from .synthetic import SYNTHETIC_CLASSES, generate_synthetic, register_default_synthetic, register_synthetic

register_default_synthetic()
register_builtin_voc()
