"""Everything an exact resume needs, captured and restored in one place.

:class:`TrainingState` gathers the model, optimizer, learning-rate scheduler, every random number
generator a training script commonly draws from (torch CPU and CUDA, numpy, Python's
``random``, plus any extra ``torch.Generator``), the data-loader position and the step into one
nested dict that :class:`~snapshotd_client.SnapshotClient` can store, and puts all of it back.
A run resumed from that dict computes exactly what the uninterrupted run would have computed,
provided the rest of the script is deterministic (fixed seeds, data chosen by the saved position,
deterministic kernels).

Example (runs as is, without a daemon: the state is captured and loaded in memory)::

    >>> import copy, torch
    >>> from snapshotd_client import TrainingState
    >>> model = torch.nn.Linear(4, 2)
    >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    >>> scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    >>> position = {"epoch": 0, "offset": 0}          # your sampler's position, kept up to date
    >>> state = TrainingState(model, optimizer, scheduler, data=position)
    >>> def train_step():
    ...     model(torch.randn(8, 4)).pow(2).mean().backward()
    ...     optimizer.step(); optimizer.zero_grad(); scheduler.step()
    ...     position["offset"] += 8
    >>> train_step()
    >>> saved = copy.deepcopy(state.state_dict(step=0))  # state.save(client, 0) copies too
    >>> train_step(); expected = model.weight.detach().clone()
    >>> state.load(saved)                              # back to just after step 0
    0
    >>> position
    {'epoch': 0, 'offset': 8}
    >>> train_step(); torch.equal(model.weight, expected)   # same data, same update, same bits
    True

The same works unchanged when the model is sharded with FSDP2 (``fully_shard``), tensor
parallelism, FSDP x TP or HSDP: parameters and optimizer moments are ``DTensor`` objects, and
each rank stores and restores its own shards (see ``examples/train_fsdp.py``).

With a daemon, in a training loop (``client = SnapshotClient(job="gpt")``)::

    state = TrainingState(model, optimizer, scheduler, data=sampler)
    client.protect(optimizer)                  # optimizer.step() waits for copies in flight
    last = state.restore(client)               # all ranks agree on one step; None: fresh start
    for step in range(0 if last is None else last + 1, total_steps):
        train_one_step()
        state.save(client, step)               # asynchronous; never blocks on the daemon
    client.close()
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, MutableMapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol

import torch

from . import _replicas
from ._client import SnapshotError, agree_step, agree_token, log
from ._flatten import is_dtensor
from ._statedicts import DcpStateDicts

if TYPE_CHECKING:
    from ._client import SnapshotClient

try:  # numpy is optional: its global RNG is captured only when it is installed
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]

__all__ = ["TrainingState", "Stateful", "FORMAT", "STATE_DICTS", "agree_step", "capture_rng",
           "restore_rng", "unwrap_optimizer"]

#: Version of the dict layout written by :meth:`TrainingState.state_dict`.
FORMAT = 1
#: ``state_dicts=`` of :class:`TrainingState`: ``"module"`` takes ``model.state_dict()`` and
#: ``optimizer.state_dict()`` as they are (FSDP2 and tensor parallelism return DTensors there);
#: ``"dcp"`` goes through ``torch.distributed.checkpoint.state_dict``'s ``get_state_dict`` /
#: ``set_state_dict`` (optimizer state keyed by parameter name; FSDP1 and other wrappers).
STATE_DICTS = ("module", "dcp")
#: TrainingState._split_group's answer when replicated DTensors are split over their mesh
#: dimensions (each replica group of each tensor separately) rather than over a DDP group.
_DTENSORS = "dtensors"


class Stateful(Protocol):
    """Anything with ``state_dict()`` / ``load_state_dict()``: a sampler, a data loader, ..."""

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> Any: ...


DataPosition = MutableMapping[str, Any] | Stateful


def _skip_warm_up(optimizer: torch.optim.Optimizer) -> list[Any]:
    """Let DCP's ``set_state_dict`` load an optimizer that holds no state yet without its
    warm-up: with an empty ``optimizer.state`` it first runs a step with zero gradients to
    create the state it then overwrites with ``load_state_dict`` (0.8 s for a small FSDP2
    model in a new process: every DTensor op dispatched for the first time, and the first
    training step after it slower too). An empty entry per parameter makes it skip that step;
    ``load_state_dict`` replaces the whole state (the entries included), so what is loaded is
    the same, bit for bit, and an optimizer left with an empty entry treats it as no state
    (``len(state) == 0``). Returns the parameters given an entry."""
    if optimizer.state:
        return []
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param in params:
        optimizer.state[param] = {}
    return params


def _stateless(optim_state: Mapping[str, Any]) -> list[str]:
    """The parameters (their names) that a DCP optimizer state dict lists in its groups but
    holds no state of: the ones that had received no gradient when it was taken.

    >>> _stateless({"state": {"a.weight": {"step": 1}}, "param_groups": [
    ...     {"params": ["a.weight", "unused.weight"]}]})
    ['unused.weight']
    """
    held = optim_state.get("state", {})
    return [fqn for group in optim_state.get("param_groups", [])
            for fqn in group.get("params", []) if isinstance(fqn, str) and fqn not in held]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside optimizer wrappers: an object whose ``.optimizer`` is the
    optimizer it steps and whose own optimizer machinery was never set up, like accelerate's
    ``AcceleratedOptimizer`` (a ``torch.optim.Optimizer`` subclass that never ran
    ``Optimizer.__init__``, so it has no step hooks). A complete optimizer is returned as is.

    >>> class Wrapper(torch.optim.Optimizer):
    ...     def __init__(self, optimizer): self.optimizer = optimizer
    >>> inner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> unwrap_optimizer(Wrapper(Wrapper(inner))) is inner
    True
    """
    seen = 0
    while (not hasattr(optimizer, "_optimizer_step_pre_hooks")
           and getattr(optimizer, "optimizer", None) is not None and seen < 16):
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel/DataParallel wrapper (stable keys)."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


