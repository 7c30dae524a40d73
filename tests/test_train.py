"""trpo_ext.train: invariants of real updates, the Fisher-vector product, settings, determinism,
and (marked slow) learning with the default settings."""
import importlib
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import trpo_ext
from trpo_ext._reference import (
    mean_kl_categorical_reference,
    mean_kl_diag_gaussian_reference,
    surrogate_kl_categorical_reference,
    surrogate_kl_diag_gaussian_reference,
)
from trpo_ext.config import TRPOConfig
from trpo_ext.policies import Adam, Policy, ValueFunction, space_spec
from trpo_ext._reference import reference_distribution, reference_values
from trpo_ext.train import HISTORY_KEYS, trpo_update

SMALL = dict(n_envs=2, n_steps=64)
# The module, not the function trpo_ext.train that shadows it as a package attribute.
train_mod = importlib.import_module("trpo_ext.train")


def episode_return(policy, env_id, seed):
    """An independent evaluation: one episode stepped by hand with ``policy.act``."""
    import gymnasium as gym

    env = gym.make(env_id)
    obs, _ = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        obs, r, terminated, truncated, _ = env.step(policy.act(obs))
        total += float(r)
        done = terminated or truncated
    env.close()
    return total


def _timeless(history):
    return [{k: v for k, v in h.items() if not k.startswith("time/") or k in
             ("time/iteration", "time/total_steps")} for h in history]


def _same(a, b):
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


# --- invariants on real updates ----------------------------------------------------------------

@pytest.mark.parametrize("env", ["CartPole-v1", "Pendulum-v1"])
def test_accepted_steps_respect_the_trust_region_and_improve(env):
    result = trpo_ext.train(env, 6 * 128, seed=3, **SMALL)
    assert len(result.history) == 6
    for h in result.history:
        assert set(h) == set(HISTORY_KEYS)
        assert h["train/cg_iterations"] == 10
        if h["train/line_search_success"]:
            assert 0 < h["train/kl"] <= TRPOConfig().max_kl
            assert h["train/kl_max_row"] >= h["train/kl"]
            assert h["train/surrogate_improvement"] > 0
            assert h["train/expected_improvement"] > 0
            assert 1 <= h["train/line_search_steps"] <= 10
        else:
            assert h["train/kl"] == 0 and h["train/surrogate_improvement"] == 0
    assert any(h["train/line_search_success"] for h in result.history)
    assert [h["time/total_steps"] for h in result.history] == [128 * i for i in range(1, 7)]
    for h in result.history:
        for k, v in h.items():
            assert type(v) in (int, float, bool), (k, type(v))


def _setup(env_id="Pendulum-v1", batch=256, seed=0):
    import gymnasium as gym

    env = gym.make(env_id)
    spec = space_spec(env.observation_space, env.action_space)
    gen = torch.Generator().manual_seed(seed)
    policy = Policy(spec, (16, 16), generator=gen)
    value_fn = ValueFunction(spec["obs_dim"], (16, 16), generator=gen)
    obs = torch.randn(batch, spec["obs_dim"], generator=gen)
    with torch.no_grad():
        actions = policy.sample(obs, gen)
    advantages = torch.randn(batch, generator=gen)
    returns = torch.randn(batch, generator=gen)
    return policy, value_fn, obs, actions, advantages, returns


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1"])
def test_failed_line_search_leaves_parameters_bit_identical(env_id, monkeypatch):
    policy, value_fn, obs, actions, adv, ret = _setup(env_id)
    before = policy.flat.detach().clone()
    real = Policy.surrogate_kl
    calls = []

    def never_within_the_region(self, old, new, actions, logp_old, advantages):
        surrogate, mean_kl, max_kl = real(self, old, new, actions, logp_old, advantages)
        if not torch.is_grad_enabled():  # a line-search trial: report a KL beyond any δ
            calls.append(1)
            return surrogate, mean_kl + 1.0, max_kl + 1.0
        return surrogate, mean_kl, max_kl

    monkeypatch.setattr(Policy, "surrogate_kl", never_within_the_region)
    cfg = TRPOConfig()
    m = trpo_update(policy, value_fn, Adam(value_fn.flat, 1e-3), obs, actions, adv, ret, cfg,
                    torch.Generator().manual_seed(0))
    assert len(calls) == cfg.line_search_steps
    assert m["train/line_search_success"] is False
    assert m["train/line_search_steps"] == cfg.line_search_steps
    assert torch.equal(policy.flat.detach(), before)


