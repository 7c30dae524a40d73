"""Rollout collection, time-major ``[T, N]``.

The vector env (built by :mod:`trpo_ext.envs`) runs in gymnasium's *same-step* autoreset mode:
when environment i ends an episode at step t, the step already returns the first observation of
the next episode and puts the episode's final observation in ``infos["final_obs"][i]``.  Every step
is then a real transition of the policy (the default next-step mode would insert a step whose
action is ignored), and a truncated step bootstraps from the value of that final observation
(``next_values``).

A vector env with ``env_groups`` (EnvPool) is stepped a group at a time with ``send``/``recv``: the
policy acts for one group while the others step.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Deque, List, Optional, Tuple

import numpy as np
import torch

from . import distributed

__all__ = ["Rollout", "RolloutCollector", "make_vector_env", "check_env_id", "flatten_time"]

# Environment construction lives in trpo_ext.envs; these names stay importable from here.
from .envs import EnvSpec, check_env_id, env_factory, make_vector_env  # noqa: E402,F401


@dataclass
class Rollout:
    """One batch, time-major.  ``obs`` is the network input as the policy saw it (a tensor, or a
    dict of tensors for a Dict space), ``raw_features`` the encoder's features before
    normalisation (for the statistics)."""
    obs: Any                   # [T, N, ...] network input (float32), or a dict of those
    actions: torch.Tensor      # [T, N, A] float32 (Box), [T, N] or [T, N, k] int64, unclipped
    rewards: torch.Tensor      # [T, N] float32
    terminated: torch.Tensor   # [T, N] bool
    truncated: torch.Tensor    # [T, N] bool
    values: torch.Tensor       # [T, N] V(s_t)
    next_values: torch.Tensor  # [T, N] V(s_{t+1}); at a truncated step, V(final observation)
    raw_features: Any          # [T, N, ...] features before normalisation, or a dict of those

    @property
    def done(self) -> torch.Tensor:
        return self.terminated | self.truncated


class RolloutCollector:
    """Steps a vector env with a policy, ``n_steps`` at a time, keeping episodes running across
    batches, and keeps the returns and lengths of the last 100 finished episodes."""

    def __init__(self, envs, policy, n_steps: int, seed: int, device: torch.device,
                 shard: Optional[distributed.Shard] = None):
        self.envs = envs
        self.n_envs = envs.num_envs
        # Data-parallel: these are environments [start, stop) of the run's `total`.
        self.shard = shard or distributed.Shard(0, self.n_envs, self.n_envs)
        self.n_steps = n_steps
        self.device = device
        spec = policy.spec
        self.episode_returns: Deque[float] = collections.deque(maxlen=100)
        self.episode_lengths: Deque[int] = collections.deque(maxlen=100)
        self.episodes = 0
        self.reset(seed)
        # The per-step buffers live on the host and go to the update's device once per rollout:
        # the features as the encoder makes them (flat float32, uint8 images, or a dict of those)
        # and the actions as sampled.
        T, N = n_steps, self.n_envs
        self._raw = _feature_buffers(spec, (T, N))
        self._actions = policy.dist.action_tensor((T, N))
        # The built-in MLP on flat observations samples in NumPy (see collect); it writes its
        # normalised observations here.
        self._numpy = policy.fast_path and spec["obs_kind"] in ("box", "discrete", "multidiscrete")
        self._obs = torch.empty(T, N, spec["obs_dim"]) if self._numpy else None

    def reset(self, seed: int) -> None:
        """Start fresh episodes in every environment, seeded ``seed + i``, i the environment's
        index in the run (``shard.start + 0, 1, …``)."""
        self.obs, _ = self.envs.reset(seed=[seed + self.shard.start + i for i in range(self.n_envs)])
        self._ep_return = np.zeros(self.n_envs)
        self._ep_length = np.zeros(self.n_envs, dtype=np.int64)

    @torch.no_grad()  # not inference_mode: the update differentiates through these tensors
    def collect(self, policy, value_fn, generator: Optional[torch.Generator]) -> Rollout:
        T, N = self.n_steps, self.n_envs
        rewards = np.empty((T, N), dtype=np.float32)
        terminated = np.empty((T, N), dtype=bool)
        truncated = np.empty((T, N), dtype=bool)
        final_obs: List[Tuple[int, int, object]] = []  # (t, i, final obs) of truncated steps
        finished: List[Tuple[int, float, int]] = []  # (t·total + global i, return, length)
        box_obs = policy.spec["obs_kind"] == "box"
        # All of the rollout's randomness in one draw, so the loop below is only the network.
        # Data-parallel: drawn for all the run's environments, this rank's columns kept, so that
        # environment i gets the same noise on any rank (and the ranks' generators stay equal).
        noise = policy.draw_noise((T, self.shard.total), generator)
        noise = noise[:, self.shard.start:self.shard.stop].cpu().contiguous()
        if self._numpy:
            # The built-in MLP's per-step network runs in NumPy on the host: a NumPy op on an
            # [8, 64] array costs a few µs, a torch op several times that, and on a GPU a launch
            # plus a device-to-host wait for every step.  On the CPU it reads zero-copy views of
            # the parameters and statistics; on a GPU, one host copy of them per rollout.
            low, high = ((np.asarray(policy.spec["action_low"], dtype=np.float32),
                          np.asarray(policy.spec["action_high"], dtype=np.float32))
                         if policy.gaussian else (None, None))
            step_fn = _numpy_policy_step(policy, noise.numpy(), self._obs.numpy(),
                                         self._actions.numpy(), low, high)
        else:
            step_fn = _torch_policy_step(policy, noise, self._raw, self._actions)
        raw = self._raw
        raw_np = raw.numpy() if isinstance(raw, torch.Tensor) else None

        def act(t: int, sl: slice, obs):
            """The env actions of the environments ``sl`` at step t, from their observations."""
            if box_obs:
                raw_np[t, sl] = np.asarray(obs).reshape(sl.stop - sl.start, -1)
            else:
                _tree_set(raw, t, policy.encode_obs(obs, device="cpu"), sl)
            return step_fn(t, raw_np if self._numpy else raw, sl)

        def record(t: int, start: int, r, term, trunc, infos) -> None:
            """Step t's results of the environments from ``start`` on."""
            n = len(r)
            rewards[t, start:start + n] = r
            terminated[t, start:start + n] = term
            truncated[t, start:start + n] = trunc
            ep_return = self._ep_return[start:start + n]
            ep_length = self._ep_length[start:start + n]
            ep_return += r
            ep_length += 1
            done = term | trunc
            if done.any():
                for i in np.flatnonzero(done):
                    if trunc[i] and not term[i]:
                        final_obs.append((t, start + int(i), _copy_obs(infos["final_obs"][i])))
                    finished.append((t * self.shard.total + self.shard.start + start + int(i),
                                     float(ep_return[i]), int(ep_length[i])))
                    ep_return[i] = 0.0
                    ep_length[i] = 0

        groups = getattr(self.envs, "env_groups", None)
        if groups is None:
            every = slice(0, N)
            for t in range(T):
                self.obs, r, term, trunc, infos = self.envs.step(act(t, every, self.obs))
                record(t, 0, r, term, trunc, infos)
        else:
            # Group g's step t is sent once its actions are known and received just before its
            # actions of step t + 1 are computed: meanwhile the other groups act and step.  Step
            # t's bookkeeping waits until step t + 1 is sent: a pool whose threads idle longer
            # than a few tens of µs puts them to sleep, and waking them costs more than the step.
            obs = np.array(self.obs)
            for t in range(T + 1):
                for g, sl in enumerate(groups):
                    if t > 0:
                        o, r, term, trunc, infos = self.envs.recv(g)
                        obs[sl] = o
                    if t < T:
                        self.envs.send(act(t, sl, obs[sl]), g)
                    if t > 0:
                        record(t - 1, sl.start, r, term, trunc, infos)
            self.obs = obs

        # Data-parallel: the episodes that ended on every rank, in one process's order.
        count, ended = distributed.gather_episodes(finished, self.episode_returns.maxlen)
        for ret, length in ended:
            self.episode_returns.append(ret)
            self.episode_lengths.append(length)
        self.episodes += count

        # A NaN or infinite reward or observation would poison the observation statistics, the
        # critic and every later update without an error: refuse it where it enters.
        _require_finite(rewards, "reward")
        if box_obs:
            _require_finite(raw_np, "observation")
            _require_finite(np.asarray(self.obs, dtype=np.float32).reshape(N, -1)[None],
                            "observation", first_step=T)
            for t, i, o in final_obs:
                if not np.isfinite(np.asarray(o, dtype=np.float32)).all():
                    raise ValueError(f"the environment returned a non-finite final observation "
                                     f"at step {t} of environment {i} of this rollout; trpo_ext "
                                     f"cannot learn from NaN or infinite observations (in float32)")

        # The rollout's tensors on the update's device (copies: the buffers are reused).  The
        # network input is made from the stored features in one batch: the statistics have not
        # changed since the steps were taken.
        features = _tree_map(lambda b: b.to(self.device, copy=True), raw)
        flat = _tree_map(lambda b: b.reshape(T * N, *b.shape[2:]), features)
        last = policy.encode_obs(self.obs)
        x_all = policy.normalize(_tree_map2(lambda a, b: torch.cat([a, b]), flat, last))
        # V(s_t) and V(s_{t+1}) in one batched forward after the loop rather than one per step.
        values_all = value_fn(x_all)
        values = values_all[: T * N].reshape(T, N)
        next_values = torch.cat([values[1:], values_all[T * N:].unsqueeze(0)])
        if final_obs:
            finals = policy.encode_obs(_stack_obs([o for _, _, o in final_obs]))
            v_final = value_fn(policy.normalize(finals))
            ts = torch.tensor([t for t, _, _ in final_obs], device=self.device)
            js = torch.tensor([i for _, i, _ in final_obs], device=self.device)
            next_values[ts, js] = v_final
        return Rollout(
            obs=_tree_map(lambda x: x[:T * N].reshape(T, N, *x.shape[1:]), x_all),
            actions=self._actions.to(self.device, copy=True),
            rewards=torch.from_numpy(rewards).to(self.device),
            terminated=torch.from_numpy(terminated).to(self.device),
            truncated=torch.from_numpy(truncated).to(self.device),
            values=values,
            next_values=next_values,
            raw_features=features,
        )

    def close(self) -> None:
        self.envs.close()


