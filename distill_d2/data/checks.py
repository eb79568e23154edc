"""Checks of a training set *before* training, and file names in data-loading errors.

``check_dataset_dicts`` makes one pass over detectron2 dataset dicts (as from
``DatasetCatalog.get``) and finds what would otherwise fail late or silently:
missing image files; with ``decode=True`` (the config default) truncated or
undecodable images and images whose size is not the record's ``width`` x
``height`` (detectron2 stops at such an image mid-run), decoded in parallel
threads (JPEGs at 1/8 scale: every byte is still entropy-decoded, so a
truncation is found as by a full decode, at about twice the speed), shared out
over the launched processes; boxes with negative or zero width/height,
sub-pixel boxes, boxes outside the image, class ids outside
``[0, num_classes)``; and what a loader left out (``extra_problems``, e.g. an
object of a class not in a VOC class list). It raises one ``ValueError``
listing them (``action="error"``) or drops them with one warning
(``action="drop"``).

``NamedErrors(mapper)`` wraps a dataset mapper so that an exception raised
while loading or augmenting an image names the image file (and, for an
unreadable image, the check's keys).

The trainer runs both (config keys ``DATALOADER.CHECK.*``).
"""
import logging
import math
import numbers
import os
import time
from collections import Counter

from detectron2.structures import BoxMode

from ..errors import DistillConfigError
from .images import oriented_size

logger = logging.getLogger(__name__)

# problem kind -> short description (the order of the summary)
KINDS = {
    "missing_file": "image file missing",
    "unreadable_image": "image file cannot be decoded (truncated/corrupt)",
    "size_mismatch": "image size is not the annotation's width/height",
    "bad_annotation": "annotation file or object unreadable",
    "unknown_class": "class name not in the class list",
    "invalid_box": "malformed bbox or bbox_mode",
    "nonpositive_size": "box with negative or zero width/height",
    "too_small": "box smaller than the minimum size",
    "outside_image": "box outside the image",
    "bad_category": "category_id out of range",
}
# kind -> what to do about it (added to the error when the kind occurs)
HINTS = {
    "size_mismatch": "an image whose size is not its annotation's width/height (EXIF orientation applied, as "
                     "detectron2 reads it) was resized or rotated after it was annotated, so its boxes are "
                     "likely off too: re-annotate it or fix the size",
    "unknown_class": "fix the class names in those files, or add them to the class list (the 'classes' of the "
                     "DATASETS.VOC entry)",
}
MAX_LISTED = 20
TOLERANCE = 1.0  # px a box may extend beyond the image
ACTIONS = ("error", "drop")
PROGRESS_EVERY = 10.0  # seconds between progress lines of the decode pass


def decode_image(path):
    """(None, (width, height)) if ``path`` decodes fully, else (short reason, None). The size is the one
    detectron2's ``read_image`` returns (EXIF orientation applied). JPEGs decode at 1/8 scale (PIL's
    ``draft``), which reads and entropy-decodes every byte as a full decode does."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            size = oriented_size(im)
            if im.format == "JPEG":
                w, h = im.size
                im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
            im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
        return f"{type(e).__name__}: {e}", None
    return None, size


def decode_workers(workers=0, processes=1):
    """Threads of the decode pass: ``workers``, or for 0 the usable cores shared by ``processes`` (at most 8)."""
    if workers > 0:
        return int(workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, processes)))


def decode_all(paths, workers=1, what=""):
    """[(reason or None, size or None)] of :func:`decode_image` for each path, in ``workers`` threads
    (PIL decodes without the GIL), logging progress every ``PROGRESS_EVERY`` seconds."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import ImageFile

    old = ImageFile.LOAD_TRUNCATED_IMAGES  # as detectron2's reader by default: a truncated file is an error
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    out, start = [], time.perf_counter()
    last = start
    if len(paths) >= 5000:
        logger.info("Decoding %d %simages to check them (DATALOADER.CHECK.DECODE; False skips it), %d thread(s).",
                    len(paths), what, workers)
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for r in pool.map(decode_image, paths, chunksize=16):
                out.append(r)
                now = time.perf_counter()
                if now - last >= PROGRESS_EVERY:
                    last, rate = now, len(out) / (now - start)
                    logger.info("Decoding %simages to check them (DATALOADER.CHECK.DECODE): %d / %d, %.0f images/s, "
                                "~%.0f s left.", what, len(out), len(paths), rate, (len(paths) - len(out)) / rate)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    return out


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


