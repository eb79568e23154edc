"""A user's own datasets from the config or the command line (no Python).

    DATASETS.COCO [["my_train", "/data/train.json", "/data/images"], ["my_val", "/data/val.json", "/data/images"]]
    DATASETS.VOC [["bccd", "/data/BCCD"]]      # registers bccd_train, bccd_val (+ every ImageSets/Main split)
    DATASETS.VOC [["pets", "/data/pets", {"classes": ["cat", "dog"], "annotations": "xml", "images": "photos"}]]
    DATASETS.TRAIN "('my_train',)" DATASETS.TEST "('my_val',)"
    MODEL.ROI_HEADS.NUM_CLASSES -1             # (or MODEL.RETINANET.NUM_CLASSES): the training data's class count

Names stay detectron2 dataset names (``DATASETS.TRAIN/TEST``); registration
happens when the config is loaded, i.e. in every process ``launch`` starts.
Class names come from the data (COCO ``categories``; VOC: the ``classes`` of
the entry, else the sorted object names of the folder's xml files, where a
name with very few instances stops training as a likely typo, see
:func:`check_class_names`). A VOC folder's sub-folders are found in any case
and under their common names (``distill_d2/data/voc.py``) or named by the
entry. A VOC folder without ``ImageSets/Main`` split files gets a
deterministic split: the sorted image ids shuffled with
``DATASETS.VOC_SPLIT_SEED``, ``DATASETS.VOC_VAL_FRACTION`` of them for
``<prefix>_val``, the rest ``<prefix>_train``; the split files are written to
a cache folder (``~/.cache/distill_d2/voc_splits``), never into the data.
"""
import hashlib
import logging
import os
import random

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..errors import DistillConfigError
from .builtin import register_coco
from .voc import annotation_dir, find_split_dir, rare_classes, register_voc_dataset, scan_classes, voc_layout

logger = logging.getLogger(__name__)

VOC_OPTIONS = ("classes", "annotations", "images")


def add_dataset_config(cfg):
    """Declare the own-dataset keys (called by ``add_distill_config``)."""
    # COCO-format datasets: [[name, json_file, image_root], ...]
    cfg.DATASETS.COCO = []
    # Pascal-VOC folders: [[prefix, folder], ...] or [[prefix, folder, {options}], ...] -> <prefix>_<split>
    # for each ImageSets/Main/<split>.txt, or <prefix>_train / <prefix>_val without them. Options:
    # 'classes': the class list (else the names found in the xml files; then a name with very few
    # instances is reported as a likely typo before training); 'annotations' / 'images': the
    # sub-folders (else Annotations/, annotations/, xml/, ... and JPEGImages/, images/, ... in any case).
    cfg.DATASETS.VOC = []
    # (Not a key here: MODEL.ROI_HEADS.NUM_CLASSES / MODEL.RETINANET.NUM_CLASSES -1 = the class count of
    # DATASETS.TRAIN's metadata, set when the config is loaded, see resolve_num_classes.)
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


def _voc_entry(spec):
    """(prefix, folder, options) of a DATASETS.VOC entry."""
    example = "[['mydata', '/path/folder', {'classes': ['cat', 'dog'], 'annotations': 'xml', 'images': 'photos'}]]"
    if not isinstance(spec, (list, tuple)) or len(spec) not in (2, 3) or (len(spec) == 3 and not isinstance(spec[2], dict)):
        raise DistillConfigError(f"DATASETS.VOC entries are [prefix, folder] or [prefix, folder, {{options}}]; got "
                                 f"{spec!r}. Example: DATASETS.VOC \"{example}\"")
    options = dict(spec[2]) if len(spec) == 3 else {}
    unknown = sorted(set(options) - set(VOC_OPTIONS))
    if unknown:
        raise DistillConfigError(f"DATASETS.VOC entry '{spec[0]}': unknown option(s) {', '.join(map(repr, unknown))}; "
                                 f"the options are {', '.join(map(repr, VOC_OPTIONS))}. Example: DATASETS.VOC \"{example}\"")
    classes = options.get("classes") or []
    if isinstance(classes, str):
        classes = [c for c in (x.strip() for x in classes.split(",")) if c]
    classes = [str(c).strip() for c in classes]
    if len(set(classes)) != len(classes) or not all(classes):
        raise DistillConfigError(f"DATASETS.VOC entry '{spec[0]}': 'classes' must be distinct non-empty names, got {classes}.")
    options["classes"] = classes
    return str(spec[0]), os.path.abspath(str(spec[1])), options


