"""snapshotd for PyTorch Lightning: snapshots every N steps on every rank, resume from the
daemons' memory, exact at an epoch boundary too.

Three lines in a Lightning script (``pip install 'snapshotd-client[lightning]'``)::

    from snapshotd_client.lightning import SnapshotdCallback
    trainer = L.Trainer(strategy="ddp", callbacks=[snap := SnapshotdCallback()])
    trainer.fit(model, datamodule, ckpt_path=snap.resume_path())   # None: nothing held

Every ``every_n_steps`` optimizer steps each rank snapshots Lightning's whole checkpoint
(``dump_checkpoint()``: model, optimizers, schedulers, loops, callbacks, precision plugin,
hyperparameters) with this callback's own state in it: the rank's RNG states and the data
position (the sampler's epoch and the batches of it already seen). :meth:`resume_path` (a
collective: every rank calls it, before ``fit``) agrees on the newest step every rank holds,
reads it from the node's daemon and returns ``"snapshotd:<step>"``; the callback's ``setup``
hook puts :class:`SnapshotdCheckpointIO` in front of the strategy's ``checkpoint_io`` (the
public setter) so that Lightning's own resume loads that checkpoint from memory. Lightning
does not skip the batches already seen for an ordinary ``DataLoader`` and, resumed at an epoch
boundary, reads the next epoch with another order than its uninterrupted run; this callback
puts the sampler's epoch and position back itself (one pass of the loader's ``BatchSampler``)
and the RNG states where the uninterrupted run had them.

**Private Lightning API, pinned:** ``trainer._checkpoint_connector.dump_checkpoint()`` (the
public ``trainer.save_checkpoint`` writes on rank 0 only) and ``trainer.fit_loop._data_fetcher``
(its iterator is built again after the RNG states are back). Tested with lightning 2.6.6
(torch 2.13, CPU, DDP on gloo); the extra pins ``lightning>=2.6.6,<2.7``.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins.io import CheckpointIO
except ImportError as exc:  # pragma: no cover - the optional extra
    raise ImportError("snapshotd_client.lightning needs lightning: pip install "
                      "'snapshotd-client[lightning]'") from exc

from ._client import SnapshotClient, SnapshotError, restore_agreed
from ._training import _distributed, capture_rng, restore_rng

__all__ = ["SnapshotdCallback", "SnapshotdCheckpointIO", "PREFIX", "TESTED"]

log = logging.getLogger("snapshotd_client")

#: ``ckpt_path`` of a checkpoint held by the daemons: ``"snapshotd:<step>"``.
PREFIX = "snapshotd:"
#: The Lightning minor versions this module was tested with (it touches private API).
TESTED = ("2.6",)

if not pl.__version__.startswith(tuple(v + "." for v in TESTED)):  # pragma: no cover
    log.warning("snapshotd_client.lightning was tested with lightning %s and uses private "
                "Lightning API; lightning %s is installed: check a resume before relying on it",
                "/".join(TESTED), pl.__version__)


class SnapshotdCheckpointIO(CheckpointIO):  # type: ignore[misc]
    """The strategy's ``checkpoint_io`` with ``"snapshotd:<step>"`` paths loaded from the
    daemons' memory (the checkpoint :meth:`SnapshotdCallback.resume_path` read); every other
    path, and every save and removal, goes to the wrapped ``CheckpointIO``.

    The callback installs it in its ``setup`` hook. Other paths are the wrapped one's:

    >>> import os, tempfile, torch
    >>> from lightning.pytorch.plugins.io import TorchCheckpointIO
    >>> io = SnapshotdCheckpointIO(TorchCheckpointIO(), SnapshotdCallback(job="doc"))
    >>> path = os.path.join(tempfile.mkdtemp(), "a.ckpt")
    >>> io.save_checkpoint({"w": torch.ones(2)}, path)
    >>> io.load_checkpoint(path)["w"]
    tensor([1., 1.])
    >>> io.load_checkpoint("snapshotd:3")      # not what resume_path() read
    Traceback (most recent call last):
    ...
    snapshotd_client._channel.SnapshotError: ckpt_path='snapshotd:3': this callback's ...
    """

    def __init__(self, inner: CheckpointIO, callback: SnapshotdCallback) -> None:
        self.inner = inner
        self.callback = callback

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if isinstance(path, str) and path.startswith(PREFIX):
            return self.callback._take_checkpoint(path)
        return self.inner.load_checkpoint(path, map_location=map_location,
                                          weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


class _ResumeSampler(torch.utils.data.Sampler[int]):
    """For one pass in place of a ``BatchSampler``'s sampler: sets the wrapped sampler's epoch
    to the saved one, skips the indices already seen, then puts the wrapped sampler back."""

    def __init__(self, batch_sampler: Any, epoch: int, skip: int) -> None:
        self.batch_sampler = batch_sampler
        self.inner = batch_sampler.sampler
        self.epoch = epoch
        self.skip = skip

    def set_epoch(self, epoch: int) -> None:
        """Lightning's epoch for the resumed pass is ignored: the saved one is used."""

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[int]:
        self.batch_sampler.sampler = self.inner          # later epochs: Lightning's as ever
        if callable(getattr(self.inner, "set_epoch", None)):
            self.inner.set_epoch(self.epoch)
        it = iter(self.inner)
        for _ in itertools.islice(it, self.skip):
            pass
        return it


