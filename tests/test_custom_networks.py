"""Training your own networks and the other spaces end to end: update invariants on custom
networks, bad networks and spaces refused before any work, checkpoints of custom networks, and
(marked slow) learning — CartPole with a user's ReLU networks, an image task with the built-in CNN,
a Dict-observation / MultiDiscrete task, MultiDiscrete and MultiBinary observations."""
import os

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn
from gymnasium import spaces

import trpo_ext
from trpo_ext.checkpoint import CheckpointError
from trpo_ext.config import TRPOConfig

SMALL = dict(n_envs=2, n_steps=64)


def relu_net(n_in, n_out, hidden=64):
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


class SideOfTheSquare(gym.Env):
    """An image task: a 36×36 RGB frame with a bright square in its left or right half; action 0
    or 1 names the half, reward 1 when right.  Ten frames an episode: the optimum is 10, a random
    policy gets 5."""

    observation_space = spaces.Box(0, 255, (36, 36, 3), np.uint8)
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._frame(), {}

    def _frame(self):
        self.side = int(self.np_random.integers(2))
        img = self.np_random.integers(0, 60, (36, 36, 3), dtype=np.uint8)
        row = int(self.np_random.integers(0, 26))
        col = int(self.np_random.integers(0, 8)) + 18 * self.side
        img[row:row + 10, col:col + 10] = 255
        return img

    def step(self, action):
        reward = float(int(action) == self.side)
        self.t += 1
        return self._frame(), reward, False, self.t >= 10, {}


class DictMultiDiscrete(gym.Env):
    """A Dict observation (a Discrete cell and a 2-D Box target) and MultiDiscrete([3, 2]) actions:
    sub-action 0 must name the third of [-1, 1] that target[0] lies in, sub-action 1 the parity of
    the cell; one reward per right sub-action.  Ten steps an episode: optimum 20, random ≈ 8.3."""

    observation_space = spaces.Dict({"cell": spaces.Discrete(5),
                                     "target": spaces.Box(-1, 1, (2,), np.float32)})
    action_space = spaces.MultiDiscrete([3, 2])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def _obs(self):
        self.cell = int(self.np_random.integers(5))
        self.target = self.np_random.uniform(-1, 1, 2).astype(np.float32)
        return {"cell": self.cell, "target": self.target}

    def step(self, action):
        third = int(np.digitize(self.target[0], [-1 / 3, 1 / 3]))
        reward = float(int(action[0]) == third) + float(int(action[1]) == self.cell % 2)
        self.t += 1
        return self._obs(), reward, False, self.t >= 10, {}


class CodeLookup(gym.Env):
    """MultiDiscrete([3, 4], start=[1, -2]) or MultiBinary(3) observations, Discrete(3) actions:
    the action must be the first element less its start (for MultiBinary, the number of ones among
    the first two elements), reward 1 when right.  Ten steps an episode: optimum 10, random ≈ 3.3.
    The other elements are noise."""

    action_space = spaces.Discrete(3)

    def __init__(self, binary=False):
        self.binary = binary
        self.observation_space = spaces.MultiBinary(3) if binary else \
            spaces.MultiDiscrete([3, 4], start=[1, -2])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.observation_space.seed(int(self.np_random.integers(2 ** 31)))
        self.t = 0
        return self._obs(), {}

    def _obs(self):
        self.obs = self.observation_space.sample()
        self.answer = int(self.obs[:2].sum()) if self.binary else int(self.obs[0]) - 1
        return self.obs

    def step(self, action):
        reward = float(int(action) == self.answer)
        self.t += 1
        return self._obs(), reward, False, self.t >= 10, {}


