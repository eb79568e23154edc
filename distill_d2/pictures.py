"""Pictures of what is distilled: every term's masks and gated boxes, and the feature error, over one image.

    python -m distill_d2.pictures --config-file configs/synthetic/tar_R34_to_R18.yaml \\
        --weights output/synthetic/tar_R34_to_R18/model_final.pth --dataset synthetic_val --index 3 --out output/pics
    python -m distill_d2.pictures --config-file configs/synthetic/defeat_R34_to_R18.yaml --image photo.jpg --out pics

One training-mode forward of the distillation model (``DistillerMixin.record_step``: the same
recording as a training step, under no_grad, BN layers in eval mode so nothing changes) on one
input resized to the test size, then ``term.explain(record)`` for every term of ``DISTILL.TERMS``
and, for the feature terms (``levels`` + ``adapters``), the per-cell error
``mean_c (adapter(S_l) - T_l)^2``. Written to ``--out`` (each PNG the original image's size):

* ``<term>_<picture>_<level>.png``: a map (mask, error) as a heatmap over the image; colours span 0..1
  when every level of the picture lies in [0, 1] (weights, comparable across levels), else each
  level's min..max;
* ``<term>_<picture>.png``: boxes (e.g. RoIs passing a gate), with their values as labels;
* ``gt.png``: the gt boxes; ``overview.png``: all maps, one row per picture, one column per level.

Without ``--weights`` the student is randomly initialised: only what comes from the teacher and
the gt (the masks; for gates, the teacher side) is meaningful. An image file has no gt: gt-derived
masks are then empty.
"""
import argparse
import copy
import logging
import os
import sys

import numpy as np
import torch

logger = logging.getLogger("distill_d2.pictures")  # (also when run as __main__)

ALPHA = 0.5  # heatmap opacity
COLORMAP = "jet"
FONT_SCALE = 0.5  # largest text scale (shrunk to fit narrow images)


# ------------------------------------------------------------------ command line
def parse_args(argv=None):
    from .cli import add_override_arguments, parse_args as parse_cli

    p = argparse.ArgumentParser(prog="python -m distill_d2.pictures", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="a distillation preset (DistillGeneralizedRCNN / "
                   "DistillRetinaNet)")
    p.add_argument("--weights", default="", help="distillation checkpoint (student + adapters); default: "
                   "a randomly initialised student (the teacher alone: DISTILL.TEACHER.WEIGHTS)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", help="an image file (no gt boxes: gt-derived masks are empty)")
    src.add_argument("--dataset", help="a registered dataset (default: DATASETS.TEST[0])")
    p.add_argument("--index", type=int, default=0, help="sample of --dataset (default 0)")
    p.add_argument("--out", required=True, help="output folder for the PNGs")
    p.add_argument("--contact-sheet", action=argparse.BooleanOptionalAction, default=True,
                   help="also write overview.png with every map (default on)")
    # config KEY VALUE pairs, bare or after --opts, after every flag (MODEL.DEVICE is cpu unless given)
    add_override_arguments(p)
    return parse_cli(p, argv)


def load_distill_cfg(config_file, opts):
    """The frozen config (``config.load_cfg``; MODEL.DEVICE cpu unless ``opts`` sets it); must be a distiller."""
    from .config import is_distiller_arch, load_cfg

    cfg = load_cfg(config_file, ["MODEL.DEVICE", "cpu"] + list(opts))
    if not is_distiller_arch(cfg.MODEL.META_ARCHITECTURE):
        raise ValueError(
            f"{config_file} is not a distillation config: MODEL.META_ARCHITECTURE is '{cfg.MODEL.META_ARCHITECTURE}'. "
            "Pictures show what a distillation term weighs: use a preset with DistillGeneralizedRCNN or "
            "DistillRetinaNet (e.g. configs/synthetic/tar_R34_to_R18.yaml).")
    return cfg