class SnapshotdCallback(Callback):  # type: ignore[misc]
    """Snapshot Lightning's training state every ``every_n_steps`` optimizer steps, on every
    rank, and resume from the daemons' memory.

    Args:
        job: the job name (default ``$SNAPSHOTD_JOB``, else torchrun's run id).
        every_n_steps: snapshot after every this many optimizer steps (default 1).
        client: a :class:`~snapshotd_client.SnapshotClient` to use (default: one made from
            the environment at the first use, ``job`` given).

    Saves never raise into training: a failure fails that save's future, is logged and
    counted (``callback.client.stats()``); training goes on.

    Example (under torchrun, a daemon on the node)::

        snap = SnapshotdCallback(every_n_steps=10)
        trainer = L.Trainer(max_epochs=3, strategy="ddp", callbacks=[snap])
        trainer.fit(model, datamodule, ckpt_path=snap.resume_path())
        print(snap.restored_step)          # None: a fresh start
    """

    def __init__(self, job: str | None = None, every_n_steps: int = 1, *,
                 client: SnapshotClient | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: must be 1 or more")
        self.job = job
        self.every_n_steps = every_n_steps
        self._client = client
        self._checkpoint: dict[str, Any] | None = None   # read by resume_path, until loaded
        self._pending: dict[str, Any] | None = None      # position and RNG to put back
        self._rng_at_first_batch: Mapping[str, Any] | None = None
        self._position = {"epoch": 0, "batches": 0}      # the next batch's, kept up to date
        self._last_saved = -1
        self._protected: set[int] = set()
        #: The step :meth:`resume_path` restored (None: nothing held, or not called).
        self.restored_step: int | None = None

    @property
    def client(self) -> SnapshotClient:
        if self._client is None:
            self._client = SnapshotClient(job=self.job)
        return self._client

    # ------------------------------------------------------------------ resume

    def resume_path(self, backend: str | None = None) -> str | None:
        """Read the newest step every rank holds from this node's daemon and return its
        ``ckpt_path`` for ``trainer.fit`` (``"snapshotd:<step>"``), or None when the daemons
        hold nothing of the job (a fresh start). A collective: call it on every rank, before
        ``fit``. Lightning chooses the checkpoint before any hook runs, so the ranks agree
        here: where the process group is not started yet and the launcher names several ranks
        (``WORLD_SIZE`` > 1), it is started from torchrun's environment with ``backend``
        (default: torch's choice, gloo for CPU tensors and NCCL for CUDA ones); Lightning's
        strategy then finds it started and uses it."""
        import torch.distributed as dist

        client = self.client
        if not _distributed() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group(backend=backend)
        agreed = restore_agreed(client)
        if agreed is None:
            return None
        step, checkpoint = agreed
        if "pytorch-lightning_version" not in checkpoint:
            raise SnapshotError(f"job {client.job!r} step {step}: the daemon holds a snapshot "
                                "that is not a Lightning checkpoint (another trainer's?); name "
                                "this job differently (SnapshotdCallback(job=...))")
        self._checkpoint = checkpoint
        self.restored_step = step
        log.info("job %r rank %d: resuming Lightning from step %d of the daemon's memory",
                 client.job, client.rank, step)
        return f"{PREFIX}{step}"

    def _take_checkpoint(self, path: str) -> dict[str, Any]:
        if self._checkpoint is None or f"{PREFIX}{self.restored_step}" != path:
            raise SnapshotError(f"ckpt_path={path!r}: this callback's resume_path() did not "
                                "read that step; pass ckpt_path=snap.resume_path() to fit")
        checkpoint, self._checkpoint = self._checkpoint, None
        return checkpoint

    # ------------------------------------------------------------------ Lightning state

    def state_dict(self) -> dict[str, Any]:
        """This rank's data position and RNG states, in every checkpoint Lightning makes."""
        return {"position": dict(self._position), "rng": capture_rng()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, SnapshotdCheckpointIO):
            trainer.strategy.checkpoint_io = SnapshotdCheckpointIO(io, self)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        position, rng = pending["position"], pending["rng"]
        self._position = dict(position)
        epoch, skip = int(position["epoch"]), int(position["batches"])
        fit_loop = trainer.fit_loop
        combined = fit_loop._combined_loader
        for loader in (combined.flattened if combined is not None else []):
            batch_sampler = getattr(loader, "batch_sampler", None)
            if batch_sampler is None or not hasattr(batch_sampler, "sampler") or (
                    skip and not isinstance(getattr(batch_sampler, "batch_size", None), int)):
                log.warning("SnapshotdCallback: the training DataLoader has no BatchSampler "
                            "(%s); its epoch and position are not put back, the resumed run "
                            "may read other batches", type(batch_sampler).__name__)
                continue
            skip_indices = skip * batch_sampler.batch_size if skip else 0
            batch_sampler.sampler = _ResumeSampler(batch_sampler, epoch, skip_indices)
        if skip:
            # Mid-epoch: the uninterrupted run built this epoch's iterator before the RNG
            # states were saved; they go back at the first batch, after it is built.
            self._rng_at_first_batch = rng
            self._rebuild_iterator(trainer)
        else:
            # At an epoch boundary the uninterrupted run built the next epoch's iterator (it
            # draws its seed from torch's RNG) after the states saved: back first, then built.
            restore_rng(rng)
            self._rebuild_iterator(trainer)

    @staticmethod
    def _rebuild_iterator(trainer: pl.Trainer) -> None:
        fetcher = trainer.fit_loop._data_fetcher
        if fetcher is not None:
            iter(fetcher)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        rng, self._rng_at_first_batch = self._rng_at_first_batch, None
        if rng is not None:
            restore_rng(rng)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        epoch, seen = trainer.current_epoch, batch_idx + 1
        if seen >= trainer.num_training_batches:
            self._position = {"epoch": epoch + 1, "batches": 0}
        else:
            self._position = {"epoch": epoch, "batches": seen}
        step = trainer.global_step
        if step == self._last_saved or step % self.every_n_steps:
            return                                      # no optimizer step, or not this one
        self._last_saved = step
        client = self.client
        try:
            for optimizer in trainer.optimizers:
                if id(optimizer) not in self._protected:
                    client.protect(optimizer, pl_module)
                    self._protected.add(id(optimizer))
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        except Exception as exc:  # noqa: BLE001 - counted and logged, never into the step
            client._refused(step, SnapshotError(
                f"step {step} not saved: Lightning's checkpoint could not be gathered: "
                f"{type(exc).__name__}: {exc}; training goes on unprotected"), exc)
            return
        client.save(step, checkpoint)                   # never raises; failures are counted

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._client is not None:
            self._client.wait()