def _require_finite(x: np.ndarray, what: str, first_step: int = 0) -> None:
    """``x [T, N, ...]`` of one rollout: a clear error naming the first non-finite entry."""
    finite = np.isfinite(x)
    if finite.all():
        return
    idx = tuple(np.argwhere(~finite)[0])
    raise ValueError(f"the environment returned a non-finite {what} ({float(x[idx])}) at step "
                     f"{first_step + int(idx[0])} of environment {int(idx[1])} of this rollout; "
                     f"trpo_ext cannot learn from NaN or infinite {what}s (in float32): clean them "
                     f"in a wrapper around the environment")


def host_policy_arrays(policy):
    """NumPy arrays of the built-in MLP policy's parameters (θ's order: each layer's weight and
    bias, then the log-std) and of its observation normaliser's ``(shift, scale)`` (None without
    one).  For a policy on the CPU they share memory with its buffers; for one on another device
    they are one host copy, taken now."""
    if policy.flat.device.type == "cpu":
        views = [v.numpy() for v in policy.split_flat(policy.flat)]
    else:
        views = [v.numpy() for v in policy.split_flat(policy.flat.detach().cpu())]
    rms = policy.obs_rms
    stats = (rms.shift.cpu().numpy(), rms.scale.cpu().numpy()) if rms is not None else None
    return views, stats


