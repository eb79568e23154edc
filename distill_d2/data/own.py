"""A user's own datasets from the config or the command line (no Python).

    DATASETS.COCO [["my_train", "/data/train.json", "/data/images"], ["my_val", "/data/val.json", "/data/images"]]
    DATASETS.VOC [["bccd", "/data/BCCD"]]      # registers bccd_train, bccd_val (+ every ImageSets/Main split)
    DATASETS.TRAIN "('my_train',)" DATASETS.TEST "('my_val',)"

Names stay detectron2 dataset names (``DATASETS.TRAIN/TEST``); registration
happens when the config is loaded, i.e. in every process ``launch`` starts.
Class names come from the data (COCO ``categories``; VOC: the sorted object
names of ``Annotations/*.xml``). A VOC folder without ``ImageSets/Main``
split files gets a deterministic split: the sorted image ids shuffled with
``DATASETS.VOC_SPLIT_SEED``, ``DATASETS.VOC_VAL_FRACTION`` of them for
``<prefix>_val``, the rest ``<prefix>_train``; the split files are written to
a cache folder (``~/.cache/distill_d2/voc_splits``), never into the data.
"""
import hashlib
import os
import random

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.pascal_voc import register_pascal_voc

from .builtin import register_coco, voc_class_names


def add_dataset_config(cfg):
    """Declare the own-dataset keys (called by ``add_distill_config``)."""
    # COCO-format datasets: [[name, json_file, image_root], ...]
    cfg.DATASETS.COCO = []
    # Pascal-VOC folders: [[prefix, folder], ...] -> <prefix>_<split> for each
    # ImageSets/Main/<split>.txt, or <prefix>_train / <prefix>_val without them.
    cfg.DATASETS.VOC = []
    # Without split files: the fraction of images in <prefix>_val and the shuffle seed.
    cfg.DATASETS.VOC_VAL_FRACTION = 0.2
    cfg.DATASETS.VOC_SPLIT_SEED = 0


def _register(name, source, fn):
    """Register ``name`` unless it already is, from the same ``source``; a different source replaces it."""
    if name in DatasetCatalog.list():
        if MetadataCatalog.get(name).get("distill_source", None) == source:
            return
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    fn()
    MetadataCatalog.get(name).set(distill_source=source)


def register_from_cfg(cfg):
    """Register every dataset of ``DATASETS.COCO`` / ``DATASETS.VOC``; returns their names."""
    names = []
    for spec in cfg.DATASETS.COCO:
        if len(spec) != 3:
            raise ValueError(f"DATASETS.COCO entries are [name, json_file, image_root]; got {list(spec)}.")
        name, json_file, image_root = (str(x) for x in spec)
        _register(name, ("coco", os.path.abspath(json_file)), lambda: register_coco(name, json_file, image_root))
        names.append(name)
    for spec in cfg.DATASETS.VOC:
        if len(spec) != 2:
            raise ValueError(f"DATASETS.VOC entries are [prefix, folder]; got {list(spec)}.")
        prefix, folder = str(spec[0]), os.path.abspath(str(spec[1]))
        names += register_voc_folder(prefix, folder, cfg.DATASETS.VOC_VAL_FRACTION, cfg.DATASETS.VOC_SPLIT_SEED)
    return names


def voc_split_files(folder, val_fraction, seed):
    """{split: path of a split file}: the folder's own ``ImageSets/Main/*.txt``, or a seeded train/val split."""
    main = os.path.join(folder, "ImageSets", "Main")
    if os.path.isdir(main):
        own = {f[:-4]: os.path.join(main, f) for f in sorted(os.listdir(main)) if f.endswith(".txt") and "_" not in f}
        if own:
            return own
    ids = sorted(f[:-4] for f in os.listdir(os.path.join(folder, "Annotations")) if f.endswith(".xml"))
    if len(ids) < 2:
        raise ValueError(f"VOC folder {folder} has {len(ids)} annotated image(s): too few to split into train/val.")
    if not 0 < val_fraction < 1:
        raise ValueError(f"DATASETS.VOC_VAL_FRACTION must be in (0, 1), got {val_fraction}.")
    order = list(ids)
    random.Random(seed).shuffle(order)
    n_val = min(len(ids) - 1, max(1, round(len(ids) * val_fraction)))
    splits = {"val": sorted(order[:n_val]), "train": sorted(order[n_val:])}
    key = hashlib.sha1(f"{folder}|{val_fraction}|{seed}|{','.join(ids)}".encode()).hexdigest()[:12]
    out = os.path.join(os.path.expanduser("~/.cache/distill_d2/voc_splits"), key)
    os.makedirs(out, exist_ok=True)
    files = {}
    for split, members in splits.items():
        path = os.path.join(out, split + ".txt")
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write("\n".join(members) + "\n")
        os.replace(tmp, path)  # atomic: several launched processes may write the same file
        files[split] = path
    return files


def register_voc_folder(prefix, folder, val_fraction=0.2, seed=0):
    """Register ``<prefix>_<split>`` for each split of a VOC folder; returns the names."""
    for sub in ("Annotations", "JPEGImages"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise FileNotFoundError(f"DATASETS.VOC: '{os.path.join(folder, sub)}' is missing (expected the Pascal "
                                    "VOC layout: Annotations/*.xml, JPEGImages/*.jpg, optional ImageSets/Main/).")
    classes = voc_class_names(folder)
    names = []
    for split, path in voc_split_files(folder, val_fraction, seed).items():
        name = f"{prefix}_{split}"
        # detectron2's VOC loader and evaluator read <folder>/ImageSets/Main/<split>.txt through
        # os.path.join, which an absolute <split> replaces: so a split file may live outside the data
        split_arg = path[:-4] if not path.startswith(os.path.join(folder, "ImageSets", "Main")) else split
        _register(name, ("voc", folder, path), lambda: register_pascal_voc(name, folder, split_arg, 2012, classes))
        MetadataCatalog.get(name).evaluator_type = "pascal_voc"
        names.append(name)
    return names
