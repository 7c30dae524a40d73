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
from typing import Deque, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["Rollout", "RolloutCollector", "make_vector_env", "check_env_id"]

# Environment construction lives in trpo_ext.envs; these names stay importable from here.
from .envs import EnvSpec, check_env_id, env_factory, make_vector_env  # noqa: E402,F401


@dataclass
class Rollout:
    """One batch, time-major.  ``obs`` are normalised features as the policy saw them."""
    obs: torch.Tensor          # [T, N, obs_dim] float32
    actions: torch.Tensor      # [T, N, A] float32 (Box) or [T, N] int64 (Discrete), unclipped
    rewards: torch.Tensor      # [T, N] float32
    terminated: torch.Tensor   # [T, N] bool
    truncated: torch.Tensor    # [T, N] bool
    values: torch.Tensor       # [T, N] V(s_t)
    next_values: torch.Tensor  # [T, N] V(s_{t+1}); at a truncated step, V(final observation)
    raw_features: torch.Tensor  # [T, N, obs_dim] float32, before normalisation (for the statistics)

    @property
    def done(self) -> torch.Tensor:
        return self.terminated | self.truncated


class RolloutCollector:
    """Steps a vector env with a policy, ``n_steps`` at a time, keeping episodes running across
    batches, and keeps the returns and lengths of the last 100 finished episodes."""

    def __init__(self, envs, policy, n_steps: int, seed: int, device: torch.device):
        self.envs = envs
        self.n_envs = envs.num_envs
        self.n_steps = n_steps
        self.device = device
        spec = policy.spec
        self.gaussian = spec["action_kind"] == "box"
        self.action_start = spec.get("action_start", 0)
        if self.gaussian:
            self.low = np.asarray(spec["action_low"], dtype=np.float32)
            self.high = np.asarray(spec["action_high"], dtype=np.float32)
        self.episode_returns: Deque[float] = collections.deque(maxlen=100)
        self.episode_lengths: Deque[int] = collections.deque(maxlen=100)
        self.episodes = 0
        self.reset(seed)
        # The per-step network always runs on the host, in NumPy (see collect): the step buffers
        # live there, and go to the update's device once per rollout.
        T, N, D = n_steps, self.n_envs, spec["obs_dim"]
        self._obs = torch.empty(T, N, D)
        self._raw = torch.empty(T, N, D)
        if self.gaussian:
            self._actions = torch.empty(T, N, spec["action_dim"])
        else:
            self._actions = torch.empty(T, N, dtype=torch.long)

    def reset(self, seed: int) -> None:
        """Start fresh episodes in every environment, seeded ``seed, seed + 1, …``."""
        self.obs, _ = self.envs.reset(seed=[seed + i for i in range(self.n_envs)])
        self._ep_return = np.zeros(self.n_envs)
        self._ep_length = np.zeros(self.n_envs, dtype=np.int64)

    @torch.no_grad()  # not inference_mode: the update differentiates through these tensors
    def collect(self, policy, value_fn, generator: Optional[torch.Generator]) -> Rollout:
        T, N = self.n_steps, self.n_envs
        rewards = np.empty((T, N), dtype=np.float32)
        terminated = np.empty((T, N), dtype=bool)
        truncated = np.empty((T, N), dtype=bool)
        final_obs: List[Tuple[int, int, np.ndarray]] = []  # (t, i, final obs) of truncated steps
        box_obs = policy.spec["obs_kind"] == "box"
        # All of the rollout's randomness in one draw, so the loop below is only the network.
        noise = policy.draw_noise((T, N), generator).cpu()
        # The per-step network runs in NumPy on the host: a NumPy op on an [8, 64] array costs a
        # few µs, a torch op 2–4× that on the CPU, and on a GPU a launch plus a device-to-host
        # wait for the env's actions every step (measured on an H200 machine: HalfCheetah sampled
        # 2048 steps in 0.18 s that way against 0.105 s on the host).  With the policy on the CPU
        # it reads zero-copy views of the parameter and statistics buffers; on a GPU, one host copy
        # of them per rollout.
        step_fn = _numpy_policy_step(policy, noise.numpy(), self._obs.numpy(),
                                     self._actions.numpy(), self.low if self.gaussian else None,
                                     self.high if self.gaussian else None)
        raw_np = self._raw.numpy()

        def act(t: int, sl: slice, obs):
            """The env actions of the environments ``sl`` at step t, from their observations."""
            if box_obs:
                raw_np[t, sl] = np.asarray(obs).reshape(sl.stop - sl.start, -1)
            else:
                self._raw[t, sl].copy_(policy.encode_obs(obs, device="cpu"))
            env_actions = step_fn(t, raw_np, sl)
            if not self.gaussian and self.action_start:
                env_actions = env_actions + self.action_start
            return env_actions

        def record(t: int, start: int, r, term, trunc, infos) -> None:
            """Step t's results of the environments from ``start`` on."""
            n = len(r)
            rewards[t, start:start + n] = r
            terminated[t, start:start + n] = term
            truncated[t, start:start + n] = trunc
            ep_return, ep_length = self._ep_return[start:start + n], self._ep_length[start:start + n]
            ep_return += r
            ep_length += 1
            done = term | trunc
            if done.any():
                for i in np.flatnonzero(done):
                    if trunc[i] and not term[i]:
                        final_obs.append((t, start + int(i), np.array(infos["final_obs"][i])))
                    self.episode_returns.append(float(ep_return[i]))
                    self.episode_lengths.append(int(ep_length[i]))
                    self.episodes += 1
                    ep_return[i] = 0.0
                    ep_length[i] = 0

        groups = getattr(self.envs, "env_groups", None)
        if groups is None or len(groups) == 1:
            every = slice(0, N)
            for t in range(T):
                self.obs, r, term, trunc, infos = self.envs.step(act(t, every, self.obs))
                record(t, 0, r, term, trunc, infos)
        else:
            # Group g's step t is sent once its actions are known and received just before its
            # actions of step t + 1 are computed: meanwhile the other groups act and step.
            obs = np.array(self.obs)
            for t in range(T + 1):
                for g, sl in enumerate(groups):
                    if t > 0:
                        o, r, term, trunc, infos = self.envs.recv(g)
                        obs[sl] = o
                        record(t - 1, sl.start, r, term, trunc, infos)
                    if t < T:
                        self.envs.send(act(t, sl, obs[sl]), g)
            self.obs = obs

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

        # The rollout's tensors on the update's device (copies: the buffers are reused).
        obs = self._obs.to(self.device, copy=True)
        # V(s_t) and V(s_{t+1}) in batched forwards after the loop rather than one per step.
        D = obs.shape[-1]
        last_obs = policy.normalize(policy.encode_obs(self.obs))
        values_all = value_fn(torch.cat([obs.reshape(T * N, D), last_obs]))
        values = values_all[: T * N].reshape(T, N)
        next_values = torch.cat([values[1:], values_all[T * N:].unsqueeze(0)])
        if final_obs:
            finals = policy.encode_obs(np.stack([o for _, _, o in final_obs]))
            v_final = value_fn(policy.normalize(finals))
            ts = torch.tensor([t for t, _, _ in final_obs], device=self.device)
            js = torch.tensor([i for _, i, _ in final_obs], device=self.device)
            next_values[ts, js] = v_final
        return Rollout(
            obs=obs,
            actions=self._actions.to(self.device, copy=True),
            rewards=torch.from_numpy(rewards).to(self.device),
            terminated=torch.from_numpy(terminated).to(self.device),
            truncated=torch.from_numpy(truncated).to(self.device),
            values=values,
            next_values=next_values,
            raw_features=self._raw.to(self.device, copy=True),
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
    """NumPy arrays of the policy's parameters (in layout order) and of its observation
    normaliser's ``(shift, scale)`` (None without one).  For a policy on the CPU they share memory
    with its buffers; for one on another device they are one host copy, taken now."""
    if policy.flat.device.type == "cpu":
        views = [v.numpy() for v in policy._data_views()]
    else:
        views = [v.numpy() for v in policy.split_flat(policy.flat.detach().cpu())]
    rms = policy.obs_rms
    stats = (rms.shift.cpu().numpy(), rms.scale.cpu().numpy()) if rms is not None else None
    return views, stats


def _numpy_policy_step(policy, noise, obs_out, actions_out, low, high):
    """``step(t, raw, envs=slice(None)) → env actions``, in NumPy on the host: normalise the
    features ``raw[t, envs]`` of the environments ``envs`` into ``obs_out[t, envs]``, sample into
    ``actions_out[t, envs]`` (Gaussian unclipped), return what those environments get."""
    views, stats = host_policy_arrays(policy)
    n_layers = len(policy.hidden_sizes) + 1
    rms = policy.obs_rms
    shift, scale = stats if stats is not None else (None, None)
    clip = rms.clip if rms is not None else None
    weights_t = [views[2 * i].T for i in range(n_layers)]
    biases = [views[2 * i + 1] for i in range(n_layers)]
    std = np.exp(views[-1]) if policy.gaussian else None

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
        return index

    return step
