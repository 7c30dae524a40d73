"""The vector-env engines of trpo_ext.envs: EnvPool's episode ends against gymnasium replicas of the
same trajectories, its MuJoCo v5 tasks against gymnasium's, refusals, settings and seeding."""
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import trpo_ext
from trpo_ext.policies import Policy, space_spec
from trpo_ext.rollout import RolloutCollector

envpool = pytest.importorskip("envpool")
from trpo_ext.envs import EnvPoolVectorEnv, make_vector_env  # noqa: E402


def _value(x):
    """A known V(s) of the raw observation (no normalisation), to read next_values back."""
    return x @ torch.arange(1.0, x.shape[1] + 1) + 0.5


def _collect(envs, n_steps, seed=0):
    spec = space_spec(envs.single_observation_space, envs.single_action_space)
    policy = Policy(spec, normalize_obs=False, generator=torch.Generator().manual_seed(seed))
    collector = RolloutCollector(envs, policy, n_steps, seed=seed, device=torch.device("cpu"))
    batch = collector.collect(policy, _value, torch.Generator().manual_seed(seed))
    return batch, collector


def _replica(env_id, max_episode_steps, first_obs):
    """gymnasium's env with the time limit, put in the state whose observation is ``first_obs``."""
    env = gym.make(env_id, max_episode_steps=max_episode_steps)
    env.reset(seed=0)
    u = env.unwrapped
    if env_id == "Pendulum-v1":
        u.state = np.array([math.atan2(first_obs[1], first_obs[0]), first_obs[2]])
    else:  # CartPole: the observation is the state
        u.state = np.array(first_obs, dtype=np.float64)
    return env


def _check_against_replicas(env_id, batch, K, discrete):
    """Every column of the batch, episode by episode, is gymnasium's trajectory from the same
    first observation under the same actions: rewards, terminated, truncated (at K steps), the
    next observation, and V(true final observation) at a truncated step; a reset (EnvPool's
    ignored-action step) never appears as a transition."""
    T, N = batch.rewards.shape
    ends = {"terminated": 0, "truncated": 0}
    for i in range(N):
        t = 0
        while t < T:
            start = t
            env = _replica(env_id, K, batch.raw_features[t, i].double().numpy())
            while t < T:
                a = batch.actions[t, i]
                a = int(a) if discrete else np.clip(a.numpy(), -2.0, 2.0)
                obs, r, term, trunc, _ = env.step(a)
                assert batch.rewards[t, i] == pytest.approx(r, rel=1e-5, abs=1e-5), (t, i)
                assert bool(batch.terminated[t, i]) == term and bool(batch.truncated[t, i]) == trunc
                assert r != 0.0  # not EnvPool's reset step (reward 0)
                if term or trunc:
                    if trunc and not term:
                        want = float(_value(torch.tensor(obs, dtype=torch.float32)[None]))
                        assert float(batch.next_values[t, i]) == pytest.approx(want, rel=1e-5)
                        assert t - start + 1 == K
                    ends["terminated" if term else "truncated"] += 1
                    t += 1
                    break
                if t + 1 < T:
                    np.testing.assert_allclose(batch.raw_features[t + 1, i], obs, rtol=1e-5,
                                               atol=1e-5)
                t += 1
            env.close()
    return ends


@pytest.mark.parametrize("groups", [1, 2])
def test_envpool_truncation_bootstraps_from_the_true_final_observation(groups):
    K, T = 5, 13
    envs = EnvPoolVectorEnv("Pendulum-v1", 4, 2, groups=groups, max_episode_steps=K)
    try:
        batch, collector = _collect(envs, T)
    finally:
        envs.close()
    # Hand-derived: every episode is exactly K transitions, truncated at t = K - 1, 2K - 1.
    expected = torch.zeros(T, 4, dtype=torch.bool)
    expected[K - 1::K] = True
    assert torch.equal(batch.truncated, expected) and not batch.terminated.any()
    # The next-step observation after a truncation is a fresh episode's (|θdot| <= 1 at reset),
    # not the final one, and its value is not the bootstrap.
    assert (batch.raw_features[K, :, 2].abs() <= 1).all()
    assert list(collector.episode_lengths) == [K] * 8
    ends = _check_against_replicas("Pendulum-v1", batch, K, discrete=False)
    assert ends == {"terminated": 0, "truncated": 8}


