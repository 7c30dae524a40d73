"""Policies whose parameters are views of one flat buffer, the value function and the observation
normaliser.

A TRPO step works on the policy's parameter vector θ as a whole: the gradient g, the CG solution s,
the step β·s and every line-search trial θ_old + α·β·s are flat vectors.  So the policy keeps all of
its parameters (weights, biases and, for Gaussian policies, the state-independent log-std) in ONE
contiguous ``nn.Parameter`` named ``flat``; the layers read slices of it.  Gradients with respect to
``flat`` come out flat, and a line-search trial is one write into ``flat``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from . import kl as _kl
from ._act import tanh_and_derivative

__all__ = ["RunningMeanStd", "Policy", "ValueFunction", "Adam", "space_spec", "Linearization"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# The smallest scale σ of normalised value targets: all-zero returns must not blow the output layer up.
_MIN_TARGET_SCALE = 1e-4


def space_spec(observation_space, action_space) -> dict:
    """What the networks need to know about an environment's spaces, as plain (JSON-able) data.

    Box observations of any shape are flattened; Discrete observations are one-hot encoded.  Box
    actions get a diagonal Gaussian, Discrete actions a categorical.  Anything else is refused here,
    before any work starts.
    """
    from gymnasium import spaces

    if isinstance(observation_space, spaces.Box):
        if observation_space.shape is None or int(np.prod(observation_space.shape)) == 0:
            raise ValueError(f"unsupported observation space {observation_space!r}: a Box "
                             "observation needs at least one element")
        obs = {"obs_kind": "box", "obs_shape": [int(d) for d in observation_space.shape],
               "obs_dim": int(np.prod(observation_space.shape, dtype=np.int64))}
    elif isinstance(observation_space, spaces.Discrete):
        obs = {"obs_kind": "discrete", "obs_shape": [], "obs_dim": int(observation_space.n),
               "obs_start": int(observation_space.start)}
    else:
        raise ValueError(f"unsupported observation space {observation_space!r}: trpo_ext handles Box "
                         "(flattened) and Discrete (one-hot) observations; wrap the env (e.g. "
                         "gymnasium.wrappers.FlattenObservation) to use it")
    if isinstance(action_space, spaces.Box):
        if len(action_space.shape) != 1 or action_space.shape[0] == 0:
            raise ValueError(f"unsupported action space {action_space!r}: Box actions must be 1-D "
                             "with at least one dimension")
        act = {"action_kind": "box", "action_dim": int(action_space.shape[0]),
               "action_low": [float(x) for x in action_space.low],
               "action_high": [float(x) for x in action_space.high]}
    elif isinstance(action_space, spaces.Discrete):
        act = {"action_kind": "discrete", "action_dim": int(action_space.n),
               "action_start": int(action_space.start)}
    else:
        raise ValueError(f"unsupported action space {action_space!r}: trpo_ext handles Box "
                         "(diagonal Gaussian) and Discrete (categorical) actions")
    return {**obs, **act}


class RunningMeanStd(nn.Module):
    """Running mean and variance of observation features (Chan et al.'s parallel update, float64),
    and the float32 shift/scale that normalise with them: clamp((x − mean) / sqrt(var + ε), ±clip)."""

    def __init__(self, dim: int, epsilon: float = 1e-8, clip: float = 10.0):
        super().__init__()
        self.epsilon = epsilon
        self.clip = clip
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        # Derived float32 copies, kept as buffers so that a loaded state normalises identically.
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold a batch ``[B, dim]`` into the statistics."""
        x = x.reshape(-1, self.mean.numel()).to(torch.float64)
        if x.shape[0] == 0:
            return
        n, batch_mean, batch_var = distributed.moments(x)  # data-parallel: all ranks' batches
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * (n / total)
        self.var.copy_((self.var * self.count + batch_var * n + delta.square() * self.count * n / total)
                       / total)
        self.count.copy_(total)
        self.shift.copy_(self.mean)
        self.scale.copy_(torch.rsqrt(self.var + self.epsilon))

    def normalize(self, x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = torch.sub(x, self.shift, out=out) if out is not None else x - self.shift
        return out.mul_(self.scale).clamp_(-self.clip, self.clip)


def _orthogonal(shape: Sequence[int], gain: float, generator: torch.Generator) -> torch.Tensor:
    w = torch.empty(*shape)
    nn.init.orthogonal_(w, gain=gain, generator=generator)
    return w


class _FlatModule(nn.Module):
    """An MLP (tanh hidden layers) whose parameters are slices of one 1-D ``nn.Parameter``, ``flat``.

    Layers are listed in ``layout`` as (name, shape), in storage order.  Orthogonal init (gain √2
    on hidden layers, ``out_gain`` on the output layer), zero biases.
    """

    def _init_flat(self, sizes: Sequence[int], out_gain: float, generator: torch.Generator,
                   extra: Sequence[Tuple[str, torch.Tensor]] = ()) -> None:
        layout: List[Tuple[str, Tuple[int, ...]]] = []
        chunks = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            last = i == len(sizes) - 2
            layout += [(f"layer{i}.weight", (n_out, n_in)), (f"layer{i}.bias", (n_out,))]
            chunks += [_orthogonal((n_out, n_in), out_gain if last else math.sqrt(2), generator)
                       .flatten(), torch.zeros(n_out)]
        for name, value in extra:
            layout.append((name, tuple(value.shape)))
            chunks.append(value.flatten())
        self.layout = layout
        self._numels = [math.prod(s) for _, s in layout]
        self._n_layers = len(sizes) - 1
        self.flat = nn.Parameter(torch.cat(chunks))
        self._views_key = None
        self._views: List[torch.Tensor] = []

    def named_views(self) -> Dict[str, torch.Tensor]:
        """The parameters by name, each a view of ``self.flat`` (no copies)."""
        return {name: v for (name, _), v in zip(self.layout, self._data_views())}

    def split_flat(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """A flat vector laid out like ``self.flat`` (the parameters, a direction, a host copy) as
        views shaped like the parameters, in layout order."""
        return [c.view(s) for c, (_, s) in zip(flat.split(self._numels), self.layout)]

    def _data_views(self) -> List[torch.Tensor]:
        # Views of flat's storage without autograd, for sampling and line-search trials; rebuilt
        # only when the storage moves (.to(), a new tensor assigned).
        key = (self.flat.data_ptr(), self.flat.device)
        if key != self._views_key:
            self._views = self.split_flat(self.flat.detach())
            self._views_key = key
        return self._views

    def _views_for(self, differentiable: bool) -> List[torch.Tensor]:
        if differentiable:
            # split's backward is one concatenation, so ∂/∂flat arrives as one flat gradient.
            return self.split_flat(self.flat)
        return self._data_views()

    def _mlp(self, x: torch.Tensor, views: List[torch.Tensor]) -> torch.Tensor:
        for i in range(self._n_layers):
            x = F.linear(x, views[2 * i], views[2 * i + 1])
            if i < self._n_layers - 1:
                x = torch.tanh(x)
        return x


class Linearization:
    """A flat MLP (the policy at θ_old, or the value function at its current parameters)
    linearised there: the closed-form Fisher-vector product, g, and the critic's gradients use it.

    Holds each layer's input (the observations, then the tanh outputs) and the tanh
    derivatives, so that ``jvp`` (J v: the first-order change of the network's output along a
    parameter direction v) and ``vjp`` (Jᵀ w: the backward pass) each cost a few matrix products,
    with no autograd graph.  F v = Jᵀ (M (J v)), M being the distribution's Fisher metric
    (:func:`trpo_ext.fisher_metric_diag_gaussian`, :func:`trpo_ext.fisher_metric_categorical`).
    Valid while θ is θ_old: it reads the weights through views of the live parameter buffer.
    """

    def __init__(self, module: "_FlatModule", obs: torch.Tensor):
        self._module = module
        views = module._data_views()
        self._weights = [views[2 * i] for i in range(module._n_layers)]
        inputs = [obs]
        derivs = []
        x = obs
        with torch.no_grad():
            for i in range(module._n_layers):
                x = F.linear(x, views[2 * i], views[2 * i + 1])
                if i < module._n_layers - 1:
                    x, d = tanh_and_derivative(x)  # one pass: tanh and 1 − tanh²
                    inputs.append(x)
                    derivs.append(d)
            self.inputs = inputs
            self.tanh_derivs = derivs
        self.output = x

    def _split(self, flat: torch.Tensor) -> List[torch.Tensor]:
        return self._module.split_flat(flat)

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """J v ``[B, out]`` for a flat parameter direction ``v`` (entries past the network's, such as
        a log-std, are ignored)."""
        parts = self._split(v)
        tangent = None
        for i, w in enumerate(self._weights):
            z = torch.addmm(parts[2 * i + 1], self.inputs[i], parts[2 * i].t())
            if tangent is not None:
                z.addmm_(tangent, w.t())
            if i == len(self._weights) - 1:
                return z
            tangent = z.mul_(self.tanh_derivs[i])
        raise AssertionError("a network has at least one layer")

    def vjp(self, w_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Writes Jᵀ w_out into the network's entries of the flat vector ``out`` and returns it."""
        parts = self._split(out)
        g = w_out
        for i in reversed(range(len(self._weights))):
            torch.mm(g.t(), self.inputs[i], out=parts[2 * i])
            torch.sum(g, 0, out=parts[2 * i + 1])
            if i > 0:
                g = torch.mm(g, self._weights[i]).mul_(self.tanh_derivs[i - 1])
        return out


class Policy(_FlatModule):
    """An MLP policy π_θ(a|s) (tanh hidden layers) over flattened / one-hot observations.

    Box actions: diagonal Gaussian N(mean(s), exp(log_std)²) with a state-independent ``log_std``
    of shape ``[A]``.  Discrete actions: categorical over ``logits(s)``.  All parameters live in
    ``self.flat`` (1-D); :meth:`named_views` shows how it is laid out.  When ``normalize_obs`` is on,
    ``self.obs_rms`` holds the running statistics, which :meth:`act` applies.
    """

    def __init__(self, spec: dict, hidden_sizes: Sequence[int] = (64, 64), init_log_std: float = 0.0,
                 normalize_obs: bool = True, generator: Optional[torch.Generator] = None,
                 env_id: Optional[str] = None):
        super().__init__()
        self.spec = dict(spec)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.env_id = env_id
        self.gaussian = spec["action_kind"] == "box"
        obs_dim, act_dim = spec["obs_dim"], spec["action_dim"]
        sizes = [obs_dim, *self.hidden_sizes, act_dim]
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        # A 0.01 output gain starts with a near-uniform, nearly state-blind policy.
        extra = [("log_std", torch.full((act_dim,), float(init_log_std)))] if self.gaussian else []
        self._init_flat(sizes, 0.01, generator, extra)
        self.obs_rms = RunningMeanStd(obs_dim) if normalize_obs else None
        if self.gaussian:
            self.register_buffer("action_low", torch.tensor(spec["action_low"], dtype=torch.float32))
            self.register_buffer("action_high", torch.tensor(spec["action_high"], dtype=torch.float32))

    # --- the distribution ------------------------------------------------------------------------

    def distribution_params(self, obs: torch.Tensor, differentiable: bool = False
                            ) -> Tuple[torch.Tensor, ...]:
        """``(mean [B, A], log_std [A])`` or ``(logits [B, K],)`` for normalised observations
        ``[B, obs_dim]``.  ``differentiable=True`` builds the graph back to ``self.flat``."""
        views = self._views_for(differentiable)
        x = self._mlp(obs, views)
        return (x, views[-1]) if self.gaussian else (x,)

    def draw_noise(self, batch_shape: Tuple[int, ...], generator: Optional[torch.Generator] = None
                   ) -> torch.Tensor:
        """The randomness of ``batch_shape`` draws in one call: standard normals ``[..., A]``
        (Gaussian) or uniforms ``[..., 1]`` (categorical)."""
        device = self.flat.device
        if self.gaussian:
            return torch.randn(*batch_shape, self.spec["action_dim"], generator=generator,
                               device=device)
        return torch.rand(*batch_shape, 1, generator=generator, device=device)

    @staticmethod
    def categorical_from_uniform(logits: torch.Tensor, u: torch.Tensor,
                                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Inverse-CDF draw from Cat(softmax(logits)) with uniforms ``u [..., 1]``: a handful of
        small ops where torch.multinomial costs ~100 µs a call."""
        below = torch.softmax(logits, -1).cumsum(-1) < u
        index = torch.sum(below, -1, out=out) if out is not None else below.sum(-1)
        return index.clamp_(max=logits.shape[-1] - 1)

    def sample(self, obs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Actions drawn from π(·|obs) (no graph); Gaussian actions are not clipped."""
        params = self.distribution_params(obs)
        noise = self.draw_noise(tuple(obs.shape[:-1]), generator)
        if self.gaussian:
            mean, log_std = params
            return noise.mul_(log_std.exp()).add_(mean)
        return self.categorical_from_uniform(params[0], noise)

    def mode(self, obs: torch.Tensor) -> torch.Tensor:
        params = self.distribution_params(obs)
        return params[0] if self.gaussian else params[0].argmax(-1)

    def log_prob(self, params: Tuple[torch.Tensor, ...], actions: torch.Tensor) -> torch.Tensor:
        if self.gaussian:
            mean, log_std = params
            z = (actions - mean) * torch.exp(-log_std)
            return (-0.5 * z.square() - log_std - _HALF_LOG_2PI).sum(-1)
        return torch.log_softmax(params[0], -1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self, params: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Mean entropy over the batch (0-d tensor)."""
        if self.gaussian:
            return (params[1] + 0.5 + _HALF_LOG_2PI).sum()
        logp = torch.log_softmax(params[0], -1)
        return -(logp.exp() * logp).sum(-1).mean()

    def surrogate_kl(self, old: Tuple[torch.Tensor, ...], new: Tuple[torch.Tensor, ...],
                     actions: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor):
        """(surrogate, mean KL(π_old‖π_new), max KL) by the fused op of this distribution."""
        if self.gaussian:
            return _kl.surrogate_kl_diag_gaussian(old[0], old[1], new[0], new[1], actions, logp_old,
                                                  advantages)
        return _kl.surrogate_kl_categorical(old[0], new[0], actions, logp_old, advantages)

    # --- the update's closed forms ----------------------------------------------------------------

    def linearize(self, obs: torch.Tensor) -> Tuple[Tuple[torch.Tensor, ...], Linearization]:
        """The distribution at θ_old for normalised ``obs`` (detached; the log-std cloned, since the
        line search writes into its buffer) and the network linearised there."""
        lin = Linearization(self, obs)
        params = (lin.output, self._data_views()[-1].clone()) if self.gaussian else (lin.output,)
        return params, lin

    def surrogate_gradient(self, lin: Linearization, old: Tuple[torch.Tensor, ...],
                           actions: torch.Tensor, logp_old: torch.Tensor,
                           advantages: torch.Tensor) -> torch.Tensor:
        """g = ∇θ of the surrogate E[π_θ/π_old · A] at θ_old, as a flat vector: the fused backward op
        gives the gradient in the distribution's parameters, the network's Jᵀ carries it to θ."""
        g = torch.empty_like(self.flat, requires_grad=False)
        zero = torch.zeros((), dtype=lin.output.dtype, device=lin.output.device)
        one = torch.ones((), dtype=lin.output.dtype, device=lin.output.device)
        if self.gaussian:
            d_mean, d_log_std = torch.ops.trpo_ext.kl_diag_gaussian_backward(
                zero, one, old[0], old[1], old[0], old[1], actions, logp_old, advantages)
            g[-d_log_std.numel():] = d_log_std
        else:
            d_mean = torch.ops.trpo_ext.kl_categorical_backward(
                zero, one, old[0], old[0], actions, logp_old, advantages)
        return lin.vjp(d_mean, g)

    def fisher_vector_product(self, lin: Linearization, old: Tuple[torch.Tensor, ...],
                              v: torch.Tensor) -> torch.Tensor:
        """F v for the Fisher matrix F = ∇²θ mean KL(π_old‖π_θ) at θ_old, in closed form Jᵀ M J v."""
        out = torch.empty_like(v)
        u = lin.jvp(v)
        if self.gaussian:
            n = old[1].numel()
            m_mean, m_log_std = _kl.fisher_metric_diag_gaussian(old[1], u, v[-n:])
            out[-n:] = m_log_std
        else:
            m_mean = _kl.fisher_metric_categorical(old[0], u)
        return lin.vjp(m_mean, out)

    # --- observations ----------------------------------------------------------------------------

    def encode_obs(self, obs: Union[np.ndarray, torch.Tensor],
                   device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        """Raw batched observations ``[B, *obs_shape]`` (Box) or ``[B]`` (Discrete) → float32
        features ``[B, obs_dim]`` on ``device`` (default: this policy's), before normalisation."""
        device = self.flat.device if device is None else torch.device(device)
        if self.spec["obs_kind"] == "discrete":
            idx = torch.as_tensor(np.asarray(obs) if not isinstance(obs, torch.Tensor) else obs,
                                  device=device).long().reshape(-1) - self.spec.get("obs_start", 0)
            return F.one_hot(idx, self.spec["obs_dim"]).to(torch.float32)
        x = torch.as_tensor(obs, device=device)
        return x.reshape(-1, self.spec["obs_dim"]).to(torch.float32)

    def normalize(self, features: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.obs_rms is None:
            return features if out is None else out.copy_(features)
        return self.obs_rms.normalize(features, out=out)

    @torch.no_grad()
    def act(self, obs, deterministic: bool = True, generator: Optional[torch.Generator] = None,
            clip: bool = True) -> np.ndarray:
        """Actions for raw observations, ready for ``env.step``: the saved normalisation is applied,
        Gaussian actions are clipped to the action bounds (``clip=True``) and Discrete actions are
        offset by the space's ``start``.  A single observation gives a single action; a batch
        ``[B, ...]`` gives ``[B, ...]``."""
        obs_arr = obs if isinstance(obs, torch.Tensor) else np.asarray(obs)
        obs_shape, shape = tuple(self.spec["obs_shape"]), tuple(obs_arr.shape)
        single = shape == obs_shape
        if not single and shape[1:] != obs_shape:
            raise ValueError(f"obs must have the policy's observation shape {obs_shape} (one "
                             f"observation) or (B, *{obs_shape}) (a batch), got shape {shape}")
        if self.spec["obs_kind"] == "discrete":
            lo = self.spec.get("obs_start", 0)
            values = np.asarray(obs_arr.cpu() if isinstance(obs_arr, torch.Tensor) else obs_arr)
            if values.size and (values.min() < lo or values.max() >= lo + self.spec["obs_dim"]):
                raise ValueError(f"obs holds {values.min()}..{values.max()}, outside the policy's "
                                 f"Discrete observations {lo}..{lo + self.spec['obs_dim'] - 1}")
        x = self.normalize(self.encode_obs(obs_arr))
        a = self.mode(x) if deterministic else self.sample(x, generator)
        if self.gaussian:
            if clip:
                a = torch.maximum(torch.minimum(a, self.action_high), self.action_low)
            out = a.cpu().numpy()
        else:
            out = (a + self.spec.get("action_start", 0)).cpu().numpy()
        return out[0] if single else out

    def check_spaces(self, observation_space, action_space, where: str) -> None:
        """A clear error when an environment's spaces are not those this policy was built for."""
        theirs = space_spec(observation_space, action_space)
        keys = ("obs_kind", "obs_shape", "obs_dim", "obs_start", "action_kind", "action_dim",
                "action_start")
        mismatch = [k for k in keys if theirs.get(k) != self.spec.get(k)]
        if mismatch:
            raise ValueError(f"{where}: the environment's spaces ({observation_space}, "
                             f"{action_space}) are not the policy's: "
                             + ", ".join(f"{k} {theirs.get(k)} vs {self.spec.get(k)}"
                                         for k in mismatch))

    def extra_repr(self) -> str:
        kind = "gaussian" if self.gaussian else "categorical"
        return (f"{kind}, obs_dim={self.spec['obs_dim']}, action_dim={self.spec['action_dim']}, "
                f"hidden_sizes={self.hidden_sizes}, n_params={self.flat.numel()}")


class ValueFunction(_FlatModule):
    """V(s): an MLP (tanh hidden layers) over normalised observation features ``[B, obs_dim]`` → ``[B]``.
    Its parameters are one flat buffer too, so that its Adam step is a few whole-buffer ops.

    With ``normalize_targets`` the network predicts returns divided by a running scale σ, and
    V(s) = σ·net(s), σ the root mean square of the returns it has been fitted to (PopArt, van Hasselt
    et al. 2016, with the scale only).  Adam moves each parameter by about ``lr`` per step whatever
    the gradient's size, so a bare network fitted to returns of several hundred needs hundreds of
    fits to reach their scale; on the normalised scale it needs a few.  Whenever
    :meth:`update_target_statistics` changes σ, the output layer is rescaled so that V's outputs
    stay exactly what they were; the regression loss is on the normalised scale.  Adam's moment
    estimates are not rescaled with it: σ moves by a few percent per fit once the first fits are
    past, and Adam's step is insensitive to the gradient's overall scale.

    Why no shift μ (full PopArt, V = μ + σ·net with μ, σ the returns' mean and spread): measured on
    MountainCarContinuous-v0 it fits the small action-cost returns so well, before the goal is
    ever reached, that the policy learns to stand still (2 of 4 seeds with running statistics, 4 of
    4 with per-batch ones); dividing by the RMS keeps those seeds reaching the goal and helps
    Pendulum as much (benchmarks/RESULTS.md).
    """

    def __init__(self, obs_dim: int, hidden_sizes: Sequence[int] = (64, 64),
                 generator: Optional[torch.Generator] = None, normalize_targets: bool = False):
        super().__init__()
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self._init_flat([obs_dim, *hidden_sizes, 1], 1.0, generator)
        self.normalize_targets = bool(normalize_targets)
        if self.normalize_targets:
            # The mean of the squared returns over the fits so far (float64), and their number;
            # σ = 1 until the first fit, so an unfitted V is the bare network.
            self.register_buffer("target_sq_mean", torch.ones((), dtype=torch.float64))
            self.register_buffer("target_fits", torch.zeros((), dtype=torch.int64))

    def target_scale(self) -> torch.Tensor:
        """σ, a 0-d float64 tensor on this module's device: V(s) = σ·net(s) (1 without target
        normalisation)."""
        if not self.normalize_targets:
            return torch.ones((), dtype=torch.float64, device=self.flat.device)
        return self.target_sq_mean.sqrt().clamp_(min=_MIN_TARGET_SCALE)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out = self._mlp(obs, self._views_for(torch.is_grad_enabled())).squeeze(-1)
        if not self.normalize_targets:
            return out
        # A 0-d float64 σ times a [B] tensor: the result keeps the network's dtype.
        return out * self.target_scale()

    @torch.no_grad()
    def update_target_statistics(self, targets: torch.Tensor) -> torch.Tensor:
        """Fold one fit's regression targets ``[B]`` (returns) into σ, rescale the output layer so
        that V(s) is unchanged: W' = W·σ/σ', b' = b·σ/σ' (PopArt's rule with the shift fixed at 0),
        and return the targets on the network's scale, ``targets / σ'`` ``[B]``, for
        :meth:`regression_gradient`.  Without target normalisation: ``targets`` itself, nothing
        else happens.

        σ² is the mean over fits of each batch's mean squared target (for the equal batches of
        :func:`trpo_ext.train`, the mean over every target so far).  The first fit adopts its σ
        without rescaling: the freshly initialised network is read as predicting normalised
        targets already, rather than kept at the raw scale.  No host synchronisation.
        """
        if not self.normalize_targets:
            return targets
        sigma = self.target_scale()
        self.target_fits += 1
        batch_sq_mean = targets.to(torch.float64).square().mean()
        distributed.reduce_mean_(batch_sq_mean)  # data-parallel: all ranks' targets
        self.target_sq_mean.lerp_(batch_sq_mean, 1.0 / self.target_fits.to(torch.float64))
        new_sigma = self.target_scale()
        ratio = torch.where(self.target_fits == 1, torch.ones_like(sigma), sigma / new_sigma)
        views = self._data_views()
        views[-2].mul_(ratio)  # the output layer's weight [1, H]
        views[-1].mul_(ratio)  # and bias [1]
        return targets / new_sigma

    @torch.no_grad()
    def regression_gradient(self, obs: torch.Tensor, targets: torch.Tensor,
                            grad: torch.Tensor, count: Optional[int] = None) -> torch.Tensor:
        """The loss mean((net(obs) − targets)²) (0-d tensor), ``targets [B]`` on the network's scale
        (returns/σ, as :meth:`update_target_statistics` returns them; the returns themselves
        without target normalisation, when net = V).  It equals mean((V(obs) − returns)²)/σ².  Its
        gradient in ``flat`` is written into ``grad`` by one forward and one backward pass of the
        network, without an autograd graph.  ``count``: the divisor of the mean, when these rows
        are one rank's share of a minibatch of ``count`` rows (data-parallel; default: the rows)."""
        lin = Linearization(self, obs)
        diff = lin.output.squeeze(-1) - targets
        n = diff.numel() if count is None else count
        lin.vjp(diff.unsqueeze(-1) * (2.0 / n), grad)
        return diff.square().sum() / n


class Adam:
    """Adam (Kingma & Ba 2015) on one flat parameter, the arithmetic of ``torch.optim.Adam``
    (no weight decay, no amsgrad): a handful of whole-buffer ops per step, and no import of
    torch.optim's compile machinery (seconds at start-up)."""

    def __init__(self, param: torch.Tensor, lr: float, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, float(lr), betas, float(eps)
        self.step_count = 0
        self.exp_avg = torch.zeros_like(param, memory_format=torch.contiguous_format)
        self.exp_avg_sq = torch.zeros_like(param, memory_format=torch.contiguous_format)

    def zero_grad(self) -> None:
        self.param.grad = None

    @torch.no_grad()
    def step(self, grad: Optional[torch.Tensor] = None) -> None:
        """One step along ``grad`` (default: ``param.grad``)."""
        grad = self.param.grad if grad is None else grad
        b1, b2 = self.betas
        self.step_count += 1
        self.exp_avg.lerp_(grad, 1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        bias1 = 1 - b1 ** self.step_count
        bias2 = 1 - b2 ** self.step_count
        denom = self.exp_avg_sq.sqrt().div_(math.sqrt(bias2)).add_(self.eps)
        self.param.addcdiv_(self.exp_avg, denom, value=-self.lr / bias1)

    def state_dict(self) -> Dict[str, object]:
        return {"step": self.step_count, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "exp_avg": self.exp_avg.detach().cpu(), "exp_avg_sq": self.exp_avg_sq.detach().cpu()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.step_count = int(state["step"])
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
