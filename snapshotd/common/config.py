"""Daemon configuration: one frozen dataclass, built in one place.

Precedence, highest first: command-line flags, ``SNAPSHOTD_*`` environment variables, the TOML
file named by ``--config`` (or ``SNAPSHOTD_CONFIG``), the defaults below. Every field's
environment name is ``SNAPSHOTD_`` plus the field name in capitals (``memory_limit`` is
``SNAPSHOTD_MEMORY_LIMIT``), its flag is ``--`` plus the name with dashes, and its TOML key is the
name itself.

Example::

    >>> cfg = build_config(["--node-slot", "3", "--memory-limit", "2GiB"], environ={})
    >>> cfg.node_slot, cfg.memory_limit
    (3, 2147483648)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Config", "ConfigError", "build_config", "parse_size", "add_arguments",
           "peer_endpoints", "slot_domains",
           "default_control", "ENV_PREFIX", "ENV_CONFIG"]

ENV_PREFIX = "SNAPSHOTD_"
ENV_CONFIG = "SNAPSHOTD_CONFIG"

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20,
          "gib": 1 << 30, "tib": 1 << 40}


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the setting."""


def parse_size(text: str | int) -> int:
    """Parse a byte size such as ``4GiB``, ``512MiB``, ``1.5GB`` or ``1048576``."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read {text!r} as a size; write e.g. 4GiB, 512MiB or 1000000")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    if str(text).lower() in ("1", "true", "yes", "on"):
        return True
    if str(text).lower() in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"cannot read {text!r} as true/false")


def _opt_int(text: Any) -> int | None:
    return None if text in (None, "", "none") else int(text)


def _runtime_dir(environ: Mapping[str, str]) -> str:
    base = environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, "snapshotd") if base else "/run/snapshotd"


def default_control(environ: Mapping[str, str] = os.environ) -> str:
    """The control endpoint a daemon binds, and a client connects to, when none is given."""
    return f"ipc://{_runtime_dir(environ)}/control.sock"


def _opt(default: Any, parse: Callable[[Any], Any], doc: str, **extra: Any) -> Any:
    return field(default=default, metadata={"parse": parse, "help": doc, **extra})


@dataclass(frozen=True)
class Config:
    """Everything the daemon is told. Sizes are bytes, durations seconds."""

    node_slot: int = _opt(0, int, "this node's slot (0-based) in the cluster")
    control: str = _opt("", str, "local control endpoint (ipc://PATH); default under "
                        "$XDG_RUNTIME_DIR/snapshotd or /run/snapshotd")
    shm_dir: str = _opt("", str, "directory on a tmpfs holding the segments (default "
                        "/dev/shm/snapshotd-<slot>); one per daemon")
    memory_limit: int = _opt(4 << 30, parse_size, "bytes of snapshot memory (e.g. 4GiB)")
    keep: int = _opt(2, int, "committed versions kept per rank")
    log_level: str = _opt("INFO", str, "DEBUG, INFO, WARNING or ERROR")
    reap_interval: float = _opt(1.0, float, "seconds between checks for dead writers/readers")
    adopt: bool = _opt(True, _parse_bool, "adopt committed segments left by a previous daemon")
    metrics_port: int | None = _opt(None, _opt_int, "port for /metrics, /healthz, /readyz")
    workers: int = _opt(2, int, "threads for checksum and copy work")
    listen: str = _opt("", str, "TCP endpoint peers reach, e.g. tcp://0.0.0.0:7600")
    peers: str = _opt("", str, "peer daemons: '0=host:port,1=host:port' or a template "
                      "'snapshotd-{slot}.snapshotd:7600' with --nodes")
    nodes: int = _opt(0, int, "number of node slots (with a --peers template)")
    domains: str = _opt("", str, "failure domain (rack, switch, zone) of every slot, the same "
                        "map on every node: '0-15=rack-a,16-31=rack-b' (slots or ranges); "
                        "groups are then drawn across domains (docs/scale.md)")
    domain: str = _opt("", str, "this node's failure domain as it sees it (e.g. its node's "
                       "topology label); checked against --domains, a mismatch is logged")
    k: int = _opt(4, int, "data chunks per stripe (group size is k+m)")
    m: int = _opt(2, int, "parity chunks per stripe: node losses a group survives")
    codec: str = _opt("isal", str, "isal (ISA-L Reed-Solomon), reedsolo (slow pure-Python "
                      "fallback) or replicate (m full copies; forces k=1)")
    keys: str = _opt("", str, "directory with the cluster CURVE keys (snapshotctl keygen)")
    insecure: bool = _opt(False, _parse_bool, "allow peer traffic without CURVE encryption")
    job_isolation: bool = _opt(False, _parse_bool, "bind each job to the token its first "
                               "writer presents (SNAPSHOTD_JOB_TOKEN); refuse other tokens")
    heartbeat_interval: float = _opt(1.0, float, "seconds between heartbeats to peers")
    peer_timeout: float = _opt(5.0, float, "seconds without an answer before a peer is down")
    encode_timeout: float = _opt(60.0, float, "seconds to wait for a stripe's data chunks")
    persist_dir: str = _opt("", str, "directory (disk, NFS) for the persistence tier")
    persist_every: int = _opt(0, int, "persist every step that is a multiple of N (0: only "
                              "on demand, snapshotctl persist)")
    persist_keep: int = _opt(2, int, "persisted steps kept per job")
    persist_rate: int = _opt(200_000_000, parse_size, "bytes/s the persistence tier may write")

    def __post_init__(self) -> None:
        if self.node_slot < 0:
            raise ConfigError(f"node_slot must be >= 0, got {self.node_slot}")
        if self.keep < 1:
            raise ConfigError(f"keep must be >= 1, got {self.keep}")
        if self.memory_limit <= 0:
            raise ConfigError(f"memory_limit must be positive, got {self.memory_limit}")
        if not self.control.startswith(("ipc://", "tcp://", "inproc://")):
            raise ConfigError(f"control endpoint {self.control!r} must start with ipc:// or tcp://")
        if self.codec not in ("isal", "reedsolo", "replicate"):
            raise ConfigError(f"codec {self.codec!r} is not isal, reedsolo or replicate")
        if self.k < 1 or self.m < 0 or self.k + self.m > 255:
            raise ConfigError(f"k={self.k}, m={self.m}: need k >= 1, m >= 0, k + m <= 255")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level {self.log_level!r} is not DEBUG/INFO/WARNING/ERROR")


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field (all default to None, meaning "not given")."""
    parser.add_argument("--config", help="TOML file with settings (flags and env win)")
    for name, f in _FIELDS.items():
        flag = "--" + name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=name, default=None,
                                action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        else:
            parser.add_argument(flag, dest=name, default=None, help=f.metadata["help"])