class TrainingState:
    """Capture and restore model, optimizer, scheduler, RNGs, data position, step and any other
    object with ``state_dict()`` / ``load_state_dict()``.

    Args:
        model: the model (a ``DistributedDataParallel`` wrapper is looked through, so the keys
            are the same with and without it).
        optimizer: optional optimizer; its state (moments, step counts, param groups with the
            current learning rate) is restored through ``load_state_dict``. A wrapper whose
            ``.optimizer`` is the torch optimizer (accelerate's ``AcceleratedOptimizer``) is
            looked through.
        scheduler: optional learning-rate scheduler (anything with ``state_dict``).
        data: optional data position. Either a mutable dict that the script keeps up to date
            (e.g. ``{"epoch": 3, "offset": 1024}``; it is updated in place on load) or an
            object with ``state_dict()``/``load_state_dict()`` such as a stateful sampler.
            Its values must be plain (int, float, str, bool, None, bytes, list, tuple, dict)
            or tensors/numpy arrays.
        generators: optional named extra ``torch.Generator`` objects (e.g. the generator a
            ``DataLoader`` shuffles with) whose states are captured too.
        rng: capture and restore the global RNGs (torch CPU, CUDA when available, numpy,
            Python ``random``). Default True.
        extra: other objects the script keeps, by name, each with ``state_dict()`` and
            ``load_state_dict()``: a ``torch.amp.GradScaler`` (fp16 training resumes with the
            same loss scale), EMA weights, a stateful data loader, a second optimizer, ...
            Their state dicts may hold tensors (DTensors too), numpy arrays and plain values;
            EMA tensors and anything else not guarded by ``protect()`` are copied at ``save()``.
        split_replicas: store each replicated tensor on one rank of its replica group only,
            where every rank's daemon codes its data across nodes (``m > 0``): each of the
            ``d`` replicas stores about ``1/d`` (default True; False: every rank stores
            everything). With ``model`` a ``DistributedDataParallel`` (pass the wrapper) the
            replicas are the DDP group and every tensor of the model and optimizer state is
            dealt out; with DTensors (HSDP's replicate dimension, a tensor-parallel
            ``Replicate()`` bias) each DTensor replicated over a mesh dimension is dealt out
            among the ranks of that dimension. Decided once, at the first save, with one
            ``all_reduce``; a restore (into fresh tensors, then loaded) gathers the shares
            with one broadcast per rank and group. Where a node loss would lose the only copy
            of a share (a daemon with ``m = 0``) every rank stores everything, and that is
            logged.
        state_dicts: ``"module"`` (default): the model's and optimizer's own ``state_dict()``
            and ``load_state_dict()``, as DDP, FSDP2 (``fully_shard``) and tensor parallelism
            return them (DTensors for sharded parameters and moments). ``"dcp"``: through
            ``torch.distributed.checkpoint.state_dict.get_state_dict`` / ``set_state_dict``
            (optimizer state keyed by parameter name, as DCP checkpoints hold it).

    **Sharded state.** With FSDP2, tensor parallelism, 2-D meshes (FSDP x TP) and HSDP the
    model's and optimizer's tensors are DTensors; each rank stores its local shards with
    their place in the global tensors, and :meth:`restore` (same world size and meshes) fills
    the model's shards in place and rebuilds the optimizer's on the model's meshes, bit for bit.

    The dict returned by :meth:`state_dict` holds references to live tensors (parameters,
    optimizer moments). :meth:`save` hands it to the client after ``client.protect(optimizer,
    model)``, so parameters and optimizer state are copied in the background while
    ``optimizer.step()`` waits for that copy, and everything else (buffers, which the next
    forward changes in place) is copied at once. :meth:`restore` checks the whole snapshot
    against the model, optimizer, scheduler, data position and generators before it writes
    anything: a snapshot that does not fit raises and leaves all of them unchanged.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 scheduler: Any | None = None, data: DataPosition | None = None, *,
                 generators: Mapping[str, torch.Generator] | None = None,
                 rng: bool = True, extra: Mapping[str, Stateful] | None = None,
                 state_dicts: str = "module", split_replicas: bool = True) -> None:
        if state_dicts not in STATE_DICTS:
            raise ValueError(f"state_dicts={state_dicts!r}: choose one of {STATE_DICTS}")
        self.split_replicas = split_replicas
        self._split: Any = False          # False: not decided yet; None: whole; else a group
        self.model = model
        # accelerate's AcceleratedOptimizer and other wrappers: the optimizer they step.
        self.optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        self.scheduler = scheduler
        self.data = data
        self.generators = dict(generators or {})
        self.rng = rng
        self.state_dicts = state_dicts
        self._dcp = DcpStateDicts()
        #: Seconds the last :meth:`restore` spent: ``wait`` (saves in flight), ``agree`` (the
        #: ranks agreeing on a step), ``load`` (reading, checking, gathering split replicas
        #: and loading into the objects); the time-to-resume breakdown of the demo uses them.
        self.last_restore_seconds: dict[str, float] = {}
        self.extra: dict[str, Stateful] = dict(extra or {})
        for name, obj in self.extra.items():
            if not isinstance(name, str):
                raise TypeError(f"extra: names must be strings, got {name!r}")
            missing = [m for m in ("state_dict", "load_state_dict")
                       if not callable(getattr(obj, m, None))]
            if missing:
                methods = " or ".join(m + "()" for m in missing)
                raise TypeError(f"extra[{name!r}]: a {type(obj).__name__} has no {methods}; "
                                "pass objects with both (wrap anything else in a small class "
                                "that has them)")

    # ------------------------------------------------------------------ capture

    def state_dict(self, step: int) -> dict[str, Any]:
        """Everything needed to resume right after ``step``, as a snapshot-able nested dict."""
        state: dict[str, Any] = {"format": FORMAT, "step": int(step),
                                 "state_dicts": self.state_dicts}
        if _distributed():
            import torch.distributed as dist

            state["world"] = dist.get_world_size()   # an elastic restore checks its layout
        if self.state_dicts == "dcp":
            # DCP's get_state_dict / get_model_state_dict, with its FQN mapping kept per
            # structure (the same dicts; _statedicts.py)
            model_state, optim_state = self._dcp.get(_unwrap(self.model), self.optimizer)
            state["model"] = model_state
            if self.optimizer is not None:
                state["optimizer"] = optim_state
        else:
            state["model"] = _unwrap(self.model).state_dict()
            if self.optimizer is not None:
                state["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.data is not None:
            state["data"] = self._data_state()
        if self.rng:
            state["rng"] = capture_rng()
        if self.generators:
            state["generators"] = {name: g.get_state() for name, g in self.generators.items()}
        if self.extra:
            state["extra"] = {name: obj.state_dict() for name, obj in self.extra.items()}
        return state

    def _data_state(self) -> dict[str, Any]:
        data = self.data
        if isinstance(data, MutableMapping):
            return dict(data)
        assert data is not None
        return dict(data.state_dict())

    # ------------------------------------------------------------------ restore

    def load(self, state: Mapping[str, Any]) -> int:
        """Put every captured piece back; return the step the state was captured after.

        Tensors restored by ``SnapshotClient.restore`` are CPU tensors; ``load_state_dict``
        copies them into the live model (on whatever device it is) and the optimizer.
        """
        self.check(state)
        # As the dict was captured (a resharded restore hands DCP's dicts to any state).
        if state.get("state_dicts", self.state_dicts) == "dcp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
                set_state_dict,
            )

            if self.optimizer is not None:
                # A parameter that had no optimizer state when saved (it never got a
                # gradient: an unused layer, an expert no token reached) has none after the
                # restore either, as in the run that saved it. DCP's strict load refuses such
                # a state dict ("Missing optimizer state"). Its check is lifted only where the
                # snapshot's parameter groups name exactly the parameters of the optimizer's
                # groups (so every parameter without state in it is one that had none when
                # saved); any other snapshot is left to DCP's strict load to refuse (review of
                # session 11, F1: an optimizer over other parameters was loaded).
                stateless = _stateless(state["optimizer"])
                if stateless and not self._same_groups(state["optimizer"]):
                    stateless = []
                placeholders = _skip_warm_up(self.optimizer)
                try:
                    if stateless:
                        log.info("parameters without optimizer state in the snapshot (no "
                                 "gradient before it was taken), restored without: %s",
                                 stateless[:8])
                        set_model_state_dict(_unwrap(self.model), state["model"])
                        set_optimizer_state_dict(_unwrap(self.model), self.optimizer,
                                                 state["optimizer"],
                                                 options=StateDictOptions(strict=False))
                    else:
                        set_state_dict(_unwrap(self.model), self.optimizer,
                                       model_state_dict=state["model"],
                                       optim_state_dict=state["optimizer"])
                except BaseException:
                    for param in placeholders:          # as they were (none held state)
                        if not self.optimizer.state.get(param):
                            self.optimizer.state.pop(param, None)
                    raise
            else:
                set_model_state_dict(_unwrap(self.model), state["model"])
        else:
            _unwrap(self.model).load_state_dict(state["model"])
            if self.optimizer is not None:
                self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            if "scheduler" not in state:
                raise KeyError("the snapshot holds no scheduler state")
            self.scheduler.load_state_dict(state["scheduler"])
        if self.data is not None:
            if "data" not in state:
                raise KeyError("the snapshot holds no data position")
            self._load_data(state["data"])
        if self.rng and "rng" in state:
            restore_rng(state["rng"])
        for name, gen in self.generators.items():
            gen.set_state(state["generators"][name])
        for name, obj in self.extra.items():
            obj.load_state_dict(state["extra"][name])
        return int(state["step"])

    def _same_groups(self, optim_state: Mapping[str, Any]) -> bool:
        """Whether a DCP optimizer state dict's parameter groups name the parameters of this
        optimizer's groups, group by group (every name DCP gives a parameter, tied ones
        included); False when a name cannot be told."""
        from ._statedicts import _dcp

        dsd = _dcp()
        if dsd is None or self.optimizer is None:
            return False
        model = _unwrap(self.model)
        names: dict[int, set[str]] = {}
        for key, param in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), set()).update(dsd._get_fqns(model, key))
        live = []
        for group in self.optimizer.param_groups:
            if any(id(param) not in names for param in group["params"]):
                return False
            live.append(set().union(*(names[id(param)] for param in group["params"])))
        saved = [set(g.get("params", ())) for g in optim_state.get("param_groups", ())]
        return live == saved

    def _load_data(self, value: Mapping[str, Any]) -> None:
        data = self.data
        if isinstance(data, MutableMapping):
            data.clear()
            data.update(value)
        elif data is not None:
            data.load_state_dict(value)

    # ------------------------------------------------------------------ with a client

    def save(self, client: SnapshotClient, step: int) -> Future:
        """Snapshot the state after ``step`` through ``client`` (asynchronous, never raises).

        Whatever fails while the state is gathered (``protect``, a ``state_dict()`` of the
        scheduler, data position or an extra object, DCP's state dicts) fails the returned
        future instead of the training step: counted in ``client.stats()``, the first one
        logged as a warning, training goes on unprotected."""
        try:
            return self._save(client, step)
        except Exception as exc:  # noqa: BLE001 - carried by the future, never raised
            return client._refused(step, SnapshotError(
                f"step {step} not saved: gathering the training state failed: "
                f"{type(exc).__name__}: {exc}; training goes on unprotected until the cause "
                "is fixed"), exc)

    def _save(self, client: SnapshotClient, step: int) -> Future:
        # First: the first save's split decision is a collective, which every rank must reach
        # even where gathering its state then fails (and training goes on).
        split = self._split_group(client)
        if self.optimizer is not None:
            client.protect(self.optimizer, _unwrap(self.model))   # idempotent
        # Parameters that a forward renormalises in place are copied at save() too.
        changed_by_forward = [m.weight for m in _unwrap(self.model).modules()
                              if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
                              and m.max_norm is not None]
        state = self.state_dict(step)
        if split is not None:
            import torch.distributed as dist

            shared = {"model": state["model"], "optimizer": state.get("optimizer")}
            if isinstance(split, str):                     # _DTENSORS
                shared = _replicas.split_dtensors(shared)
                state["replicas"] = {"dtensors": True}
            else:
                size = dist.get_world_size(split)
                owners = _replicas.plan(_replicas.entries(shared), size)
                shared = _replicas.split(shared, owners, dist.get_rank(split))
                state["replicas"] = {"size": size}
            state["model"] = shared["model"]
            if self.optimizer is not None:
                state["optimizer"] = shared["optimizer"]
        return client.save(step, state, copy_now=changed_by_forward)

    def _replica_group(self) -> Any:
        """The DDP replica group to split over (None: not a DDP job of several ranks, or
        ``split_replicas`` off)."""
        return self._ddp_group() if self.split_replicas else None

    def _ddp_group(self) -> Any:
        """The DDP replica group of ``model`` (None: not a DDP job of several ranks)."""
        if not _distributed() or not isinstance(
                self.model, torch.nn.parallel.DistributedDataParallel):
            return None
        import torch.distributed as dist

        group = self.model.process_group
        return group if dist.get_world_size(group) > 1 else None

    def _replicated_dtensors(self) -> bool:
        """Whether the model has DTensors replicated over a mesh dimension of several ranks
        (HSDP's replicate dimension, a tensor-parallel bias) that a save may split."""
        if not self.split_replicas or not _distributed() or self._replica_group() is not None:
            return False
        return any(is_dtensor(t) and _replicas.replica_dim(t) is not None
                   for t in _unwrap(self.model).parameters())

    def _split_group(self, client: SnapshotClient) -> Any:
        """How replicated state is split, decided once (collectively) at the first save: the
        DDP group, :data:`_DTENSORS` (each DTensor over its replica mesh dimension), or None
        (whole). Split only where every rank's daemon codes its data across nodes."""
        if self._split is not False:
            return self._split
        import torch.distributed as dist

        split = self._replica_group()
        group = split
        if split is None and self._replicated_dtensors():
            split, group = _DTENSORS, dist.group.WORLD
        if split is not None:
            from ._client import SnapshotError

            try:
                coded = client.coding()[1] > 0
            except SnapshotError:
                coded = False
            flag = torch.tensor([1 if coded else 0],
                                device=_replicas.collective_device(group))
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
            if not flag.item():
                log.warning("replicated state is stored whole on every rank: a daemon of the "
                            "job does not code its data across nodes (m = 0), so a node loss "
                            "would lose the only copy of a share")
                split = None
        self._split = split
        return split

    def _gather(self, state: dict[str, Any]) -> dict[str, Any]:
        """Fill the shares other replicas stored (every rank restores the same step). A
        snapshot's split is its own: gathered whatever ``split_replicas`` says now."""
        if state["replicas"].get("dtensors"):
            if not _distributed():
                raise ValueError("this snapshot's replicated DTensors are split across their "
                                 "replica groups: restore it inside the job (torch.distributed "
                                 "initialised)")
            shared = _replicas.reassemble_dtensors({"model": state["model"],
                                                    "optimizer": state.get("optimizer")},
                                                   self.meshes())
        else:
            size = int(state["replicas"]["size"])
            group = self._ddp_group()
            if group is None:
                raise ValueError(f"this snapshot is split across {size} data-parallel "
                                 "replicas: restore it inside the job (torch.distributed "
                                 "initialised, the DDP-wrapped model passed to TrainingState)")
            import torch.distributed as dist

            if dist.get_world_size(group) != size:
                raise ValueError(f"this snapshot is split across {size} replicas and the job's "
                                 f"replica group has {dist.get_world_size(group)} ranks: "
                                 "restoring at another world size is not supported yet "
                                 "(issue 14)")
            shared = _replicas.reassemble({"model": state["model"],
                                           "optimizer": state.get("optimizer")}, group, size)
        state = dict(state, model=shared["model"])
        if shared["optimizer"] is not None:
            state["optimizer"] = shared["optimizer"]
        del state["replicas"]
        return state

    def _model_state(self) -> dict[str, Any]:
        if self.state_dicts == "dcp":
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            return get_model_state_dict(_unwrap(self.model))
        return _unwrap(self.model).state_dict()

    def meshes(self) -> list[Any]:
        """The ``DeviceMesh`` of every DTensor parameter and buffer of the model and optimizer:
        where :meth:`restore` rebuilds the optimizer's sharded moments in a fresh process."""
        seen: dict[int, Any] = {}
        tensors: list[Any] = list(_unwrap(self.model).parameters())
        tensors += list(_unwrap(self.model).buffers())
        if self.optimizer is not None:
            tensors += [p for g in self.optimizer.param_groups for p in g["params"]]
        for t in tensors:
            mesh = getattr(t, "device_mesh", None) if is_dtensor(t) else None
            if mesh is not None:
                seen.setdefault(id(mesh), mesh)
        return list(seen.values())

    def check(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming every way ``state`` does not fit what :meth:`load` would
        put it into; change nothing. ``state`` may hold ``meta`` tensors (shapes only)."""
        problems: list[str] = []
        if not isinstance(state, Mapping) or state.get("format") != FORMAT:
            got = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"not a TrainingState snapshot (format {got!r}, expected {FORMAT})")
        if not isinstance(state.get("step"), int):
            problems.append("no integer 'step'")
        model = self._model_state()
        saved = state.get("model")
        if not isinstance(saved, Mapping):
            problems.append("no model state")
        else:
            missing = [k for k in model if k not in saved]
            extra = [k for k in saved if k not in model]
            if missing:
                problems.append(f"model keys missing from the snapshot: {missing[:8]}")
            if extra:
                problems.append(f"model keys in the snapshot that the model lacks: {extra[:8]}")
            for key, live in model.items():
                value = saved.get(key)
                if isinstance(live, torch.Tensor) and isinstance(value, torch.Tensor) and (
                        live.shape != value.shape or live.dtype != value.dtype):
                    problems.append(f"model {key!r}: snapshot {value.dtype}{list(value.shape)}, "
                                    f"model {live.dtype}{list(live.shape)}")
        parts = [("optimizer", self.optimizer), ("scheduler", self.scheduler),
                 ("data", self.data)]
        for name, live in parts:
            if live is not None and name not in state:
                problems.append(f"the snapshot holds no {name} state")
        if self.optimizer is not None and isinstance(state.get("optimizer"), Mapping):
            groups = state["optimizer"].get("param_groups", [])
            want = [len(g["params"]) for g in self.optimizer.param_groups]
            have = [len(g.get("params", [])) for g in groups]
            if want != have:
                problems.append(f"optimizer parameter groups: snapshot has sizes {have}, the "
                                f"optimizer {want}")
        missing_gens = [n for n in self.generators if n not in state.get("generators", {})]
        if missing_gens:
            problems.append(f"generators missing from the snapshot: {missing_gens}")
        held = state.get("extra", {})
        missing_extra = [n for n in self.extra if not isinstance(held, Mapping) or n not in held]
        if missing_extra:
            problems.append(f"extra objects missing from the snapshot: {missing_extra} (it "
                            f"holds {sorted(held) if isinstance(held, Mapping) else []})")
        if self.rng and "rng" in state and not {"torch", "python"} <= set(state["rng"]):
            problems.append("RNG state without torch/python entries")
        if problems:
            raise ValueError("; ".join(problems))

    def restore(self, client: SnapshotClient, step: int | None = None) -> int | None:
        """Load the newest snapshot (or ``step``) from ``client``; return its step, or None.

        With ``torch.distributed`` initialised every rank restores the same step: the newest
        one that every rank holds (see :func:`agree_step`), so call it on every rank. None
        means nothing to restore: start from scratch. Raises ``SnapshotError`` if a daemon
        cannot list or serve the snapshot (on every rank alike when listing fails).
        """
        t0 = time.perf_counter()
        client.wait()              # a save in flight may be the newest common step
        t1 = time.perf_counter()
        self.last_restore_seconds = {"wait": t1 - t0, "agree": 0.0, "load": 0.0}
        moved = False             # the job's ranks are on other nodes than their versions
        if step is None and _distributed():
            import torch.distributed as dist

            from . import _elastic

            # What every rank's daemon holds of the job (all ranks, every layout): the newest
            # step that one saved layout holds whole. The job's own layout (same world size,
            # each rank on its own rank's daemon) restores as always; another one (the job
            # restarted at another size, or its ranks on other nodes) is resharded from the
            # daemons that hold it.
            found = _elastic.survey(client)
            chosen = found.choose()
            self.last_restore_seconds["agree"] = time.perf_counter() - t1
            if chosen is None:
                if found.down:
                    # Not "nothing to restore": nodes that hold ranks of the job do not
                    # answer, and what they reported protected (decodable) does not complete
                    # a layout. Starting over would drop this rank's versions for good.
                    raise SnapshotError(
                        f"job {client.job!r}: no step is held whole by the nodes that answer; "
                        f"nodes {sorted(found.down)} hold ranks of the job and do not answer "
                        "(a node lost before its newest steps were protected, or more than m "
                        "nodes of a group lost). Bring them back (or a replacement, which "
                        "rebuilds them) and restart; to start from scratch instead, drop the "
                        "job's versions (snapshotctl drop --job ...)")
                client._start_over(found.token)
                return None
            step, saved_world = chosen
            if saved_world != dist.get_world_size():
                t2 = time.perf_counter()
                loaded = _elastic.load(self, client, found, step, saved_world)
                self.last_restore_seconds["load"] = time.perf_counter() - t2
                return loaded
            # The same world size: each rank restores its own saved rank, as always. Where
            # the ranks moved to other nodes (a replacement host, a rendezvous that ordered
            # the nodes otherwise: issue 24, finding 8), a rank whose daemon does not hold its
            # version reads it through its daemon from the node that does, and every rank's
            # new timeline is dropped into every node that holds the rank.
            moved = not found.own(step, saved_world, saved_world)
            client._next_timeline = found.token     # the timeline this restore starts
        elif step is not None and _distributed():
            # An explicit step: the ranks name this restore's timeline together (a token
            # derived from the step alone would be the same for two restores of one step,
            # and a late report of the first could raise a pin in the second: review F3).
            client._next_timeline = agree_token(step)
        t2 = time.perf_counter()
        # The model exists already: fill its tensors in place (no fresh memory to fault in),
        # once the whole snapshot is known to fit (checked before any byte is written). In a
        # snapshot split across replicas the tensors other ranks stored are left to the
        # reassembly that follows (one broadcast per owner).
        model_state = self._model_state()
        into = {"model": model_state}
        # The rest (optimizer state, ...) comes back fresh: mapped copy-on-write when it is
        # moved to an accelerator by load_state_dict (the mapping is freed right after), copied
        # when it stays on the CPU (it lives as long as the run, and would keep the version
        # leased in the daemon's memory that long).
        on_device = self.model is not None and any(
            t.device.type != "cpu" for t in self.model.parameters())
        guard = _Guard() if _distributed() else None

        def check(skeleton: Mapping[str, Any]) -> None:
            # Every way the snapshot does not fit is found on some rank before any rank
            # writes: a rank that cannot restore makes every rank raise (not wait forever in
            # the reassembly's broadcasts).
            try:
                self.check(skeleton)
                _check_markers(skeleton, model_state)
            except Exception:
                if guard is not None:
                    guard.vote(0, False)
                raise
            if guard is not None and not guard.vote(0, True):
                raise SnapshotError(f"another rank of the job could not restore step {step}; "
                                    "nothing was written (see that rank's error)")
        try:
            restored = client.restore(step, into=into, check=check, meshes=self.meshes(),
                                      zero_copy=on_device, remote=moved)
            if restored is None and guard is not None:
                raise SnapshotError(f"step {step}, which every rank held, is gone")
        except Exception:
            if guard is not None:
                guard.vote(0, False)
                guard.vote(1, False)
            raise
        if guard is not None and not (guard.vote(0, True) and guard.vote(1, True)):
            raise SnapshotError(f"another rank of the job could not restore step {step} (see "
                                "that rank's error)")
        if restored is None:
            return None
        step_restored, state = restored
        if "replicas" in state:
            state = self._gather(state)
        loaded = self.load(state)
        if loaded != step_restored:
            raise ValueError(f"snapshot of step {step_restored} says it was taken at {loaded}")
        self.last_restore_seconds["load"] = time.perf_counter() - t2
        return loaded


class _Guard:
    """The two agreement rounds of a distributed restore (a MIN of a flag over every rank):
    0 before anything is written (in the restore's check), 1 after the restore. Every rank
    votes once in each round, whatever fails where, so that no rank waits forever."""

    def __init__(self) -> None:
        self.results: list[bool | None] = [None, None]

    def vote(self, round_: int, ok: bool) -> bool:
        import torch.distributed as dist

        result = self.results[round_]
        if result is None:
            flag = torch.tensor([1 if ok else 0])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            result = self.results[round_] = bool(flag.item())
        return result


def _check_markers(skeleton: Mapping[str, Any], model_state: Mapping[str, Any]) -> None:
    """A model tensor that another replica stored must still fit the live one: the same
    dtype and shape, and for a DTensor the same mesh, placements and global shape."""
    from ._flatten import _placement_text, describe_mesh

    problems = []
    model = skeleton.get("model")
    if not isinstance(model, Mapping):
        return
    for key, value in model.items():
        if not _replicas.is_marker(value) or key not in model_state:
            continue
        live = model_state[key]
        if is_dtensor(live):
            mine = {"mesh": describe_mesh(live.device_mesh), "global": list(live.shape),
                    "placements": [_placement_text(p, key) for p in live.placements]}
            saved = {k: value.get(k) for k in mine}
        else:
            mine = {"dtype": str(live.dtype).removeprefix("torch."), "shape": list(live.shape)}
            saved = {k: value.get(k) for k in mine}
        if saved != mine:
            problems.append(f"model {key!r}: the snapshot's share (stored by replica "
                            f"{value[_replicas.MARK]}) is {saved}, the live tensor {mine}")
    if problems:
        raise SnapshotError("the snapshot does not fit the live job, nothing was written: "
                            + "; ".join(problems[:8]) + " (at the same world size the "
                            "meshes and placements must be the saved ones; issue 14: at "
                            "another world size, restore() reshards)")


# ---------------------------------------------------------------------- agreement


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


# ---------------------------------------------------------------------- RNG helpers


def capture_rng() -> dict[str, Any]:
    """States of the global RNGs: torch CPU, every CUDA device, numpy, Python ``random``, as
    a dict a snapshot can hold (tensors and plain values); :func:`restore_rng` sets them back.

    >>> import torch
    >>> from snapshotd_client import capture_rng, restore_rng
    >>> saved = capture_rng()
    >>> first = torch.rand(3)
    >>> restore_rng(saved)
    >>> torch.equal(torch.rand(3), first)
    True
    """
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        out["numpy"] = {"kind": str(kind), "keys": np.asarray(keys, dtype=np.uint32).copy(),
                        "pos": int(pos), "has_gauss": int(has_gauss),
                        "cached_gaussian": float(cached)}
    return out


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the global RNGs from :func:`capture_rng`'s dict (CUDA and numpy when present)."""
    torch.set_rng_state(_byte_tensor(state["torch"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        states = [_byte_tensor(s) for s in state["cuda"]]
        count = min(len(states), torch.cuda.device_count())
        for device in range(count):
            torch.cuda.set_rng_state(states[device], device)
    if "numpy" in state and np is not None:
        n = state["numpy"]
        np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"],
                             n["has_gauss"], n["cached_gaussian"]))


def _byte_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.uint8).contiguous()
    return torch.as_tensor(value, dtype=torch.uint8)
