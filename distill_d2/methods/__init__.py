"""Distillation methods: one module per method, each registering its terms in DISTILL_TERM_REGISTRY.

Every module in this package is imported here (so a new method file is picked
up without editing anything else); its presets are YAML files under configs/.

* ``generic``: masked feature imitation (FitNet, TAR/FGFI feature term), logit KD (Hinton, TAR cls term)
* ``tar``: TAR's teacher-better box KD and reverse proposal sharing
* ``defeat``: DeFeat's decoupled neck / backbone features and decoupled proposals
* ``hgd``, ``tbd``: HGD, TBD (reconstructions); ``pkd``, ``cwd``, ``mgd``, ``fgd``, ``crosskd``: the methods users pick today
"""
import importlib
import pkgutil

__all__ = []
for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_m}")
    __all__.append(_m)
