"""Messy test datasets, made in the test, like real data: ``make_voc`` (a Pascal-VOC folder with
lowercase sub-folders, landscape and portrait images of several sizes, some .png, xml files without
<size> or with float coordinates and missing tags, optionally a typo'd class name, a truncated JPEG,
an EXIF-rotated photo) and ``make_jpegs`` (many photo-like JPEGs, e.g. to time the decode check)."""
import os
from dataclasses import dataclass, field

import cv2
import numpy as np

# (width, height): landscape and portrait
SIZES = ((128, 96), (96, 128), (120, 80), (80, 120), (112, 112))
COLOURS = ((0, 0, 220), (0, 200, 0), (220, 120, 0), (200, 0, 200))


@dataclass
class MessyVOC:
    root: str
    classes: list
    ids: list
    images: dict  # id -> image path
    xmls: dict  # id -> xml path
    sizes: dict  # id -> (width, height) as detectron2 reads the image
    typo_xml: str = None
    truncated: str = None
    splits: dict = field(default_factory=dict)


def draw(width, height, boxes, seed):
    """A BGR image: noisy gradient background, a filled shape of its class colour in each
    ``(class index, (x1, y1, x2, y2))`` box (0-based pixels)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(30, 90, width, dtype=np.float32)[None, :, None]
    img = np.broadcast_to(ramp, (height, width, 3)) + rng.normal(0, 8, (height, width, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    for c, (x1, y1, x2, y2) in boxes:
        colour = COLOURS[c % len(COLOURS)]
        if c % 2:
            cv2.ellipse(img, ((x1 + x2) // 2, (y1 + y2) // 2), ((x2 - x1) // 2, (y2 - y1) // 2), 0, 0, 360, colour, -1)
        else:
            cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), colour, -1)
    return img


def _boxes(width, height, n_classes, i):
    """One box per class (0-based XYXY), placed by the image's size."""
    out = []
    for c in range(n_classes):
        bw, bh = max(12, width // 3), max(12, height // 3)
        x1 = (c * width // n_classes + 4 + i) % max(1, width - bw)
        y1 = (height // 4 + 6 * c + i) % max(1, height - bh)
        out.append((c, (x1, y1, x1 + bw, y1 + bh)))
    return out


def _xml(file_name, size, objects, i, *, with_size, tidy=False):
    """VOC xml text; messy by ``i`` unless ``tidy``: float coordinates on odd images, <pose>/<truncated>
    left out on every third; no <size> unless ``with_size``."""
    parts = [f"<annotation><folder>images</folder><filename>{file_name}</filename>"]
    if with_size:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, (x1, y1, x2, y2) in objects:
        coords = [x1 + 1, y1 + 1, x2, y2]  # VOC: 1-based inclusive pixels
        text = [f"{v:.1f}" if i % 2 and not tidy else str(v) for v in coords]
        tags = "" if i % 3 == 2 and not tidy else "<pose>Unspecified</pose><truncated>0</truncated>"
        parts.append(f"<object><name>{name}</name>{tags}<difficult>0</difficult><bndbox><xmin>{text[0]}</xmin>"
                     f"<ymin>{text[1]}</ymin><xmax>{text[2]}</xmax><ymax>{text[3]}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


def make_voc(root, n=10, classes=("dog", "raccoon"), *, annotations="annotations", images="images", png_every=3,
             typo=None, truncate=None, exif_rotated=None, no_size_every=4, splits=None, tidy=False):
    """Write a messy VOC folder at ``root``; returns a :class:`MessyVOC`.

    Image ``i`` has size ``SIZES[i % 5]`` (landscape and portrait), one object of each class, is a .png
    when ``i % png_every == 1`` (else .jpg), and its xml has no <size> when ``i % no_size_every == 3``.
    ``typo``: (image index, wrong name) replaces the first object's class name in that xml.
    ``truncate``: index of a .jpg image cut to half its bytes. ``exif_rotated``: index of a .jpg stored
    sideways with EXIF orientation 6 (displayed, and annotated, upright). ``splits``: {split: [indices]}
    written to ImageSets/Main (default: none, distill_d2 makes a seeded split). ``tidy``: xml files as
    detectron2's own VOC reader needs them (integer coordinates, every tag); with ``png_every=0``,
    ``no_size_every=0`` and the standard sub-folder names, a folder detectron2 reads.
    """
    from PIL import Image

    ann_dir, img_dir = os.path.join(root, annotations), os.path.join(root, images)
    os.makedirs(ann_dir, exist_ok=True)
    os.makedirs(img_dir, exist_ok=True)
    out = MessyVOC(root, list(classes), [], {}, {}, {})
    for i in range(n):
        iid = f"img_{i:03d}"
        w, h = SIZES[i % len(SIZES)]
        boxes = _boxes(w, h, len(classes), i)
        ext = ".png" if png_every and i % png_every == 1 and i != truncate and i != exif_rotated else ".jpg"
        path = os.path.join(img_dir, iid + ext)
        img = draw(w, h, boxes, i)
        if i == exif_rotated:  # pixels stored turned 90 degrees anticlockwise; EXIF 6 turns them back upright
            exif = Image.Exif()
            exif[0x0112] = 6
            Image.fromarray(np.ascontiguousarray(np.rot90(img, 1)[:, :, ::-1])).save(path, exif=exif)
        else:
            cv2.imwrite(path, img)
        if i == truncate:
            data = open(path, "rb").read()
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            out.truncated = path
        names = [(classes[c], b) for c, b in boxes]
        if typo is not None and typo[0] == i:
            names[0] = (typo[1], names[0][1])
        xml = os.path.join(ann_dir, iid + ".xml")
        with open(xml, "w") as f:
            f.write(_xml(iid + ext, (w, h), names, i, with_size=not (no_size_every and i % no_size_every == 3),
                         tidy=tidy))
        if typo is not None and typo[0] == i:
            out.typo_xml = xml
        out.ids.append(iid)
        out.images[iid], out.xmls[iid], out.sizes[iid] = path, xml, (w, h)
    if splits:
        main = os.path.join(root, "ImageSets", "Main")
        os.makedirs(main, exist_ok=True)
        for split, members in splits.items():
            with open(os.path.join(main, split + ".txt"), "w") as f:
                f.write("".join(out.ids[i] + "\n" for i in members))
            out.splits[split] = [out.ids[i] for i in members]
    return out


def make_jpegs(folder, n, size=(500, 375), quality=90):
    """``n`` photo-like JPEGs of ``size`` (width, height) in ``folder``; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    w, h = size
    paths = []
    for i in range(n):
        img = draw(w, h, _boxes(w, h, 3, i), i)
        p = os.path.join(folder, f"{i:05d}.jpg")
        cv2.imwrite(p, img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        paths.append(p)
    return paths
