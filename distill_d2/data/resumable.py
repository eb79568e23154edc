"""Exactly resumable training data: seeded batches that are a pure function of (seed, batch number),
aspect-ratio grouping included, and per-sample augmentation seeds.

detectron2's ``TrainingSampler`` draws a new seed per run and the augmentation
RNG of each data worker restarts with it, so a resumed run sees other images
and other flips than the run it continues; its ``AspectRatioGroupedDataset``
holds samples in per-orientation buckets across batch boundaries, so the
samples consumed after ``k`` iterations are not the first ``k x batch``. Here:

* :class:`ResumableTrainingSampler` yields ``(index, position)`` from one
  infinite shuffled stream fixed by a seed; ``position`` counts samples of all
  processes; ``start`` skips what was consumed. Process ``r`` of ``W`` takes
  positions ``p % W == r`` (as ``TrainingSampler`` shards).
* :class:`ResumableBatchSampler` forms this process's batches from it. With
  aspect-ratio grouping it does what ``AspectRatioGroupedDataset`` does
  (bucket ``0 if width > height else 1``, a batch when a bucket is full), on
  the indices, with the dataset dicts' ``width``/``height``, which are the
  values ``DatasetMapper`` passes through (checked equal to the decoded image)
  and detectron2 groups by; ``start`` (the resumed iteration) skips that many
  batches, replaying the index stream from the beginning to refill the buckets
  (integers only: about 1 s per million samples).
* :class:`ReseededMapDataset` maps sample ``(index, position)`` with python,
  numpy and torch RNGs seeded from ``(seed, position)`` (the caller's RNG state
  is restored afterwards), so augmentation depends on the position only, not
  on which worker or run produced it.

Limits: grouping is by the dataset dicts' sizes (a dict without them: the
image file's header, EXIF rotation applied); a custom mapper that changes
``width``/``height`` to another orientation is warned about once (its batches
may mix orientations: more padding, still exact). The batches are what
``AspectRatioGroupedDataset`` makes of the same sample stream with
``NUM_WORKERS 0``; with data workers detectron2 interleaves the workers'
samples before grouping, here the batches are formed first and the workers
map whole batches, in order (the same batches for any ``NUM_WORKERS``).
"""
import logging
import operator
import random

import numpy as np
import torch
from detectron2.data.common import DatasetFromList, ToIterableDataset
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DistillConfigError
from .images import image_size

logger = logging.getLogger(__name__)


class ResumableTrainingSampler(Sampler):
    """Infinite shuffled stream of ``(index, position)`` pairs, fixed by ``seed``, starting at ``start``."""

    def __init__(self, size, seed, shuffle=True):
        self._size, self._seed, self._shuffle = int(size), int(seed), shuffle
        self._rank, self._world = comm.get_rank(), comm.get_world_size()
        self.start = 0

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self._seed)
        pos = 0
        while True:
            order = torch.randperm(self._size, generator=g).tolist() if self._shuffle else range(self._size)
            if pos + self._size <= self.start:  # a whole epoch already consumed: only advance the generator
                pos += self._size
                continue
            for idx in order:
                if pos >= self.start and pos % self._world == self._rank:
                    yield idx, pos
                pos += 1


def aspect_ratio_groups(dicts):
    """detectron2's aspect-ratio group of each dataset dict: 0 if ``width > height`` else 1
    (``AspectRatioGroupedDataset``, which reads the mapped dict's ``width``/``height``, i.e. these)."""
    groups = []
    for d in dicts:
        if "width" in d and "height" in d:
            w, h = d["width"], d["height"]
        else:  # DatasetMapper fills them from the decoded image
            size = image_size(d["file_name"])
            if size is None:
                raise FileNotFoundError(f"Cannot read the size of image {d['file_name']} (needed for "
                                        "DATALOADER.ASPECT_RATIO_GROUPING): missing or not an image.")
            w, h = size
        groups.append(0 if w > h else 1)
    return groups


class ResumableBatchSampler(Sampler):
    """This process's batches (lists of ``(index, position)``) of a :class:`ResumableTrainingSampler`,
    grouped by ``groups[index]`` when given (``AspectRatioGroupedDataset``'s rule, on indices); starts at
    batch ``start``."""

    def __init__(self, sampler, batch_size, groups=None):
        self.sampler, self.batch_size = sampler, int(batch_size)
        #: one group id per dataset index, or None (a single group: consecutive samples)
        self.groups = list(groups) if groups is not None and len(set(groups)) > 1 else None
        self.start = 0

    def __iter__(self):
        bs = self.batch_size
        if self.groups is None:  # batch k = this process's samples k*bs .. (k+1)*bs-1: skip straight there
            self.sampler.start = self.start * bs * self.sampler._world
            it = iter(self.sampler)
            while True:
                yield [next(it) for _ in range(bs)]
        self.sampler.start = 0  # replay from the beginning: the buckets at batch ``start`` depend on all before
        buckets, n = {}, 0
        for key in self.sampler:
            bucket = buckets.setdefault(self.groups[key[0]], [])
            bucket.append(key)
            if len(bucket) == bs:
                if n >= self.start:
                    yield bucket[:]
                del bucket[:]
                n += 1


