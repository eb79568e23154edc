"""Registration helpers for real datasets (COCO json or Pascal-VOC layout).

``register_coco`` wraps detectron2's ``register_coco_instances``; ``register_voc`` registers a
Pascal-VOC folder with distill_d2's own VOC loader (``distill_d2/data/voc.py``: detectron2's dicts,
from any common folder layout, .jpg or .png images), so that a dataset with its own class names,
e.g. BCCD (RBC/WBC/Platelets), is one call away. See datasets/README.md.
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .voc import annotation_dir, find_split_dir, register_voc_dataset, scan_classes

__all__ = ["register_coco", "register_voc", "voc_class_names"]


def register_coco(name, json_file, image_root):
    """Register a COCO-format detection dataset (evaluated with COCOEvaluator)."""
    for p in (json_file, image_root):
        if not os.path.exists(p):
            raise FileNotFoundError(f"Cannot register dataset '{name}': '{p}' does not exist.")
    register_coco_instances(name, {}, json_file, image_root)


def voc_class_names(dirname, annotations=""):
    """Sorted set of the object names found in the xml files of a VOC folder (its ``Annotations/``,
    ``annotations/``, ... or the sub-folder ``annotations``)."""
    return sorted(scan_classes(annotation_dir(dirname, annotations))[0])


def register_voc(name, dirname, split, class_names=None, year=2012, annotations="", images=""):
    """Register a Pascal-VOC-layout dataset.

    Args:
        dirname: folder with the xml files and images (``Annotations/`` + ``JPEGImages/``,
            ``annotations/`` + ``images/``, ... in any case; or named by ``annotations`` /
            ``images``) and ``ImageSets/Main/<split>.txt``.
        split: e.g. "train", "val", "trainval", "test".
        class_names: list of class names; default: those found in the xml files (sorted), which
            makes the class order independent of the split (a very rare name then stops training
            as a likely typo; a given list reports objects of other classes instead).
        year: 2007 selects VOC2007's 11-point AP in the Pascal-VOC evaluator, anything else the
            area-under-curve AP. (Use ``TEST.EVALUATOR coco`` for COCO-style AP, APs/m/l on the same data.)
    """
    main = find_split_dir(dirname) if os.path.isdir(dirname) else None
    split_file = os.path.join(main, split + ".txt") if main else None
    if not split_file or not os.path.isfile(split_file):
        raise FileNotFoundError(
            f"Cannot register VOC dataset '{name}': '{os.path.join(dirname, 'ImageSets', 'Main', split + '.txt')}' "
            "is missing (expected the Pascal VOC layout: annotations, images, ImageSets/Main/<split>.txt; the "
            "DATASETS.VOC config key needs no split files).")
    counts, examples, given = {}, {}, class_names is not None
    if not given:
        counts, examples = scan_classes(annotation_dir(dirname, annotations))
        class_names = sorted(counts)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_voc_dataset(name, dirname, split, split_file, class_names, year=year, annotations=annotations,
                         images=images, classes_given=given, class_counts=counts, class_examples=examples)


# VOC-layout datasets expected under $DETECTRON2_DATASETS (like detectron2's
# builtin voc_2007_*): name prefix -> (folder, class names).
BUILTIN_VOC = {"bccd": ("BCCD", ["RBC", "WBC", "Platelets"])}


def register_builtin_voc(root=None):
    """Register ``bccd_{train,val,trainval,test}`` at ``$DETECTRON2_DATASETS/BCCD``.

    Registration is lazy: nothing is read until the dataset is used, so a
    missing folder only matters (with a FileNotFoundError naming it) then.
    """
    root = root or os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    for prefix, (folder, classes) in BUILTIN_VOC.items():
        for split in ("train", "val", "trainval", "test"):
            name = f"{prefix}_{split}"
            if name not in DatasetCatalog.list():
                d = os.path.join(root, folder)
                register_voc_dataset(name, d, split, os.path.join(d, "ImageSets", "Main", split + ".txt"), classes)
