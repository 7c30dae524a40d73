"""Policies of any network: the gradient g and the Fisher-vector product against independent
autograd references (torch.distributions and torch.autograd.functional.hvp, float64), the closed-form
MLP path against the autograd path, the θ layout, and bad input."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from gymnasium import spaces

import trpo_ext
from trpo_ext._reference import reference_distribution
from trpo_ext.policies import (Policy, fisher_product, linearize, space_spec,
                               surrogate_gradient)

IMAGE = spaces.Box(0, 255, (36, 36, 3), np.uint8)
DICT = spaces.Dict({"img": spaces.Box(0, 255, (3, 40, 36), np.uint8),
                    "vec": spaces.Box(-1, 1, (3,), np.float32), "cell": spaces.Discrete(4)})


def relu_mlp(n_in, n_out):
    return nn.Sequential(nn.Linear(n_in, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, n_out))


CASES = {
    "mlp-gaussian": (spaces.Box(-1, 1, (5,), np.float32), spaces.Box(-1, 1, (3,)), None),
    "mlp-categorical": (spaces.Box(-1, 1, (5,), np.float32), spaces.Discrete(4), None),
    "relu-gaussian": (spaces.Box(-1, 1, (5,), np.float32), spaces.Box(-1, 1, (2,)),
                      lambda: relu_mlp(5, 2)),
    "relu-categorical": (spaces.Box(-1, 1, (5,), np.float32), spaces.Discrete(3),
                         lambda: relu_mlp(5, 3)),
    "cnn-image": (IMAGE, spaces.Discrete(3), None),
    "dict-multidiscrete": (DICT, spaces.MultiDiscrete([3, 2, 4]), None),
    "mlp-multibinary": (spaces.Box(-1, 1, (5,), np.float32), spaces.MultiBinary(4), None),
}


def _policy(case, seed=0):
    obs_space, act_space, make_net = CASES[case]
    spec = space_spec(obs_space, act_space)
    torch.manual_seed(seed)
    net = make_net() if make_net else None
    policy = Policy(spec, (8, 8), init_log_std=-0.3, generator=torch.Generator().manual_seed(seed),
                    net=net).double()
    with torch.no_grad():  # away from the near-uniform initial output layer
        policy.flat.add_(0.3 * torch.randn(policy.flat.shape, dtype=torch.float64,
                                           generator=torch.Generator().manual_seed(seed + 1)))
    obs_space.seed(seed)
    samples = [obs_space.sample() for _ in range(12)]
    if isinstance(samples[0], dict):
        obs = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
    else:
        obs = np.stack(samples)
    features = policy.encode_obs(obs)
    policy.encoder.update(features)
    return policy, obs, policy.normalize(features)


def _torch_distribution(policy, params):
    """The same distribution from torch.distributions (an independent reference)."""
    D = torch.distributions
    kind = policy.spec["action_kind"]
    if kind == "box":
        return D.Independent(D.Normal(params[0], params[1].exp().expand_as(params[0])), 1)
    if kind == "discrete":
        return D.Categorical(logits=params[0])
    if kind == "multi_binary":
        return D.Independent(D.Bernoulli(logits=params[0]), 1)
    parts = params[0].split(policy.spec["action_nvec"], -1)
    return [D.Categorical(logits=p) for p in parts]


def _kl(policy, old, new):
    p, q = _torch_distribution(policy, old), _torch_distribution(policy, new)
    if isinstance(p, list):
        return sum(torch.distributions.kl_divergence(a, b).mean() for a, b in zip(p, q))
    return torch.distributions.kl_divergence(p, q).mean()


def _log_prob(policy, params, actions):
    d = _torch_distribution(policy, params)
    if isinstance(d, list):
        return sum(di.log_prob(actions[:, i]) for i, di in enumerate(d))
    return d.log_prob(actions.to(params[0].dtype) if policy.spec["action_kind"] != "discrete"
                      else actions)


@pytest.mark.parametrize("case", list(CASES))
def test_fisher_vector_product_is_the_hessian_of_the_mean_kl(case):
    policy, obs, x = _policy(case)
    theta0 = policy.flat.detach().clone()
    old = tuple(p.detach() for p in reference_distribution(policy, theta0, x))
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        v = torch.randn(theta0.shape, dtype=torch.float64, generator=gen)
        fv = trpo_ext.fisher_vector_product(policy, obs, v)
        _, hv = torch.autograd.functional.hvp(
            lambda th: _kl(policy, old, reference_distribution(policy, th, x)), theta0, v)
        torch.testing.assert_close(fv, hv, rtol=1e-10, atol=1e-12)
        assert torch.dot(v, fv) > 0
        damped = trpo_ext.fisher_vector_product(policy, obs, v, damping=0.25)
        torch.testing.assert_close(damped, hv + 0.25 * v, rtol=1e-10, atol=1e-12)
    assert torch.equal(policy.flat, theta0)


@pytest.mark.parametrize("case", list(CASES))
def test_policy_gradient_is_the_surrogate_gradient(case):
    policy, _, x = _policy(case)
    theta0 = policy.flat.detach().clone()
    old, lin = linearize(policy, x)
    actions = policy.dist.sample(old, policy.draw_noise((x_batch(x),),
                                                        torch.Generator().manual_seed(2)))
    advantages = torch.randn(x_batch(x), dtype=torch.float64,
                             generator=torch.Generator().manual_seed(3))
    logp_old = policy.log_prob(old, actions)
    torch.testing.assert_close(logp_old, _log_prob(policy, old, actions), rtol=1e-12, atol=1e-12)
    g = surrogate_gradient(policy, lin, old, actions, logp_old, advantages)
    theta = theta0.clone().requires_grad_()
    new = reference_distribution(policy, theta, x)
    ratio = torch.exp(_log_prob(policy, new, actions) - logp_old)
    (expected,) = torch.autograd.grad((ratio * advantages).mean(), theta)
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)
    assert expected.abs().max() > 1e-3  # a gradient worth comparing


def x_batch(x):
    return next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]


@pytest.mark.parametrize("case", ["mlp-gaussian", "mlp-categorical", "mlp-multibinary"])
def test_closed_form_mlp_path_equals_the_autograd_path(case):
    policy, _, x = _policy(case)
    assert policy.fast_path
    (old_c, lin_c), (old_a, lin_a) = linearize(policy, x, True), linearize(policy, x, False)
    for a, b in zip(old_c, old_a):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    actions = policy.dist.sample(old_c, policy.draw_noise((x.shape[0],),
                                                          torch.Generator().manual_seed(2)))
    adv = torch.randn(x.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    logp = policy.log_prob(old_c, actions)
    g_c = surrogate_gradient(policy, lin_c, old_c, actions, logp, adv)
    g_a = surrogate_gradient(policy, lin_a, old_a, actions, logp, adv)
    torch.testing.assert_close(g_c, g_a, rtol=1e-10, atol=1e-14)
    v = torch.randn(policy.flat.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(fisher_product(policy, lin_c, old_c, v),
                               fisher_product(policy, lin_a, old_a, v), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("low, high, expected", [
    (-1.0, 1.0, [-1.0, -1.0]),                    # MuJoCo's bounds: std e^-1
    ([-3.0, -0.4], [3.0, 0.4], [np.log(3.0) - 1, np.log(np.float32(0.4)) - 1]),
    ([0.0, -np.inf], [10.0, np.inf], [np.log(5.0) - 1, -1.0]),  # unbounded: e^-1
])
def test_default_initial_std_is_a_fixed_fraction_of_each_actions_half_width(low, high, expected):
    spec = space_spec(spaces.Box(-1, 1, (3,), np.float32),
                      spaces.Box(np.array(low, np.float32) * np.ones(2, np.float32),
                                 np.array(high, np.float32) * np.ones(2, np.float32)))
    policy = Policy(spec, (8,))
    np.testing.assert_allclose(policy.log_std.detach().numpy(), expected, rtol=1e-6)
    assert torch.equal(Policy(spec, (8,), init_log_std=0.25).log_std.detach(),
                       torch.full((2,), 0.25))  # an explicit value, in the action's units


def test_theta_is_the_networks_parameters_in_order_then_the_log_std():
    net = relu_mlp(5, 2)
    names = [n for n, _ in net.named_parameters()]
    spec = space_spec(spaces.Box(-1, 1, (5,), np.float32), spaces.Box(-1, 1, (2,)))
    policy = Policy(spec, net=net, init_log_std=-0.5)
    theta = torch.nn.utils.parameters_to_vector(policy.parameters())
    assert torch.equal(theta, policy.flat)
    assert [n for n, _ in policy.named_parameters()] == ["net." + n for n in names] + \
        ["std.log_std"]
    assert torch.equal(policy.flat[-2:], torch.full((2,), -0.5))
    # The network's parameters are views of θ: writing θ moves the network.
    with torch.no_grad():
        policy.flat.zero_()
    assert all(float(p.detach().abs().sum()) == 0 for p in net.parameters())
    assert policy.flat.data_ptr() == net[0].weight.data_ptr()


def test_fisher_vector_product_refuses_bad_input():
    policy, obs, _ = _policy("mlp-gaussian")
    v = torch.zeros_like(policy.flat)
    with pytest.raises(ValueError, match=r"v must be a tensor of θ's shape"):
        trpo_ext.fisher_vector_product(policy, obs, v[:-1])
    with pytest.raises(ValueError, match="dtype"):
        trpo_ext.fisher_vector_product(policy, obs, v.float())
    with pytest.raises(ValueError, match="damping must be a number >= 0"):
        trpo_ext.fisher_vector_product(policy, obs, v, damping=-1.0)
    with pytest.raises(ValueError, match="observation shape"):
        trpo_ext.fisher_vector_product(policy, obs[:, :3], v)
    with pytest.raises(TypeError, match="policy must be a trpo_ext Policy"):
        trpo_ext.fisher_vector_product(object(), obs, v)


@pytest.mark.parametrize("case,default_forward_mode", [
    ("relu-gaussian", False), ("mlp-categorical", False), ("cnn-image", True),
    ("dict-multidiscrete", True)])
def test_the_two_autograd_jacobian_routes_agree(case, default_forward_mode):
    """J v is reverse-over-reverse for networks without convolutions and forward mode with them
    (each checked against hvp above); the other route gives the same J v on the same network."""
    from trpo_ext.policies import AutogradLinearization

    policy, _, x = _policy(case)
    assert linearize(policy, x, closed_form=False)[1].forward_mode is default_forward_mode
    n = policy.n_net_params
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(policy.flat.shape, dtype=torch.float64, generator=gen)
    fwd = AutogradLinearization(policy.net, x, n, forward_mode=True).jvp(v)
    rev = AutogradLinearization(policy.net, x, n, forward_mode=False).jvp(v)
    assert fwd.abs().max() > 1e-3
    torch.testing.assert_close(fwd, rev, rtol=1e-10, atol=1e-12)
