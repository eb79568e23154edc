"""The errors distill_d2 raises for set-up mistakes (ground floor: imports nothing of distill_d2).

Both subclass ``ValueError``; their messages name the key or file at fault and the fix.
"""


class DistillConfigError(ValueError):
    """A setting that cannot work (a DISTILL key, a data or solver key); the message names the key and the fix."""


class TeacherError(ValueError):
    """A teacher/student set-up problem (weights, classes, strides, anchors, box coders); the message says what
    to change."""