def _local_processes():
    """Processes on this machine (detectron2's launch makes the local group; without it, all of them)."""
    from detectron2.utils import comm

    try:
        return comm.get_local_size()
    except AssertionError:
        return comm.get_world_size()


def _decode_problems(dicts, indices, workers, distributed):
    """({record index: (kind, detail)}, speed line) of the decode pass over ``indices`` (records whose
    file exists); with ``distributed``, each launched process decodes its share, the results are gathered."""
    from detectron2.utils import comm

    world = comm.get_world_size() if distributed else 1
    mine = indices[comm.get_rank()::world] if world > 1 else indices
    threads = decode_workers(workers, _local_processes() if world > 1 else 1)
    start = time.perf_counter()
    found = {}
    for i, (reason, size) in zip(mine, decode_all([dicts[i]["file_name"] for i in mine], threads)):
        d = dicts[i]
        if reason:
            found[i] = ("unreadable_image", reason)
        elif d.get("width") is not None and d.get("height") is not None and size != (d["width"], d["height"]):
            found[i] = ("size_mismatch", f"the image is {size[0]}x{size[1]} (width x height) but the record says "
                                         f"{d['width']}x{d['height']}")
    seconds = time.perf_counter() - start
    if world > 1:
        merged = {}
        for part in comm.all_gather(found):
            merged.update(part)
        found = merged
    speed = (f"images decoded in {seconds:.1f} s: {len(mine) / max(seconds, 1e-9):.0f} images/s, {threads} thread(s)"
             + (f" in each of {world} processes" if world > 1 else ""))
    return found, speed


