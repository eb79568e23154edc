"""Export the student of a distillation checkpoint as a plain detectron2 checkpoint.

    python -m distill_d2.export --config-file configs/synthetic/tar_R34_to_R18.yaml \\
        --input output/tar/model_final.pth --output output/tar/student.pth

The output loads into the student's own YAML (MODEL.META_ARCHITECTURE
GeneralizedRCNN / RetinaNet) with zero missing, unexpected or mis-shaped
keys; this is verified before writing (a class count other than the
checkpoint's is an error naming the key to set). The output carries the
checkpoint's ``model_meta`` (class names and count, input settings: see
distill_d2/checkpoint.py), so ``--eval-only`` with the plain YAML checks the
config and the evaluation data against it; a checkpoint without one (older
runs) gets one made from the config.
"""
import argparse
import logging
import os

import torch
from detectron2.modeling import build_model

from .checkpoint import CheckpointFitError, DistillCheckpointer, model_meta, misfit_message
from .cli import add_override_arguments, parse_args
from .config import default_distill_node, load_cfg

logger = logging.getLogger(__name__)
KD_PREFIX = "kd_"


def student_state_dict(state_dict):
    """Drop distillation-only entries (``kd_*`` adapters) from a state dict."""
    return {k: v for k, v in state_dict.items() if not k.startswith(KD_PREFIX)}


class StudentCheckpointer(DistillCheckpointer):
    """DistillCheckpointer that loads a distillation checkpoint into the plain student: the
    ``kd_*`` entries (adapters) and the distillation-only states are dropped; the teacher
    fingerprint of the last file loaded is kept as ``distill_teacher`` (None if absent)."""

    distill_teacher = None

    def _load_file(self, f):
        data = super()._load_file(f)
        if isinstance(data.get("model"), dict):
            data["model"] = student_state_dict(data["model"])
        self.distill_teacher = data.pop("distill_teacher", None)
        data.pop("training_state", None)
        return data


def student_cfg_from(cfg, keep_weights=False):
    """The plain student config of a distillation config (META_ARCHITECTURE swapped; the
    DISTILL block reset, since the plain detector ignores it; MODEL.WEIGHTS kept only with
    ``keep_weights``)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    if not getattr(arch, "is_distiller", False):
        raise ValueError(f"{cfg.MODEL.META_ARCHITECTURE} is not a distillation meta-architecture.")

    scfg = cfg.clone()
    scfg.defrost()
    scfg.MODEL.META_ARCHITECTURE = arch.STUDENT_META_ARCH
    if not keep_weights:
        scfg.MODEL.WEIGHTS = ""
    scfg.DISTILL = default_distill_node()
    scfg.freeze()
    return scfg


def export_student(cfg, input_path, output_path):
    """Write the student-only checkpoint; returns the number of tensors written.

    Raises:
        KeyError: the exported keys do not exactly match the plain student model.
        CheckpointFitError: a tensor's shape differs (e.g. another class count: the message names the key).
    """
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"Distillation checkpoint '{input_path}' not found.")
    ckpt = torch.load(input_path, map_location="cpu", weights_only=False)
    sd = student_state_dict(ckpt["model"] if "model" in ckpt else ckpt)
    scfg = student_cfg_from(cfg)
    scfg.defrost()
    scfg.MODEL.DEVICE = "cpu"
    student = build_model(scfg)
    model_sd = student.state_dict()
    expected = set(model_sd)
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise KeyError(
            f"Exported student does not match {scfg.MODEL.META_ARCHITECTURE} built from the config: "
            f"missing {missing}, unexpected {unexpected}. Is '{input_path}' a checkpoint of this config?"
        )
    meta = ckpt.get("model_meta") if "model" in ckpt else None
    shapes = [(k, tuple(sd[k].shape), tuple(model_sd[k].shape)) for k in sorted(expected)
              if tuple(sd[k].shape) != tuple(model_sd[k].shape)]
    if shapes:
        raise CheckpointFitError(
            misfit_message(input_path, shapes, [], student, meta, scfg, mode="export")
            + " Give export the training run's config and overrides (KEY VALUE after the arguments).")
    if meta is None:  # a checkpoint of an older run: what the config says (class names if known without loading data)
        meta = model_meta(cfg, recorded_by="distill_d2.export, from the config (the checkpoint recorded none)")
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    torch.save({"model": sd, "model_meta": meta, "__author__": "distill_d2.export",
                "source": os.path.abspath(input_path)}, output_path)
    logger.info("Wrote student (%d tensors, %d kd_* entries dropped) to %s", len(sd),
                len(ckpt.get("model", ckpt)) - len(sd), output_path)
    return len(sd)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="the distillation config the checkpoint was trained with")
    p.add_argument("--input", required=True, help="distillation checkpoint (model_final.pth)")
    p.add_argument("--output", required=True, help="where to write the student-only checkpoint")
    add_override_arguments(p)  # KEY VALUE overrides, bare or after --opts, after every flag
    args = parse_args(p, argv)
    logging.basicConfig(level=logging.INFO)
    n = export_student(load_cfg(args.config_file, args.opts, need_teacher=False), args.input, args.output)
    print(f"exported {n} tensors -> {args.output}")


if __name__ == "__main__":
    import distill_d2  # noqa: F401

    main()