def _trials(monkeypatch, reject_first=0, improve=True):
    """Spies on the line search: records θ at each trial (a surrogate/KL evaluation without
    grad), rejects the first ``reject_first`` trials (a KL beyond any δ) and, with
    ``improve=False``, reports no surrogate improvement at all."""
    real = Policy.surrogate_kl
    thetas = []

    def spy(self, old, new, actions, logp_old, advantages):
        surrogate, mean_kl, max_kl = real(self, old, new, actions, logp_old, advantages)
        if torch.is_grad_enabled():  # the reference at θ_old, not a trial
            return surrogate, mean_kl, max_kl
        thetas.append(self.flat.detach().clone())
        if not improve:
            return surrogate - 1e6, mean_kl, max_kl
        if len(thetas) <= reject_first:
            return surrogate, mean_kl + 1.0, max_kl
        return surrogate, mean_kl, max_kl

    monkeypatch.setattr(Policy, "surrogate_kl", spy)
    return thetas


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1"])
def test_step_size_and_backtracking_schedule(env_id, monkeypatch):
    # β = sqrt(2δ / sᵀ(F + damping·I)s), with F·s computed independently (autograd hvp of the
    # textbook mean KL), and trial k at θ_old + 0.8^k·β·s.
    cfg = TRPOConfig(max_kl=0.02, cg_damping=0.05)
    policy, value_fn, obs, actions, adv, ret = _setup(env_id, batch=64)
    theta_old = policy.flat.detach().clone()
    solved = {}
    real_cg = train_mod.conjugate_gradient

    def spy_cg(matvec, b, x0=None, **kw):
        solved["res"] = real_cg(matvec, b, x0, **kw)
        return solved["res"]

    monkeypatch.setattr(train_mod, "conjugate_gradient", spy_cg)
    thetas = _trials(monkeypatch, reject_first=3)
    m = trpo_update(policy, value_fn, Adam(value_fn.flat, 1e-3), obs, actions, adv, ret, cfg,
                    torch.Generator().manual_seed(0))
    s = solved["res"].x
    mean_kl = _mean_kl_from(policy, theta_old, obs)

    _, fs = torch.autograd.functional.hvp(mean_kl, theta_old, s)
    beta = math.sqrt(2 * cfg.max_kl / float(s.double() @ (fs + cfg.cg_damping * s).double()))
    assert len(thetas) == 4 and m["train/line_search_steps"] == 4
    assert m["train/line_search_success"] is True
    for k, theta in enumerate(thetas):
        torch.testing.assert_close(theta - theta_old, cfg.backtrack_ratio ** k * beta * s,
                                   rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(policy.flat.detach(), thetas[-1], rtol=0, atol=0)


def test_no_improvement_tries_every_step_then_keeps_theta_old(monkeypatch):
    policy, value_fn, obs, actions, adv, ret = _setup()
    before = policy.flat.detach().clone()
    thetas = _trials(monkeypatch, improve=False)
    cfg = TRPOConfig()
    m = trpo_update(policy, value_fn, Adam(value_fn.flat, 1e-3), obs, actions, adv, ret, cfg,
                    torch.Generator().manual_seed(0))
    assert len(thetas) == cfg.line_search_steps
    assert m["train/line_search_success"] is False and float(m["train/kl"]) == 0
    assert float(m["train/surrogate_improvement"]) == 0
    assert torch.equal(policy.flat.detach(), before)


def test_zero_advantages_skip_the_step():
    policy, value_fn, obs, actions, _, ret = _setup()
    before = policy.flat.detach().clone()
    m = trpo_update(policy, value_fn, Adam(value_fn.flat, 1e-3), obs, actions,
                    torch.zeros(obs.shape[0]), ret, TRPOConfig(), torch.Generator().manual_seed(0))
    # g = 0 gives s = 0 and sᵀFs = 0: no step size exists, the update is skipped.
    assert m["train/line_search_steps"] == 0 and m["train/line_search_success"] is False
    assert torch.equal(policy.flat.detach(), before)


def test_line_search_writes_into_the_same_buffer():
    policy, value_fn, obs, actions, adv, ret = _setup()
    ptr = policy.flat.data_ptr()
    views = {k: v.data_ptr() for k, v in policy.named_views().items()}
    before = policy.flat.detach().clone()
    m = trpo_update(policy, value_fn, Adam(value_fn.flat, 1e-3), obs, actions, adv, ret,
                    TRPOConfig(), torch.Generator().manual_seed(0))
    assert m["train/line_search_success"]
    assert policy.flat.data_ptr() == ptr
    assert {k: v.data_ptr() for k, v in policy.named_views().items()} == views
    assert not torch.equal(policy.flat.detach(), before)
    assert 0 < float(m["train/kl"]) <= TRPOConfig().max_kl


def _reference_dist(policy, theta, obs):
    """The policy's distribution parameters as a function of θ: the network called functionally
    by autograd on θ's first entries (its parameters in order), then the log-std."""
    return reference_distribution(policy, theta, obs)


def _mean_kl_from(policy, theta_old, obs):
    """θ ↦ the textbook batch-mean KL(π_θold ‖ π_θ) on ``obs`` (an autograd reference)."""
    old = tuple(p.detach() for p in _reference_dist(policy, theta_old, obs))

    def mean_kl(theta):
        new = _reference_dist(policy, theta, obs)
        if policy.gaussian:
            return mean_kl_diag_gaussian_reference(old[0], old[1], new[0], new[1])
        return mean_kl_categorical_reference(old[0], new[0])

    return mean_kl


def _update_seen_by_cg(env_id, monkeypatch, cfg):
    """One trpo_update on a small batch with the CG spied on: what it was handed (kw, b) and the
    matvec's products with three fixed random vectors.  Also returns θ_old and the batch."""
    policy, value_fn, obs, actions, adv, ret = _setup(env_id, batch=64)
    theta_old = policy.flat.detach().clone()
    seen = {}
    real_cg = train_mod.conjugate_gradient

    def spy(matvec, b, x0=None, **kw):
        seen["kw"] = kw
        seen["b"] = b.clone()
        vs = [torch.randn(b.shape, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        seen["pairs"] = [(v, matvec(v).clone()) for v in vs]
        return real_cg(matvec, b, x0, **kw)

    monkeypatch.setattr(train_mod, "conjugate_gradient", spy)
    trpo_update(policy, value_fn, Adam(value_fn.flat, 1e-3), obs, actions, adv, ret, cfg,
                torch.Generator().manual_seed(0))
    return policy, theta_old, obs, actions, adv, seen


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1"])
def test_fisher_vector_product_is_the_hessian_of_the_mean_kl(env_id, monkeypatch):
    cfg = TRPOConfig()
    policy, theta_old, obs, _, _, seen = _update_seen_by_cg(env_id, monkeypatch, cfg)
    assert seen["kw"] == dict(maxiter=cfg.cg_iters, rtol=0.0, atol=0.0, damping=cfg.cg_damping,
                              sync=False)

    mean_kl = _mean_kl_from(policy, theta_old, obs)

    for v, fv in seen["pairs"]:
        _, hv = torch.autograd.functional.hvp(mean_kl, theta_old, v)
        torch.testing.assert_close(fv, hv, rtol=1e-4, atol=1e-6)
        assert torch.dot(v, fv) > 0  # the Fisher matrix is positive semi-definite


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1"])
def test_policy_gradient_is_the_surrogate_gradient(env_id, monkeypatch):
    # g (the right-hand side handed to the CG) comes from the fused backward op and the linearised
    # network's backward pass; it must equal autograd of the textbook surrogate at θ_old.
    policy, theta_old, obs, actions, adv, seen = _update_seen_by_cg(env_id, monkeypatch,
                                                                    TRPOConfig())
    old = tuple(p.detach() for p in _reference_dist(policy, theta_old, obs))
    logp_old = policy.log_prob(old, actions)

    def surrogate(theta):
        new = _reference_dist(policy, theta, obs)
        if policy.gaussian:
            return surrogate_kl_diag_gaussian_reference(old[0], old[1], new[0], new[1], actions,
                                                        logp_old, adv)[0]
        return surrogate_kl_categorical_reference(old[0], new[0], actions, logp_old, adv)[0]

    theta = theta_old.clone().requires_grad_()
    (expected,) = torch.autograd.grad(surrogate(theta), theta)
    torch.testing.assert_close(seen["b"], expected, rtol=1e-4, atol=1e-6)


def test_critic_regression_gradient_matches_autograd():
    gen = torch.Generator().manual_seed(3)
    vf = ValueFunction(5, (16, 8), generator=gen).double()
    obs = torch.randn(37, 5, generator=gen, dtype=torch.float64)
    targets = torch.randn(37, generator=gen, dtype=torch.float64)
    grad = torch.empty_like(vf.flat.detach())
    loss = vf.regression_gradient(obs, targets, grad)
    theta = vf.flat.clone().requires_grad_()
    expected_loss = (reference_values(vf, theta, obs) - targets).square().mean()
    (expected,) = torch.autograd.grad(expected_loss, theta)
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_popart_rescale_preserves_values_exactly():
    gen = torch.Generator().manual_seed(3)
    vf = ValueFunction(5, (16, 8), generator=gen, normalize_targets=True).double()
    obs = torch.randn(50, 5, generator=gen, dtype=torch.float64)
    net = vf(obs)  # σ = 1: V is the bare network until the first fit
    first = -500.0 + 300.0 * torch.randn(64, generator=gen, dtype=torch.float64)
    vf.update_target_statistics(first)
    sigma = vf.target_scale()
    torch.testing.assert_close(sigma, first.square().mean().sqrt(), rtol=1e-14, atol=0)
    # The first fit adopts its σ: the fresh network is read as predicting normalised targets.
    torch.testing.assert_close(vf(obs), sigma * net, rtol=1e-14, atol=0)
    # Later fits rescale the output layer: V's outputs stay as they were, whichever way σ moves.
    batches = [first]
    for targets in (-80.0 + 12.0 * torch.randn(640, generator=gen, dtype=torch.float64),
                    torch.zeros(64, dtype=torch.float64),
                    1e4 * torch.randn(64, generator=gen, dtype=torch.float64)):
        before = vf(obs)
        scaled = vf.update_target_statistics(targets)
        torch.testing.assert_close(vf(obs), before, rtol=1e-13, atol=1e-12)
        torch.testing.assert_close(scaled, targets / vf.target_scale(), rtol=0, atol=0)
        batches.append(targets)
    # σ² is the mean over fits of each batch's mean square.
    expected = torch.stack([b.square().mean() for b in batches]).mean().sqrt()
    torch.testing.assert_close(vf.target_scale(), expected, rtol=1e-13, atol=0)
    assert int(vf.target_fits) == 4


def test_target_scale_has_a_floor():
    vf = ValueFunction(3, (4,), normalize_targets=True).double()
    vf.update_target_statistics(torch.zeros(10, dtype=torch.float64))  # e.g. no reward seen yet
    assert float(vf.target_scale()) == 1e-4
    obs = torch.randn(6, 3, dtype=torch.float64)
    before = vf(obs)
    vf.update_target_statistics(torch.full((10,), 3.0, dtype=torch.float64))
    torch.testing.assert_close(vf(obs), before, rtol=1e-13, atol=0)


def test_critic_regression_gradient_on_the_normalised_scale_matches_autograd():
    gen = torch.Generator().manual_seed(3)
    vf = ValueFunction(5, (16, 8), generator=gen, normalize_targets=True).double()
    for scale, shift in ((300.0, -500.0), (120.0, -80.0)):
        vf.update_target_statistics(scale * torch.randn(64, generator=gen, dtype=torch.float64)
                                    + shift)
    sigma = vf.target_scale()
    assert float(sigma) > 100
    obs = torch.randn(37, 5, generator=gen, dtype=torch.float64)
    targets = -200.0 + 100.0 * torch.randn(37, generator=gen, dtype=torch.float64)
    grad = torch.empty_like(vf.flat.detach())
    loss = vf.regression_gradient(obs, targets / sigma, grad)
    # The loss on the normalised scale is the loss in return units over σ².
    theta = vf.flat.clone().requires_grad_()
    expected_loss = ((reference_values(vf, theta, obs) * sigma - targets) / sigma).square().mean()
    (expected,) = torch.autograd.grad(expected_loss, theta)
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_value_function_without_target_normalisation_is_the_bare_network():
    gen = torch.Generator().manual_seed(1)
    vf = ValueFunction(5, (16, 8), generator=gen)
    assert not any(k.startswith("target_") for k in vf.state_dict())
    flat = vf.flat.detach().clone()
    returns = torch.randn(20, generator=gen) * 100
    assert vf.update_target_statistics(returns) is returns  # nothing else happens
    assert torch.equal(vf.flat.detach(), flat)
    obs = torch.randn(7, 5, generator=gen)
    torch.testing.assert_close(vf(obs), vf.net(obs).squeeze(-1), rtol=0, atol=0)


# --- settings --------------------------------------------------------------------------------

class _CountingEnv:
    """A callable env factory that counts how often it was asked for an env."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        import gymnasium as gym

        self.calls += 1
        return gym.make("CartPole-v1")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(total_steps=0), ValueError, "total_steps"),
    (dict(total_steps=-5), ValueError, "total_steps"),
    (dict(max_kl=0.0), ValueError, "max_kl"),
    (dict(max_kl=-0.1), ValueError, "max_kl"),
    (dict(gamma=1.5), ValueError, "gamma"),
    (dict(gae_lambda=-0.1), ValueError, "gae_lambda"),
    (dict(n_envs=0), ValueError, "n_envs"),
    (dict(n_steps=0), ValueError, "n_steps"),
    (dict(cg_iters=0), ValueError, "cg_iters"),
    (dict(cg_damping=-1.0), ValueError, "cg_damping"),
    (dict(backtrack_ratio=1.0), ValueError, "backtrack_ratio"),
    (dict(line_search_steps=0), ValueError, "line_search_steps"),
    (dict(hidden_sizes=(64, 0)), ValueError, "hidden_sizes"),
    (dict(vf_lr=0.0), ValueError, "vf_lr"),
    (dict(device="tpu"), ValueError, "device"),
    (dict(resume="/nonexistent/ckpt.pt"), ValueError, "resume"),
    (dict(callback=3), TypeError, "callback"),
    (dict(max_kll=0.01), TypeError, "max_kll.*valid settings"),
    (dict(normalize_obs="yes"), TypeError, "normalize_obs"),
    (dict(normalize_value_targets=1), TypeError, "normalize_value_targets"),
    (dict(num_threads=100_000), ValueError, "num_threads must be at most 1024"),
    (dict(log_dir=""), ValueError, "log_dir must be a directory path"),
    (dict(seed=2**64 - 1), ValueError, "seed must be at most"),
    (dict(init_log_std=100.0), ValueError, r"init_log_std must be in \[-20, 20\]"),
    (dict(init_log_std="wide"), ValueError, "init_log_std must be a finite number or None"),
    (dict(resume=5), TypeError, "resume must be a checkpoint path"),
    (dict(env_kwargs="x"), TypeError, "env_kwargs must be a dict"),
    (dict(env_kwargs={"a": object()}), ValueError, "env_kwargs must hold JSON values"),
    (dict(env_kwargs={"max_episode_steps": 5}), ValueError, "env_kwargs .* env is the callable"),
])
def test_invalid_settings_raise_before_any_work(kwargs, error, match):
    factory = _CountingEnv()
    kwargs = dict(kwargs)
    total = kwargs.pop("total_steps", 1000)
    with pytest.raises(error, match=match):
        trpo_ext.train(factory, total, **kwargs)
    assert factory.calls == 0


def test_env_kwargs_make_the_training_and_evaluation_envs_and_stay_with_the_policy(tmp_path):
    # CartPole's pole takes at least 8 steps to fall: with a time limit of 5 every episode lasts
    # exactly 5 steps (return 5) in training, in evaluation and after loading the checkpoint.
    kwargs = {"max_episode_steps": 5}
    result = trpo_ext.train("CartPole-v1", 512, n_envs=2, n_steps=128, env_kwargs=kwargs,
                            log_dir=str(tmp_path / "run"))
    assert result.history[-1]["rollout/ep_length_mean"] == 5
    assert result.policy.env_kwargs == kwargs
    assert trpo_ext.evaluate_returns(result.policy, episodes=3) == [5.0] * 3
    loaded = trpo_ext.load(result.checkpoint_path)
    assert loaded.env_kwargs == kwargs
    assert trpo_ext.evaluate_returns(loaded, episodes=3) == [5.0] * 3
    assert min(trpo_ext.evaluate_returns(loaded, "CartPole-v1", episodes=3)) > 5  # an id: as is
    # The environments of vector_env="async" are made in their own processes, with the same.
    async_run = trpo_ext.train("CartPole-v1", 256, n_envs=2, n_steps=128, env_kwargs=kwargs,
                               vector_env="async")
    assert async_run.history[-1]["rollout/ep_length_mean"] == 5
    with pytest.raises(TypeError, match="env_kwargs {'no_such_option': 1} for 'CartPole-v1'"):
        trpo_ext.train("CartPole-v1", 256, env_kwargs={"no_such_option": 1})
    with pytest.raises(ValueError, match="vector_env='envpool' does not take env_kwargs"):
        trpo_ext.train("CartPole-v1", 256, env_kwargs=kwargs, vector_env="envpool")


def test_log_dir_that_cannot_take_the_run_is_refused_before_any_work(tmp_path):
    factory = _CountingEnv()
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="log_dir .* exists and is not a directory"):
        trpo_ext.train(factory, 1000, log_dir=str(a_file))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")
    with pytest.raises(ValueError, match="checkpoints/ .* exists and is not a directory"):
        trpo_ext.train(factory, 1000, log_dir=str(tmp_path / "run"))
    assert factory.calls == 0


def test_log_dir_of_another_run_is_refused_for_a_new_run(tmp_path):
    # A new run there would overwrite some of that run's checkpoints and leave the others.
    run = tmp_path / "run"
    first = trpo_ext.train("CartPole-v1", 2 * 128, seed=1, log_dir=str(run), **SMALL)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    with pytest.raises(ValueError, match="holds the checkpoints of another run .*resume="):
        trpo_ext.train("CartPole-v1", 128, seed=2, log_dir=str(run), **SMALL)
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    # Resuming it is fine; a run directory stands for its checkpoints/last.pt, as in the CLI.
    resumed = trpo_ext.train(None, 3 * 128, resume=str(run), log_dir=str(run))
    assert len(resumed.history) == 3 and resumed.history[:2] == first.history


def test_numpy_scalars_are_taken_as_settings():
    a = trpo_ext.train("Pendulum-v1", 128, seed=np.int64(3), hidden_sizes=(np.int64(8),),
                       init_log_std=np.float32(-0.5), progress=np.bool_(False), **SMALL)
    b = trpo_ext.train("Pendulum-v1", 128, seed=3, hidden_sizes=(8,), init_log_std=-0.5, **SMALL)
    assert a.history[0]["train/kl"] == b.history[0]["train/kl"]
    assert torch.equal(a.policy.flat, b.policy.flat)
    assert torch.equal(a.value_fn.flat, b.value_fn.flat)


class _Poisoned:
    """CartPole whose n-th step (counted over every copy) returns a NaN reward or an infinite
    observation entry."""

    def __init__(self, what: str, at: int):
        self.what, self.at, self.steps = what, at, 0

    def __call__(self):
        import gymnasium as gym

        outer = self

        class Wrapper(gym.Wrapper):
            def step(self, action):
                obs, r, term, trunc, info = self.env.step(action)
                outer.steps += 1
                if outer.steps == outer.at:
                    if outer.what == "reward":
                        r = float("nan")
                    else:
                        obs = obs.copy()
                        obs[1] = np.inf
                return obs, r, term, trunc, info

        return Wrapper(gym.make("CartPole-v1"))


@pytest.mark.parametrize("what", ["reward", "observation"])
def test_non_finite_rewards_and_observations_are_a_clear_error(what):
    # Silently, one NaN would poison the observation statistics or the critic for the whole run.
    with pytest.raises(ValueError, match=f"non-finite {what} .* at step .* of environment"):
        trpo_ext.train(_Poisoned(what, 150), 3 * 128, seed=0, **SMALL)


def test_unknown_env_id_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown gymnasium environment id 'NoSuchEnv-v0'"):
        trpo_ext.train("NoSuchEnv-v0", 1000)
    with pytest.raises(TypeError, match="env must be"):
        trpo_ext.train(42, 1000)


def test_same_seed_same_history_and_globals_untouched():
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    rng = torch.get_rng_state()
    a = trpo_ext.train("CartPole-v1", 3 * 128, seed=7, **SMALL)
    assert torch.get_num_threads() == threads and torch.get_default_dtype() == dtype
    assert torch.equal(torch.get_rng_state(), rng)  # the run draws from its own generators
    b = trpo_ext.train("CartPole-v1", 3 * 128, seed=7, **SMALL)
    c = trpo_ext.train("CartPole-v1", 3 * 128, seed=8, **SMALL)
    ha, hb = _timeless(a.history), _timeless(b.history)
    assert all(_same(x[k], y[k]) for x, y in zip(ha, hb) for k in x)
    assert torch.equal(a.policy.flat, b.policy.flat)
    assert torch.equal(a.value_fn.flat, b.value_fn.flat)
    assert not torch.equal(a.policy.flat, c.policy.flat)


def test_callback_receives_each_entry_and_can_stop():
    seen = []

    def callback(metrics):
        seen.append(metrics)
        return False if len(seen) == 2 else None  # None (or True) continues

    result = trpo_ext.train("CartPole-v1", 10 * 128, callback=callback, **SMALL)
    assert len(result.history) == 2 and seen == result.history


def test_discrete_observations_and_policy_act_and_evaluate():
    result = trpo_ext.train("FrozenLake-v1", 2 * 128, **SMALL)
    a = result.policy.act(np.int64(3))
    assert isinstance(a.item(), int) and 0 <= a < 4
    assert result.policy.act(np.array([0, 5, 6])).shape == (3,)
    rets = trpo_ext.evaluate_returns(result.policy, "FrozenLake-v1", episodes=3, seed=1)
    assert rets == [episode_return(result.policy, "FrozenLake-v1", s) for s in (1, 2, 3)]
    sampled = [trpo_ext.evaluate_returns(result.policy, "FrozenLake-v1", episodes=5, seed=2,
                                         deterministic=False) for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded: the same episodes and the same action draws


def test_policy_act_applies_normalisation_and_clips():
    result = trpo_ext.train("Pendulum-v1", 2 * 128, init_log_std=2.0, **SMALL)
    p = result.policy
    assert p.obs_rms is not None and p.obs_rms.count.item() == 256
    obs = np.array([0.5, -0.5, 3.0], dtype=np.float32)
    a = p.act(obs)
    assert a.shape == (1,)
    x = (torch.from_numpy(obs)[None] - p.obs_rms.shift) * p.obs_rms.scale
    with torch.no_grad():
        expected = p.distribution_params(x.clamp(-10, 10))[0].clamp(-2, 2)
    np.testing.assert_allclose(a, expected[0].numpy(), rtol=1e-6)
    samples = p.act(np.repeat(obs[None], 200, 0), deterministic=False,
                    generator=torch.Generator().manual_seed(0))
    assert samples.max() <= 2.0 and samples.min() >= -2.0
    assert trpo_ext.evaluate_returns(p, "Pendulum-v1", episodes=2) == pytest.approx(
        [episode_return(p, "Pendulum-v1", s) for s in (0, 1)], rel=1e-6)  # batched vs one


def test_act_and_evaluate_refuse_what_the_policy_was_not_built_for():
    p = trpo_ext.train("CartPole-v1", 128, **SMALL).policy  # observations (4,), Discrete(2)
    # A flat array whose length is a multiple of 4 is no batch of observations.
    for bad in (np.arange(8.0), np.zeros((2, 2)), np.zeros((3, 5))):
        with pytest.raises(ValueError, match=r"obs must have the policy's observation shape "
                                             r"\(4,\)"):
            p.act(bad)
    assert p.act(np.zeros(4)).shape == () and p.act(np.zeros((3, 4))).shape == (3,)
    with pytest.raises(ValueError, match="evaluate: the environment's spaces .* are not the "
                                         "policy's: obs_shape"):
        trpo_ext.evaluate(p, "Pendulum-v1", episodes=1)
    with pytest.raises(TypeError, match="policy must be a trpo_ext Policy"):
        trpo_ext.evaluate(None, "CartPole-v1")
    lake = trpo_ext.train("FrozenLake-v1", 128, **SMALL).policy  # Discrete(16) observations
    with pytest.raises(ValueError, match=r"obs holds 16, outside the policy's Discrete "
                                         r"observations: from 0 to 15"):
        lake.act(np.int64(16))


def test_no_logging_libraries_without_log_dir():
    # torch itself may import tqdm; what matters is that train() adds none of these.
    code = ("import sys, trpo_ext\n"
            "names = ('trpo_ext.logger', 'tqdm', 'tensorboard', 'matplotlib', "
            "'torch.utils.tensorboard', 'pandas', 'trpo_ext.plot')\n"
            "before = {m for m in names if m in sys.modules}\n"
            "trpo_ext.train('CartPole-v1', 128, n_envs=2, n_steps=64)\n"
            "added = {m for m in names if m in sys.modules} - before\n"
            "assert not added and 'trpo_ext.logger' not in sys.modules, added\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_async_envs_give_the_same_batches_as_sync():
    a = trpo_ext.train("CartPole-v1", 2 * 128, seed=1, **SMALL)
    b = trpo_ext.train("CartPole-v1", 2 * 128, seed=1, async_envs=True, **SMALL)
    assert torch.equal(a.policy.flat, b.policy.flat)


@pytest.mark.parametrize("workers", [1, -1])
def test_retired_env_workers_warn_and_train_as_one_process(workers):
    # env_workers is kept for old scripts: accepted, ignored with a warning, the same training.
    kw = dict(n_envs=2, n_steps=64, seed=3)
    a = trpo_ext.train("Pendulum-v1", 3 * 128, **kw)
    with pytest.warns(FutureWarning, match="env_workers=.* retired.*torchrun.*envpool"):
        b = trpo_ext.train("Pendulum-v1", 3 * 128, env_workers=workers, **kw)
    assert torch.equal(a.policy.flat, b.policy.flat)
    with pytest.raises(ValueError, match="env_workers"):
        trpo_ext.train("Pendulum-v1", 128, env_workers=-2, **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_training_keeps_the_invariants():
    result = trpo_ext.train("Pendulum-v1", 4 * 128, device="cuda", **SMALL)
    assert result.policy.flat.device.type == "cuda"
    for h in result.history:
        if h["train/line_search_success"]:
            assert 0 < h["train/kl"] <= TRPOConfig().max_kl and h["train/surrogate_improvement"] > 0
    assert trpo_ext.evaluate(result.policy, "Pendulum-v1", episodes=2) < 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_update_synchronises_only_for_line_search_decisions(monkeypatch):
    # The update's only host synchronisations are the line-search decisions, one per trial: each
    # trpo_update runs under torch's sync debug mode, and its warnings are counted.
    import warnings

    train_module = sys.modules["trpo_ext.train"]
    original, syncs = train_module.trpo_update, []

    def audited(*args, **kwargs):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                metrics = original(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("called a synchronizing" in str(w.message) for w in caught))
        return metrics

    monkeypatch.setattr(train_module, "trpo_update", audited)
    result = trpo_ext.train("Pendulum-v1", 3 * 256, device="cuda", n_envs=2, n_steps=128)
    # A trial count of 0 (a step skipped before any trial) still read one decision.
    trials = [max(int(h["train/line_search_steps"]), 1) for h in result.history]
    assert len(syncs) == 3 and syncs == trials, (syncs, trials)


# --- learning with the default settings ------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("env_id, target", [("CartPole-v1", 475.0), ("InvertedPendulum-v5", 950.0)])
def test_learns_with_default_settings(env_id, target):
    scores = []
    for seed in (0, 1):
        result = trpo_ext.train(env_id, 100_000, seed=seed)
        scores.append(trpo_ext.evaluate(result.policy, env_id, episodes=20, seed=1000))
    assert np.mean(scores) >= target, scores


def test_log_dir_config_names_the_task_and_seed(tmp_path):
    # `trpo-ext plot` groups runs of one task across seeds by these two keys of config.json.
    import json

    trpo_ext.train("CartPole-v1", 2048, seed=3, log_dir=str(tmp_path), n_envs=2, n_steps=64)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["env_id"] == "CartPole-v1" and config["seed"] == 3
    assert config["total_steps"] == 2048 and config["max_kl"] == TRPOConfig().max_kl