class NoiseOf(gym.Env):
    """Any observation space, noise for observations, no reward."""

    action_space = spaces.Discrete(2)

    def __init__(self, observation_space):
        self.observation_space = observation_space

    def reset(self, *, seed=None, options=None):
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def test_multidiscrete_and_multibinary_observations_reach_the_network_one_hot_and_as_floats():
    from trpo_ext.policies import ObservationEncoder, space_spec

    md = spaces.MultiDiscrete([3, 4], start=[1, -2])
    obs = np.array([[1, -2], [3, 1], [2, 0]])
    enc = ObservationEncoder(space_spec(md, spaces.Discrete(2)), normalize=False)
    # Reference: each element's row of an identity matrix, side by side.
    want = np.concatenate([np.eye(3)[obs[:, 0] - 1], np.eye(4)[obs[:, 1] + 2]], axis=1)
    np.testing.assert_array_equal(enc.encode(obs).numpy(), want)
    np.testing.assert_array_equal(enc.encode(obs[1]).numpy(), want[1:2])
    mb = spaces.MultiBinary([2, 2])
    bits = np.array([[[0, 1], [1, 1]]], dtype=np.int8)
    enc = ObservationEncoder(space_spec(mb, spaces.Discrete(2)), normalize=False)
    np.testing.assert_array_equal(enc.encode(bits).numpy(), [[0.0, 1.0, 1.0, 1.0]])
    # A Dict of them, and a policy that refuses values outside the space.
    dict_space = spaces.Dict({"code": md, "bits": spaces.MultiBinary(3)})
    result = trpo_ext.train(lambda: gym.wrappers.TimeLimit(NoiseOf(dict_space), 5), 128, **SMALL)
    assert result.policy.act({"code": obs, "bits": np.zeros((3, 3), np.int8)}).shape == (3,)
    policy = trpo_ext.train(CodeLookup, 128, **SMALL).policy
    for bad in ([4, 0], [1, 2], [0, 0]):
        with pytest.raises(ValueError, match=r"obs holds \[.*\], outside the policy's "
                                             r"MultiDiscrete observations: from \[1, -2\] to "
                                             r"\[3, 1\]"):
            policy.act(np.array(bad))


# --- invariants --------------------------------------------------------------------------------

@pytest.mark.parametrize("env, nets", [
    ("Pendulum-v1", lambda: (relu_net(3, 1, 32), relu_net(3, 1, 32))),
    (SideOfTheSquare, lambda: (None, None)),
    (DictMultiDiscrete, lambda: (None, None)),
])
def test_accepted_steps_respect_the_trust_region_on_any_network(env, nets):
    policy_net, value_net = nets()
    result = trpo_ext.train(env, 4 * 128, seed=1, policy_net=policy_net, value_net=value_net,
                            **SMALL)
    assert any(h["train/line_search_success"] for h in result.history)
    for h in result.history:
        if h["train/line_search_success"]:
            assert 0 < h["train/kl"] <= TRPOConfig().max_kl and h["train/surrogate_improvement"] > 0
        else:
            assert h["train/kl"] == 0
    if policy_net is not None:  # the user's module is the one trained
        assert result.policy.net is policy_net
        assert policy_net[0].weight.data_ptr() == result.policy.flat.data_ptr()


def test_failed_line_search_restores_a_custom_network_bit_for_bit(monkeypatch):
    from trpo_ext.policies import Policy

    real = Policy.surrogate_kl

    def never_within_the_region(self, old, new, actions, logp_old, advantages):
        s, kl, kl_max = real(self, old, new, actions, logp_old, advantages)
        return (s, kl + 1.0, kl_max) if not torch.is_grad_enabled() else (s, kl, kl_max)

    net = relu_net(3, 1, 16)
    trpo_ext.train("Pendulum-v1", 128, policy_net=net, value_net=relu_net(3, 1, 16), **SMALL)
    before = [p.detach().clone() for p in net.parameters()]
    monkeypatch.setattr(Policy, "surrogate_kl", never_within_the_region)
    result = trpo_ext.train("Pendulum-v1", 128, seed=1, policy_net=net,
                            value_net=relu_net(3, 1, 16), **SMALL)
    assert not result.history[-1]["train/line_search_success"]
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, net.parameters()))


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("policy_net, value_net, message", [
    (relu_net(4, 3), relu_net(4, 1), r"policy_net must map .* the logits, shape \[B, 2\]; on B = 2 "
                                     r"it returned \(2, 3\)"),
    (relu_net(4, 2), relu_net(4, 2), r"value_net must map .* \[B\] or \[B, 1\]; on B = 2 it "
                                     r"returned \(2, 2\)"),
    (relu_net(5, 2), relu_net(4, 1), r"the networks failed on a batch of 2 observations "
                                     r"\(a tensor of shape \[2, 4\]\)"),
])
def test_networks_of_the_wrong_shape_are_refused_before_any_work(tmp_path, policy_net, value_net,
                                                                 message):
    with pytest.raises(ValueError, match=message):
        trpo_ext.train("CartPole-v1", 256, policy_net=policy_net, value_net=value_net,
                       log_dir=str(tmp_path / "run"), **SMALL)
    assert not any(f.endswith(".pt") for _, _, fs in os.walk(tmp_path) for f in fs)


def test_shared_parameters_and_non_modules_are_refused():
    trunk = nn.Linear(4, 8)
    with pytest.raises(ValueError, match="share parameters"):
        trpo_ext.train("CartPole-v1", 256, policy_net=nn.Sequential(trunk, nn.Linear(8, 2)),
                       value_net=nn.Sequential(trunk, nn.Linear(8, 1)), **SMALL)
    with pytest.raises(TypeError, match="policy_net must be a torch.nn.Module"):
        trpo_ext.train("CartPole-v1", 256, policy_net=lambda x: x, **SMALL)