def _numpy_policy_step(policy, noise, obs_out, actions_out, low, high):
    """``step(t, raw, envs=slice(None)) → env actions``, in NumPy on the host, for the built-in
    MLP: normalise the features ``raw[t, envs]`` of the environments ``envs`` into
    ``obs_out[t, envs]``, sample into ``actions_out[t, envs]`` (Gaussian unclipped), return what
    those environments get."""
    views, stats = host_policy_arrays(policy)
    n_layers = len(policy.net.layers)
    rms = policy.obs_rms
    shift, scale = stats if stats is not None else (None, None)
    clip = rms.clip if rms is not None else None
    weights_t = [views[2 * i].T for i in range(n_layers)]
    biases = [views[2 * i + 1] for i in range(n_layers)]
    std = np.exp(views[-1]) if policy.gaussian else None
    start = policy.spec.get("action_start", 0)

    def step(t, raw_np, envs=slice(None)):
        x = obs_out[t, envs]
        if shift is not None:
            np.subtract(raw_np[t, envs], shift, out=x)
            np.multiply(x, scale, out=x)
            np.clip(x, -clip, clip, out=x)
        else:
            x[...] = raw_np[t, envs]
        for i in range(n_layers):
            x = x @ weights_t[i]
            x += biases[i]
            if i < n_layers - 1:
                np.tanh(x, out=x)
        if std is not None:
            a = actions_out[t, envs]
            np.multiply(noise[t, envs], std, out=a)
            a += x
            return np.minimum(np.maximum(a, low), high)
        # Inverse-CDF categorical draw from softmax(x).
        x -= x.max(-1, keepdims=True)
        np.exp(x, out=x)
        np.cumsum(x, -1, out=x)
        below = x < noise[t, envs] * x[:, -1:]
        index = np.minimum(below.sum(-1), x.shape[-1] - 1)
        actions_out[t, envs] = index
        return index + start if start else index

    return step


