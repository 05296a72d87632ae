"""snapshotd for the Hugging Face ``transformers.Trainer``: snapshots every N steps on every
rank, resume from the daemons' memory.

Three lines in a Trainer script (``pip install 'snapshotd-client[hf]'``)::

    from snapshotd_client.hf import SnapshotdCallback
    trainer = Trainer(model, args, train_dataset=data, callbacks=[snap := SnapshotdCallback()])
    trainer.train(resume_from_checkpoint=snap.resume(trainer))   # None: nothing held, fresh

Each rank's snapshot holds the model, the optimizer (the torch optimizer inside accelerate's
``AcceleratedOptimizer``), the learning-rate scheduler, the ``TrainerState`` (global step,
epoch, log history) and the rank's RNG states. :meth:`SnapshotdCallback.resume` (a collective:
every rank calls it) agrees on the newest step every rank holds, reads it from the node's
daemon and lays it out as the Trainer's own checkpoint directory in this rank's memory
(``/dev/shm``; per rank, removed after the first resumed step), so that the Trainer's own
resume does the rest through its public ``resume_from_checkpoint``: it skips the batches
already seen in the epoch, sets the sampler's epoch and puts the RNG states back where its
uninterrupted run would have had them (at an epoch boundary, before the epoch's data order is
drawn). No private Trainer API is touched.

Tested with transformers 5.25.0 and accelerate 1.16.0 (torch 2.13, CPU, DDP on gloo).

accelerate loops without the Trainer use :class:`~snapshotd_client.TrainingState` directly
(``AcceleratedOptimizer`` is looked through); :class:`EpochLoader` puts the epoch that
``DataLoaderShard.state_dict()`` omits into the snapshot.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

try:
    from transformers import TrainerCallback, TrainerState
except ImportError as exc:  # pragma: no cover - the optional extra
    raise ImportError("snapshotd_client.hf needs transformers: pip install "
                      "'snapshotd-client[hf]'") from exc

from ._adapters import register_type
from ._client import SnapshotClient, restore_agreed
from ._training import TrainingState, unwrap_optimizer

__all__ = ["SnapshotdCallback", "EpochLoader"]

log = logging.getLogger("snapshotd_client")

# The TrainerState (a dataclass of plain values) is held as its fields.
register_type(TrainerState, dataclasses.asdict, lambda d: TrainerState(**d),
              name="transformers.TrainerState")


class _Holder:
    """The Trainer's state as an ``extra`` object of :class:`TrainingState`."""

    def __init__(self) -> None:
        self.state: TrainerState | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"trainer_state": self.state}

    def load_state_dict(self, value: Mapping[str, Any]) -> None:
        self.state = value["trainer_state"]


