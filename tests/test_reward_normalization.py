"""normalize_rewards: VecNormalize's reward rule against a float64 loop written from its definition,
raw logged returns, and the statistics through a checkpoint."""
import numpy as np
import pytest
import torch

import trpo_ext
from trpo_ext.checkpoint import load_checkpoint
from trpo_ext.train import RewardNormalizer


def reference(batches, gamma, n_envs, eps=1e-8, clip=10.0):
    """Per environment R <- gamma R + r, reset after a done step; each batch's rewards divided by
    sqrt(var + eps) of every R seen up to the end of that batch, clipped."""
    R = np.zeros(n_envs)
    seen, out = [], []
    for rewards, dones in batches:
        for t in range(rewards.shape[0]):
            R = gamma * R + rewards[t]
            seen.append(R.copy())
            R = np.where(dones[t], 0.0, R)
        var = np.var(np.concatenate(seen))
        out.append(np.clip(rewards / np.sqrt(var + eps), -clip, clip))
    return out, R


def test_matches_the_rule_over_several_batches_with_resets_and_clipping():
    rng = np.random.default_rng(0)
    T, N, gamma = 60, 3, 0.9
    batches = []
    for i in range(3):
        rewards = rng.normal(2.0, 3.0, (T, N))
        if i == 2:
            rewards[4, 1] = 1e4  # ~23 standard deviations of the 540 returns seen: clipped
        batches.append((rewards, rng.random((T, N)) < 0.25))
    expected, expected_R = reference(batches, gamma, N)
    norm = RewardNormalizer(N, gamma)
    for (rewards, dones), want in zip(batches, expected):
        r32 = torch.tensor(rewards, dtype=torch.float32)
        norm.update(r32, torch.tensor(dones))
        got = norm.normalize(r32)
        assert got.dtype == torch.float32
        # float32 rewards in: the reference sees the same rounded rewards up to 1e-6 relative.
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert float(got.max()) == 10.0
    np.testing.assert_allclose(norm.returns.numpy(), expected_R, rtol=1e-5)


def test_logged_returns_stay_raw_and_statistics_resume(tmp_path):
    small = dict(n_envs=2, n_steps=256, seed=3)
    raw = trpo_ext.train("Pendulum-v1", 512, **small)
    scaled = trpo_ext.train("Pendulum-v1", 1024, normalize_rewards=True, log_dir=str(tmp_path / "a"),
                            **small)
    # The first rollout is the same policy's: the same raw episode returns whatever the scaling.
    assert raw.history[0]["rollout/ep_return_mean"] == scaled.history[0]["rollout/ep_return_mean"]
    assert raw.history[0]["rollout/ep_return_mean"] < -100  # Pendulum's raw scale, not ~±10
    # The scaling changed what the critic learned (its loss is in the returns' units).
    assert raw.history[0]["train/value_loss"] != pytest.approx(
        scaled.history[0]["train/value_loss"], rel=1e-3)

    state = load_checkpoint(scaled.checkpoint_path)
    stats = state["reward_normalizer"]
    assert float(stats["return_rms.count"]) == 1024  # every step of both rollouts
    r1 = trpo_ext.train(None, 1536, resume=scaled.checkpoint_path, log_dir=str(tmp_path / "b"))
    r2 = trpo_ext.train(None, 1536, resume=scaled.checkpoint_path, log_dir=str(tmp_path / "c"))
    assert torch.equal(r1.policy.flat, r2.policy.flat)
    after = load_checkpoint(r1.checkpoint_path)["reward_normalizer"]
    assert float(after["return_rms.count"]) == 1536  # continued from the saved statistics
