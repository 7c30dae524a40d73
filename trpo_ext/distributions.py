"""Action distributions of TRPO policies, each one object: sampling, log-probability, entropy, the
fused surrogate/KL reduction and its Fisher metric.

A distribution is described by a tuple of parameter tensors, ``params``: what the network outputs
(means or logits, ``[B, out_dim]``) and, for the diagonal Gaussian, the state-independent log-std
``[A]`` that the policy owns.  Conventions (the seed chapter's):

* KL(π_old ‖ π_new), summed over action dimensions / sub-spaces, averaged over the batch;
* ``surrogate = mean_b exp(log π_new(a_b) − logp_old_b) · advantages_b``;
* ``fisher_metric(old, u)`` is the Hessian of the batch-mean KL at new = old applied to a direction
  ``u`` in the parameters (a tuple shaped like ``params``): the M of F·v = Jᵀ M J v.

Everything else in the library talks to these methods, never to the kind of distribution.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from . import kl as _kl

__all__ = ["Distribution", "DiagGaussian", "Categorical", "MultiCategorical", "Bernoulli",
           "for_action_spec"]

Params = Tuple[torch.Tensor, ...]
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class Distribution:
    """The interface; see the module docstring.  ``out_dim`` is the network's output width."""

    out_dim: int
    has_log_std = False

    def draw_noise(self, batch_shape: Tuple[int, ...], generator: Optional[torch.Generator],
                   device) -> torch.Tensor:
        """All the randomness of ``batch_shape`` draws, drawn in one call."""
        raise NotImplementedError

    def sample(self, params: Params, noise: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mode(self, params: Params) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, params: Params, actions: torch.Tensor) -> torch.Tensor:
        """``[B]``: log π(a_b), summed over action dimensions."""
        raise NotImplementedError

    def entropy(self, params: Params) -> torch.Tensor:
        """Mean entropy over the batch (0-d)."""
        raise NotImplementedError

    def mean_kl(self, old: Params, new: Params) -> torch.Tensor:
        """Batch-mean KL(old ‖ new) (0-d), differentiable to second order in ``new``."""
        raise NotImplementedError

    def surrogate_kl(self, old: Params, new: Params, actions: torch.Tensor, logp_old: torch.Tensor,
                     advantages: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(surrogate, mean KL, largest per-row KL)`` in one pass; the first two differentiable
        (first order) in ``new``."""
        raise NotImplementedError

    def fisher_metric(self, old: Params, u: Params) -> Params:
        raise NotImplementedError

    def action_tensor(self, batch_shape: Tuple[int, ...]) -> torch.Tensor:
        """An empty buffer for ``batch_shape`` actions."""
        raise NotImplementedError


class DiagGaussian(Distribution):
    """N(mean, exp(log_std)²) per dimension; ``params = (mean [B, A], log_std [A])``."""

    has_log_std = True

    def __init__(self, action_dim: int):
        self.out_dim = self.action_dim = int(action_dim)

    def draw_noise(self, batch_shape, generator, device):
        return torch.randn(*batch_shape, self.action_dim, generator=generator, device=device)

    def sample(self, params, noise):
        mean, log_std = params
        return noise * log_std.exp() + mean

    def mode(self, params):
        return params[0]

    def log_prob(self, params, actions):
        mean, log_std = params
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z.square() - log_std - _HALF_LOG_2PI).sum(-1)

    def entropy(self, params):
        return (params[1] + 0.5 + _HALF_LOG_2PI).sum()

    def mean_kl(self, old, new):
        return _kl.kl_diag_gaussian(old[0], old[1], new[0], new[1])

    def surrogate_kl(self, old, new, actions, logp_old, advantages):
        return _kl.kl_surrogate_diag_gaussian(old[0], old[1], new[0], new[1], actions, logp_old,
                                              advantages)

    def fisher_metric(self, old, u):
        return _kl.kl_metric_diag_gaussian(old[1], u[0], u[1])

    def action_tensor(self, batch_shape):
        return torch.empty(*batch_shape, self.action_dim)


class Categorical(Distribution):
    """Cat(softmax(logits)); ``params = (logits [B, n],)``, actions int64 ``[B]`` in [0, n)."""

    def __init__(self, n: int):
        self.out_dim = self.n = int(n)

    def draw_noise(self, batch_shape, generator, device):
        return torch.rand(*batch_shape, 1, generator=generator, device=device)

    def sample(self, params, noise):
        # Inverse-CDF draw: a handful of small ops where torch.multinomial costs far more a call.
        below = torch.softmax(params[0], -1).cumsum(-1) < noise
        return below.sum(-1).clamp_(max=self.n - 1)

    def mode(self, params):
        return params[0].argmax(-1)

    def log_prob(self, params, actions):
        return torch.log_softmax(params[0], -1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self, params):
        logp = torch.log_softmax(params[0], -1)
        return -(logp.exp() * logp).sum(-1).mean()

    def mean_kl(self, old, new):
        return _kl.kl_categorical(old[0], new[0])

    def surrogate_kl(self, old, new, actions, logp_old, advantages):
        return _kl.kl_surrogate_categorical(old[0], new[0], actions, logp_old, advantages)

    def fisher_metric(self, old, u):
        return (_kl.kl_metric_categorical(old[0], u[0]),)

    def action_tensor(self, batch_shape):
        return torch.empty(*batch_shape, dtype=torch.long)


class MultiCategorical(Distribution):
    """Independent categoricals over the sub-spaces of a MultiDiscrete(nvec): ``params =
    (logits [B, sum(nvec)],)`` (the sub-spaces' logits side by side), actions int64 ``[B, len(nvec)]``.
    Its KL is the sum of the sub-spaces' KLs, its Fisher metric block-diagonal."""

    def __init__(self, nvec: Sequence[int]):
        self.nvec = [int(n) for n in nvec]
        self.out_dim = sum(self.nvec)

    def _split(self, logits: torch.Tensor):
        return logits.split(self.nvec, -1)

    def draw_noise(self, batch_shape, generator, device):
        return torch.rand(*batch_shape, len(self.nvec), generator=generator, device=device)

    def sample(self, params, noise):
        parts = []
        for i, (logits, n) in enumerate(zip(self._split(params[0]), self.nvec)):
            below = torch.softmax(logits, -1).cumsum(-1) < noise[..., i:i + 1]
            parts.append(below.sum(-1).clamp_(max=n - 1))
        return torch.stack(parts, -1)

    def mode(self, params):
        return torch.stack([x.argmax(-1) for x in self._split(params[0])], -1)

    def log_prob(self, params, actions):
        total = 0
        for i, logits in enumerate(self._split(params[0])):
            logp = torch.log_softmax(logits, -1)
            total = total + logp.gather(-1, actions[..., i:i + 1].long()).squeeze(-1)
        return total

    def entropy(self, params):
        total = 0
        for logits in self._split(params[0]):
            logp = torch.log_softmax(logits, -1)
            total = total - (logp.exp() * logp).sum(-1).mean()
        return total

    def mean_kl(self, old, new):
        return sum(_kl.kl_categorical(o, n)
                   for o, n in zip(self._split(old[0]), self._split(new[0])))

    def surrogate_kl(self, old, new, actions, logp_old, advantages):
        # The ratio is a product over sub-spaces, so the per-sub-space fused ops do not compose;
        # torch ops here, the KL by the op.
        logp_new = self.log_prob(new, actions)
        surrogate = (torch.exp(logp_new - logp_old) * advantages).mean()
        with torch.no_grad():
            row_kl = sum(_row_kl_categorical(o, n)
                         for o, n in zip(self._split(old[0]), self._split(new[0])))
        return surrogate, self.mean_kl(old, new), row_kl.max()

    def fisher_metric(self, old, u):
        return (torch.cat([_kl.kl_metric_categorical(o, x)
                           for o, x in zip(self._split(old[0]), self._split(u[0]))], -1),)

    def action_tensor(self, batch_shape):
        return torch.empty(*batch_shape, len(self.nvec), dtype=torch.long)


class Bernoulli(Distribution):
    """Independent Bernoullis over a MultiBinary(n): ``params = (logits [B, n],)``, P(a_i = 1) =
    sigmoid(logit_i); actions int64 ``[B, n]`` of 0/1.  Each dimension is the two-class categorical
    with logits (0, logit_i), so KL and Fisher metric come from the categorical ops."""

    def __init__(self, n: int):
        self.out_dim = self.n = int(n)

    @staticmethod
    def _two_class(logits: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.zeros_like(logits), logits], -1).reshape(-1, 2)

    def draw_noise(self, batch_shape, generator, device):
        return torch.rand(*batch_shape, self.n, generator=generator, device=device)

    def sample(self, params, noise):
        return (noise < torch.sigmoid(params[0])).long()

    def mode(self, params):
        return (params[0] > 0).long()

    def log_prob(self, params, actions):
        logits = params[0]
        # log σ(l) for a = 1, log σ(−l) for a = 0.
        return -torch.nn.functional.softplus(torch.where(actions.bool(), -logits, logits)).sum(-1)

    def entropy(self, params):
        logits = params[0]
        p = torch.sigmoid(logits)
        return (torch.nn.functional.softplus(logits) - p * logits).sum(-1).mean()

    def mean_kl(self, old, new):
        # The op averages over B·n rows; the KL sums over the n dimensions.
        return _kl.kl_categorical(self._two_class(old[0]), self._two_class(new[0])) * self.n

    def surrogate_kl(self, old, new, actions, logp_old, advantages):
        logp_new = self.log_prob(new, actions)
        surrogate = (torch.exp(logp_new - logp_old) * advantages).mean()
        with torch.no_grad():
            row_kl = _row_kl_categorical(self._two_class(old[0]), self._two_class(new[0]))
            row_kl = row_kl.reshape(old[0].shape).sum(-1)
        return surrogate, self.mean_kl(old, new), row_kl.max()

    def fisher_metric(self, old, u):
        p = torch.sigmoid(old[0])
        return (p * (1 - p) * u[0] / old[0].shape[0],)

    def action_tensor(self, batch_shape):
        return torch.empty(*batch_shape, self.n, dtype=torch.long)


def _row_kl_categorical(logits_old: torch.Tensor, logits_new: torch.Tensor) -> torch.Tensor:
    """``[B]`` per-row KL (a diagnostic: the line search's largest per-row KL)."""
    lp_old = torch.log_softmax(logits_old, -1)
    lp_new = torch.log_softmax(logits_new, -1)
    return (lp_old.exp() * (lp_old - lp_new)).sum(-1)


def for_action_spec(spec: dict) -> Distribution:
    """The distribution for an action space described by :func:`trpo_ext.policies.space_spec`."""
    kind = spec["action_kind"]
    if kind == "box":
        return DiagGaussian(spec["action_dim"])
    if kind == "discrete":
        return Categorical(spec["action_dim"])
    if kind == "multi_discrete":
        return MultiCategorical(spec["action_nvec"])
    if kind == "multi_binary":
        return Bernoulli(spec["action_dim"])
    raise ValueError(f"no distribution for action kind {kind!r}")