def register_from_cfg(cfg):
    """Register every dataset of ``DATASETS.COCO`` / ``DATASETS.VOC``; returns their names."""
    names = []
    for spec in cfg.DATASETS.COCO:
        if len(spec) != 3:
            raise DistillConfigError(f"DATASETS.COCO entries are [name, json_file, image_root]; got {list(spec)}.")
        name, json_file, image_root = (str(x) for x in spec)
        _register(name, ("coco", os.path.abspath(json_file)), lambda: register_coco(name, json_file, image_root))
        names.append(name)
    for spec in cfg.DATASETS.VOC:
        prefix, folder, opts = _voc_entry(spec)
        names += register_voc_folder(prefix, folder, cfg.DATASETS.VOC_VAL_FRACTION, cfg.DATASETS.VOC_SPLIT_SEED,
                                     classes=opts["classes"], annotations=str(opts.get("annotations", "")),
                                     images=str(opts.get("images", "")))
    return names


def voc_split_files(folder, val_fraction, seed, annotations=""):
    """{split: path of a split file}: the folder's own ``ImageSets/Main/*.txt`` (any case), or a seeded
    train/val split of the ids of the annotation folder (``annotations``, else found)."""
    main = find_split_dir(folder)
    if main:
        own = {f[:-4]: os.path.join(main, f) for f in sorted(os.listdir(main)) if f.endswith(".txt") and "_" not in f}
        if own:
            return own
    ann_dir = annotation_dir(folder, annotations)
    ids = sorted(f[:-4] for f in os.listdir(ann_dir) if f.lower().endswith(".xml"))
    if len(ids) < 2:
        raise DistillConfigError(f"VOC folder {folder} has {len(ids)} annotated image(s): too few to split into train/val.")
    if not 0 < val_fraction < 1:
        raise DistillConfigError(f"DATASETS.VOC_VAL_FRACTION must be in (0, 1), got {val_fraction}.")
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


def register_voc_folder(prefix, folder, val_fraction=0.2, seed=0, classes=(), annotations="", images=""):
    """Register ``<prefix>_<split>`` for each split of a VOC folder; returns the names. ``classes``:
    the class list (default: the sorted names found in its xml files)."""
    ann_dir, _ = voc_layout(folder, annotations, images)  # a wrong folder stops here, when the config loads
    counts, examples = {}, {}
    if classes:
        class_names = list(classes)
    else:
        counts, examples = scan_classes(ann_dir)
        class_names = sorted(counts)
        if not class_names:
            raise DistillConfigError(f"DATASETS.VOC '{prefix}': no objects in the xml files of {ann_dir}.")
    names = []
    for split, path in voc_split_files(folder, val_fraction, seed, annotations).items():
        name = f"{prefix}_{split}"
        source = ("voc", folder, path, tuple(class_names), annotations, images)
        _register(name, source, lambda: register_voc_dataset(
            name, folder, split, path, class_names, annotations=annotations, images=images,
            classes_given=bool(classes), class_counts=counts, class_examples=examples))
        MetadataCatalog.get(name).set(voc_prefix=prefix)
        names.append(name)
    return names


