"""Rollout collection against scripted environments: autoreset, truncation bootstrapping, clipping,
observation encodings and space checks."""
import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

import trpo_ext
from trpo_ext._reference import gae_reference
from trpo_ext.policies import Policy, space_spec
from trpo_ext.rollout import RolloutCollector, make_vector_env


class ScriptedEnv(gym.Env):
    """Episodes of scripted lengths and endings.  The observation is ``10·episode + t`` (t the step
    within the episode), the reward of a step is the observation it was taken in, and the actions
    received are recorded."""

    def __init__(self, lengths=(3, 2, 4), endings=("truncated", "terminated", "truncated"),
                 box_actions=False):
        self.lengths, self.endings = lengths, endings
        self.observation_space = spaces.Box(-np.inf, np.inf, (1,), np.float32)
        self.action_space = (spaces.Box(-1.0, 1.0, (2,), np.float32) if box_actions
                             else spaces.Discrete(2))
        self.episode = -1
        self.t = 0
        self.received = []

    def _obs(self):
        return np.array([10.0 * self.episode + self.t], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.received.append(np.array(action))
        reward = float(10.0 * self.episode + self.t)
        self.t += 1
        k = self.episode % len(self.lengths)
        end = self.t >= self.lengths[k]
        term = end and self.endings[k] == "terminated"
        trunc = end and self.endings[k] == "truncated"
        return self._obs(), reward, term, trunc, {}


def _collect(make_env, n_envs=1, n_steps=8, **policy_kw):
    envs = make_vector_env(make_env, n_envs)
    spec = space_spec(envs.single_observation_space, envs.single_action_space)
    policy = Policy(spec, normalize_obs=False, **policy_kw)
    collector = RolloutCollector(envs, policy, n_steps, seed=0, device=torch.device("cpu"))
    value_fn = lambda x: 2.0 * x[:, 0] + 0.5  # noqa: E731  a known V(s) of the raw observation
    batch = collector.collect(policy, value_fn, torch.Generator().manual_seed(0))
    return batch, collector, envs


def test_every_step_is_a_transition_no_autoreset_step():
    batch, collector, _ = _collect(ScriptedEnv, n_steps=10)
    # Episodes: 0,1,2 (truncated) | 10,11 (terminated) | 20,21,22,23 (truncated) | 30 …
    # With next-step autoreset a step taken in a final observation (3, 12, 24) would appear.
    assert batch.obs[:, 0, 0].tolist() == [0, 1, 2, 10, 11, 20, 21, 22, 23, 30]
    assert batch.rewards[:, 0].tolist() == [0, 1, 2, 10, 11, 20, 21, 22, 23, 30]
    assert batch.truncated[:, 0].tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 1, 0]
    assert batch.terminated[:, 0].tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert list(collector.episode_returns) == [3.0, 21.0, 86.0]
    assert list(collector.episode_lengths) == [3, 2, 4]
    assert collector.episodes == 3


def test_truncation_bootstraps_from_the_final_observation():
    batch, _, _ = _collect(ScriptedEnv, n_steps=10)
    nv = batch.next_values[:, 0].tolist()
    v = lambda s: 2.0 * s + 0.5  # noqa: E731
    # Truncated at t=2 with final observation 3 and at t=8 with final observation 24.
    assert nv[2] == v(3) and nv[8] == v(24)
    # Ordinary steps bootstrap from the next state; the last from the carried-over observation.
    for t in (0, 1, 3, 5, 6, 7):
        assert nv[t] == v(batch.obs[t + 1, 0, 0].item())
    assert nv[9] == v(31)
    assert batch.values[:, 0].tolist() == [v(s) for s in batch.obs[:, 0, 0].tolist()]
    # And GAE over the batch agrees with the textbook recursion run on these inputs.
    adv, ret = trpo_ext.gae(batch.rewards, batch.values, batch.next_values, batch.terminated,
                           batch.done, 0.9, 0.8)
    ref_adv, ref_ret = gae_reference(batch.rewards, batch.values, batch.next_values,
                                     batch.terminated, batch.done, 0.9, 0.8)
    torch.testing.assert_close(adv.double(), ref_adv, rtol=1e-5, atol=1e-4)
    # At the truncated step t=2: δ = r + γ V(final) − V(s), and nothing flows back from t=3.
    assert adv[2, 0].item() == pytest.approx(2 + 0.9 * v(3) - v(2), rel=1e-6)
    # At the terminated step t=4: no bootstrap at all.
    assert adv[4, 0].item() == pytest.approx(11 - v(11), rel=1e-6)