def check_dataset_dicts(dicts, num_classes, *, decode=False, action="error", min_box_size=1.0, dataset_name="",
                        extra_problems=(), workers=0, distributed=False):
    """Check detectron2 dataset dicts in one pass; return them (filtered with ``action="drop"``).

    Per record: the image file exists; with ``decode=True`` it fully decodes (in ``workers``
    threads, 0 = one per core up to 8; with ``distributed`` every launched process must call this
    with the same dicts: each decodes its share) and its size is the record's ``width`` x
    ``height`` (when given). Per annotation: the box (``bbox`` in ``bbox_mode``, as XYXY_ABS) has
    x2 > x1 and y2 > y1, width and height >= ``min_box_size``, lies inside the record's ``width``
    x ``height`` (1 px tolerance; not checked without them), and ``category_id`` is in
    ``[0, num_classes)``. ``iscrowd`` annotations are only checked for the class id.
    ``extra_problems``: [(kind, file, detail)] that the loader already left out (reported, counted).

    ``action="error"``: raise ``ValueError`` naming the dataset, the counts per kind and the
    first problems. ``action="drop"``: drop bad annotations and records whose image is
    missing/unreadable/of another size, log one warning, return the filtered list (new dicts for
    changed records; the input is not modified). Without problems the input list is returned as is.
    """
    if action not in ACTIONS:
        raise DistillConfigError(f"check_dataset_dicts: action must be one of {ACTIONS}, got {action!r} "
                                 "(config key DATALOADER.CHECK.ACTION).")
    per_record = {}  # record index -> [(kind, annotation index or None, detail)]
    bad_records, bad_anns = set(), {}  # record index; record index -> set of annotation indices
    num_anns, to_decode = 0, []
    for i, d in enumerate(dicts):
        fname = d.get("file_name")
        if not fname or not os.path.isfile(fname):
            per_record.setdefault(i, []).append(("missing_file", None, "no such file"))
            bad_records.add(i)
        elif decode:
            to_decode.append(i)
        width, height = d.get("width"), d.get("height")
        for j, ann in enumerate(d.get("annotations") or ()):
            num_anns += 1
            for kind, detail in _check_annotation(ann, num_classes, min_box_size, width, height):
                per_record.setdefault(i, []).append((kind, j, detail))
                bad_anns.setdefault(i, set()).add(j)
    speed = "images decoded"
    if to_decode:
        found, speed = _decode_problems(dicts, to_decode, workers, distributed)
        for i, (kind, detail) in found.items():
            per_record.setdefault(i, []).insert(0, (kind, None, detail))
            bad_records.add(i)
    problems = [(kind, f, None, detail) for kind, f, detail in extra_problems]  # (kind, file, ann index, detail)
    problems += [(kind, dicts[i].get("file_name"), j, detail) for i in sorted(per_record) for kind, j, detail in per_record[i]]
    name = f"'{dataset_name}'" if dataset_name else "(unnamed)"
    checks = f"{len(dicts)} images, {num_anns} annotations" + (f", {speed}" if decode else "")
    if not problems:
        logger.info("Dataset %s checked: %s, no problems.", name, checks)
        return dicts
    counts = Counter(p[0] for p in problems)
    summary = ", ".join(f"{counts[k]} x {k} ({KINDS.get(k, k)})" for k in list(KINDS) + sorted(set(counts) - set(KINDS))
                        if counts[k])
    if action == "error":
        lines = [f"  {f}" + (f" annotation #{j}" if j is not None else "") + f": {kind}: {detail}"
                 for kind, f, j, detail in problems[:MAX_LISTED]]
        if len(problems) > MAX_LISTED:
            lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
        hints = "".join(f" ({k}: {HINTS[k]}.)" for k in HINTS if counts[k])
        raise ValueError(
            f"Dataset {name} has {len(problems)} problems ({checks}): {summary}. First ones:\n"
            + "\n".join(lines)
            + "\nFix the annotations/images, or set DATALOADER.CHECK.ACTION drop to drop the bad annotations and "
            "images and train on the rest (DATALOADER.CHECK.MIN_BOX_SIZE sets the smallest box in pixels; "
            "DATALOADER.CHECK.ENABLED False turns this check off)." + hints
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
    left_out = f"; the loader left out {len(extra_problems)} (listed above by kind)" if extra_problems else ""
    logger.warning(
        "Dataset %s checked (%s): %s; dropped %d of %d images (missing/unreadable/other size) and %d of %d "
        "annotations (%d bad, %d on dropped images)%s.",
        name, checks, summary, len(bad_records), len(dicts), dropped_bad + dropped_with_image, num_anns,
        dropped_bad, dropped_with_image, left_out,
    )
    return out if (bad_records or bad_anns) else dicts


# errors of reading an image (PIL: OSError incl. UnidentifiedImageError, SyntaxError; detectron2: SizeMismatchError)
_IMAGE_ERRORS = (OSError, SyntaxError)


class NamedErrors:
    """Wrap a dataset mapper: any exception becomes a RuntimeError naming the image file (and, for an
    image that cannot be read or has another size, the check that finds such images before training)."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, d):
        try:
            return self.mapper(d)
        except Exception as e:
            hint = ""
            if isinstance(e, _IMAGE_ERRORS) or type(e).__name__ == "SizeMismatchError":
                hint = (" DATALOADER.CHECK.DECODE True (the default) finds such images before training, and "
                        "DATALOADER.CHECK.ACTION drop then trains without them.")
            raise RuntimeError(
                f"Failed to load or augment image {d.get('file_name')} (image_id {d.get('image_id')}): "
                f"{type(e).__name__}: {e}.{hint}"
            ) from e

    def __repr__(self):
        return f"NamedErrors({self.mapper!r})"
