"""Where this process runs: rank, local rank, world size, run id and port, from the scheduler's environment."""
from __future__ import annotations

import os
import secrets
import time
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional

ENV_PREFIX = "TRAINING_EXPORTER_"
DEFAULT_PORT = 9945
# All interfaces, as Prometheus's own exporters do: the Prometheus that scrapes a training job runs on another
# host or pod, and a loopback default would make every cluster target silently down. Where other users share the
# node's network, bind an internal interface (addr=..., TRAINING_EXPORTER_ADDR) and/or require TLS and basic auth
# with a web config (web_config=..., TRAINING_EXPORTER_WEB_CONFIG).
DEFAULT_ADDR = "0.0.0.0"

# First variable set wins. torchrun sets RANK/LOCAL_RANK/WORLD_SIZE, Slurm's srun the SLURM_* ones.
_RANK_VARS = ("RANK", "SLURM_PROCID")
_LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID")
_WORLD_SIZE_VARS = ("WORLD_SIZE", "SLURM_NTASKS")


@dataclass(frozen=True)
class Placement:
    """This process's place in a (possibly multi-process) job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


def _int_from(env: Mapping[str, str], names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return default


def placement(env: Mapping[str, str] = os.environ) -> Placement:
    """Rank, local rank and world size from torchrun's or Slurm's variables (0, 0, 1 when absent)."""
    return Placement(
        rank=_int_from(env, _RANK_VARS, 0),
        local_rank=_int_from(env, _LOCAL_RANK_VARS, 0),
        world_size=_int_from(env, _WORLD_SIZE_VARS, 1),
    )


def resolve_run(run: Optional[str], env: Mapping[str, str] = os.environ) -> str:
    """The run id: the argument, else TRAINING_EXPORTER_RUN, else the scheduler's job id, else a generated id.

    Every rank of a job must agree, so the scheduler's id comes before anything generated per process.
    """
    if run is not None:
        if not isinstance(run, str) or not run.strip():
            raise ValueError(f"run must be a non-empty string, got {run!r}")
        return run
    candidates = (
        env.get(ENV_PREFIX + "RUN"),
        env.get("TORCHELASTIC_RUN_ID") if env.get("TORCHELASTIC_RUN_ID") != "none" else None,
        env.get("SLURM_JOB_ID"),
        env.get("KUBERNETES_JOB_NAME"),
    )
    for value in candidates:
        if value:
            return value
    generated = time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    warnings.warn(
        f"no run id given and no scheduler job id found; using {generated!r}. Ranks of a multi-process job "
        f"must share one id: pass TrainingExporter(run=...) or set {ENV_PREFIX}RUN.",
        RuntimeWarning,
        stacklevel=3,
    )
    return generated


def resolve_port(port: Optional[int], local_rank: int, env: Mapping[str, str] = os.environ) -> int:
    """The port to serve on: the argument, else TRAINING_EXPORTER_PORT or the default, offset by the local rank.

    Port 0 (pick a free port) stays 0 on every rank: offsetting it would ask for the fixed ports 1, 2, 3.
    """
    if port is None:
        port = _int_from(env, (ENV_PREFIX + "PORT",), DEFAULT_PORT)
        port = port + local_rank if port else 0
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in 0..65535 (0 picks a free port), got {port!r}")
    return port


def resolve_addr(addr: Optional[str], env: Mapping[str, str] = os.environ) -> str:
    """The address to bind: the argument, else TRAINING_EXPORTER_ADDR, else all interfaces."""
    return addr or env.get(ENV_PREFIX + "ADDR") or DEFAULT_ADDR


def resolve_web_config(path: Optional[str], env: Mapping[str, str] = os.environ) -> Optional[str]:
    """The web-config.yml (TLS, basic auth) to serve with: the argument, else TRAINING_EXPORTER_WEB_CONFIG."""
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"web_config must be a path to a web-config.yml, got {type(path).__name__}")
    return os.fspath(path) if path else env.get(ENV_PREFIX + "WEB_CONFIG") or None