def test_several_envs_each_with_its_own_schedule():
    schedules = [((2,), ("terminated",)), ((3,), ("truncated",))]
    made = iter(schedules)

    def make():
        lengths, endings = next(made)
        return ScriptedEnv(lengths, endings)

    batch, _, _ = _collect(make, n_envs=2, n_steps=6)
    assert batch.obs[:, 0, 0].tolist() == [0, 1, 10, 11, 20, 21]
    assert batch.obs[:, 1, 0].tolist() == [0, 1, 2, 10, 11, 12]
    assert batch.terminated[:, 0].tolist() == [0, 1, 0, 1, 0, 1]
    assert batch.truncated[:, 1].tolist() == [0, 0, 1, 0, 0, 1]
    assert batch.next_values[2, 1].item() == 2.0 * 3 + 0.5
    assert batch.next_values[5, 1].item() == 2.0 * 13 + 0.5


def test_gaussian_actions_stored_unclipped_and_clipped_for_the_env():
    envs_made = []

    def make():
        env = ScriptedEnv(box_actions=True)
        envs_made.append(env)
        return env

    batch, _, _ = _collect(make, n_steps=64, init_log_std=1.5)
    stored = batch.actions[:, 0]
    assert stored.abs().max() > 1.0  # std e^1.5 ≈ 4.5 leaves the [-1, 1] box often
    received = np.stack(envs_made[0].received)
    assert np.all(np.abs(received) <= 1.0)
    np.testing.assert_array_equal(received, np.clip(stored.numpy(), -1.0, 1.0))


def test_discrete_observations_are_one_hot():
    batch, _, _ = _collect(lambda: gym.make("FrozenLake-v1"), n_steps=5)
    obs = batch.obs[:, 0]
    assert obs.shape == (5, 16)
    assert torch.all(obs.sum(-1) == 1) and torch.all((obs == 0) | (obs == 1))
    assert obs[0].argmax().item() == 0  # FrozenLake starts in state 0


def test_box_observations_of_any_shape_are_flattened():
    class ImageEnv(ScriptedEnv):
        def __init__(self):
            super().__init__()
            self.observation_space = spaces.Box(0, 1, (2, 3), np.float32)

        def _obs(self):
            return np.full((2, 3), self.t, dtype=np.float32)

    batch, _, _ = _collect(ImageEnv, n_steps=3)
    assert batch.obs.shape == (3, 1, 6)
    assert batch.obs[1, 0].tolist() == [1.0] * 6


@pytest.mark.parametrize("obs_space, act_space, what", [
    (spaces.Tuple((spaces.Discrete(2), spaces.Discrete(3))), spaces.Discrete(2), "observation"),
    (spaces.Box(-1, 1, (3,)), spaces.MultiDiscrete([[2, 3], [2, 2]]), "action"),
    (spaces.Box(-1, 1, (3,)), spaces.Box(-1, 1, (2, 2)), "action"),
    (spaces.Dict({"a": spaces.Text(5)}), spaces.Discrete(2), "observation"),
    (spaces.Dict({}), spaces.Discrete(2), "observation"),
    (spaces.Box(-1, 1, (0,)), spaces.Discrete(2), "observation"),
    (spaces.Box(-1, 1, (3,)), spaces.Box(-1, 1, (0,)), "action"),
])
def test_unsupported_spaces_are_refused_with_a_clear_error(obs_space, act_space, what):
    with pytest.raises(ValueError, match=f"unsupported {what} space"):
        space_spec(obs_space, act_space)

    class Odd(ScriptedEnv):
        def __init__(self):
            super().__init__()
            self.observation_space, self.action_space = obs_space, act_space

    with pytest.raises(ValueError, match=f"unsupported {what} space"):
        trpo_ext.train(Odd, 1000, n_envs=1, n_steps=8)


@pytest.mark.parametrize("made", [None, 5, "CartPole-v1"])
def test_env_callable_must_return_an_env(made):
    with pytest.raises(TypeError, match=f"returned {type(made).__name__}, not a gymnasium.Env"):
        trpo_ext.train(lambda: made, 1000, n_envs=1, n_steps=8)


