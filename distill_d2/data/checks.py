"""Fast checks of a training set *before* training, and file names in data-loading errors.

``check_dataset_dicts`` makes one pass over detectron2 dataset dicts (as from
``DatasetCatalog.get``) and finds what would otherwise fail late or silently:
missing (and, with ``decode=True``, truncated/undecodable) image files, boxes
with negative or zero width/height, sub-pixel boxes, boxes outside the image,
class ids outside ``[0, num_classes)``. It raises one ``ValueError`` listing
them (``action="error"``) or drops them with one warning (``action="drop"``).

``NamedErrors(mapper)`` wraps a dataset mapper so that an exception raised
while loading or augmenting an image names the image file.

The trainer runs both (config keys ``DATALOADER.CHECK.*``).
"""
import logging
import math
import numbers
import os
from collections import Counter

from detectron2.structures import BoxMode

logger = logging.getLogger(__name__)

# problem kind -> short description (the order of the summary)
KINDS = {
    "missing_file": "image file missing",
    "unreadable_image": "image file cannot be decoded (truncated/corrupt)",
    "invalid_box": "malformed bbox or bbox_mode",
    "nonpositive_size": "box with negative or zero width/height",
    "too_small": "box smaller than the minimum size",
    "outside_image": "box outside the image",
    "bad_category": "category_id out of range",
}
MAX_LISTED = 20
TOLERANCE = 1.0  # px a box may extend beyond the image
ACTIONS = ("error", "drop")


def _try_decode(path):
    """None if ``path`` fully decodes, else a short reason."""
    from PIL import Image, ImageFile

    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
        return f"{type(e).__name__}: {e}"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    return None


def _to_xyxy(bbox, mode):
    """``bbox`` in ``mode`` as an XYXY_ABS tuple of floats (ValueError/TypeError/AssertionError if malformed)."""
    mode = BoxMode(mode)
    if mode in (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS):  # fast path, same as BoxMode.convert
        if len(bbox) != 4:
            raise ValueError(f"{len(bbox)} values")
        x1, y1, a, b = (float(v) for v in bbox)
        return (x1, y1, a, b) if mode == BoxMode.XYXY_ABS else (x1, y1, x1 + a, y1 + b)
    return tuple(float(v) for v in BoxMode.convert(list(bbox), mode, BoxMode.XYXY_ABS))


def _fmt(values):
    return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) + "]"


def _check_annotation(ann, num_classes, min_box_size, width, height):
    """[(kind, detail)] for one annotation."""
    problems = []
    cat = ann.get("category_id")
    if not isinstance(cat, numbers.Integral) or isinstance(cat, bool) or not 0 <= cat < num_classes:
        problems.append(("bad_category", f"category_id={cat!r} not in [0, {num_classes})"))
    if ann.get("iscrowd", 0) == 1:
        return problems  # crowd regions are ignored by the losses: only the class id matters
    bbox, mode = ann.get("bbox"), ann.get("bbox_mode", BoxMode.XYXY_ABS)
    try:
        x1, y1, x2, y2 = _to_xyxy(bbox, mode)
    except Exception as e:
        return problems + [("invalid_box", f"bbox={bbox!r} bbox_mode={mode!r}: {type(e).__name__}: {e}")]
    orig = f"bbox={_fmt(bbox)} ({BoxMode(mode).name})"
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return problems + [("invalid_box", f"{orig}: non-finite value")]
    w, h = x2 - x1, y2 - y1
    if w <= 0 or h <= 0:
        problems.append(("nonpositive_size", f"{orig}: width {w:g}, height {h:g}"))
    elif w < min_box_size or h < min_box_size:
        problems.append(("too_small", f"{orig}: width {w:g}, height {h:g} < {min_box_size:g} px"))
    if width is not None and height is not None:
        if x1 < -TOLERANCE or y1 < -TOLERANCE or x2 > width + TOLERANCE or y2 > height + TOLERANCE:
            problems.append(("outside_image", f"{orig}: XYXY {_fmt((x1, y1, x2, y2))} outside the "
                                              f"{width}x{height} image (tolerance {TOLERANCE:g} px)"))
    return problems


