#!/usr/bin/env python
"""Train / evaluate detectors and distilled students, the detectron2 way.

    python train_net.py --config-file configs/synthetic/faster_rcnn_R18_student.yaml
    python train_net.py --config-file configs/synthetic/tar_R34_to_R18.yaml --num-gpus 2
    python train_net.py --config-file X.yaml --eval-only MODEL.WEIGHTS out/model_final.pth

``--num-gpus N`` without GPUs launches N CPU processes (gloo backend). Config overrides
``KEY VALUE ...`` come after every flag, bare or after ``--opts``.
"""
from detectron2.engine import default_argument_parser, launch

import distill_d2  # noqa: F401  (registers meta-archs and datasets)
from distill_d2.cli import add_override_arguments, parse_args
from distill_d2.engine import main


def get_parser():
    """detectron2's ``default_argument_parser``, also taking the overrides as ``--opts KEY VALUE``."""
    return add_override_arguments(default_argument_parser())


if __name__ == "__main__":
    args = parse_args(get_parser())
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
