"""Pascal-VOC folders in the layouts found in the wild, and their evaluation.

detectron2's ``load_voc_instances`` reads only ``Annotations/<id>.xml`` + ``JPEGImages/<id>.jpg`` and
trusts every XML field. ``load_voc_dicts`` makes the same dataset dicts (``file_name``, ``image_id`` =
the xml's stem, ``height``, ``width``, ``annotations`` of XYXY_ABS boxes moved by -1 px to 0-based
pixels, difficult objects included: equal dicts on a standard folder) from:

- sub-folders in any case and under their common names (``annotations/``, ``xml/``; ``images/``,
  ``imgs/``, ...), or named by the caller; xml files and images in one folder;
- ``.jpg``, ``.jpeg``, ``.png``, ``.bmp`` images in any case (the xml's stem, else its ``<filename>``);
- a missing or zero ``<size>`` (then read from the image header, EXIF orientation applied as
  detectron2's ``read_image`` does); float coordinates; missing ``<pose>`` / ``<difficult>`` tags.

What it cannot use (an object of a class not in a given class list, an unreadable xml, an object
without name or box, an xml without image) is left out, logged as one warning, and kept in
``load_problems(name)`` for the check before training (``DATALOADER.CHECK``), which reports it
(file and detail) or, with ``ACTION drop``, counts it as dropped.

``VOCEvaluator`` is detectron2's ``PascalVOCDetectionEvaluator`` reading the ground truth from the
dataset's own annotation folder and split file (any layout, the same lenient parsing).
"""
import logging
import os
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm

from ..errors import DistillConfigError
from .images import image_size

logger = logging.getLogger(__name__)

# sub-folder names looked for (lower-cased), in order of preference
ANNOTATION_DIRS = ("annotations", "annotation", "xml", "xmls", "labels")
IMAGE_DIRS = ("jpegimages", "images", "image", "imgs", "img", "jpeg", "jpg", "pngimages", "photos", "pictures")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")  # what detectron2's PIL-based read_image decodes
MAX_EXAMPLES = 5  # xml files kept per class name (to name a rare class's files)

# dataset name -> [(kind, file_name, detail)] of its last load
_LOAD_PROBLEMS = {}


def _entry_hint(option, example):
    return (f"name it in the DATASETS.VOC entry, e.g. [['<prefix>', '<folder>', {{'{option}': '{example}'}}]] "
            f"(register_voc(..., {option}='{example}') from Python)")


def _find_subfolder(folder, given, candidates, what, option, accept):
    """The sub-folder of ``folder`` named ``given`` ('.' = the folder itself), else the one of
    ``candidates`` (any case) for which ``accept(path)`` holds."""
    if given:
        path = os.path.normpath(os.path.join(folder, given))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"The {what} folder '{path}' ('{option}' of the VOC folder {folder}) does "
                                    "not exist.")
        return path
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"VOC folder '{folder}' does not exist.")
    subs = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    found = sorted((candidates.index(s.lower()), s) for s in subs
                   if s.lower() in candidates and accept(os.path.join(folder, s)))
    if found and (len(found) == 1 or found[0][0] != found[1][0]):
        return os.path.join(folder, found[0][1])
    if len(found) > 1:  # e.g. Annotations/ and annotations/ on a case-sensitive file system
        raise DistillConfigError(f"VOC folder {folder} has several {what} folders ({', '.join(s for _, s in found)}): "
                                 + _entry_hint(option, found[0][1]) + ".")
    if accept(folder):  # flat layout: xml files and images side by side
        return folder
    fitting = [s for s in subs if accept(os.path.join(folder, s))]
    raise FileNotFoundError(
        f"VOC folder {folder}: no {what} folder (looked for {', '.join(c + '/' for c in candidates)} in any case"
        f", and in the folder itself); its sub-folders: {', '.join(subs) or 'none'}"
        + (f" ({', '.join(fitting)} {'has' if len(fitting) == 1 else 'have'} {what.split()[0]} files)" if fitting else "")
        + ". If it is one of them, " + _entry_hint(option, fitting[0] if fitting else "<sub-folder>") + ".")