class ReseededMapDataset(Dataset):
    """``mapper(dicts[index])`` with the RNGs seeded from ``(seed, position)`` for sample ``(index, position)``;
    a list of such keys (a batch) maps to the list of samples."""

    def __init__(self, dicts, mapper, seed, groups=None):
        self._dicts = DatasetFromList(dicts, copy=True)
        self._mapper, self._seed = mapper, int(seed)
        self._groups, self._warned = groups, False  # groups: to check the mapper keeps each image's orientation

    def __len__(self):
        return len(self._dicts)

    def __getitem__(self, key):
        if isinstance(key, list):
            return [self[k] for k in key]
        idx, pos = key
        seed = (self._seed * 1_000_003 + pos) % 2**31
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        try:
            out = self._mapper(self._dicts[idx])
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
        if out is None:
            raise ValueError(f"The dataset mapper returned None for {self._dicts[idx].get('file_name')}.")
        if self._groups is not None and not self._warned and isinstance(out, dict) and "width" in out \
                and "height" in out and (0 if out["width"] > out["height"] else 1) != self._groups[idx]:
            self._warned = True
            logger.warning("The dataset mapper returned width %s, height %s for %s, another orientation than its "
                           "dataset dict, by which DATALOADER.ASPECT_RATIO_GROUPING batches it: such batches mix "
                           "orientations (more padding; resume stays exact).", out["width"], out["height"],
                           out.get("file_name"))
        return out


def build_resumable_train_loader(dicts, mapper, total_batch_size, seed, aspect_ratio_grouping, num_workers):
    """The training loader of ``DATALOADER.EXACT_RESUME``: like ``build_detection_train_loader`` (each process
    gets ``total_batch_size / W`` images per step, grouped by orientation when ``aspect_ratio_grouping``), with
    ``loader.resumable = (batch_sampler, dataset)``; set ``batch_sampler.start`` to the iteration to resume."""
    world = comm.get_world_size()
    if total_batch_size <= 0 or total_batch_size % world:
        raise DistillConfigError(f"SOLVER.IMS_PER_BATCH ({total_batch_size}) must be a positive multiple of the "
                                 f"number of processes ({world}): each process takes IMS_PER_BATCH / {world} images per iteration.")
    groups = aspect_ratio_groups(dicts) if aspect_ratio_grouping else None
    if groups is not None:
        logger.info("Aspect-ratio groups of the %d training images: %d landscape, %d portrait or square.",
                    len(groups), groups.count(0), groups.count(1))
    batches = ResumableBatchSampler(ResumableTrainingSampler(len(dicts), seed), total_batch_size // world, groups)
    dataset = ReseededMapDataset(dicts, mapper, seed, batches.groups)
    # seeded: the DataLoader's own generator (its base seed is otherwise drawn from torch's global RNG at the
    # first batch, which would shift the RPN/RoI sampling of a resumed run by one draw)
    generator = torch.Generator()
    generator.manual_seed(seed)
    from detectron2.data.build import worker_init_reset_seed

    # each worker maps whole batches (workers take batches round-robin; the loader returns them in order)
    loader = DataLoader(ToIterableDataset(dataset, batches), num_workers=num_workers,
                        collate_fn=operator.itemgetter(0), worker_init_fn=worker_init_reset_seed, generator=generator)
    loader.resumable = (batches, dataset)
    return loader


def _numpy_state(saved=None):
    """numpy's global RNG state as plain types + a tensor (checkpoints load with weights_only), or back."""
    if saved is None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    name, keys, pos, has_gauss, gauss = saved
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss


class TrainingState:
    """Checkpointable with what else a step depends on: the RNG states of the main process
    (python, numpy, torch CPU and CUDA: RPN/RoI sampling) and the model's non-tensor state
    (RetinaNet's ``loss_normalizer`` EMA). Saved by the main process; on resume process 0
    continues exactly, other processes get RNG states derived from it and their rank."""

    def __init__(self, model, stream=None):
        self._model = model
        self._stream = stream  #: (ResumableBatchSampler, ReseededMapDataset) of the loader, or None

    def state_dict(self):
        return {
            "data_seed": self._stream[0].sampler._seed if self._stream else None,
            "python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loss_normalizer": getattr(self._model, "loss_normalizer", None),
        }

    def load_state_dict(self, state):
        random.setstate(state["python"])
        np.random.set_state(_numpy_state(state["numpy"]))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        rank = comm.get_rank()
        if rank > 0:  # only process 0's states were saved: derive the others deterministically
            seed = (int(torch.randint(2**31 - 1, (1,)).item()) + 7919 * rank) % 2**31
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        if self._stream and state.get("data_seed") is not None:  # the stream the run started with
            batches, dataset = self._stream
            batches.sampler._seed = dataset._seed = state["data_seed"]
        if state.get("loss_normalizer") is not None:
            self._model.loss_normalizer = state["loss_normalizer"]