# ------------------------------------------------------------------ input
def load_sample(cfg, image=None, dataset=None, index=0):
    """(dataset dict, original BGR image, class names) of an image file or a dataset sample."""
    import cv2
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if image is not None:
        img = cv2.imread(image, cv2.IMREAD_COLOR) if os.path.isfile(image) else None
        if img is None:
            raise FileNotFoundError(f"Image file '{image}' not found or not readable.")
        logger.info("%s is an image file: no gt boxes, so the masks that depend on gt are empty.", image)
        d = {"file_name": image, "height": img.shape[0], "width": img.shape[1], "image_id": 0, "annotations": []}
        meta = cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None
    else:
        names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
        if dataset is None and not names:
            raise ValueError("No --image or --dataset given and the config has no DATASETS.TEST / TRAIN.")
        dataset = dataset or names[0]
        if dataset not in DatasetCatalog.list():
            raise KeyError(f"Dataset '{dataset}' is not registered; registered: {sorted(DatasetCatalog.list())}.")
        dicts = DatasetCatalog.get(dataset)
        if not 0 <= index < len(dicts):
            raise IndexError(f"--index {index} is out of range: dataset '{dataset}' has {len(dicts)} samples "
                             f"(0..{len(dicts) - 1}).")
        d = copy.deepcopy(dicts[index])
        img = cv2.imread(d["file_name"], cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(f"Image file '{d['file_name']}' of {dataset}[{index}] not found or not readable.")
        meta = dataset
    classes = MetadataCatalog.get(meta).get("thing_classes", None) if meta else None
    return d, img, classes


def model_input(cfg, d):
    """The model's input for dataset dict ``d`` as training builds it (annotations -> ``instances``),
    resized like at test time (INPUT.MIN/MAX_SIZE_TEST), no flip."""
    import detectron2.data.transforms as T
    from detectron2.data import DatasetMapper

    kw = DatasetMapper.from_config(cfg, is_train=True)
    size = cfg.INPUT.MIN_SIZE_TEST
    kw.update(augmentations=[T.ResizeShortestEdge(size, cfg.INPUT.MAX_SIZE_TEST)] if size else [],
              recompute_boxes=False)
    return DatasetMapper(**kw)(copy.deepcopy(d))


# ------------------------------------------------------------------ model
def build_distiller(cfg, weights=""):
    """The distillation model (teacher set up), with ``weights`` loaded when given."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    model.setup_teacher()
    if weights:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"--weights '{weights}' not found.")
        DetectionCheckpointer(model).load(weights)  # logs missing / unexpected keys
        logger.info("Loaded %s into the distillation model (student + adapters; keys it lacked are listed "
                    "above)", weights)
    else:
        logger.info("No --weights: the student is randomly initialised; only the teacher (%s) and the gt are "
                    "meaningful (masks, gt boxes).", cfg.DISTILL.TEACHER.WEIGHTS or "no weights either")
    return model


def feature_error(term, rec):
    """{level: (N, H_l, W_l)} mean over channels of (adapter(S_l) - T_l)^2 of a feature term."""
    out = {}
    for lv in term.levels:
        s, t = term.adapters[lv](rec.features[lv]), rec.t_features[lv]
        if s.shape != t.shape:
            logger.warning("%s level %s: adapted student %s vs teacher %s, no error map.", type(term).__name__, lv,
                           tuple(s.shape), tuple(t.shape))
            continue
        out[lv] = ((s - t) ** 2).mean(dim=1)
    return out


def explain_all(model, inputs, seed=0):
    """(record, {term: explain dict}) of one recorded training step on ``inputs`` (no state changes:
    no grad, BN in eval mode; the teacher is always frozen). Feature terms' explanations also
    hold the map "feature_error"."""
    from detectron2.utils.events import EventStorage

    was_training = model.training
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    torch.manual_seed(seed)  # RPN/RoI sampling
    try:
        with torch.no_grad(), EventStorage():
            rec = model.record_step(inputs)
            explained = {}
            for name, term in model.kd_terms.items():
                e = dict(term.explain(rec))
                if hasattr(term, "levels") and hasattr(term, "adapters"):
                    e["maps"] = {**e.get("maps", {}), "feature_error": feature_error(term, rec)}
                explained[name] = e
    finally:
        model.train(was_training)
    return rec, explained


# ------------------------------------------------------------------ drawing (BGR uint8 arrays)
def level_to_image(grid, stride, resized_hw, orig_hw):
    """(H_l, W_l) map -> (H, W) float array over the original image: cell (i, j) covers input pixels
    [i s, (i+1) s) x [j s, (j+1) s); cropped to the resized image (no padding), resized to the original."""
    import cv2

    m = grid.detach().float().cpu().numpy()
    m = np.repeat(np.repeat(m, stride, axis=0), stride, axis=1)
    h, w = resized_hw
    m = np.pad(m, ((0, max(0, h - m.shape[0])), (0, max(0, w - m.shape[1]))))[:h, :w]
    return cv2.resize(m, (orig_hw[1], orig_hw[0]), interpolation=cv2.INTER_NEAREST)


def overlay(img, m, lo, hi):
    """Heatmap of ``m`` (colours from ``lo`` to ``hi``) alpha-blended over ``img``."""
    import matplotlib

    norm = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    rgb = matplotlib.colormaps[COLORMAP](norm.clip(0, 1))[..., :3]
    out = img.astype(np.float32) * (1 - ALPHA) + rgb[..., ::-1].astype(np.float32) * 255 * ALPHA
    return out.clip(0, 255).astype(np.uint8)


def put_lines(img, lines):
    """White text with a dark outline, top-left, shrunk to fit the width."""
    import cv2

    font, y = cv2.FONT_HERSHEY_SIMPLEX, 2
    for text in lines:
        scale = FONT_SCALE
        (tw, _), _ = cv2.getTextSize(text, font, scale, 1)
        if tw > img.shape[1] - 4:
            scale = max(0.25, scale * (img.shape[1] - 4) / tw)
        (_, th), base = cv2.getTextSize(text, font, scale, 1)
        y += th + base
        cv2.putText(img, text, (2, y - base), font, scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(img, text, (2, y - base), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def draw_boxes(img, boxes, scale_xy, labels=None, color=(0, 255, 255)):
    """``boxes`` (M, 4) XYXY in input pixels, drawn at ``scale_xy`` (input -> original) with optional labels."""
    import cv2

    img = img.copy()
    b = boxes.detach().float().cpu().numpy() * np.array(scale_xy * 2, dtype=np.float32)
    for i, (x0, y0, x1, y1) in enumerate(b.round().astype(int)):
        cv2.rectangle(img, (x0, y0), (x1, y1), color, 1)
        if labels is not None:
            cv2.putText(img, labels[i], (x0 + 1, max(y0 - 2, 8)), cv2.FONT_HERSHEY_SIMPLEX, 0.3, color, 1,
                        cv2.LINE_AA)
    return img


def box_color(i):
    import matplotlib

    r, g, b, _ = matplotlib.colormaps["tab10"](i % 10)
    return int(b * 255), int(g * 255), int(r * 255)


# ------------------------------------------------------------------ the pictures
def write_pictures(out_dir, img, rec, explained, classes=None, contact_sheet=True):
    """Write every picture of image 0 of ``rec`` over ``img`` (the original BGR image); returns the paths."""
    import cv2

    os.makedirs(out_dir, exist_ok=True)
    orig_hw = img.shape[:2]
    resized_hw = tuple(rec.images.image_sizes[0])
    scale_xy = [orig_hw[1] / resized_hw[1], orig_hw[0] / resized_hw[0]]
    written, rows = [], []

    def save(name, picture):
        path = os.path.join(out_dir, name)
        assert picture.shape[:2] == orig_hw, (picture.shape, orig_hw)
        if not cv2.imwrite(path, picture):
            raise OSError(f"Could not write {path}.")
        written.append(path)

    gt = rec.gt_instances[0]
    labels = [classes[c] if classes and c < len(classes) else str(c) for c in gt.gt_classes.tolist()]
    title = f"gt: {len(gt)} boxes" if len(gt) else "gt: none (masks from gt are empty)"
    save("gt.png", put_lines(draw_boxes(img, gt.gt_boxes.tensor, scale_xy, labels, (0, 255, 0)), [title]))
    for ti, (term, e) in enumerate(explained.items()):
        for picture, levels in e.get("maps", {}).items():
            maps = {lv: level_to_image(x[0], rec.strides[lv], resized_hw, orig_hw) for lv, x in levels.items()}
            if not maps:
                continue
            weights = all(m.min() >= 0 and m.max() <= 1 for m in maps.values())
            row = []
            for lv, m in maps.items():
                lo, hi = (0.0, 1.0) if weights else (float(m.min()), float(m.max()))
                pic = overlay(img, m, lo, hi)
                row.append((lv, pic, float(m.min()), float(m.max())))
                save(f"{term}_{picture}_{lv}.png", put_lines(pic.copy(), [
                    f"{term} {picture} {lv}", f"min {m.min():.3g} max {m.max():.3g}", f"colours {lo:.3g}..{hi:.3g}"]))
            rows.append((f"{term}\n{picture}\n(colours {'0..1' if weights else 'min..max'})", row))
        values = e.get("box_values", {})
        for pi, (picture, boxes) in enumerate(e.get("boxes", {}).items()):
            labels = [f"{v:.2f}" for v in values[picture][0].tolist()] if picture in values else None
            pic = draw_boxes(img, boxes[0], scale_xy, labels, box_color(ti + pi))
            save(f"{term}_{picture}.png", put_lines(pic, [f"{term} {picture}", f"{len(boxes[0])} boxes"]))
    if contact_sheet and rows:
        save_overview(os.path.join(out_dir, "overview.png"), rows)
        written.append(os.path.join(out_dir, "overview.png"))
    return written


def save_overview(path, rows):
    """One row per picture, one column per level (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = max(len(r) for _, r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.2 * ncols, 2.3 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (name, row) in enumerate(rows):
        axes[i, 0].text(-0.08, 0.5, name, transform=axes[i, 0].transAxes, ha="right", va="center", fontsize=8)
        for j, (lv, pic, lo, hi) in enumerate(row):
            axes[i, j].imshow(pic[..., ::-1])
            axes[i, j].set_title(f"{lv}  [{lo:.2g}, {hi:.2g}]", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    """Run the command; returns the list of written files."""
    from detectron2.utils.logger import setup_logger

    import distill_d2  # noqa: F401  (meta-archs, terms, datasets)
    from .cli import use_color

    setup_logger(name="fvcore", color=use_color())  # missing / unexpected checkpoint keys
    setup_logger(name="distill_d2", abbrev_name="distill_d2", color=use_color())
    args = parse_args(argv)
    cfg = load_distill_cfg(args.config_file, args.opts)
    d, img, classes = load_sample(cfg, args.image, args.dataset, args.index)
    inputs = model_input(cfg, d)
    model = build_distiller(cfg, args.weights)
    rec, explained = explain_all(model, [inputs])
    written = write_pictures(args.out, img, rec, explained, classes, args.contact_sheet)
    print(f"Wrote {len(written)} pictures to {args.out}:")
    for path in written:
        print("  " + path)
    return written


if __name__ == "__main__":
    try:
        main()
    except (ValueError, KeyError, IndexError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