def check_class_names(dataset_names):
    """Stop before training when a VOC dataset whose classes are the names found in its xml files
    has a rare one (:func:`~distill_d2.data.voc.rare_classes`: a typo such as ``racoon`` among
    ``raccoon`` would otherwise become a class), naming the class, its count and files, and the fix."""
    for name in dataset_names:
        meta = MetadataCatalog.get(name)
        if meta.get("classes_given", True):
            continue
        counts, examples = meta.get("class_counts", {}), meta.get("class_examples", {})
        rare = rare_classes(counts)
        if not rare:
            continue
        top = max(counts, key=counts.get)
        keep = [c for c in meta.thing_classes if c not in rare]
        listed = "; ".join(f"'{c}': {counts[c]} instance(s), in {', '.join(examples.get(c, []))}" for c in rare)
        prefix = meta.get("voc_prefix", None)
        opts = dict({"classes": keep}, **{k: v for k, v in (("annotations", meta.get("voc_annotations", "")),
                                                            ("images", meta.get("voc_images", ""))) if v})
        how = (f"DATASETS.VOC \"{[[prefix, meta.dirname, opts]]}\"" if prefix else f"register_voc(..., class_names={keep})")
        raise ValueError(
            f"Dataset '{name}': its classes are the object names found in {meta.dirname}, and "
            f"{len(rare)} of them {'is' if len(rare) == 1 else 'are'} so rare that {'it is' if len(rare) == 1 else 'they are'} "
            f"likely a typo ({listed}; the largest class: '{top}', {counts[top]}). Fix the name in those files, "
            f"or give the class list: {how} (objects of other classes are then reported before training, and "
            "DATALOADER.CHECK.ACTION drop drops them); a list that includes a rare name keeps it as a class.")


def dataset_class_names(name, load=True):
    """``thing_classes`` of dataset ``name`` as a list, None if unknown. With ``load``, a registered
    dataset whose metadata lacks them (a COCO json not read yet) is loaded once first: detectron2's
    COCO loader sets them while reading the json."""
    meta = MetadataCatalog.get(name)
    if meta.get("thing_classes", None) is None and load and name in DatasetCatalog.list():
        logger.info("Loading dataset '%s' to read its class names.", name)
        DatasetCatalog.get(name)
    classes = meta.get("thing_classes", None)
    return None if classes is None else list(classes)


def resolve_num_classes(cfg):
    """``MODEL.ROI_HEADS.NUM_CLASSES`` / ``MODEL.RETINANET.NUM_CLASSES`` -1 becomes the class count of
    ``DATASETS.TRAIN`` (``DATASETS.TEST`` without training sets): their metadata ``thing_classes``.
    (A distillation teacher follows the student's count.) ``cfg`` must not be frozen."""
    keys = []
    for key in ("ROI_HEADS", "RETINANET"):
        k = cfg.MODEL[key].NUM_CLASSES
        if k == -1:
            keys.append(key)
        elif not (isinstance(k, int) and k > 0):
            raise DistillConfigError(f"MODEL.{key}.NUM_CLASSES must be a positive class count or -1 (from the "
                                     f"training data), got {k!r}.")
    if not keys:
        return
    what = " / ".join(f"MODEL.{k}.NUM_CLASSES" for k in keys)
    names = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
    if not names:
        raise DistillConfigError(f"{what} is -1 (from the data) but DATASETS.TRAIN and DATASETS.TEST are empty: "
                                 "set the number of classes.")
    classes = {}
    for name in names:
        c = dataset_class_names(name)
        if c is None:
            raise DistillConfigError(f"{what} is -1 (from the data) but dataset '{name}' has no class names "
                                     "(metadata thing_classes): set the number of classes.")
        classes[name] = list(c)
    if len({len(c) for c in classes.values()}) > 1:
        raise DistillConfigError(f"{what} is -1 (from the data) but the datasets have different class counts ("
                                 + ", ".join(f"'{n}': {len(c)}" for n, c in classes.items()) + "): set the number.")
    n = len(next(iter(classes.values())))
    for key in keys:
        cfg.MODEL[key].NUM_CLASSES = n
    logger.info("%s -1: %d classes from %s (%s).", what, n, ", ".join(classes), ", ".join(classes[names[0]][:10]))
