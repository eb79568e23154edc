"""Command-line handling shared by train_net.py, ``python -m distill_d2.export`` and ``python -m distill_d2.pictures``.

* Config overrides are accepted in both forms, bare ``KEY VALUE ...`` after the flags (detectron2's
  way) and ``--opts KEY VALUE ...``; both end the command line (argparse ``REMAINDER``).
* A flag written after the overrides (``... MODEL.WEIGHTS w.pth --eval-only``) would otherwise become
  part of them (yacs: "Override list has odd length"): it is an error saying to put flags first.
* Logs: no colour escape codes when stdout is not a terminal (a redirected log stays plain text), and
  never in log.txt (detectron2 colours the full-config dump it writes there too).

Imports nothing of distill_d2 but its errors (``config.load_cfg`` checks overrides with :func:`check_overrides`).
"""
import argparse
import contextlib
import logging
import re
import sys

from .errors import DistillConfigError

#: what a config key on the command line looks like (``MODEL.WEIGHTS``, ``SEED``, ``DISTILL.FEAT.WEIGHT``)
KEY_RE = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Za-z0-9_]+)*$")


class OverrideError(DistillConfigError):
    """Command-line KEY VALUE overrides that cannot be applied; the message says how to write them."""


def add_override_arguments(parser, positional=True):
    """Let ``parser`` take overrides as bare ``KEY VALUE`` pairs (positional ``opts``, unless the parser
    already has it, e.g. detectron2's ``default_argument_parser``) and as ``--opts KEY VALUE``."""
    dests = {a.dest for a in parser._actions}
    if positional and "opts" not in dests:
        parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                            help="config KEY VALUE overrides, after every flag (also accepted after --opts)")
    parser.add_argument("--opts", dest="opts_flag", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
                        help="config KEY VALUE overrides (the same as writing them bare, after every flag)")
    return parser


def check_overrides(opts):
    """``opts`` as a list of strings, or OverrideError: a flag among them (it was written after the
    overrides) or an odd number of items (a KEY without VALUE)."""
    opts = [str(o) for o in opts]
    flags = [o for o in opts if o.startswith("--") and len(o) > 2 and not o[2].isdigit()]
    if flags:
        example = ("--config-file X.yaml KEY VALUE" if flags[0] == "--config-file"
                   else f"--config-file X.yaml {flags[0]} ... KEY VALUE, not --config-file X.yaml KEY VALUE {flags[0]}")
        raise OverrideError(
            f"{flags[0]} appears among the KEY VALUE config overrides ({' '.join(opts)}): put flags before "
            "KEY VALUE overrides (everything after the first KEY, or after --opts, is read as overrides): "
            f"{example}.")
    if len(opts) % 2:
        keys = opts[0::2]
        bad = next((i for i, k in enumerate(keys) if not KEY_RE.match(k)), None)
        where = (f"'{keys[bad]}' stands where a KEY is expected (after {' '.join(opts[:2 * bad]) or 'nothing'}): "
                 "a value is missing or doubled before it" if bad is not None
                 else f"the last KEY '{opts[-1]}' has no VALUE")
        raise OverrideError(f"Config overrides must be KEY VALUE pairs, got {len(opts)} items ({' '.join(opts)}): "
                            f"{where}. Quote a value with spaces, e.g. SOLVER.STEPS \"(3000, 4000)\"; put flags "
                            "before KEY VALUE overrides.")
    return opts


def merged_overrides(args):
    """The overrides of parsed ``args``: bare ``opts`` then ``--opts`` ones (a ``--opts`` written after bare
    pairs lands inside the bare list and only separates them)."""
    opts = [o for o in list(getattr(args, "opts", None) or []) if o != "--opts"]
    return check_overrides(opts + list(getattr(args, "opts_flag", None) or []))


def parse_args(parser, argv=None):
    """``parser.parse_args(argv)`` with the overrides merged into ``args.opts`` and checked; an error
    (argparse's own, e.g. a required flag swallowed by the overrides, or ours) exits with the usage and
    the hint to put flags before the overrides when one was written after them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    error = parser.error

    def explained_error(message):
        hint = _late_flag(argv, parser)
        error(message + (f"; {hint}" if hint and "put flags before" not in message else ""))

    parser.error = explained_error
    try:
        args = parser.parse_args(argv)
        try:
            args.opts = merged_overrides(args)
        except OverrideError as e:
            parser.error(str(e))
    finally:
        parser.error = error
    if hasattr(args, "opts_flag"):
        del args.opts_flag
    return args


def _late_flag(argv, parser):
    """'put flags before ...' when a flag follows the first override (``--opts`` or a KEY that is not a
    flag's value) in ``argv``, else ''."""
    takes_value = {s for a in parser._actions for s in a.option_strings if a.nargs != 0}
    start = None
    for i, a in enumerate(argv):
        if a == "--opts" or (KEY_RE.match(a) and (i == 0 or argv[i - 1] not in takes_value)):
            start = i
            break
    if start is None:
        return ""
    late = [a for a in argv[start + 1:] if a.startswith("--") and len(a) > 2 and a != "--opts"]
    return f"{late[0]} came after the KEY VALUE overrides: put flags before KEY VALUE overrides" if late else ""


# ------------------------------------------------------------------ logging
def use_color():
    """Colour log lines only on a terminal (a redirected stdout gets plain text); the environment variables
    NO_COLOR (off) and FORCE_COLOR (on) decide first, as for termcolor."""
    import os

    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def plain_console_logs(names=("detectron2", "fvcore", "distill_d2")):
    """Give the stdout handlers of loggers ``names`` a plain formatter when stdout is not a terminal
    (detectron2's ``default_setup`` configures them with colour unconditionally)."""
    if use_color():
        return
    from detectron2.utils.logger import _ColorfulFormatter

    plain = logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s", datefmt="%m/%d %H:%M:%S")
    for name in names:
        for h in logging.getLogger(name).handlers:
            if isinstance(h.formatter, _ColorfulFormatter):
                h.setFormatter(plain)


@contextlib.contextmanager
def plain_config_dump():
    """detectron2's ``default_setup`` logs the config file and the full config syntax-highlighted (terminal
    escape codes) to the console and log.txt alike: within this block they are logged as plain text."""
    from detectron2.engine import defaults

    original = defaults._highlight
    defaults._highlight = lambda code, filename: code
    try:
        yield
    finally:
        defaults._highlight = original