@pytest.mark.parametrize("groups", [1, 2])
def test_envpool_termination_and_truncation_against_gymnasium_replicas(groups):
    K, T = 16, 50
    envs = EnvPoolVectorEnv("CartPole-v1", 6, 2, groups=groups, max_episode_steps=K)
    try:
        batch, collector = _collect(envs, T, seed=3)
    finally:
        envs.close()
    assert batch.rewards.eq(1).all()  # CartPole: 1 per transition, so no reset step slipped in
    ends = _check_against_replicas("CartPole-v1", batch, K, discrete=True)
    assert ends["terminated"] >= 3 and ends["truncated"] >= 3, ends
    assert collector.episodes == ends["terminated"] + ends["truncated"]


def test_envpool_termination_on_the_time_limit_step_is_a_termination():
    """Hopper (EnvPool seed 3, these actions) falls at its 26th step.  With a 26-step limit
    gymnasium reports terminated and truncated; EnvPool alone reports truncated only, which would
    bootstrap from a terminal state."""
    def run(limit, groups=1):
        envs = EnvPoolVectorEnv("Hopper-v5", 1, 1, groups=groups, seed=3, max_episode_steps=limit)
        rng = np.random.default_rng(0)
        try:
            envs.reset()
            for t in range(40):
                a = rng.uniform(-1, 1, (1, 3)).astype(np.float32)
                _, _, term, trunc, info = envs.step(a)
                if term[0] or trunc[0]:
                    return t, bool(term[0]), bool(trunc[0]), info["final_obs"][0]
        finally:
            envs.close()

    t, term, trunc, final = run(1000)
    assert (t, term, trunc) == (25, True, False)
    t, term, trunc, final_at_limit = run(26)
    assert (t, term, trunc) == (25, True, True)
    np.testing.assert_array_equal(final, final_at_limit)
    assert run(25)[:3] == (24, False, True)


@pytest.mark.parametrize("env_id,nq", [("Hopper-v5", 6), ("HalfCheetah-v5", 9)])
def test_envpool_mujoco_v5_follows_gymnasium(env_id, nq):
    """Same spaces, and from the same state under the same actions the same observations and
    rewards (to rounding: EnvPool builds its own MuJoCo, and the dynamics amplify rounding
    differences chaotically over hundreds of steps, so the comparison covers 40)."""
    e = envpool.make(env_id, env_type="gymnasium", num_envs=1, seed=3)
    g = gym.make(env_id)
    try:
        assert e.observation_space.shape == g.observation_space.shape
        np.testing.assert_array_equal(e.action_space.low, g.action_space.low)
        np.testing.assert_array_equal(e.action_space.high, g.action_space.high)
        assert e.config["max_episode_steps"] == g.spec.max_episode_steps
        obs, info = e.reset()
        g.reset(seed=0)
        qpos = np.concatenate([[info["x_position"][0]], obs[0, :nq - 1]])
        g.unwrapped.set_state(qpos, obs[0, nq - 1:])
        rng = np.random.default_rng(0)
        for t in range(40):
            a = rng.uniform(-1, 1, g.action_space.shape).astype(np.float32)
            o1, r1, te1, tr1, _ = e.step(a[None].astype(np.float64))
            o2, r2, te2, tr2, _ = g.step(a)
            np.testing.assert_allclose(o1[0], o2, rtol=0, atol=1e-8)
            assert r1[0] == pytest.approx(r2, abs=1e-6)  # EnvPool rewards are float32
            assert (te1[0], tr1[0]) == (te2, tr2)
            if te2:
                break
    finally:
        e.close()
        g.close()


@pytest.mark.parametrize("groups", [1, 2])
def test_envpool_direct_io_steps_like_envpool_public_api(groups):
    """The pools' C++ send/recv, which the wrapper calls directly, give what EnvPool's public
    send/recv give on the same seeds: observations, rewards, ends, final observations, over
    episodes that terminate and that hit the time limit."""
    a = EnvPoolVectorEnv("Hopper-v5", 6, 2, groups=groups, max_episode_steps=30)
    b = EnvPoolVectorEnv("Hopper-v5", 6, 2, groups=groups, max_episode_steps=30)
    try:
        np.testing.assert_array_equal(a.reset(seed=4)[0], b.reset(seed=4)[0])
        assert all(io is not None for io in a._io)  # EnvPool 1.2.5's layout
        b._io = [None] * len(b._pools)  # the public API (set after the reset, which rebuilds)
        rng = np.random.default_rng(0)
        ends = {"terminated": 0, "truncated": 0}
        for t in range(120):
            act = rng.uniform(-1, 1, (6, 3)).astype(np.float32)
            out_a, out_b = a.step(act), b.step(act)
            for x, y in zip(out_a[:4], out_b[:4]):
                np.testing.assert_array_equal(x, y)
            assert out_a[4].keys() == out_b[4].keys()
            if out_a[4]:
                np.testing.assert_array_equal(out_a[4]["_final_obs"], out_b[4]["_final_obs"])
                for i in np.flatnonzero(out_a[4]["_final_obs"]):
                    np.testing.assert_array_equal(out_a[4]["final_obs"][i],
                                                  out_b[4]["final_obs"][i])
            ends["terminated"] += int(out_a[2].sum())
            ends["truncated"] += int((out_a[3] & ~out_a[2]).sum())
        assert ends["terminated"] > 0 and ends["truncated"] > 0, ends
        with pytest.raises(ValueError, match=r"actions must have shape \(\d, 3\), got \(\d, 2\)"):
            a.step(np.zeros((6, 2)))
    finally:
        a.close()
        b.close()