@pytest.mark.parametrize("box_actions", [True, False])
@pytest.mark.parametrize("host_copy", [False, True])
def test_numpy_sampling_step_matches_the_torch_policy(box_actions, host_copy):
    # The rollout's per-step network runs in NumPy on the host, on views of the policy's buffers
    # (policy on the CPU) or on one host copy of them (policy on a GPU; forced here on the CPU).
    # Reference: the torch policy's own normalisation, distribution and inverse-CDF draw.
    import trpo_ext.rollout as rollout

    env = ScriptedEnv(box_actions=box_actions)
    env.observation_space = spaces.Box(-5, 5, (3,), np.float32)
    spec = space_spec(env.observation_space, env.action_space)
    gen = torch.Generator().manual_seed(0)
    policy = Policy(spec, (8, 8), init_log_std=0.5, generator=gen)
    with torch.no_grad():
        policy.flat.mul_(30.0)  # sharp distributions, away from the output-layer init's uniformity
        policy.obs_rms.update(torch.randn(50, 3, generator=gen) * 2 + 1)
    T, N = 6, 5
    noise = policy.draw_noise((T, N), gen)
    raw = torch.randn(T, N, 3, generator=gen) * 3
    obs_out = torch.empty(T, N, 3)
    act_out = torch.empty(T, N, spec["action_dim"]) if box_actions else \
        torch.empty(T, N, dtype=torch.long)
    low, high = (np.full(2, -1, np.float32), np.full(2, 1, np.float32)) if box_actions \
        else (None, None)
    with torch.no_grad():
        obs_ref = policy.normalize(raw.reshape(T * N, 3)).reshape(T, N, 3)
        params = policy.distribution_params(obs_ref.reshape(T * N, 3))
        params = tuple(p.clone() for p in params)
    original = rollout.host_policy_arrays
    if host_copy:
        def copied(p):  # what a GPU policy gives: arrays that do not share the CPU buffers
            views, stats = original(p)
            return [a.copy() for a in views], tuple(a.copy() for a in stats)

        rollout.host_policy_arrays = copied
    try:
        step = rollout._numpy_policy_step(policy, noise.numpy(), obs_out.numpy(), act_out.numpy(),
                                          low, high)
    finally:
        rollout.host_policy_arrays = original
    if host_copy:
        # A copy taken when the rollout starts is what the whole rollout samples from.
        with torch.no_grad():
            policy.flat.zero_()
            policy.obs_rms.shift.zero_()
    env_actions = np.stack([step(t, raw.numpy()) for t in range(T)])
    torch.testing.assert_close(obs_out, obs_ref)
    if box_actions:
        a_ref = (params[0] + params[1].exp() * noise.reshape(T * N, -1)).reshape(T, N, -1)
        torch.testing.assert_close(act_out, a_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(env_actions, a_ref.clamp(-1, 1).numpy(), rtol=1e-5, atol=1e-5)
        assert np.all(np.abs(env_actions) <= 1) and act_out.abs().max() > 1
    else:
        a_ref = policy.dist.sample(params, noise.reshape(T * N, 1)).reshape(T, N)
        assert (act_out == a_ref).float().mean() > 0.9  # equal but for ties at a CDF boundary
        np.testing.assert_array_equal(env_actions, act_out.numpy())


@pytest.mark.parametrize("env_id,steps", [("Pendulum-v1", 201), ("CartPole-v1", 300),
                                          ("FrozenLake-v1", 300), ("InvertedPendulum-v5", 300)])
def test_same_step_vector_env_matches_gymnasium_sync_env(env_id, steps):
    # The collector's default vector env against gymnasium's SyncVectorEnv in same-step mode:
    # the same observations (dtype included), rewards, terminations, truncations and final
    # observations, bit for bit, through truncations (Pendulum at 200 steps) and terminations.
    from gymnasium.vector import AutoresetMode, SyncVectorEnv

    from trpo_ext.vecenv import SameStepVectorEnv

    if env_id.startswith("Inverted"):
        pytest.importorskip("mujoco")
    make = lambda: gym.make(env_id)  # noqa: E731
    sync = SyncVectorEnv([make for _ in range(3)], autoreset_mode=AutoresetMode.SAME_STEP)
    ours = SameStepVectorEnv([make for _ in range(3)])
    try:
        assert ours.single_observation_space == sync.single_observation_space
        assert ours.action_space == sync.action_space
        o1, _ = sync.reset(seed=[5, 6, 7])
        o2, _ = ours.reset(seed=[5, 6, 7])
        assert o1.dtype == o2.dtype
        np.testing.assert_array_equal(o1, o2)
        sync.action_space.seed(0)
        ends = 0
        for _ in range(steps):
            a = sync.action_space.sample()
            r1, r2 = sync.step(a), ours.step(a)
            for x, y in zip(r1[:4], r2[:4]):
                assert x.dtype == y.dtype
                np.testing.assert_array_equal(x, y)
            done = np.logical_or(r1[2], r1[3])
            if done.any():
                ends += int(done.sum())
                for i in range(3):
                    assert bool(r2[4]["_final_obs"][i]) == bool(done[i])
                    if done[i]:
                        np.testing.assert_array_equal(r1[4]["final_obs"][i], r2[4]["final_obs"][i])
            else:
                assert r2[4] == {}
        assert ends > 0
    finally:
        sync.close()
        ours.close()


def test_same_step_vector_env_refuses_mismatched_input():
    from trpo_ext.vecenv import SameStepVectorEnv

    with pytest.raises(ValueError, match="at least one"):
        SameStepVectorEnv([])
    with pytest.raises(ValueError, match="environment 1 has spaces"):
        SameStepVectorEnv([lambda: gym.make("CartPole-v1"), lambda: gym.make("Acrobot-v1")])
    envs = SameStepVectorEnv([lambda: gym.make("CartPole-v1")] * 2)
    with pytest.raises(ValueError, match="one seed per environment"):
        envs.reset(seed=[1, 2, 3])
    envs.close()
