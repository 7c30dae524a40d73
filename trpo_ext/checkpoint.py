"""Checkpoints: atomic writes, validated loads, and :func:`load` of a ready policy.

A checkpoint is one ``torch.save`` of a dict of tensors and plain Python data, so that
``torch.load(weights_only=True)`` reads it (a checkpoint cannot run code).  Writes go to a temporary
file in the same directory, are flushed and fsync'ed, then renamed over the target: a crash at any
moment leaves either the previous file or the new one, never a torn one.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from typing import Any, Dict, Iterable

import torch

__all__ = ["CheckpointError", "FORMAT", "VERSION", "save_checkpoint", "load_checkpoint", "load",
           "write_atomic", "reading", "run_total_steps"]

FORMAT = "trpo_ext.checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "env_id", "config", "policy_spec", "policy_state",
                 "value_state", "optimizer_state", "total_steps_done", "iteration", "history", "rng")


class CheckpointError(ValueError):
    """A file that is not a readable trpo_ext checkpoint of a supported version."""


@contextlib.contextmanager
def reading(path):
    """Around code that takes a loaded checkpoint's entries apart: an entry of the wrong type or
    shape (a damaged or hand-edited file) surfaces as a CheckpointError that names the file, not
    as a KeyError or a state-dict mismatch from deep inside."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{os.fspath(path)!r} is a damaged trpo_ext checkpoint: "
                              f"{type(e).__name__}: {e}") from e


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or the new, never a mix."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # The rename itself is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: Dict[str, Any], paths: Iterable[str]) -> None:
    """Serialise ``state`` once and write it atomically to each of ``paths``."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buf)
    data = buf.getvalue()
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomic(path, data)


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read and validate a checkpoint written by :func:`trpo_ext.train`.

    Raises :class:`CheckpointError` for a missing, truncated or foreign file, or one of another
    format version.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — the unpickler fails in many ways on a damaged file
        # torch's own message suggests weights_only=False, which would run code from the file:
        # never relay that; say what the file is not.
        raise CheckpointError(f"{path!r} is not a trpo_ext checkpoint: it cannot be read as one "
                              f"(truncated, corrupt, or another kind of file; "
                              f"{type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a trpo_ext checkpoint (no '{FORMAT}' format marker)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path!r} is a trpo_ext checkpoint of format version "
                              f"{state.get('version')!r}; this trpo_ext reads version {VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path!r} lacks the checkpoint entries {missing}")
    return state


def upgrade_state(state: Dict[str, Any], module) -> Dict[str, Any]:
    """A policy's or critic's state dict of an earlier version (one ``flat`` tensor, ``obs_rms.*``
    buffers) in today's names; the layout of θ is unchanged."""
    if "flat" not in state:
        return state
    out = {n: v.clone() for n, v in zip(module._names, module.split_flat(state["flat"]))}
    for k, v in state.items():
        if k.startswith("obs_rms."):
            out["encoder.rms.obs." + k[len("obs_rms."):]] = v
        elif k != "flat":
            out[k] = v
    return out


def run_total_steps(state: Dict[str, Any], path) -> int:
    """The total environment steps of the run that wrote the checkpoint ``state`` (read from
    ``path``): its ``total_steps`` entry.

    A checkpoint from before that entry existed falls back, with a warning, on the ``config.json``
    of its run directory (``path``'s grandparent), when that file describes the same run (env id
    and seed); without one it raises :class:`CheckpointError` asking for the total.
    """
    from ._checks import require_int

    path = os.fspath(path)
    if "total_steps" in state:
        with reading(path):
            return require_int(state["total_steps"], "total_steps", 1)
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.json")
    try:
        with open(config) as f:
            run = json.load(f)
        total = run["total_steps"]
        same = (run["env_id"] == state.get("env_id") and run["seed"] == state.get("seed")
                and isinstance(total, int) and total >= state["total_steps_done"])
    except (OSError, ValueError, KeyError, TypeError):
        same = False
    if same:
        warnings.warn(f"{path!r} does not record its run's total steps (an older trpo_ext wrote "
                      f"it): using {total:,}, from {config}", stacklevel=3)
        return total
    raise CheckpointError(f"{path!r} does not record its run's total steps (an older trpo_ext "
                          f"wrote it, and no config.json of its run is beside it): pass "
                          f"total_steps= (trpo-ext train --steps N)")


def policy_from_state(state: Dict[str, Any], policy_net=None):
    from .policies import Policy

    cfg = state["config"]
    custom = bool(state.get("custom_networks"))
    if custom and policy_net is None:
        raise CheckpointError("this checkpoint was trained with your own networks and holds only "
                              "their weights: pass the policy network, built as for training, "
                              "as load(path, policy_net=...)")
    if not custom and policy_net is not None:
        raise CheckpointError("this checkpoint was trained with the built-in networks: load it "
                              "without policy_net")
    policy = Policy(state["policy_spec"], hidden_sizes=cfg["hidden_sizes"],
                    normalize_obs=cfg["normalize_obs"], env_id=state["env_id"], net=policy_net,
                    env_kwargs=cfg.get("env_kwargs"))
    try:
        policy.load_state_dict(upgrade_state(state["policy_state"], policy))
    except RuntimeError as e:
        if custom:
            raise CheckpointError(f"the policy_net passed does not match the checkpoint's "
                                  f"weights: {e}") from None
        raise
    return policy


def load(path: str, policy_net=None, value_net=None):
    """The policy stored in a checkpoint, ready for :func:`trpo_ext.evaluate` (CPU, eval mode);
    ``policy.env_id`` is the environment it was trained on (None when trained on a callable).

    A run trained with your own networks stores only their weights (the file is read with
    ``weights_only=True``): pass ``policy_net`` (and optionally ``value_net``), built as for
    training; their weights are loaded into them.  ``value_net`` is accepted for symmetry with
    :func:`trpo_ext.train` and gets the critic's weights.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a checkpoint path, got {type(path).__name__}")
    state = load_checkpoint(path)
    with reading(path):
        policy = policy_from_state(state, policy_net).eval()
        if value_net is not None:
            prefix = "net."
            value_net.load_state_dict({k[len(prefix):]: v for k, v in state["value_state"].items()
                                       if k.startswith(prefix)})
        return policy
