from setuptools import find_packages, setup

setup(
    name="distill_d2",
    version="0.1.0",
    description="Knowledge distillation of object detectors for Detectron2 (TAR, DeFeat, HGD, TBD, baselines)",
    packages=find_packages(exclude=("tests", "configs")),
    python_requires=">=3.9",
    # torch, torchvision and detectron2 are installed by `make setup`
    # (detectron2 has no regular PyPI release; see README "Install").
    install_requires=["fvcore", "pycocotools", "numpy", "opencv-python", "matplotlib", "tabulate"],
)