def build_config(argv: Sequence[str] | argparse.Namespace | None = None,
                 environ: Mapping[str, str] = os.environ) -> Config:
    """Build the one Config from flags over environment over TOML file over defaults."""
    if isinstance(argv, argparse.Namespace):
        args = vars(argv)
    else:
        parser = argparse.ArgumentParser(add_help=False)
        add_arguments(parser)
        args = vars(parser.parse_args(list(argv or [])))
    values: dict[str, Any] = {}
    path = args.get("config") or environ.get(ENV_CONFIG)
    if path:
        try:
            with open(path, "rb") as fh:
                values.update(tomllib.load(fh))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        unknown = set(values) - set(_FIELDS)
        if unknown:
            raise ConfigError(f"config file {path}: unknown settings {sorted(unknown)}")
    for name in _FIELDS:
        env = environ.get(ENV_PREFIX + name.upper())
        if env is not None:
            values[name] = env
        if args.get(name) is not None:
            values[name] = args[name]
    parsed = {}
    for name, raw in values.items():
        try:
            parsed[name] = _FIELDS[name].metadata["parse"](raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"setting {name}={raw!r}: {exc}") from None
    slot = parsed.get("node_slot", 0)
    parsed.setdefault("control", default_control(environ))
    parsed.setdefault("shm_dir", f"/dev/shm/snapshotd-{slot}")
    if parsed.get("codec") == "replicate":
        parsed["k"] = 1
    return Config(**parsed)


def peer_endpoints(config: Config) -> dict[int, str]:
    """Node slot -> ``tcp://host:port`` of every node, this one included (empty: no peers)."""
    spec = config.peers.strip()
    if not spec:
        return {}
    if "{slot}" in spec:
        if config.nodes < 1:
            raise ConfigError(f"peers template {spec!r} needs --nodes N")
        return {i: "tcp://" + spec.format(slot=i) for i in range(config.nodes)}
    out: dict[int, str] = {}
    for item in spec.split(","):
        slot, sep, addr = item.strip().partition("=")
        if not sep or not slot.strip().isdigit() or ":" not in addr:
            raise ConfigError(f"peer entry {item!r} is not slot=host:port")
        out[int(slot)] = "tcp://" + addr.strip()
    if config.node_slot not in out:
        raise ConfigError(f"--peers lists slots {sorted(out)} but not this node's slot "
                          f"{config.node_slot}")
    return out


def slot_domains(config: Config, nodes: int) -> list[str] | None:
    """The failure domain of every slot 0..nodes-1 from ``--domains``, or None without one.

    Entries are ``SLOT=LABEL`` or ``FIRST-LAST=LABEL`` (inclusive), separated by commas or
    newlines; every slot must be named exactly once.

    >>> config = build_config(["--domains", "0-1=rack-a, 2=rack-b,3=rack-b"], environ={})
    >>> slot_domains(config, 4)
    ['rack-a', 'rack-a', 'rack-b', 'rack-b']
    """
    spec = config.domains.strip()
    if not spec:
        return None
    out: list[str | None] = [None] * nodes
    for item in re.split(r"[,\n]", spec):
        item = item.strip()
        if not item:
            continue
        slots, sep, label = item.partition("=")
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", slots)
        label = label.strip()
        if not sep or not match or not label:
            raise ConfigError(f"domains entry {item!r} is not SLOT=LABEL or FIRST-LAST=LABEL")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        if not 0 <= first <= last < nodes:
            raise ConfigError(f"domains entry {item!r} names slots outside 0..{nodes - 1}")
        for slot in range(first, last + 1):
            if out[slot] is not None:
                raise ConfigError(f"domains names slot {slot} twice ({out[slot]!r} and "
                                  f"{label!r})")
            out[slot] = label
    missing = [slot for slot, label in enumerate(out) if label is None]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ConfigError(f"domains names no failure domain for slot(s) {shown}: label every "
                          f"slot of --peers, or none")
    return [label for label in out if label is not None]