class SnapshotdCallback(TrainerCallback):  # type: ignore[misc]
    """Snapshot the Trainer's training state every ``every_n_steps`` optimizer steps.

    Args:
        job: the job name (default ``$SNAPSHOTD_JOB``, else torchrun's run id).
        every_n_steps: snapshot after every this many optimizer steps (default 1).
        client: a :class:`~snapshotd_client.SnapshotClient` to use (default: one made from
            the environment at the first use, ``job`` given).

    Saves never raise into training: a failure fails that save's future, is logged once and
    counted (``callback.client.stats()``); training goes on.
    """

    def __init__(self, job: str | None = None, every_n_steps: int = 1, *,
                 client: SnapshotClient | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: must be 1 or more")
        self.job = job
        self.every_n_steps = every_n_steps
        self._client = client
        self._state: TrainingState | None = None
        self._holder = _Holder()
        self._resume_dir: str | None = None
        #: The step :meth:`resume` restored (None: nothing held, or not called).
        self.restored_step: int | None = None

    @property
    def client(self) -> SnapshotClient:
        if self._client is None:
            self._client = SnapshotClient(job=self.job)
        return self._client

    # ------------------------------------------------------------------ resume

    def resume(self, trainer: Any) -> str | None:
        """Restore the newest step every rank holds into a per-rank checkpoint directory in
        memory and return its path for ``trainer.train(resume_from_checkpoint=...)``; None
        when the daemons hold nothing of the job (a fresh start). A collective: call it on
        every rank, after the Trainer is built (it starts the process group)."""
        client = self.client
        agreed = restore_agreed(client)
        if agreed is None:
            return None
        step, state = agreed
        args = trainer.args
        directory = tempfile.mkdtemp(prefix=f"snapshotd-hf-{client.job}-{client.rank}-",
                                     dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        _write_checkpoint(directory, state, args.world_size, args.process_index)
        self._resume_dir = directory
        self.restored_step = step
        log.info("job %r rank %d: resuming the Trainer from step %d of the daemon's memory",
                 client.job, client.rank, step)
        return directory

    # ------------------------------------------------------------------ hooks

    def on_step_end(self, args: Any, state: TrainerState, control: Any, **kw: Any) -> None:
        if self._resume_dir is not None:        # the Trainer has read it (RNG: first step)
            shutil.rmtree(self._resume_dir, ignore_errors=True)
            self._resume_dir = None
        if state.global_step % self.every_n_steps:
            return
        training = self._training(kw)
        if training is None:
            return
        self._holder.state = state
        training.save(self.client, state.global_step)       # never raises

    def on_train_end(self, args: Any, state: TrainerState, control: Any, **kw: Any) -> None:
        if self._client is not None:
            self._client.wait()

    def _training(self, kw: Mapping[str, Any]) -> TrainingState | None:
        if self._state is None:
            model, optimizer = kw.get("model"), kw.get("optimizer")
            if model is None or optimizer is None:
                log.warning("SnapshotdCallback: the Trainer passed no model or optimizer; "
                            "nothing is snapshotted")
                return None
            self._state = TrainingState(model, unwrap_optimizer(optimizer),
                                        kw.get("lr_scheduler"),
                                        extra={"trainer": self._holder})
        return self._state


def _write_checkpoint(directory: str, state: Mapping[str, Any], world: int, index: int) -> None:
    """Lay a TrainingState snapshot out as the Trainer's checkpoint directory."""
    # The file names of transformers.trainer (WEIGHTS_NAME, OPTIMIZER_NAME, ...).
    torch.save(state["model"], os.path.join(directory, "pytorch_model.bin"))
    torch.save(state["optimizer"], os.path.join(directory, "optimizer.pt"))
    if "scheduler" in state:
        torch.save(state["scheduler"], os.path.join(directory, "scheduler.pt"))
    trainer_state = state["extra"]["trainer"]["trainer_state"]
    with open(os.path.join(directory, "trainer_state.json"), "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(trainer_state), f)
    torch.save(_hf_rng(state["rng"]), os.path.join(
        directory, "rng_state.pth" if world <= 1 else f"rng_state_{index}.pth"))


def _hf_rng(rng: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`~snapshotd_client.capture_rng`'s dict in the Trainer's ``rng_state.pth`` form."""
    import numpy as np

    py = rng["python"]
    out: dict[str, Any] = {"python": (py[0], tuple(py[1]), py[2]),
                           "cpu": torch.as_tensor(rng["torch"], dtype=torch.uint8)}
    n = rng.get("numpy")
    if n is not None:
        out["numpy"] = (n["kind"], np.asarray(n["keys"], dtype=np.uint32), int(n["pos"]),
                        int(n["has_gauss"]), float(n["cached_gaussian"]))
    else:
        out["numpy"] = np.random.get_state()
    if "cuda" in rng:
        out["cuda"] = [torch.as_tensor(s, dtype=torch.uint8) for s in rng["cuda"]]
    return out


class EpochLoader:
    """The position of an accelerate-prepared data loader for :class:`TrainingState`:
    ``DataLoaderShard.state_dict()`` (and a plain loader) with the epoch, which accelerate's
    own state dict omits; loading sets the epoch back (``set_epoch``) before the position.

    Example, in an accelerate loop::

        loader = accelerator.prepare(DataLoader(data, batch_size=8, shuffle=True))
        position = EpochLoader(loader)
        state = TrainingState(model, optimizer, scheduler, data=position)
        for epoch in range(position.epoch, epochs):
            position.set_epoch(epoch)
            for batch in loader: ...
    """

    def __init__(self, loader: Any, epoch: int = 0) -> None:
        self.loader = loader
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        inner = self.loader.state_dict() if hasattr(self.loader, "state_dict") else {}
        return {"epoch": self.epoch, "loader": dict(inner)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.set_epoch(int(state["epoch"]))
        if state.get("loader") and hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(state["loader"])
