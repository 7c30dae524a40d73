"""Policies and value functions: any torch network plus an action distribution, with every
parameter a view of one flat buffer.

A TRPO step works on the policy's parameter vector θ as a whole: the gradient g, the CG solution s,
the step β·s and every line-search trial θ_old + α·β·s are flat vectors.  So a :class:`Policy`
keeps all of its parameters — the network's, in the order of its ``named_parameters()``, then the
state-independent log-std of a Gaussian — as views of ONE contiguous tensor, ``policy.flat``: a
line-search trial is one write into it, and ``parameters_to_vector(policy.parameters())`` is θ.

The network is any ``nn.Module`` mapping a batch of observations, as :class:`ObservationEncoder`
prepares them, to the distribution's parameters (means for Box actions, logits otherwise).  Its
Jacobian products — for g and the Fisher-vector products — come from autograd
(:class:`AutogradLinearization`); the built-in tanh MLP has a closed-form fast path
(:class:`Linearization`) that the tests hold to the autograd path.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from . import distributions as _dist
from ._tanh_and_derivative import tanh_and_derivative

__all__ = ["RunningMeanStd", "ObservationEncoder", "MLP", "NatureCNN", "DictExtractor", "Policy",
           "ValueFunction", "Adam", "space_spec", "Linearization", "AutogradLinearization",
           "linearize", "surrogate_gradient", "fisher_product", "fisher_vector_product"]

# The smallest scale σ of normalised value targets: all-zero returns must not blow the output layer up.
_MIN_TARGET_SCALE = 1e-4
# The Nature-DQN extractor's three convolutions need at least this many pixels on each side.
_MIN_IMAGE_SIDE = 36


# --- spaces --------------------------------------------------------------------------------------

def _is_image(space) -> bool:
    from gymnasium import spaces

    return isinstance(space, spaces.Box) and len(space.shape) == 3 and space.dtype == np.uint8


def _obs_part_spec(space, where: str) -> dict:
    """One observation (or one Dict key) as plain data: "box" (flattened float features; also
    MultiBinary), "image" (3-D uint8, fed channels-first), "discrete" (one-hot) or
    "multidiscrete" (the elements' one-hots side by side, in the flattened order)."""
    from gymnasium import spaces

    if _is_image(space):
        shape = [int(d) for d in space.shape]
        # Channels last (H, W, C) is gymnasium's convention for pixels; channels first when the
        # first axis is small and the last is not.
        channels_last = not (shape[0] <= 4 < shape[2])
        c, h, w = (shape[2], shape[0], shape[1]) if channels_last else shape
        return {"obs_kind": "image", "obs_shape": shape, "channels_last": channels_last,
                "image_chw": [c, h, w], "obs_dim": c * h * w}
    if isinstance(space, spaces.Box):
        if space.shape is None or int(np.prod(space.shape)) == 0:
            raise ValueError(f"unsupported observation space {where}{space!r}: a Box observation "
                             "needs at least one element")
        return {"obs_kind": "box", "obs_shape": [int(d) for d in space.shape],
                "obs_dim": int(np.prod(space.shape, dtype=np.int64))}
    if isinstance(space, spaces.Discrete):
        return {"obs_kind": "discrete", "obs_shape": [], "obs_dim": int(space.n),
                "obs_start": int(space.start)}
    if isinstance(space, spaces.MultiBinary):
        return {"obs_kind": "box", "obs_shape": [int(d) for d in space.shape],
                "obs_dim": int(np.prod(space.shape, dtype=np.int64))}
    if isinstance(space, spaces.MultiDiscrete):
        nvec = [int(n) for n in space.nvec.reshape(-1)]
        return {"obs_kind": "multidiscrete", "obs_shape": [int(d) for d in space.shape],
                "obs_dim": sum(nvec), "obs_nvec": nvec,
                "obs_start": [int(a) for a in space.start.reshape(-1)]}
    hint = ("flatten it with gymnasium.wrappers.FlattenObservation" if where == "" else
            f"drop or convert key {where.strip(': ')!r} with a gymnasium observation wrapper "
            "(e.g. gymnasium.wrappers.FilterObservation or TransformObservation)")
    raise ValueError(f"unsupported observation space {where}{space!r}: trpo_ext takes Box "
                     f"(flat, or 3-D uint8 images), Discrete and MultiDiscrete (one-hot), "
                     f"MultiBinary and Dict of those; {hint}")


def space_spec(observation_space, action_space) -> dict:
    """What the networks need to know about an environment's spaces, as plain (JSON-able) data.

    Observations: Box or MultiBinary (flattened), 3-D uint8 Box (an image), Discrete or
    MultiDiscrete (one-hot), or a Dict of those (``obs_kind == "dict"``, ``obs_keys`` maps each
    key to its own description).  Actions: Box (diagonal Gaussian), Discrete (categorical),
    MultiDiscrete (one categorical per sub-space), MultiBinary (one Bernoulli per dimension).
    Anything else is refused here, before any work starts, with the wrapper to use.
    """
    from gymnasium import spaces

    if isinstance(observation_space, spaces.Dict):
        if not observation_space.spaces:
            raise ValueError("unsupported observation space: an empty Dict")
        keys = {str(k): _obs_part_spec(s, f"key {k!r}: ")
                for k, s in observation_space.spaces.items()}
        obs = {"obs_kind": "dict", "obs_keys": keys,
               "obs_dim": sum(k["obs_dim"] for k in keys.values())}
    else:
        obs = _obs_part_spec(observation_space, "")
    if isinstance(action_space, spaces.Box):
        if len(action_space.shape) != 1 or action_space.shape[0] == 0:
            raise ValueError(f"unsupported action space {action_space!r}: Box actions must be 1-D "
                             "with at least one dimension (wrap the env to flatten them)")
        act = {"action_kind": "box", "action_dim": int(action_space.shape[0]),
               "action_low": [float(x) for x in action_space.low],
               "action_high": [float(x) for x in action_space.high]}
    elif isinstance(action_space, spaces.Discrete):
        act = {"action_kind": "discrete", "action_dim": int(action_space.n),
               "action_start": int(action_space.start)}
    elif isinstance(action_space, spaces.MultiDiscrete):
        if action_space.nvec.ndim != 1 or action_space.nvec.size == 0:
            raise ValueError(f"unsupported action space {action_space!r}: MultiDiscrete actions "
                             "must be 1-D with at least one sub-space")
        act = {"action_kind": "multi_discrete", "action_dim": int(action_space.nvec.size),
               "action_nvec": [int(n) for n in action_space.nvec],
               "action_start": [int(s) for s in action_space.start]}
    elif isinstance(action_space, spaces.MultiBinary):
        if len(action_space.shape) != 1 or action_space.shape[0] == 0:
            raise ValueError(f"unsupported action space {action_space!r}: MultiBinary actions "
                             "must be 1-D with at least one dimension")
        act = {"action_kind": "multi_binary", "action_dim": int(action_space.shape[0])}
    else:
        raise ValueError(f"unsupported action space {action_space!r}: trpo_ext handles Box "
                         "(diagonal Gaussian), Discrete (categorical), MultiDiscrete and "
                         "MultiBinary actions")
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


Features = Union[torch.Tensor, Dict[str, torch.Tensor]]


def _index_layout(part: dict) -> Tuple[np.ndarray, np.ndarray]:
    """(nvec, start) of a MultiDiscrete observation, or of a Discrete one as one element."""
    return (np.asarray(part.get("obs_nvec", [part["obs_dim"]]), dtype=np.int64),
            np.asarray(part.get("obs_start", 0), dtype=np.int64).reshape(-1))


def _check_indices(arr, part: dict, where: str) -> None:
    """A clear error for Discrete or MultiDiscrete observations outside the space."""
    multi = part["obs_kind"] == "multidiscrete"
    n, lo = _index_layout(part)
    values = np.asarray(arr.cpu() if isinstance(arr, torch.Tensor) else arr).reshape(-1, len(n))
    outside = ((values < lo) | (values >= lo + n)).any(-1)
    if outside.any():
        first, hi = values[outside][0], lo + n - 1
        if not multi:
            first, lo, hi = first[0], lo[0], hi[0]
        raise ValueError(f"{where} holds {first.tolist()}, outside the policy's "
                         f"{'MultiDiscrete' if multi else 'Discrete'} observations: from "
                         f"{lo.tolist()} to {hi.tolist()}")


class ObservationEncoder(nn.Module):
    """Raw environment observations → the tensors a network takes.

    ``encode`` turns a batch of raw observations (NumPy or torch, ``[B, *obs_shape]``, or a dict of
    those for a Dict space) into *features*: Box, MultiBinary → float32 ``[B, obs_dim]``
    (flattened), Discrete → one-hot float32 ``[B, n]``, MultiDiscrete → its elements' one-hots
    side by side ``[B, sum(nvec)]``, image → uint8 ``[B, C, H, W]`` (channels moved first).
    Calling the encoder on features gives the *network input*: flat features normalised by their
    running mean and variance (``normalize_obs``; each Dict key has its own statistics), clipped
    to ±10; images scaled to [0, 1] as float32.  The statistics change only between updates
    (:meth:`update`), so features can be stored and turned into network input later.
    """

    def __init__(self, spec: dict, normalize: bool = True):
        super().__init__()
        self.spec = spec
        parts = spec["obs_keys"] if spec["obs_kind"] == "dict" else {"": spec}
        self.rms = nn.ModuleDict({
            (k or "obs"): RunningMeanStd(p["obs_dim"])
            for k, p in parts.items() if normalize and p["obs_kind"] != "image"})

    def _rms(self, key: str) -> Optional[RunningMeanStd]:
        return self.rms[key or "obs"] if (key or "obs") in self.rms else None

    @staticmethod
    def _encode_part(part: dict, x, device) -> torch.Tensor:
        if part["obs_kind"] in ("discrete", "multidiscrete"):  # a Discrete is one element
            # A value past its element's range would land in the next element's columns.
            _check_indices(x, part, "the observation")
            arr = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
            nvec, start = _index_layout(part)
            idx = arr.to(device).long().reshape(-1, len(nvec))
            # Element j's one-hot occupies columns offset_j .. offset_j + nvec_j − 1.
            offset = np.concatenate([[0], np.cumsum(nvec[:-1])]) - start
            out = torch.zeros(idx.shape[0], part["obs_dim"], device=device)
            return out.scatter_(1, idx + torch.as_tensor(offset, device=device), 1.0)
        t = torch.as_tensor(x, device=device)
        if part["obs_kind"] == "image":
            t = t.reshape(-1, *part["obs_shape"])
            return (t.permute(0, 3, 1, 2) if part["channels_last"] else t).to(torch.uint8)
        return t.reshape(-1, part["obs_dim"]).to(torch.float32)

    def encode(self, obs, device=None) -> Features:
        device = torch.device("cpu") if device is None else device
        if self.spec["obs_kind"] == "dict":
            return {k: self._encode_part(p, obs[k], device)
                    for k, p in self.spec["obs_keys"].items()}
        return self._encode_part(self.spec, obs, device)

    def forward(self, features: Features) -> Features:
        if isinstance(features, dict):
            return {k: self._input(self.spec["obs_keys"][k], k, v) for k, v in features.items()}
        return self._input(self.spec, "", features)

    def _input(self, part: dict, key: str, x: torch.Tensor) -> torch.Tensor:
        if part["obs_kind"] == "image":
            return x.to(torch.float32).div_(255.0)
        rms = self._rms(key)
        return rms.normalize(x) if rms is not None else x

    @torch.no_grad()
    def update(self, features: Features) -> None:
        """Fold a batch of features (any leading shape) into the running statistics."""
        if isinstance(features, dict):
            for k, v in features.items():
                rms = self._rms(k)
                if rms is not None:
                    rms.update(v.reshape(-1, v.shape[-1]))
        elif self._rms("") is not None:
            self._rms("").update(features.reshape(-1, features.shape[-1]))


def _orthogonal(shape: Sequence[int], gain: float, generator: torch.Generator) -> torch.Tensor:
    w = torch.empty(*shape)
    nn.init.orthogonal_(w, gain=gain, generator=generator)
    return w


class MLP(nn.Module):
    """The built-in network: linear layers with tanh between them; orthogonal weights (gain √2 on
    hidden layers, ``out_gain`` on the output layer), zero biases.  Policies and critics built on
    it use the closed-form :class:`Linearization` instead of autograd."""

    def __init__(self, sizes: Sequence[int], out_gain: float = 1.0,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList()
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layer = nn.Linear(n_in, n_out)
            gain = out_gain if i == len(sizes) - 2 else math.sqrt(2)
            with torch.no_grad():
                layer.weight.copy_(_orthogonal((n_out, n_in), gain, generator))
                layer.bias.zero_()
            self.layers.append(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


class NatureCNN(nn.Module):
    """The Nature-DQN feature extractor (Mnih et al. 2015) for images ``[B, C, H, W]`` in [0, 1]:
    three ReLU convolutions (32×8×8 stride 4, 64×4×4 stride 2, 64×3×3 stride 1), then a ReLU
    linear layer to ``features`` (512)."""

    def __init__(self, chw: Sequence[int], features: int = 512):
        super().__init__()
        c, h, w = chw
        if min(h, w) < _MIN_IMAGE_SIDE:
            raise ValueError(f"image observations of {h}×{w} pixels are too small for the built-in "
                             f"CNN (at least {_MIN_IMAGE_SIDE}×{_MIN_IMAGE_SIDE}); pass your own "
                             "policy_net and value_net")
        self.convs = nn.Sequential(
            nn.Conv2d(c, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            n_flat = self.convs(torch.zeros(1, c, h, w)).shape[1]
        self.linear = nn.Sequential(nn.Linear(n_flat, features), nn.ReLU())
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x))


class DictExtractor(nn.Module):
    """One extractor per key of a Dict observation — :class:`NatureCNN` for images, the features
    themselves for the rest — concatenated, keys in the space's order."""

    def __init__(self, keys: Dict[str, dict]):
        super().__init__()
        self.keys = list(keys)
        self.cnns = nn.ModuleDict({k: NatureCNN(p["image_chw"]) for k, p in keys.items()
                                   if p["obs_kind"] == "image"})
        self.features = sum(self.cnns[k].features if k in self.cnns else p["obs_dim"]
                            for k, p in keys.items())

    def forward(self, obs: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.cnns[k](obs[k]) if k in self.cnns else obs[k] for k in self.keys],
                         -1)


def default_network(spec: dict, hidden_sizes: Sequence[int], out_dim: int, out_gain: float,
                    generator: torch.Generator) -> nn.Module:
    """The built-in network for an observation space: an :class:`MLP` on flat features; a
    :class:`NatureCNN` or :class:`DictExtractor` followed by an MLP head otherwise."""
    kind = spec["obs_kind"]
    # Layers draw their default initialisation from torch's global generator: fork it, so that
    # building a network leaves the caller's random state as it was, and initialise from
    # ``generator`` instead.
    with torch.random.fork_rng(devices=[]):
        if kind in ("box", "discrete", "multidiscrete"):
            return MLP([spec["obs_dim"], *hidden_sizes, out_dim], out_gain, generator)
        extractor = NatureCNN(spec["image_chw"]) if kind == "image" \
            else DictExtractor(spec["obs_keys"])
        for m in extractor.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.orthogonal_(m.weight, gain=math.sqrt(2), generator=generator)
                nn.init.zeros_(m.bias)
        return nn.Sequential(extractor, MLP([extractor.features, *hidden_sizes, out_dim],
                                            out_gain, generator))


def _flatten_parameters(module: nn.Module) -> torch.Tensor:
    """Moves every parameter of ``module`` into one new contiguous tensor and makes each a view of
    it (``param.data`` reassigned; the Parameter objects, their names and order are kept).
    Returns that tensor."""
    params = list(module.parameters())
    if not params:
        raise ValueError(f"{type(module).__name__} has no parameters to train")
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(f"all parameters of a trpo_ext policy or critic must share one dtype and "
                         f"device, got dtypes {sorted(map(str, dtypes))} and devices "
                         f"{sorted(map(str, devices))}")
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        n = p.numel()
        p.data = flat[offset:offset + n].view_as(p)
        offset += n
    return flat


class _FlatModule(nn.Module):
    """A module whose parameters are views of ``self.flat`` (see :func:`_flatten_parameters`),
    re-established whenever the module is moved or cast."""

    def _init_flat(self) -> None:
        self.flat = _flatten_parameters(self)
        self._names = [n for n, _ in self.named_parameters()]
        self._shapes = [p.shape for p in self.parameters()]
        self._numels = [p.numel() for p in self.parameters()]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if "flat" in self.__dict__:
            self.flat = _flatten_parameters(self)
        return self

    def split_flat(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """A flat vector laid out like θ as views shaped like the parameters, in order."""
        return [c.view(s) for c, s in zip(flat.split(self._numels), self._shapes)]

    def named_views(self) -> Dict[str, torch.Tensor]:
        return dict(zip(self._names, self.split_flat(self.flat)))


class Linearization:
    """The built-in :class:`MLP` linearised at its current parameters, in closed form: it holds each
    layer's input and the tanh derivatives, so that ``jvp`` (J v) and ``vjp`` (Jᵀ w) each cost a few
    matrix products, with no autograd graph.  Valid while the parameters do not change."""

    def __init__(self, mlp: MLP, x: torch.Tensor, n_params: int):
        self.n_params = n_params
        self._weights = [layer.weight.detach() for layer in mlp.layers]
        self._shapes = [(layer.weight.shape, layer.bias.shape) for layer in mlp.layers]
        inputs, derivs = [x], []
        with torch.no_grad():
            for i, layer in enumerate(mlp.layers):
                x = F.linear(x, layer.weight, layer.bias)
                if i < len(mlp.layers) - 1:
                    x, d = tanh_and_derivative(x)  # one pass: tanh and 1 − tanh²
                    inputs.append(x)
                    derivs.append(d)
        self.inputs, self.tanh_derivs, self.output = inputs, derivs, x

    def _split(self, flat: torch.Tensor) -> List[torch.Tensor]:
        out, offset = [], 0
        for ws, bs in self._shapes:
            nw, nb = ws.numel(), bs.numel()
            out += [flat[offset:offset + nw].view(ws), flat[offset + nw:offset + nw + nb]]
            offset += nw + nb
        return out

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """J v ``[B, out]`` for a flat direction ``v`` (entries past the network's are ignored)."""
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
        """Writes Jᵀ w_out into the network's entries of the flat vector ``out``; returns ``out``."""
        parts = self._split(out)
        g = w_out
        for i in reversed(range(len(self._weights))):
            torch.mm(g.t(), self.inputs[i], out=parts[2 * i])
            torch.sum(g, 0, out=parts[2 * i + 1])
            if i > 0:
                g = torch.mm(g, self._weights[i]).mul_(self.tanh_derivs[i - 1])
        return out


class AutogradLinearization:
    """Any network linearised at its current parameters by autograd, with the interface of
    :class:`Linearization`: ``vjp`` (Jᵀ w) is a backward pass of one recorded forward pass; ``jvp``
    (J v) reverse-over-reverse on that recording (Jᵀu is linear in u, so J v = ∂(Jᵀu·v)/∂u), which
    reuses the recorded activations, or forward mode (torch.func.jvp), which recomputes them, for
    networks with convolutions, whose double backward torch runs on a slow CPU path
    (``benchmarks/bench_update.py --jvp`` times both; ``forward_mode`` overrides the choice).  The
    network's parameters are θ's first ``n_params`` entries."""

    def __init__(self, net: nn.Module, x: Features, n_params: int,
                 forward_mode: Optional[bool] = None):
        self.n_params = n_params
        names = [n for n, _ in net.named_parameters()]
        shapes = [p.shape for p in net.parameters()]
        numels = [p.numel() for p in net.parameters()]

        def f(theta: torch.Tensor) -> torch.Tensor:
            params = {n: t.view(s) for n, t, s in zip(names, theta.split(numels), shapes)}
            return torch.func.functional_call(net, params, (x,))

        # A copy: the line search later writes into the parameters' storage.
        self._theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        theta = self._theta.detach().requires_grad_()
        if forward_mode is None:
            forward_mode = any(isinstance(m, nn.modules.conv._ConvNd) for m in net.modules())
        self.forward_mode = forward_mode
        with torch.enable_grad():
            out = f(theta)
            if not self.forward_mode:
                self._u = torch.zeros_like(out, requires_grad=True)
                self._jt_u = torch.autograd.grad(out, theta, self._u, create_graph=True)[0]
        self._f, self._theta_req, self._out = f, theta, out
        self.output = out.detach()

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        if not self.forward_mode:
            return torch.autograd.grad(self._jt_u, self._u, v[:self.n_params], retain_graph=True,
                                       allow_unused=True, materialize_grads=True)[0]
        with warnings.catch_warnings():
            # torch's forward-mode AD loads its decompositions through torch.jit.script on first
            # use, which warns of its own deprecation: not the user's concern.
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            return torch.func.jvp(self._f, (self._theta,), (v[:self.n_params],))[1]

    def vjp(self, w_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out[:self.n_params] = torch.autograd.grad(self._out, self._theta_req, w_out,
                                                  retain_graph=True)[0]
        return out


def initial_log_std(spec: dict, init_log_std: Optional[float] = None) -> torch.Tensor:
    """The Gaussian's initial log-std ``[A]`` (float64): ``init_log_std`` in every dimension, or
    for None e^-1 times half the width of each bounded dimension (e^-1 where a bound is infinite),
    so that the exploration noise starts at the same fraction of every action's range: a unit
    noise on actions bounded at ±1 is mostly clipped noise whose control cost outweighs the
    reward (Ant-v5), while on ±3 (InvertedPendulum-v5) e^-1 is too little to learn in time."""
    n = spec["action_dim"]
    if init_log_std is not None:
        return torch.full((n,), float(init_log_std), dtype=torch.float64)
    half = (torch.tensor(spec["action_high"], dtype=torch.float64)
            - torch.tensor(spec["action_low"], dtype=torch.float64)) / 2
    return torch.where(torch.isfinite(half) & (half > 0), half.log(), torch.zeros(())) - 1.0


class Policy(_FlatModule):
    """π_θ(a|s): a network (``net``: any ``nn.Module`` from network input to the distribution's
    parameters; None builds the built-in one for the space) plus an action distribution
    (:mod:`trpo_ext.distributions`), and the observation encoder with its running statistics.

    Box actions: diagonal Gaussian N(net(s), exp(log_std)²), ``log_std [A]`` owned by the policy
    and stored after the network's parameters in θ.  Discrete: categorical over ``net(s)``
    ``[B, n]``; MultiDiscrete(nvec): one categorical per sub-space, logits side by side
    ``[B, sum(nvec)]``; MultiBinary(n): Bernoulli logits ``[B, n]``.
    """

    def __init__(self, spec: dict, hidden_sizes: Sequence[int] = (64, 64),
                 init_log_std: Optional[float] = None,
                 normalize_obs: bool = True, generator: Optional[torch.Generator] = None,
                 env_id: Optional[str] = None, net: Optional[nn.Module] = None,
                 env_kwargs: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.spec = dict(spec)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.env_id = env_id
        self.env_kwargs = dict(env_kwargs or {})  # gymnasium.make's, for evaluation
        self.dist = _dist.for_action_spec(spec)
        self.gaussian = isinstance(self.dist, _dist.DiagGaussian)
        self.encoder = ObservationEncoder(spec, normalize_obs)
        self.custom_net = net is not None
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        # A 0.01 output gain starts with a near-uniform, nearly state-blind policy.
        self.net = net if net is not None else default_network(
            spec, self.hidden_sizes, self.dist.out_dim, 0.01, generator)
        self.n_net_params = sum(p.numel() for p in self.net.parameters())
        if self.gaussian:
            # A child module registered after the network, so that parameters() lists the log-std
            # after the network's parameters, as θ holds them.
            ref = next(self.net.parameters())
            self.std = nn.Module()
            self.std.log_std = nn.Parameter(
                initial_log_std(spec, init_log_std).to(dtype=ref.dtype, device=ref.device))
            self.register_buffer("action_low", torch.tensor(spec["action_low"], dtype=torch.float32))
            self.register_buffer("action_high", torch.tensor(spec["action_high"], dtype=torch.float32))
        self._init_flat()

    @property
    def log_std(self) -> torch.Tensor:
        """The Gaussian's state-independent log standard deviation ``[A]`` (the last entries of θ)."""
        return self.std.log_std

    @property
    def fast_path(self) -> bool:
        """Whether the closed-form :class:`Linearization` serves this policy (the built-in MLP)."""
        return isinstance(self.net, MLP)

    @property
    def obs_rms(self) -> Optional[RunningMeanStd]:
        """The running statistics of flat (non-Dict) observations; None otherwise or when off."""
        return self.encoder._rms("") if self.spec["obs_kind"] != "dict" else None

    # --- observations ----------------------------------------------------------------------------

    def encode_obs(self, obs, device=None) -> Features:
        """Raw batched observations → features on ``device`` (default: this policy's); see
        :class:`ObservationEncoder`."""
        return self.encoder.encode(obs, self.flat.device if device is None else torch.device(device))

    def normalize(self, features: Features) -> Features:
        """Features → network input (normalised; images scaled to [0, 1]), in θ's dtype."""
        x = self.encoder(features)
        dtype = self.flat.dtype
        if dtype == torch.float32:
            return x
        return {k: v.to(dtype) for k, v in x.items()} if isinstance(x, dict) else x.to(dtype)

    # --- the distribution ------------------------------------------------------------------------

    def distribution_params(self, x: Features, differentiable: bool = False
                            ) -> Tuple[torch.Tensor, ...]:
        """The distribution's parameters for network input ``x``: ``(mean [B, A], log_std [A])``
        or ``(logits [B, n],)``.  Without ``differentiable`` no graph is built."""
        with torch.set_grad_enabled(differentiable):
            out = self.net(x)
            return (out, self.log_std) if self.gaussian else (out,)

    def draw_noise(self, batch_shape: Tuple[int, ...], generator: Optional[torch.Generator] = None
                   ) -> torch.Tensor:
        return self.dist.draw_noise(batch_shape, generator, self.flat.device)

    def sample(self, x: Features, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Actions drawn from π(·|x) (no graph); Gaussian actions are not clipped."""
        params = self.distribution_params(x)
        batch = params[0].shape[:-1]
        return self.dist.sample(params, self.draw_noise(tuple(batch), generator))

    def mode(self, x: Features) -> torch.Tensor:
        return self.dist.mode(self.distribution_params(x))

    def log_prob(self, params, actions):
        return self.dist.log_prob(params, actions)

    def entropy(self, params):
        return self.dist.entropy(params)

    def surrogate_kl(self, old, new, actions, logp_old, advantages):
        """(surrogate, mean KL(π_old‖π_new), largest per-row KL) by the distribution's fused op."""
        return self.dist.surrogate_kl(old, new, actions, logp_old, advantages)

    def env_actions(self, actions: torch.Tensor, clip: bool = True) -> np.ndarray:
        """Actions as the environment takes them: Gaussian ones clipped to the bounds
        (``clip``), discrete ones offset by the space's start."""
        if self.gaussian:
            if clip:
                actions = torch.maximum(torch.minimum(actions, self.action_high.to(actions.device)),
                                        self.action_low.to(actions.device))
            return actions.cpu().numpy()
        start = self.spec.get("action_start", 0)
        out = actions.cpu().numpy()
        return out + np.asarray(start, dtype=out.dtype) if np.any(start) else out

    @torch.no_grad()
    def act(self, obs, deterministic: bool = True, generator: Optional[torch.Generator] = None,
            clip: bool = True) -> np.ndarray:
        """Actions for raw observations, ready for ``env.step``: the saved normalisation is applied,
        Gaussian actions are clipped to the bounds (``clip=True``) and discrete actions offset by
        the space's ``start``.  A single observation gives a single action; a batch ``[B, ...]``
        gives ``[B, ...]``."""
        single = self._check_obs(obs)
        if single:
            obs = {k: np.asarray(v)[None] for k, v in obs.items()} if isinstance(obs, dict) \
                else (obs[None] if isinstance(obs, torch.Tensor) else np.asarray(obs)[None])
        x = self.normalize(self.encode_obs(obs))
        a = self.mode(x) if deterministic else self.sample(x, generator)
        out = self.env_actions(a, clip)
        return out[0] if single else out

    def _check_obs(self, obs) -> bool:
        """Whether ``obs`` is one observation (else a batch); a clear error for a wrong shape or
        a Discrete value out of range."""
        parts = self.spec["obs_keys"] if self.spec["obs_kind"] == "dict" else {None: self.spec}
        if self.spec["obs_kind"] == "dict" and not isinstance(obs, dict):
            raise ValueError(f"obs must be a dict with keys {list(parts)}, got "
                             f"{type(obs).__name__}")
        single = None
        for key, part in parts.items():
            value = obs[key] if key is not None else obs
            arr = value if isinstance(value, torch.Tensor) else np.asarray(value)
            shape, want = tuple(arr.shape), tuple(part["obs_shape"])
            one = shape == want
            if not one and shape[1:] != want:
                where = f"obs[{key!r}]" if key is not None else "obs"
                raise ValueError(f"{where} must have the policy's observation shape {want} (one "
                                 f"observation) or (B, *{want}) (a batch), got shape {shape}")
            single = one if single is None else single
            if part["obs_kind"] in ("discrete", "multidiscrete"):
                _check_indices(arr, part, f"obs[{key!r}]" if key is not None else "obs")
        return bool(single)

    def check_spaces(self, observation_space, action_space, where: str) -> None:
        """A clear error when an environment's spaces are not those this policy was built for."""
        theirs = space_spec(observation_space, action_space)
        keys = ("obs_kind", "obs_shape", "obs_dim", "obs_start", "obs_nvec", "obs_keys",
                "action_kind", "action_dim", "action_start", "action_nvec")
        mismatch = [k for k in keys if theirs.get(k) != self.spec.get(k)]
        if mismatch:
            raise ValueError(f"{where}: the environment's spaces ({observation_space}, "
                             f"{action_space}) are not the policy's: "
                             + ", ".join(f"{k} {theirs.get(k)} vs {self.spec.get(k)}"
                                         for k in mismatch))

    def extra_repr(self) -> str:
        return (f"{type(self.dist).__name__}, obs={self.spec['obs_kind']}, "
                f"action_dim={self.spec['action_dim']}, n_params={self.flat.numel()}")


# --- the update's Jacobian products ----------------------------------------------------------------

def linearize(policy: Policy, x: Features, closed_form: Optional[bool] = None):
    """``(old, lin)``: the distribution's parameters at θ_old for network input ``x`` (detached;
    the log-std cloned, since the line search writes into its storage) and the network linearised
    there — in closed form for the built-in MLP, by autograd otherwise (``closed_form=False``
    forces autograd, for tests and benchmarks)."""
    if closed_form is None:
        closed_form = policy.fast_path
    if closed_form:
        lin = Linearization(policy.net, x, policy.n_net_params)
    else:
        lin = AutogradLinearization(policy.net, x, policy.n_net_params)
    old = (lin.output, policy.log_std.detach().clone()) if policy.gaussian else (lin.output,)
    return old, lin


def surrogate_gradient(policy: Policy, lin, old, actions: torch.Tensor, logp_old: torch.Tensor,
                       advantages: torch.Tensor) -> torch.Tensor:
    """g = ∇θ of the surrogate mean(π_θ/π_old · A) at θ_old, flat: the gradient in the
    distribution's parameters by the fused op's backward, carried to θ by the network's Jᵀ."""
    new = tuple(p.detach().requires_grad_() for p in old)
    with torch.enable_grad():
        surrogate = policy.dist.surrogate_kl(old, new, actions, logp_old, advantages)[0]
        grads = torch.autograd.grad(surrogate, new)
    g = torch.empty_like(policy.flat)
    if policy.gaussian:
        g[policy.n_net_params:] = grads[1]
    return lin.vjp(grads[0], g)


def fisher_product(policy: Policy, lin, old, v: torch.Tensor) -> torch.Tensor:
    """F v, F the Hessian of the batch-mean KL(π_old ‖ π_θ) at θ_old, as Jᵀ M J v: J v through the
    linearised network, M the distribution's Fisher metric (an op), Jᵀ back to θ."""
    u = lin.jvp(v)
    n = policy.n_net_params
    metric = policy.dist.fisher_metric(old, (u, v[n:]) if policy.gaussian else (u,))
    out = torch.empty_like(v)
    if policy.gaussian:
        out[n:] = metric[1]
    return lin.vjp(metric[0], out)


def fisher_vector_product(policy: Policy, obs, v: torch.Tensor, damping: float = 0.0
                          ) -> torch.Tensor:
    """F·v + damping·v for any trpo_ext policy, F the Hessian of the batch-mean
    KL(π_θnow ‖ π_θ) at θ = θnow (the Fisher information of the policy on these observations).

    Args:
        policy: a :class:`Policy` (``TrainResult.policy``, :func:`trpo_ext.load`, or built).
        obs: a batch of raw observations ``[B, *obs_shape]`` as the environment gives them (NumPy
            or torch; a dict for a Dict space); the policy applies its own encoding and
            normalisation.
        v: a direction in θ's layout, ``[n_params]`` (the network's parameters in the order of
            its ``named_parameters()``, then a Gaussian's log-std), θ's dtype and device.
        damping: added as ``damping·v`` (≥ 0).
    Returns:
        ``[n_params]``.  Exact (no sampling): Jᵀ M J v with M the distribution's Fisher metric.
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a trpo_ext Policy, got {type(policy).__name__}")
    if not isinstance(v, torch.Tensor) or v.shape != policy.flat.shape:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"v must be a tensor of θ's shape ({policy.flat.numel()},), got {got}")
    if v.dtype != policy.flat.dtype or v.device != policy.flat.device:
        raise ValueError(f"v must have θ's dtype {policy.flat.dtype} and device "
                         f"{policy.flat.device}, got {v.dtype} on {v.device}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise ValueError(f"damping must be a number >= 0, got {damping!r}")
    policy._check_obs(obs)
    with torch.no_grad():
        x = policy.normalize(policy.encode_obs(obs))
        old, lin = linearize(policy, x)
        fv = fisher_product(policy, lin, old, v)
    return fv.add_(v, alpha=damping) if damping else fv


class ValueFunction(_FlatModule):
    """V(s): a network from the policy's network input to values ``[B]`` (or ``[B, 1]``); None
    builds the built-in one for the space (an MLP on flat observations).

    With ``normalize_targets`` the network predicts returns divided by a running scale σ, and
    V(s) = σ·net(s), σ the root mean square of the returns it has been fitted to (PopArt, van
    Hasselt et al. 2016, with the scale only).  Whenever :meth:`update_target_statistics` changes
    σ, the last layer's weight and bias (the last two parameters of ``net``, which must be its
    output layer) are rescaled so that V's outputs stay exactly what they were; the regression
    loss is on the normalised scale.  No shift μ: measured on MountainCarContinuous-v0, fitting the
    small action-cost returns well before the goal is reached teaches the policy to stand still.
    """

    def __init__(self, obs_dim_or_spec: Union[int, dict], hidden_sizes: Sequence[int] = (64, 64),
                 generator: Optional[torch.Generator] = None, normalize_targets: bool = False,
                 net: Optional[nn.Module] = None):
        super().__init__()
        spec = obs_dim_or_spec if isinstance(obs_dim_or_spec, dict) else \
            {"obs_kind": "box", "obs_dim": int(obs_dim_or_spec)}
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.net = net if net is not None else default_network(spec, hidden_sizes, 1, 1.0,
                                                                generator)
        self.normalize_targets = bool(normalize_targets)
        if self.normalize_targets:
            # The mean of the squared returns over the fits so far (float64), and their number;
            # σ = 1 until the first fit, so an unfitted V is the bare network.
            self.register_buffer("target_sq_mean", torch.ones((), dtype=torch.float64))
            self.register_buffer("target_fits", torch.zeros((), dtype=torch.int64))
        self._init_flat()

    def target_scale(self) -> torch.Tensor:
        """σ, a 0-d float64 tensor: V(s) = σ·net(s) (1 without target normalisation)."""
        if not self.normalize_targets:
            return torch.ones((), dtype=torch.float64, device=self.flat.device)
        return self.target_sq_mean.sqrt().clamp_(min=_MIN_TARGET_SCALE)

    def _net_values(self, x: Features) -> torch.Tensor:
        out = self.net(x)
        return out.squeeze(-1) if out.dim() == 2 else out

    def forward(self, x: Features) -> torch.Tensor:
        out = self._net_values(x)
        if not self.normalize_targets:
            return out
        # A 0-d float64 σ times a [B] tensor: the result keeps the network's dtype.
        return out * self.target_scale()

    @torch.no_grad()
    def update_target_statistics(self, targets: torch.Tensor) -> torch.Tensor:
        """Fold one fit's regression targets ``[B]`` into σ, rescale the output layer so that V(s)
        is unchanged (W' = W·σ/σ', b' = b·σ/σ'), and return ``targets / σ'`` for
        :meth:`regression_gradient`.  Without target normalisation: ``targets``, nothing else.
        The first fit adopts its σ without rescaling (the fresh network is read as predicting
        normalised targets already).  No host synchronisation."""
        if not self.normalize_targets:
            return targets
        sigma = self.target_scale()
        self.target_fits += 1
        batch_sq_mean = targets.to(torch.float64).square().mean()
        distributed.reduce_mean_(batch_sq_mean)  # data-parallel: all ranks' targets
        self.target_sq_mean.lerp_(batch_sq_mean, 1.0 / self.target_fits.to(torch.float64))
        new_sigma = self.target_scale()
        ratio = torch.where(self.target_fits == 1, torch.ones_like(sigma), sigma / new_sigma)
        params = list(self.net.parameters())
        params[-2].mul_(ratio)  # the output layer's weight
        params[-1].mul_(ratio)  # and bias
        return targets / new_sigma

    @torch.no_grad()
    def regression_gradient(self, x: Features, targets: torch.Tensor, grad: torch.Tensor
                            ) -> torch.Tensor:
        """The loss mean((net(x) − targets)²) (0-d), ``targets [B]`` on the network's scale; its
        gradient in ``flat`` written into ``grad`` (closed form for the built-in MLP, autograd
        otherwise)."""
        n = targets.numel()
        if isinstance(self.net, MLP):
            lin = Linearization(self.net, x, self.flat.numel())
            diff = lin.output.squeeze(-1) - targets
            lin.vjp(diff.unsqueeze(-1) * (2.0 / n), grad)
            return diff.square().sum() / n
        with torch.enable_grad():
            loss = (self._net_values(x) - targets).square().sum() / n
            grads = torch.autograd.grad(loss, list(self.parameters()))
        torch.cat([g.reshape(-1) for g in grads], out=grad)
        return loss.detach()


class Adam:
    """Adam (Kingma & Ba 2015) on one flat parameter, the arithmetic of ``torch.optim.Adam`` (no
    weight decay, no amsgrad) in five whole-buffer ops.  Kept over torch.optim.Adam because the
    critic takes ~40 small steps an update and torch's per-step overhead (fused or foreach) made
    the update more than 5% slower (benchmarks/bench_update.py --adam)."""

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