def _has(ext):
    return lambda path: any(f.lower().endswith(ext) for f in os.listdir(path))


def annotation_dir(folder, annotations=""):
    """The annotation folder of a VOC folder: ``annotations`` (relative to ``folder``), else the one
    of :data:`ANNOTATION_DIRS` (any case) with .xml files, else ``folder`` itself if it has them."""
    return _find_subfolder(folder, annotations, ANNOTATION_DIRS, "annotation (.xml)", "annotations", _has(".xml"))


def voc_layout(folder, annotations="", images=""):
    """(annotation folder, image folder) of a VOC folder; ``annotations`` / ``images`` name them
    (relative to ``folder``), else they are looked for (:data:`ANNOTATION_DIRS`, :data:`IMAGE_DIRS`)."""
    ann = annotation_dir(folder, annotations)
    img = _find_subfolder(folder, images, IMAGE_DIRS, "image", "images", _has(IMAGE_EXTS))
    return ann, img


def find_split_dir(folder):
    """``ImageSets/Main`` of ``folder`` in any case, or None."""
    path = folder
    for part in ("imagesets", "main"):
        if not os.path.isdir(path):
            return None
        sub = [e.name for e in os.scandir(path) if e.is_dir() and e.name.lower() == part]
        if not sub:
            return None
        path = os.path.join(path, sorted(sub)[0])
    return path


def read_split_file(path):
    """Image ids of a split file (one a line; a known extension is stripped)."""
    with open(path) as f:
        ids = [line.strip() for line in f if line.strip()]
    return [i[: -len(ext)] if (ext := os.path.splitext(i)[1].lower()) in IMAGE_EXTS + (".xml",) else i for i in ids]


def _number(node, tag):
    text = node.findtext(tag)
    if text is None or not text.strip():
        raise ValueError(f"no <{tag}>")
    return float(text)


