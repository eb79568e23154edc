"""Datasets: the bundled synthetic set, COCO / Pascal-VOC registration helpers (VOC folders in any
common layout: ``voc.py``), the check before training (``checks.py``).

Importing registers ``synthetic_{train,val}``, ``synthetic_tiny_{train,val}``
and ``bccd_{train,val,trainval,test}`` (lazily; nothing is read or generated
until a dataset is used).
"""
from .builtin import register_builtin_voc, register_coco, register_voc, voc_class_names
from .synthetic import SYNTHETIC_CLASSES, generate_synthetic, register_default_synthetic, register_synthetic
from .voc import VOCEvaluator, load_voc_dicts, voc_layout

__all__ = [
    "SYNTHETIC_CLASSES", "generate_synthetic", "register_synthetic", "register_default_synthetic",
    "register_coco", "register_voc", "register_builtin_voc", "voc_class_names",
    "VOCEvaluator", "load_voc_dicts", "voc_layout",
]

register_default_synthetic()
register_builtin_voc()