def check_dataset_dicts(dicts, num_classes, *, decode=False, action="error", min_box_size=1.0, dataset_name=""):
    """Check detectron2 dataset dicts in one pass; return them (filtered with ``action="drop"``).

    Per record: the image file exists (and fully decodes with ``decode=True``: slow for large
    sets). Per annotation: the box (``bbox`` in ``bbox_mode``, as XYXY_ABS) has x2 > x1 and
    y2 > y1, width and height >= ``min_box_size``, lies inside the record's ``width`` x
    ``height`` (1 px tolerance; not checked without them), and ``category_id`` is in
    ``[0, num_classes)``. ``iscrowd`` annotations are only checked for the class id.

    ``action="error"``: raise ``ValueError`` naming the dataset, the counts per kind and the
    first problems. ``action="drop"``: drop bad annotations and records whose image is
    missing/unreadable, log one warning, return the filtered list (new dicts for changed
    records; the input is not modified). Without problems the input list is returned as is.
    """
    if action not in ACTIONS:
        raise ValueError(f"check_dataset_dicts: action must be one of {ACTIONS}, got {action!r} "
                         "(config key DATALOADER.CHECK.ACTION).")
    problems = []  # (kind, file_name, annotation index or None, detail)
    bad_records, bad_anns = set(), {}  # record index; record index -> set of annotation indices
    num_anns = 0
    for i, d in enumerate(dicts):
        fname = d.get("file_name")
        if not fname or not os.path.isfile(fname):
            problems.append(("missing_file", fname, None, "no such file"))
            bad_records.add(i)
        elif decode:
            reason = _try_decode(fname)
            if reason:
                problems.append(("unreadable_image", fname, None, reason))
                bad_records.add(i)
        width, height = d.get("width"), d.get("height")
        for j, ann in enumerate(d.get("annotations") or ()):
            num_anns += 1
            for kind, detail in _check_annotation(ann, num_classes, min_box_size, width, height):
                problems.append((kind, fname, j, detail))
                bad_anns.setdefault(i, set()).add(j)
    name = f"'{dataset_name}'" if dataset_name else "(unnamed)"
    checks = f"{len(dicts)} images, {num_anns} annotations" + (", images decoded" if decode else "")
    if not problems:
        logger.info("Dataset %s checked: %s, no problems.", name, checks)
        return dicts
    counts = Counter(p[0] for p in problems)
    summary = ", ".join(f"{counts[k]} x {k} ({KINDS[k]})" for k in KINDS if counts[k])
    if action == "error":
        lines = [f"  {f}" + (f" annotation #{j}" if j is not None else "") + f": {kind}: {detail}"
                 for kind, f, j, detail in problems[:MAX_LISTED]]
        if len(problems) > MAX_LISTED:
            lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
        raise ValueError(
            f"Dataset {name} has {len(problems)} problems ({checks}): {summary}. First ones:\n"
            + "\n".join(lines)
            + "\nFix the annotations/images, or set DATALOADER.CHECK.ACTION drop to drop the bad annotations and "
            "images and train on the rest (DATALOADER.CHECK.MIN_BOX_SIZE sets the smallest box in pixels; "
            "DATALOADER.CHECK.ENABLED False turns this check off)."
        )
    out, dropped_bad, dropped_with_image = [], 0, 0
    for i, d in enumerate(dicts):
        if i in bad_records:
            dropped_with_image += len(d.get("annotations") or ())
            continue
        if i in bad_anns:
            d = dict(d, annotations=[a for j, a in enumerate(d["annotations"]) if j not in bad_anns[i]])
            dropped_bad += len(bad_anns[i])
        out.append(d)
    logger.warning(
        "Dataset %s checked (%s): %s; dropped %d of %d images (missing/unreadable) and %d of %d annotations "
        "(%d bad, %d on dropped images).",
        name, checks, summary, len(bad_records), len(dicts), dropped_bad + dropped_with_image, num_anns,
        dropped_bad, dropped_with_image,
    )
    return out


class NamedErrors:
    """Wrap a dataset mapper: any exception becomes a RuntimeError naming the image file."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, d):
        try:
            return self.mapper(d)
        except Exception as e:
            raise RuntimeError(
                f"Failed to load or augment image {d.get('file_name')} (image_id {d.get('image_id')}): "
                f"{type(e).__name__}: {e}"
            ) from e

    def __repr__(self):
        return f"NamedErrors({self.mapper!r})"
