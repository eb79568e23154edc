"""Inside the detectors' heads: module lookup for taps, and running a head from a given layer on.

Method files never index detectron2 internals; they declare a
:class:`~distill_d2.record.Tap` (a module path) or a
:class:`~distill_d2.record.CrossPass` (a branch and a start layer), checked here
when the model is built and run here during the step.

Branches (the layers of each, in order, are what ``start`` counts):

* RetinaNet ``"cls"``: ``head.cls_subnet`` (``[conv, (norm,) ReLU] x NUM_CONVS``) then ``head.cls_score``;
  ``"bbox"``: ``head.bbox_subnet`` then ``head.bbox_pred``. Input and output (N, C, H, W) of one level.
* Faster R-CNN ``"box"``: the box head's children (``FastRCNNConvFCHead``: ``flatten, fc1, fc_relu1, fc2,
  fc_relu2``) then ``roi_heads.box_predictor``; input (R, ...) pooled or hidden features, output
  (logits (R, K+1), deltas (R, 4K)).
"""
import difflib

import torch
from detectron2.layers import CycleBatchNormList

from ..errors import DistillConfigError, TeacherError
from ..record import CrossPass, Tap, provider

#: branch -> (family, path of the layer sequence, path of the predictor)
BRANCHES = {
    "cls": ("dense", "head.cls_subnet", "head.cls_score"),
    "bbox": ("dense", "head.bbox_subnet", "head.bbox_pred"),
    "box": ("rcnn", "roi_heads.box_head", "roi_heads.box_predictor"),
}


def find_module(model, path, who="student"):
    """The submodule of ``model`` at dotted ``path``; DistillConfigError naming the closest paths if none."""
    modules = dict(model.named_modules())
    if path in modules and path:
        return modules[path]
    close = difflib.get_close_matches(path, [n for n in modules if n], n=5, cutoff=0.5)
    raise DistillConfigError(
        f"No module '{path}' in the {who} ({type(model).__name__}) for a tap: "
        + (f"closest names: {close}." if close else "list its modules with model.named_modules().")
    )


def branch_layers(model, branch):
    """(list of the branch's layers, its predictor) in ``model`` (see the module docstring)."""
    if branch not in BRANCHES:
        raise DistillConfigError(f"Unknown head branch '{branch}' for a cross pass: use one of {sorted(BRANCHES)}.")
    _, seq, pred = BRANCHES[branch]
    return list(find_module(model, seq, "teacher").children()), find_module(model, pred, "teacher")


def check_cross_pass(cross, student, teacher, family):
    """Build-time checks of a CrossPass against both models (``teacher`` may live on the meta device)."""
    if BRANCHES.get(cross.branch, (family,))[0] != family:
        raise DistillConfigError(f"Cross pass branch '{cross.branch}' belongs to the "
                                 f"{BRANCHES[cross.branch][0]} family, not to this {family} student.")
    layers, _ = branch_layers(teacher, cross.branch)
    if not 0 <= cross.start <= len(layers):
        raise DistillConfigError(f"Cross pass start {cross.start} is outside the teacher's '{cross.branch}' "
                                 f"branch of {len(layers)} layers ({[type(m).__name__ for m in layers]}).")
    if any(isinstance(m, CycleBatchNormList) for m in layers[cross.start:]):
        raise TeacherError("The teacher's head uses per-level norms (CycleBatchNormList, e.g. MODEL.RETINANET.NORM "
                           "'BN'): an extra pass through them would shift their level cycle. Use a head without "
                           "per-level norms (e.g. NORM 'GN' or '') for cross-pass terms.")
    if cross.tap.model != "student":
        raise DistillConfigError(f"A cross pass runs the teacher on the student's tensor: its tap {cross.tap} "
                                 "must be on the student.")
    find_module(student, cross.tap.path, "student")


def check_taps(needs, student, teacher, family):
    """Every Tap / CrossPass in ``needs`` names a module of its model (build time)."""
    for need in needs:
        if isinstance(need, Tap):
            if need.model not in ("student", "teacher"):
                raise DistillConfigError(f"Tap {need}: model must be 'student' or 'teacher'.")
            find_module(student if need.model == "student" else teacher, need.path, need.model)
        elif isinstance(need, CrossPass):
            check_cross_pass(need, student, teacher, family)


def run_head_from(model, branch, start, x):
    """``model``'s ``branch`` layers ``start:`` then its predictor, on ``x`` (see the module docstring).

    Runs with autograd on (gradient reaches ``x``); ``model``'s parameters keep their own
    ``requires_grad`` (a frozen teacher: none), its norm layers their mode.
    """
    layers, predictor = branch_layers(model, branch)
    with torch.enable_grad():
        for layer in layers[start:]:
            x = layer(x)
        return predictor(x)


@provider(families=("rcnn", "dense"), same_family=True)
def cross_pass(rec, need):
    """:class:`CrossPass` ``need``: the teacher's branch on each (prepared) tapped student tensor."""
    teacher = rec.models.teacher
    if any(p.requires_grad for p in teacher.parameters()):
        raise RuntimeError("A cross pass must run through a frozen teacher (its parameters require grad).")
    out = []
    for i, x in enumerate(rec.get(need.tap)):
        x = need.prepare(rec, i, x) if need.prepare is not None else x
        out.append(run_head_from(teacher, need.branch, need.start, x))
    return out


def tap_hooks(taps, model, store):
    """(module, fn(output)) pairs appending each Tap's outputs to ``store[tap]`` (a list per tap) as
    (tensor, its version counter at capture), so a later in-place change is detected."""
    pairs = []
    for tap in taps:
        store.setdefault(tap, [])
        pairs.append((find_module(model, tap.path, tap.model),
                      lambda out, s=store[tap]: s.append((out, out._version if torch.is_tensor(out) else None))))
    return pairs


__all__ = ["find_module", "run_head_from", "check_taps", "tap_hooks", "BRANCHES", "CrossPass", "Tap"]
