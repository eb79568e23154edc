"""Shared fixtures: a private dataset cache, tiny CPU configs, a teacher checkpoint; in_processes
(a function run in N gloo CPU processes)."""
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

# Disk the suite needs under its temporary directory: measured peak 1.04 GB on 2026-12-01
# (checkpoints; pytest.ini deletes a passed test's tmp_path at once), plus a margin.
NEED_FREE_GB = 1.5


def _tmp_root(config):
    """The existing directory that will hold pytest's temporary files."""
    d = os.path.abspath(config.option.basetemp or tempfile.gettempdir())
    while not os.path.isdir(d):
        d = os.path.dirname(d)
    return d


def pytest_report_header(config):
    d = _tmp_root(config)
    return f"temporary files under {d}: {shutil.disk_usage(d).free / 1e9:.1f} GB free"


def pytest_sessionstart(session):
    """Stop at once, saying why, on a disk too full for the checkpoints the tests write."""
    d = _tmp_root(session.config)
    free = shutil.disk_usage(d).free / 1e9
    if free < NEED_FREE_GB:
        pytest.exit(f"only {free:.2f} GB free under {d}; the tests write up to ~1 GB of checkpoints there "
                    f"and need {NEED_FREE_GB} GB. Free some space, or point them at another disk with "
                    f"TMPDIR=/path/with/space make test (or pytest --basetemp DIR).", returncode=1)


@pytest.fixture(scope="session", autouse=True)
def datasets_dir(tmp_path_factory):
    """Generate datasets into a per-session dir, never into the repo."""
    d = tmp_path_factory.mktemp("datasets")
    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = str(d)
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from distill_d2.data import register_builtin_voc, register_default_synthetic

    for name in DatasetCatalog.list():  # re-register the builtins under the new root
        if name.startswith(("synthetic_", "bccd_")):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    register_default_synthetic()
    register_builtin_voc()
    yield d
    if old is None:
        os.environ.pop("DETECTRON2_DATASETS", None)
    else:
        os.environ["DETECTRON2_DATASETS"] = old


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYN = os.path.join(REPO, "configs", "synthetic")

# Tiny, fast overrides for any synthetic config: small images and heads.
TINY_OPTS = [
    "DATASETS.TRAIN", "('synthetic_tiny_train',)",
    "DATASETS.TEST", "('synthetic_tiny_val',)",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "()",
    "DATALOADER.NUM_WORKERS", "0",
    "MODEL.DEVICE", "cpu",
    # untrained models score low: keep their detections so COCO AP is a number
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
]


def adapters(model, term=None):
    """The adapters ModuleDict of ``term`` (default: the first term that has adapters)."""
    terms = model.kd_terms
    name = term or next(n for n, t in terms.items() if hasattr(t, "adapters"))
    return terms[name].adapters


def tiny_cfg(config_file, *opts):
    """Load a config with TINY_OPTS + ``opts`` (strings) through train_net's set-up."""
    from distill_d2.config import load_cfg

    path = config_file if os.path.isabs(config_file) else os.path.join(SYN, config_file)
    return load_cfg(path, TINY_OPTS + list(opts))


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """``make_ckpt(config, *opts)``: path of a randomly initialised checkpoint of that config (cached)."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cache = {}

    def make(config, *opts):
        key = (config,) + tuple(opts)
        if key not in cache:
            d = tmp_path_factory.mktemp("ckpt")
            torch.manual_seed(0)
            model = build_model(tiny_cfg(config, *opts))
            DetectionCheckpointer(model, save_dir=str(d)).save("model_final")
            cache[key] = str(d / "model_final.pth")
        return cache[key]

    return make


@pytest.fixture(scope="session")
def teacher_ckpt(make_ckpt):
    """A (randomly initialised) R34 Faster R-CNN teacher checkpoint of the synthetic teacher config."""
    return make_ckpt("faster_rcnn_R34_teacher.yaml")


# ------------------------------------------------------------------ several gloo CPU processes
def _tensor_path(x, path="result"):
    """Where a torch.Tensor sits in nested dicts / lists / tuples ``x`` (None if nowhere)."""
    import torch

    if torch.is_tensor(x):
        return path
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, (list, tuple)) else ()
    for k, v in items:
        where = _tensor_path(v, f"{path}[{k!r}]")
        if where:
            return where
    return None


def _process_entry(rank, world, port, q, fn, args):
    """One child of ``in_processes``: join the gloo group, run ``fn``, put (rank, ok, result or traceback)."""
    import traceback

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        where = _tensor_path(out)
        if where:
            raise TypeError(f"{fn.__name__} returned a torch.Tensor at {where}: it would travel as shared memory "
                            f"that the exiting child frees; return .tolist() or .numpy().copy() instead")
        q.put((rank, True, out))
    except BaseException:  # (shows up in the test with its traceback, not as a queue timeout)
        q.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def in_processes(fn, *args, world=2, timeout=300):
    """[fn(rank, world, *args) for each rank], run in ``world`` spawned CPU processes with a gloo process group
    (one torch thread each). A child's exception is re-raised here as a RuntimeError with its rank and
    traceback text; a child that dies without a result, or no result within ``timeout`` seconds, also raises
    (the other children are terminated). ``fn`` must be a module-level function; return numpy / python values
    (a tensor would travel as shared memory the exiting child frees)."""
    import queue
    import time

    import torch.multiprocessing as mp
    from detectron2.engine.launch import _find_free_port

    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), _find_free_port()
    procs = [ctx.Process(target=_process_entry, args=(r, world, port, q, fn, args), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    got, dead_before, deadline = {}, set(), time.monotonic() + timeout
    try:
        while len(got) < world:
            try:
                rank, ok, res = q.get(timeout=1)
            except queue.Empty:
                missing = [r for r in range(world) if r not in got]
                dead = {r for r in missing if procs[r].exitcode is not None}
                if dead & dead_before:  # (exited before an empty poll: nothing of it is left in the queue)
                    r = min(dead & dead_before)
                    raise RuntimeError(f"{fn.__name__}: rank {r} of {world} exited with code {procs[r].exitcode} "
                                       f"without a result (killed, out of memory, a crash in native code, or "
                                       f"a result that cannot be pickled: see the child's stderr)")
                dead_before = dead
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__}: no result from rank(s) {missing} of {world} after {timeout} s "
                                       f"(a collective that another rank never reached?)")
                continue
            if not ok:
                raise RuntimeError(f"{fn.__name__} failed in rank {rank} of {world}:\n{res}")
            got[rank] = res
        for p in procs:
            p.join(60)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(10)
    return [got[r] for r in range(world)]