def test_envpool_groups_step_like_one_pool():
    """Two groups (async pools with spares, send/recv per half) give one pool's batches, with its
    reset step taken at once: the true final observation in the infos, the next episode's first
    observation returned."""
    K = 7
    a = EnvPoolVectorEnv("Hopper-v5", 5, 2, groups=2, max_episode_steps=K)
    b = envpool.make("Hopper-v5", env_type="gymnasium", num_envs=5, seed=0, max_episode_steps=K)
    try:
        assert [(s.start, s.stop) for s in a.env_groups] == [(0, 2), (2, 5)]
        oa, _ = a.reset(seed=0)
        ob, _ = b.reset()
        np.testing.assert_array_equal(oa, ob)
        rng = np.random.default_rng(1)
        for t in range(K):
            act = rng.uniform(-1, 1, (5, 3))
            oa, ra, ta, ua, info = a.step(act)
            ob, rb, tb, ub, _ = b.step(act)
            for x, y in ((ra, rb), (ta, tb), (ua, ub)):
                np.testing.assert_array_equal(x, y)
            if t < K - 1:
                np.testing.assert_array_equal(oa, ob)
                assert not info
        assert ua.all()  # the time limit
        for i in range(5):
            np.testing.assert_array_equal(info["final_obs"][i], ob[i])
        ob, rb, tb, ub, _ = b.step(act)  # the one pool's reset step: action ignored, reward 0
        assert (rb == 0).all() and not (tb | ub).any()
        np.testing.assert_array_equal(oa, ob)
    finally:
        a.close()
        b.close()


def test_envpool_refusals_name_the_alternatives():
    with pytest.raises(ValueError, match="callable.*vector_env='sync'"):
        make_vector_env(lambda: gym.make("CartPole-v1"), 2, "envpool")
    with pytest.raises(ValueError, match="EnvPool has no task 'Taxi-v4'.*'sync'"):
        trpo_ext.train("Taxi-v4", 64, vector_env="envpool", n_envs=2, n_steps=32)
    with pytest.raises(ValueError, match="vector_env must be one of"):
        trpo_ext.train("CartPole-v1", 64, vector_env="gpu", n_envs=2, n_steps=32)
    with pytest.raises(ValueError, match="async_envs=True.*contradicts"):
        trpo_ext.train("CartPole-v1", 64, vector_env="envpool", async_envs=True, n_envs=2,
                       n_steps=32)
    with pytest.raises(ValueError, match="env_threads must be >= 0"):
        trpo_ext.train("CartPole-v1", 64, vector_env="envpool", env_threads=-1, n_envs=2,
                       n_steps=32)


def _history(result):
    return [{k: v for k, v in h.items() if not k.startswith("time/") or k in
             ("time/iteration", "time/total_steps")} for h in result.history]


def test_envpool_training_is_reproducible():
    kw = dict(n_envs=4, n_steps=128, vector_env="envpool", env_threads=2)
    a = trpo_ext.train("CartPole-v1", 4 * 128 * 6, seed=5, **kw)
    b = trpo_ext.train("CartPole-v1", 4 * 128 * 6, seed=5, **kw)
    assert _history(a) == _history(b)
    assert torch.equal(a.policy.flat, b.policy.flat)
    c = trpo_ext.train("CartPole-v1", 4 * 128 * 6, seed=6, **kw)
    assert _history(c) != _history(a)


def test_old_make_vector_env_signature_and_import_paths():
    from trpo_ext import rollout, vecenv

    assert rollout.make_vector_env is make_vector_env
    envs = rollout.make_vector_env("CartPole-v1", 2, False)
    assert isinstance(envs, vecenv.SameStepVectorEnv)
    envs.close()
    with pytest.warns(FutureWarning, match="workers is retired"):  # the retired worker processes
        envs = make_vector_env("CartPole-v1", 2, "sync", None, 1)
    assert isinstance(envs, vecenv.SameStepVectorEnv)
    envs.close()
