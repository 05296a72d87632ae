"""DCP's ``get_state_dict`` with the work that depends only on the structure done once.

``torch.distributed.checkpoint.state_dict.get_state_dict`` works out, at every call, the
canonical name (FQN) of every parameter and buffer (``_verify_options`` walks the model and
resolves every name through its wrappers, ``_get_fqns``), renames the model's state dict keys
that differ from their FQN, and maps the optimizer's parameter ids to FQNs (the FQNs again). For
a model of a few hundred tensors that is several milliseconds per save, spent on facts that do
not change between saves of one structure. :class:`DcpStateDicts` asks DCP once per structure
and keeps its answers:

- the options record (``_StateDictInfo``) of ``_verify_options``, for one model, optimizer and
  structure (the modules by identity and name, each module's parameters by identity and name,
  the optimizer's parameters by identity, in order: every object is held, so an equal id is the
  same object);
- the model state dict's renames (key -> FQN, in order), for one tuple of keys;
- each optimizer's parameter id -> FQN mapping, for one structure.

A save of another structure, or whose model state dict has other keys, goes through DCP's own
functions (the same result, the same errors) and refreshes what is kept; so does every save of a
model that DCP's fast path does not cover (FSDP1 modules, options other than the defaults, a
torch without these functions). On a hit the result is built exactly as DCP builds it: the same
dicts, keys in the same order, the same tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["DcpStateDicts"]

_STATE, _PG, _PARAMS = "state", "param_groups", "params"


def _dcp() -> Any:
    """DCP's ``state_dict`` module when it has every function used here, else None."""
    try:
        from torch.distributed.checkpoint import state_dict as dsd
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    names = ("_verify_options", "_get_model_state_dict", "_get_optim_state_dict",
             "_verify_state_dict", "_get_fqns", "_state_dict_fn", "_init_optim_state",
             "_gc_context")
    return dsd if all(hasattr(dsd, n) for n in names) else None


def _structure(model: torch.nn.Module, optims: Sequence[torch.optim.Optimizer]
               ) -> tuple[tuple, list[Any]]:
    """What the FQNs and the optimizer's id -> FQN mapping depend on, as a tuple of names and
    ids, and the objects whose ids it holds (kept alive with it, so an id is not reused)."""
    names: list[Any] = []
    ids: list[int] = []
    held: list[Any] = [model, *optims]
    for name, module in model.named_modules():
        names.append(name)
        names.append(type(module))
        ids.append(id(module))
        held.append(module)
        params = module._parameters
        if params:
            names.append(tuple(params))
            for p in params.values():
                ids.append(id(p))
                held.append(p)
    for optim in optims:
        ids.append(id(optim))
        for group in optim.param_groups:
            group_params = group[_PARAMS]
            names.append(len(group_params))
            for p in group_params:
                ids.append(id(p))
                held.append(p)
    return (tuple(names), tuple(ids)), held


def _renamed(keys: Sequence[str], renames: Sequence[tuple[str, str]]) -> list[str]:
    """The keys of DCP's model state dict: the renamed ones move to the end, in order."""
    moved = dict(renames)
    return [k for k in keys if k not in moved] + [fqn for _, fqn in renames]