def _torch_policy_step(policy, noise, raw, actions_out):
    """``step(t, raw, envs=slice(None)) → env actions`` for any policy: its torch forward without
    a graph on the features of step ``t`` of the environments ``envs``, the distribution's draw
    from ``noise[t, envs]``."""
    device = policy.flat.device

    def step(t, raw, envs=slice(None)):
        x = policy.normalize(_tree_map(lambda b: b[t, envs].to(device), raw))
        actions = policy.dist.sample(policy.distribution_params(x), noise[t, envs].to(device))
        actions_out[t, envs] = actions.cpu()
        return policy.env_actions(actions)

    return step


# --- features as tensors or dicts of tensors -----------------------------------------------------

def _tree_map(fn, tree):
    return {k: fn(v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def _tree_map2(fn, a, b):
    return {k: fn(a[k], b[k]) for k in a} if isinstance(a, dict) else fn(a, b)


def _tree_set(tree, t: int, value, envs=slice(None)) -> None:
    if isinstance(tree, dict):
        for k in tree:
            tree[k][t, envs].copy_(value[k])
    else:
        tree[t, envs].copy_(value)


def _feature_buffers(spec: dict, batch_shape: Tuple[int, ...]):
    """Empty host buffers for ``batch_shape`` features of the observation space ``spec``."""
    if spec["obs_kind"] == "dict":
        return {k: _feature_buffers(p, batch_shape) for k, p in spec["obs_keys"].items()}
    if spec["obs_kind"] == "image":
        return torch.empty(*batch_shape, *spec["image_chw"], dtype=torch.uint8)
    return torch.empty(*batch_shape, spec["obs_dim"])


def _copy_obs(obs):
    return {k: np.array(v) for k, v in obs.items()} if isinstance(obs, dict) else np.array(obs)


def _stack_obs(observations: List[Any]):
    if isinstance(observations[0], dict):
        return {k: np.stack([o[k] for o in observations]) for k in observations[0]}
    return np.stack(observations)


def flatten_time(tree, samples: int):
    """``[T, N, ...]`` tensors (or a dict of them) as ``[T·N, ...]``."""
    return _tree_map(lambda x: x.reshape(samples, *x.shape[2:]), tree)