def parse_voc_xml(path):
    """One VOC xml, leniently: {"filename", "width", "height" (None when absent or not positive),
    "objects": [{"name", "bbox" (VOC's 1-based xmin, ymin, xmax, ymax as floats), "difficult",
    "truncated", "pose"}], "bad": [(object index, reason)]}. Raises ``ET.ParseError`` on malformed xml."""
    root = ET.parse(path).getroot()
    size = root.find("size")
    width = height = None
    if size is not None:
        try:
            width, height = int(_number(size, "width")), int(_number(size, "height"))
        except ValueError:
            pass
        if not (width and height and width > 0 and height > 0):
            width = height = None
    objects, bad = [], []
    for k, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if not name:
            bad.append((k, "object without <name>"))
            continue
        if box is None:
            bad.append((k, f"object '{name}' without <bndbox>"))
            continue
        try:
            bbox = [_number(box, t) for t in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError as e:
            bad.append((k, f"object '{name}': <bndbox> {e}"))
            continue

        def flag(tag):
            try:
                return int(float(obj.findtext(tag) or 0))
            except ValueError:
                return 0

        objects.append({"name": name, "bbox": bbox, "difficult": flag("difficult"), "truncated": flag("truncated"),
                        "pose": (obj.findtext("pose") or "Unspecified").strip()})
    return {"filename": (root.findtext("filename") or "").strip(), "width": width, "height": height,
            "objects": objects, "bad": bad}


def _image_index(image_dir):
    """{stem: [file names]} of the images in ``image_dir``, preferred extension first."""
    index = {}
    for f in sorted(os.listdir(image_dir), key=lambda f: (os.path.splitext(f)[0], _ext_rank(f))):
        if _ext_rank(f) < len(IMAGE_EXTS):
            index.setdefault(os.path.splitext(f)[0], []).append(f)
    return index


def _ext_rank(f):
    ext = os.path.splitext(f)[1].lower()
    return IMAGE_EXTS.index(ext) if ext in IMAGE_EXTS else len(IMAGE_EXTS)


def scan_classes(annotation_dir):
    """(Counter of object names over every xml of the folder, {name: first xml files}); unreadable
    files are skipped (the loader reports them)."""
    counts, examples = Counter(), {}
    for f in sorted(os.listdir(annotation_dir)):
        if not f.lower().endswith(".xml"):
            continue
        path = os.path.join(annotation_dir, f)
        try:
            objects = parse_voc_xml(path)["objects"]
        except ET.ParseError:
            continue
        for o in objects:
            counts[o["name"]] += 1
            files = examples.setdefault(o["name"], [])
            if len(files) < MAX_EXAMPLES and path not in files:
                files.append(path)
    return counts, examples


def rare_classes(counts):
    """Names whose instance count is at most 2 (or under 1 % of the largest class's) and at most a
    fifth of the largest class's: in a folder whose classes are the names found, likely typos."""
    if not counts:
        return []
    top = max(counts.values())
    return sorted(n for n, c in counts.items() if c <= max(2, 0.01 * top) and 5 * c <= top)


def load_problems(name):
    """[(kind, file_name, detail)] that the last load of dataset ``name`` left out ([] if none)."""
    return list(_LOAD_PROBLEMS.get(name, ()))


def load_voc_dicts(name, folder, split_file, class_names, annotations="", images=""):
    """Dataset dicts of the ids in ``split_file`` (see the module doc); an object of a class not in
    ``class_names`` is an ``unknown_class`` problem (the closest name suggested)."""
    import difflib

    ann_dir, img_dir = voc_layout(folder, annotations, images)
    index = _image_index(img_dir)
    class_id = {c: i for i, c in enumerate(class_names)}
    dicts, problems = [], []
    for image_id in read_split_file(split_file):
        xml = os.path.join(ann_dir, image_id + ".xml")
        found = index.get(image_id)
        try:
            ann = parse_voc_xml(xml)
        except (ET.ParseError, OSError) as e:
            problems.append(("bad_annotation", xml, f"cannot read the annotation file: {type(e).__name__}: {e}"))
            continue
        named = os.path.basename(ann["filename"])
        if not found and named and os.path.isfile(os.path.join(img_dir, named)):  # named by the xml only
            found = [named]
        if not found:
            problems.append(("missing_file", xml, f"no image for it in {img_dir} (looked for {image_id}"
                             f"{{{','.join(IMAGE_EXTS)}}} in any case and its <filename> '{ann['filename']}')"))
            continue
        if len(found) > 1 and ann["filename"] in found:
            found = [ann["filename"]]
        file_name = os.path.join(img_dir, found[0])
        r = {"file_name": file_name, "image_id": image_id}
        size = (ann["width"], ann["height"]) if ann["width"] else image_size(file_name)
        if size:  # else the check's decode finds why the header is unreadable
            r["height"], r["width"] = size[1], size[0]
        instances = []
        for k, reason in ann["bad"]:
            problems.append(("bad_annotation", file_name, f"object #{k} of {xml}: {reason}"))
        for o in ann["objects"]:
            if o["name"] not in class_id:
                close = difflib.get_close_matches(o["name"], class_names, n=1)
                problems.append(("unknown_class", file_name, f"class '{o['name']}' (in {xml}) is not in the class "
                                 f"list of '{name}' ({', '.join(class_names)})"
                                 + (f"; did you mean '{close[0]}'?" if close else "")))
                continue
            x1, y1, x2, y2 = o["bbox"]  # 1-based inclusive pixels -> 0-based, as detectron2's loader
            instances.append({"category_id": class_id[o["name"]], "bbox": [x1 - 1.0, y1 - 1.0, x2, y2],
                              "bbox_mode": BoxMode.XYXY_ABS})
        r["annotations"] = instances
        dicts.append(r)
    _LOAD_PROBLEMS[name] = problems
    if problems:
        counts = Counter(k for k, _, _ in problems)
        logger.warning("Dataset '%s': left out %s (first: %s: %s); the check before training lists them "
                       "(DATALOADER.CHECK).", name, ", ".join(f"{n} x {k}" for k, n in counts.items()),
                       *problems[0][1:])
    return dicts


def register_voc_dataset(name, folder, split, split_file, class_names, *, year=2012, annotations="", images="",
                         classes_given=True, class_counts=None, class_examples=None):
    """Register ``name`` (lazy: nothing is read until it is used) with the metadata detectron2's VOC
    datasets have (``thing_classes``, ``dirname``, ``split``, ``year``, ``evaluator_type``) plus what
    :class:`VOCEvaluator` and the class check read."""
    class_names = list(class_names)
    DatasetCatalog.register(name, lambda: load_voc_dicts(name, folder, split_file, class_names, annotations, images))
    MetadataCatalog.get(name).set(
        thing_classes=class_names, dirname=folder, split=split, year=year, evaluator_type="pascal_voc",
        voc_split_file=split_file, voc_annotations=annotations, voc_images=images, classes_given=classes_given,
        class_counts=dict(class_counts or {}), class_examples=dict(class_examples or {}))


class VOCEvaluator(PascalVOCDetectionEvaluator):
    """detectron2's Pascal-VOC AP on any folder :func:`load_voc_dicts` reads: the ground truth comes
    from the dataset's own annotation folder and split file, parsed leniently (float coordinates,
    missing ``<pose>``/``<truncated>``, spaces in ids), and is handed to detectron2's ``voc_eval`` as
    normalised xml copies (integer pixels as in VOC) in a temporary folder. Datasets registered otherwise (e.g.
    detectron2's ``voc_2007_test``) are evaluated exactly as by the parent class."""

    def __init__(self, dataset_name):
        super().__init__(dataset_name)
        meta = MetadataCatalog.get(dataset_name)
        self._voc_split_file = meta.get("voc_split_file", None)
        if self._voc_split_file:
            self._voc_ann_dir = annotation_dir(meta.dirname, meta.voc_annotations)

    def process(self, inputs, outputs):
        if self._voc_split_file:  # voc_eval splits its prediction lines at spaces: none in an id
            inputs = [dict(x, image_id=_safe_id(x["image_id"])) for x in inputs]
        super().process(inputs, outputs)

    def evaluate(self):
        if not self._voc_split_file or not comm.is_main_process():
            return super().evaluate()  # (other processes only send their predictions)
        from detectron2.evaluation.pascal_voc_evaluation import parse_rec

        with tempfile.TemporaryDirectory(prefix="distill_d2_voc_gt_") as tmp:
            ids = read_split_file(self._voc_split_file)
            for image_id in ids:
                _write_normalised_xml(os.path.join(self._voc_ann_dir, image_id + ".xml"),
                                      os.path.join(tmp, _safe_id(image_id) + ".xml"))
            with open(os.path.join(tmp, "split.txt"), "w") as f:
                f.write("".join(_safe_id(i) + "\n" for i in ids))
            self._anno_file_template = os.path.join(tmp, "{}.xml")
            self._image_set_path = os.path.join(tmp, "split.txt")
            try:
                return super().evaluate()
            finally:
                parse_rec.cache_clear()  # (keyed by the temporary file names)


def _safe_id(image_id):
    return str(image_id).replace("%", "%25").replace(" ", "%20")


def _write_normalised_xml(src, dst):
    """The objects of ``src`` as the minimal xml detectron2's ``parse_rec`` reads (no objects if
    ``src`` is unreadable: the loader reported it)."""
    try:
        objects = parse_voc_xml(src)["objects"]
    except (ET.ParseError, OSError):
        objects = []
    root = ET.Element("annotation")
    for o in objects:
        node = ET.SubElement(root, "object")
        for tag in ("name", "pose", "truncated", "difficult"):
            ET.SubElement(node, tag).text = str(o[tag])
        box = ET.SubElement(node, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), o["bbox"]):
            ET.SubElement(box, tag).text = str(int(round(v)))
    ET.ElementTree(root).write(dst)