class _TextEnv(gym.Env):
    observation_space = spaces.Dict({"pos": spaces.Box(-1, 1, (2,)), "name": spaces.Text(8)})
    action_space = spaces.Discrete(2)


def test_a_dict_key_that_cannot_be_a_tensor_is_refused_with_the_wrapper_to_use():
    with pytest.raises(ValueError, match=r"key 'name'.*Text.*FilterObservation"):
        trpo_ext.train(_TextEnv, 256, **SMALL)


def test_checkpoints_of_custom_networks_load_into_the_callers_modules(tmp_path):
    run = str(tmp_path / "run")
    result = trpo_ext.train("CartPole-v1", 256, seed=2, policy_net=relu_net(4, 2, 16),
                            value_net=relu_net(4, 1, 16), log_dir=run, **SMALL)
    path = os.path.join(run, "checkpoints", "last.pt")
    with pytest.raises(CheckpointError, match="your own networks .* policy_net"):
        trpo_ext.load(path)
    with pytest.raises(CheckpointError, match="does not match the checkpoint's weights"):
        trpo_ext.load(path, policy_net=relu_net(4, 2, 8))
    value_net = relu_net(4, 1, 16)
    policy = trpo_ext.load(path, policy_net=relu_net(4, 2, 16), value_net=value_net)
    assert torch.equal(policy.flat, result.policy.flat)
    assert torch.equal(torch.nn.utils.parameters_to_vector(value_net.parameters()),
                       result.value_fn.flat)
    obs = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    np.testing.assert_array_equal(policy.act(obs), result.policy.act(obs))
    # Resuming needs the networks again, and continues with them.
    with pytest.raises(ValueError, match="pass them again"):
        trpo_ext.train(None, 512, resume=path)
    more = trpo_ext.train(None, 512, resume=path, policy_net=relu_net(4, 2, 16),
                          value_net=relu_net(4, 1, 16))
    assert more.history[:len(result.history)] == result.history


def test_evaluate_and_act_work_for_image_and_dict_policies():
    for env in (SideOfTheSquare, DictMultiDiscrete):
        result = trpo_ext.train(env, 128, **SMALL)
        returns = trpo_ext.evaluate_returns(result.policy, env, episodes=3)
        assert len(returns) == 3 and all(0 <= r <= 20 for r in returns)
        obs, _ = env().reset(seed=0)
        action = result.policy.act(obs)
        assert env.action_space.contains(np.asarray(action, dtype=np.int64))


# --- learning (slow) -----------------------------------------------------------------------------

@pytest.mark.slow
def test_cartpole_with_a_users_relu_networks():
    # Initial weights from torch's global generator, seeded as a user would.  Evaluated
    # deterministically after 100k steps, 18 of seeds 0-18 scored 500 here; another CPU's rounding
    # takes other trajectories, so 3 of 5 seeds must reach 475.
    scores = []
    for seed in range(5):
        torch.manual_seed(seed)
        result = trpo_ext.train("CartPole-v1", 100_000, seed=seed, policy_net=relu_net(4, 2),
                                value_net=relu_net(4, 1))
        scores.append(trpo_ext.evaluate(result.policy, "CartPole-v1", episodes=20))
    assert sum(score >= 475 for score in scores) >= 3, scores


@pytest.mark.slow
def test_image_task_with_the_builtin_cnn():
    # Within 50k steps on the defaults; it gets there by 20k, and CI's time is better spent.
    result = trpo_ext.train(SideOfTheSquare, 20_480, seed=0)
    # Optimum 10, random 5.
    assert trpo_ext.evaluate(result.policy, SideOfTheSquare, episodes=20) >= 8.5


@pytest.mark.slow
@pytest.mark.parametrize("binary", [False, True])
def test_multidiscrete_and_multibinary_observations(binary):
    result = trpo_ext.train(lambda: CodeLookup(binary), 20_480, seed=0)
    # Optimum 10, random ≈ 3.3.
    assert trpo_ext.evaluate(result.policy, lambda: CodeLookup(binary), episodes=20) >= 8.5


@pytest.mark.slow
def test_dict_observations_and_multidiscrete_actions():
    result = trpo_ext.train(DictMultiDiscrete, 50_000, seed=0)
    # Optimum 20, random ≈ 8.3.
    assert trpo_ext.evaluate(result.policy, DictMultiDiscrete, episodes=20) >= 17
