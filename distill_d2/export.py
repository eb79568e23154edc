"""Export the student of a distillation checkpoint as a plain detectron2 checkpoint.

    python -m distill_d2.export --config-file configs/synthetic/tar_R34_to_R18.yaml \\
        --input output/tar/model_final.pth --output output/tar/student.pth

The output loads into the student's own YAML (MODEL.META_ARCHITECTURE
GeneralizedRCNN / RetinaNet) with zero missing and zero unexpected keys;
this is verified before writing.
"""
import argparse
import logging
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

logger = logging.getLogger(__name__)
KD_PREFIX = "kd_"


def student_state_dict(state_dict):
    """Drop distillation-only entries (``kd_*`` adapters) from a state dict."""
    return {k: v for k, v in state_dict.items() if not k.startswith(KD_PREFIX)}


class StudentCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that loads a distillation checkpoint into the plain student: the
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
    from .terms import default_distill_node

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
    """
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"Distillation checkpoint '{input_path}' not found.")
    ckpt = torch.load(input_path, map_location="cpu", weights_only=False)
    sd = student_state_dict(ckpt["model"] if "model" in ckpt else ckpt)
    scfg = student_cfg_from(cfg)
    scfg.defrost()
    scfg.MODEL.DEVICE = "cpu"
    expected = set(build_model(scfg).state_dict().keys())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise KeyError(
            f"Exported student does not match {scfg.MODEL.META_ARCHITECTURE} built from the config: "
            f"missing {missing}, unexpected {unexpected}. Is '{input_path}' a checkpoint of this config?"
        )
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    torch.save({"model": sd, "__author__": "distill_d2.export", "source": os.path.abspath(input_path)}, output_path)
    logger.info("Wrote student (%d tensors, %d kd_* entries dropped) to %s", len(sd),
                len(ckpt.get("model", ckpt)) - len(sd), output_path)
    return len(sd)


def main(argv=None):
    from .engine import load_cfg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="the distillation config the checkpoint was trained with")
    p.add_argument("--input", required=True, help="distillation checkpoint (model_final.pth)")
    p.add_argument("--output", required=True, help="where to write the student-only checkpoint")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    n = export_student(load_cfg(args.config_file, args.opts, need_teacher=False), args.input, args.output)
    print(f"exported {n} tensors -> {args.output}")


if __name__ == "__main__":
    import distill_d2  # noqa: F401

    main()
