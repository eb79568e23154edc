"""Exactly resumable training data: a seeded sampler that can start mid-stream, and per-sample
augmentation seeds.

detectron2's ``TrainingSampler`` draws a new seed per run and the augmentation
RNG of each data worker restarts with it, so a resumed run sees other images
and other flips than the run it continues. Here:

* :class:`ResumableTrainingSampler` yields ``(index, position)`` from one
  infinite shuffled stream fixed by a seed; ``position`` counts samples of all
  processes; ``start`` (set on resume to iteration x total batch) skips what
  was consumed. Process ``r`` of ``W`` takes positions ``p % W == r``.
* :class:`ReseededMapDataset` maps sample ``(index, position)`` with python,
  numpy and torch RNGs seeded from ``(seed, position)`` (the caller's RNG state
  is restored afterwards), so augmentation depends on the position only, not
  on which worker or run produced it.

Exact when every batch holds consecutive positions: always with
``DATALOADER.ASPECT_RATIO_GROUPING False`` or a single aspect-ratio group (all
images landscape, or all portrait); with mixed groups the batches a group
buffer held at the checkpoint are re-formed differently.
"""
import random

import numpy as np
import torch
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler


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


class ReseededMapDataset(Dataset):
    """``mapper(dicts[index])`` with the RNGs seeded from ``(seed, position)`` for sample ``(index, position)``."""

    def __init__(self, dicts, mapper, seed):
        self._dicts = DatasetFromList(dicts, copy=True)
        self._mapper, self._seed = mapper, int(seed)

    def __len__(self):
        return len(self._dicts)

    def __getitem__(self, key):
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
        return out


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
        self._stream = stream  #: (ResumableTrainingSampler, ReseededMapDataset) of the loader, or None

    def state_dict(self):
        return {
            "data_seed": self._stream[0]._seed if self._stream else None,
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
            sampler, dataset = self._stream
            sampler._seed = dataset._seed = state["data_seed"]
        if state.get("loss_normalizer") is not None:
            self._model.loss_normalizer = state["loss_normalizer"]