class DcpStateDicts:
    """``get_state_dict(model, optimizer)`` / ``get_model_state_dict(model)`` of DCP, with the
    FQN mapping and option checks kept per structure (see the module docstring). One per
    :class:`~snapshotd_client.TrainingState`; not thread-safe."""

    def __init__(self) -> None:
        self._structure: tuple | None = None
        self._held: list[Any] = []
        self._info: Any = None
        self._model_keys: tuple[str, ...] | None = None
        self._renames: list[tuple[str, str]] = []
        self._pid_fqns: list[dict[Any, Any]] | None = None
        #: Calls answered from what was kept (model state dict and, with an optimizer,
        #: optimizer state dict both); the others went through DCP's own functions.
        self.hits = 0

    def get(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
            ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """``get_state_dict(model, optimizer)``, or ``(get_model_state_dict(model), None)``
        without an optimizer."""
        dsd = _dcp()
        if dsd is None:  # pragma: no cover - another torch: the public functions
            from torch.distributed.checkpoint.state_dict import (
                get_model_state_dict,
                get_state_dict,
            )

            if optimizer is None:
                return get_model_state_dict(model), None
            return get_state_dict(model, optimizer)
        optims = () if optimizer is None else (optimizer,)
        with dsd._gc_context():
            structure, held = _structure(model, optims)
            if structure != self._structure:
                info = dsd._verify_options(model, optims, optim_only=False)
                self._structure, self._held, self._info = structure, held, info
                self._model_keys, self._pid_fqns = None, None
            info = self._info
            if not _fast(info):
                model_sd = dsd._get_model_state_dict(model, info)
                optim_sd = dsd._get_optim_state_dict(model, optims, info)
                hit = False
            else:
                model_sd, hit = self._model(dsd, model, info)
                optim_sd = {}
                if optims:
                    optim_sd, optim_hit = self._optims(dsd, model, optims, info)
                    hit = hit and optim_hit
            dsd._verify_state_dict(model_sd, optim_sd, info)
        if hit:
            self.hits += 1
        return model_sd, (optim_sd if optims else None)

    # ------------------------------------------------------------------ model

    def _model(self, dsd: Any, model: torch.nn.Module, info: Any) -> tuple[dict[str, Any], bool]:
        with torch.no_grad():
            with info.fsdp_context():
                state = dsd._state_dict_fn(model, "state_dict")()
        keys = tuple(state)
        if keys == self._model_keys:
            for key, fqn in self._renames:         # as _get_model_state_dict renames them
                state[fqn] = state.pop(key)
            return state, True
        # Another structure: DCP lays this one out (its checks, its errors) and the renames
        # it made are kept, if they are the ones it made.
        result = dsd._get_model_state_dict(model, info)
        renames: list[tuple[str, str]] = []
        single = True
        for key in keys:
            fqns = dsd._get_fqns(model, key)
            if len(fqns) != 1:
                single = False
                break
            fqn = next(iter(fqns))
            if fqn != key:
                renames.append((key, fqn))
        if single and _renamed(keys, renames) == list(result):
            self._model_keys, self._renames = keys, renames
        else:
            self._model_keys, self._renames = None, []
        return result, False

    # ------------------------------------------------------------------ optimizer

    def _optims(self, dsd: Any, model: torch.nn.Module,
                optims: Sequence[torch.optim.Optimizer], info: Any
                ) -> tuple[dict[str, Any], bool]:
        mappings = self._pid_fqns
        if mappings is None:
            result = dsd._get_optim_state_dict(model, optims, info)
            found = [_pid_fqns(dsd, model, optim) for optim in optims]
            mappings = [m for m in found if m is not None]
            # Kept only if they give what DCP gave: a fresh state dict converted with them
            # has its keys and parameter names.
            ok = len(mappings) == len(found)
            if ok:
                try:                # (no second warm-up step: DCP's call made the state)
                    again = self._convert(dsd, optims, mappings, init=False)
                except KeyError:
                    ok = False
                else:
                    ok = (list(again[_STATE]) == list(result[_STATE])
                          and [g[_PARAMS] for g in again[_PG]]
                          == [g[_PARAMS] for g in result[_PG]])
            self._pid_fqns = mappings if ok else None
            return result, False
        return self._convert(dsd, optims, mappings), True

    @staticmethod
    def _convert(dsd: Any, optims: Sequence[torch.optim.Optimizer],
                 mappings: Sequence[dict[Any, Any]], init: bool = True) -> dict[str, Any]:
        """``_get_optim_state_dict`` (no FSDP1 modules, default options) with the parameter id
        -> FQN mappings given; ``init``: create an empty optimizer's state first, as DCP does
        (a step with zero gradients and learning rate)."""
        out: dict[str, Any] = {_STATE: {}, _PG: []}
        with torch.no_grad():
            for optim, mapping in zip(optims, mappings):
                if init:
                    dsd._init_optim_state(optim)
                osd = dsd._state_dict_fn(optim, "state_dict")()
                state = osd[_STATE]
                for key in list(state.keys()):
                    state[mapping[key]] = state.pop(key)
                for group in osd[_PG]:
                    group[_PARAMS] = [mapping[pid] for pid in group[_PARAMS]]
                if not osd:
                    continue
                out[_STATE].update(osd[_STATE])
                out[_PG].extend(osd[_PG])
        return out


def _fast(info: Any) -> bool:
    """The options under which DCP's get path is the plain one :class:`DcpStateDicts` builds:
    no FSDP1 modules, no submodules, nothing gathered, offloaded or flattened."""
    return (not info.fsdp_modules and not info.submodule_prefixes
            and not info.ignore_frozen_params and not info.full_state_dict
            and not info.cpu_offload and not info.flatten_optimizer_state_dict
            and info.handle_model)


def _pid_fqns(dsd: Any, model: torch.nn.Module, optim: torch.optim.Optimizer
              ) -> dict[Any, Any] | None:
    """``optim``'s parameter index <-> FQN mapping, as ``_get_optim_state_dict`` builds it
    (None where it would fail: DCP raises then, at every call)."""
    params = [p for g in optim.param_groups for p in g[_PARAMS]]
    pids = {id(p): i for i, p in enumerate(params)}
    mapping: dict[Any, Any] = {}
    for key, param in model.named_parameters():
        fqns = dsd._get_fqns(model, key)
        if len(fqns) != 1:
            return None
        fqn = next(iter(fqns))
        pid = pids.get(id(param))
        if pid is None:
            continue
        mapping[fqn] = pid
        mapping[pid] = fqn
    return mapping
