"""Registration helpers for real datasets (COCO json or Pascal-VOC layout).

Thin wrappers over detectron2's own loaders (``register_coco_instances`` and
``register_pascal_voc``) so that a dataset with its own class names, e.g.
BCCD (RBC/WBC/Platelets), is one call away. See datasets/README.md.
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.datasets.pascal_voc import register_pascal_voc

__all__ = ["register_coco", "register_voc", "voc_class_names"]


def register_coco(name, json_file, image_root):
    """Register a COCO-format detection dataset (evaluated with COCOEvaluator)."""
    for p in (json_file, image_root):
        if not os.path.exists(p):
            raise FileNotFoundError(f"Cannot register dataset '{name}': '{p}' does not exist.")
    register_coco_instances(name, {}, json_file, image_root)


def voc_class_names(dirname):
    """Sorted set of the object names found in ``dirname/Annotations/*.xml``."""
    import xml.etree.ElementTree as ET

    ann_dir = os.path.join(dirname, "Annotations")
    names = set()
    for f in sorted(os.listdir(ann_dir)):
        if f.endswith(".xml"):
            names.update(o.find("name").text.strip() for o in ET.parse(os.path.join(ann_dir, f)).findall("object"))
    return sorted(names)


def register_voc(name, dirname, split, class_names=None, year=2012):
    """Register a Pascal-VOC-layout dataset with detectron2's VOC loader.

    Args:
        dirname: folder with ``Annotations/``, ``JPEGImages/`` and
            ``ImageSets/Main/<split>.txt``.
        split: e.g. "train", "val", "trainval", "test".
        class_names: list of class names; default: those found in the xml files
            (sorted), which makes the class order independent of the split.
        year: 2007 selects VOC2007's 11-point AP in PascalVOCDetectionEvaluator,
            anything else the area-under-curve AP. (Use ``TEST.EVALUATOR coco``
            for COCO-style AP, APs/m/l on the same data.)
    """
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main", split + ".txt")):
        if not os.path.exists(os.path.join(dirname, sub)):
            raise FileNotFoundError(
                f"Cannot register VOC dataset '{name}': '{os.path.join(dirname, sub)}' is missing "
                "(expected the Pascal VOC layout: Annotations/, JPEGImages/, ImageSets/Main/<split>.txt)."
            )
    if class_names is None:
        class_names = voc_class_names(dirname)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_pascal_voc(name, dirname, split, year, list(class_names))
    MetadataCatalog.get(name).evaluator_type = "pascal_voc"


# VOC-layout datasets expected under $DETECTRON2_DATASETS (like detectron2's
# builtin voc_2007_*): name prefix -> (folder, class names).
BUILTIN_VOC = {"bccd": ("BCCD", ["RBC", "WBC", "Platelets"])}


def register_builtin_voc(root=None):
    """Register ``bccd_{train,val,trainval,test}`` at ``$DETECTRON2_DATASETS/BCCD``.

    Registration is lazy: nothing is read until the dataset is used, so a
    missing folder only matters (with detectron2's FileNotFoundError) then.
    """
    root = root or os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    for prefix, (folder, classes) in BUILTIN_VOC.items():
        for split in ("train", "val", "trainval", "test"):
            name = f"{prefix}_{split}"
            if name not in DatasetCatalog.list():
                register_pascal_voc(name, os.path.join(root, folder), split, 2012, classes)
                MetadataCatalog.get(name).evaluator_type = "pascal_voc"
