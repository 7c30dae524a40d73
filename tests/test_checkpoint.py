"""Checkpoints: layout, atomic writes, round trip, resume (bit-identical state, the total step
budget, deterministic continuation), refusal of bad files, and a run killed mid-write."""
import math
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import trpo_ext
from trpo_ext.checkpoint import CheckpointError, load_checkpoint
from trpo_ext.config import TRPOConfig

SMALL = dict(n_envs=2, n_steps=64)  # 128 steps per iteration

FAKE_LOGGER = textwrap.dedent("""
    class RunLogger:
        instances = []
        def __init__(self, log_dir, progress, total_steps, config, start_steps=0, resumed=False,
                     history=None):
            self.args = dict(log_dir=log_dir, progress=progress, total_steps=total_steps,
                             config=config, start_steps=start_steps, resumed=resumed,
                             history=None if history is None else list(history))
            self.logged, self.closed = [], False
            RunLogger.instances.append(self)
        def log(self, metrics):
            self.logged.append(metrics)
        def close(self):
            self.closed = True
""")


@pytest.fixture
def fake_logger(monkeypatch):
    """A stand-in for trpo_ext.logger (the CLI engineer's module) recording what train() calls."""
    module = types.ModuleType("trpo_ext.logger")
    exec(FAKE_LOGGER, module.__dict__)
    monkeypatch.setitem(sys.modules, "trpo_ext.logger", module)
    return module.RunLogger


def _timeless(history):
    return [{k: v for k, v in h.items() if not k.startswith("time/") or k in
             ("time/iteration", "time/total_steps")} for h in history]


def _assert_same_history(a, b):
    assert len(a) == len(b)
    for x, y in zip(_timeless(a), _timeless(b)):
        for k in x:
            assert x[k] == y[k] or (isinstance(x[k], float) and math.isnan(x[k]) and
                                    math.isnan(y[k])), k


def test_layout_round_trip_and_logger_calls(tmp_path, fake_logger):
    log_dir = str(tmp_path / "run")
    result = trpo_ext.train("CartPole-v1", 3 * 128, seed=2, log_dir=log_dir, checkpoint_every=2,
                            **SMALL)
    ckdir = os.path.join(log_dir, "checkpoints")
    assert sorted(os.listdir(ckdir)) == ["last.pt", "step_000000256.pt", "step_000000384.pt"]
    assert result.checkpoint_path == os.path.join(ckdir, "step_000000384.pt")
    assert result.log_dir == log_dir
    with open(os.path.join(ckdir, "last.pt"), "rb") as f, open(result.checkpoint_path, "rb") as g:
        assert f.read() == g.read()

    (logger,) = fake_logger.instances
    assert logger.args["log_dir"] == log_dir and logger.args["total_steps"] == 384
    assert logger.args["start_steps"] == 0 and logger.args["resumed"] is False
    assert logger.args["history"] is None
    assert logger.args["config"]["max_kl"] == TRPOConfig().max_kl
    assert logger.logged == result.history and logger.closed

    state = load_checkpoint(os.path.join(ckdir, "last.pt"))
    assert state["env_id"] == "CartPole-v1" and state["total_steps_done"] == 384
    assert state["total_steps"] == 384 and state["seed"] == 2  # what defines the run
    assert state["config"]["n_envs"] == 2 and state["iteration"] == 3
    _assert_same_history(state["history"], result.history)

    policy = trpo_ext.load(os.path.join(ckdir, "last.pt"))
    assert policy.env_id == "CartPole-v1"
    assert torch.equal(policy.flat, result.policy.flat)
    for k, v in result.policy.obs_rms.state_dict().items():
        assert torch.equal(policy.obs_rms.state_dict()[k], v)
    assert trpo_ext.evaluate(policy, episodes=2) == trpo_ext.evaluate(result.policy, "CartPole-v1",
                                                                      episodes=2)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_resume_restores_state_bit_identically_and_continues(tmp_path, fake_logger, env_id):
    first = trpo_ext.train(env_id, 2 * 128, seed=5, log_dir=str(tmp_path / "a"), **SMALL)
    ckpt = first.checkpoint_path

    # Resuming with the budget already spent: nothing runs, and every state comes back exactly.
    same = trpo_ext.train(None, 2 * 128, resume=ckpt, log_dir=str(tmp_path / "b"))
    assert torch.equal(same.policy.flat, first.policy.flat)
    assert torch.equal(same.value_fn.flat, first.value_fn.flat)
    for k, v in first.policy.state_dict().items():
        assert torch.equal(same.policy.state_dict()[k], v), k
    # The value targets' statistics (normalised by default) come back with the network.
    value_state = first.value_fn.state_dict()
    assert {"target_sq_mean", "target_fits"} <= set(value_state)
    assert int(value_state["target_fits"]) == 2
    for k, v in value_state.items():
        assert torch.equal(same.value_fn.state_dict()[k], v), k
    _assert_same_history(same.history, first.history)

    # The budget stays the total of the whole run; the history continues where it stopped.
    r1 = trpo_ext.train(env_id, 4 * 128, resume=ckpt, log_dir=str(tmp_path / "c"))
    r2 = trpo_ext.train(None, 4 * 128, resume=ckpt, log_dir=str(tmp_path / "d"))
    assert [h["time/iteration"] for h in r1.history] == [1, 2, 3, 4]
    assert [h["time/total_steps"] for h in r1.history] == [128, 256, 384, 512]
    _assert_same_history(r1.history[:2], first.history)
    # Restored generators, optimiser and normaliser make the continuation deterministic.
    _assert_same_history(r1.history, r2.history)
    assert torch.equal(r1.policy.flat, r2.policy.flat)
    logger = fake_logger.instances[-1]
    assert logger.args["resumed"] is True and logger.args["start_steps"] == 256
    # The logger rewrites progress.csv from the checkpoint's history; the total is the run's.
    _assert_same_history(logger.args["history"], first.history)
    assert logger.args["total_steps"] == 4 * 128

    state = load_checkpoint(r1.checkpoint_path)
    assert state["config"]["n_envs"] == 2  # settings come from the checkpoint
    assert state["total_steps_done"] == 512


def test_value_target_statistics_round_trip_and_older_checkpoints_resume(tmp_path, fake_logger):
    first = trpo_ext.train("Pendulum-v1", 2 * 128, seed=1, log_dir=str(tmp_path / "a"), **SMALL)
    state = load_checkpoint(first.checkpoint_path)
    assert state["config"]["normalize_value_targets"] is True
    for k in ("target_sq_mean", "target_fits"):
        assert torch.equal(state["value_state"][k], first.value_fn.state_dict()[k]), k
    assert float(first.value_fn.target_scale()) > 10  # the scale of Pendulum's returns, not 1
    with pytest.raises(ValueError, match="normalize_value_targets"):
        trpo_ext.train(None, 4 * 128, resume=first.checkpoint_path, normalize_value_targets=False)

    # A checkpoint written before the setting existed: no config entry, no statistics.  It was
    # trained without normalisation and resumes that way.
    plain = trpo_ext.train("Pendulum-v1", 2 * 128, seed=1, log_dir=str(tmp_path / "b"),
                           normalize_value_targets=False, **SMALL)
    old = torch.load(plain.checkpoint_path, weights_only=True)
    del old["config"]["normalize_value_targets"]
    assert not any(k.startswith("target_") for k in old["value_state"])
    torch.save(old, tmp_path / "old.pt")
    resumed = trpo_ext.train(None, 3 * 128, resume=str(tmp_path / "old.pt"))
    assert resumed.value_fn.normalize_targets is False
    assert len(resumed.history) == 3


def test_resume_refuses_incompatible_settings(tmp_path, fake_logger):
    first = trpo_ext.train("CartPole-v1", 128, log_dir=str(tmp_path / "a"), **SMALL)
    with pytest.raises(ValueError, match="hidden_sizes"):
        trpo_ext.train(None, 256, resume=first.checkpoint_path, hidden_sizes=(8,))
    with pytest.raises(ValueError, match="differs from the checkpoint"):
        trpo_ext.train("Pendulum-v1", 256, resume=first.checkpoint_path)


def test_resume_with_an_env_of_other_spaces_is_refused(tmp_path, fake_logger):
    import gymnasium as gym

    first = trpo_ext.train("CartPole-v1", 128, log_dir=str(tmp_path / "a"), **SMALL)
    with pytest.raises(ValueError, match=r"resume: the environment's spaces .* are not those the "
                                         r"checkpoint was trained on \(obs_dim 6 vs 4, action_dim 3 "
                                         r"vs 2\)"):
        trpo_ext.train(lambda: gym.make("Acrobot-v1"), 256, resume=first.checkpoint_path)


_DAMAGE = {
    "config without hidden_sizes": lambda s: s["config"].pop("hidden_sizes"),
    "config a list": lambda s: s.__setitem__("config", [1, 2]),
    "policy state a list": lambda s: s.__setitem__("policy_state", [1]),
    "value state of another shape": lambda s: s["value_state"].__setitem__(
        next(iter(s["value_state"])), torch.zeros(3)),
    "optimizer state foreign": lambda s: s.__setitem__("optimizer_state", {"bogus": 1}),
    "history entries foreign": lambda s: s.__setitem__("history", [{"x": 1}]),
    "seed a string": lambda s: s.__setitem__("seed", "x"),
    "negative step count": lambda s: s.__setitem__("total_steps_done", -100),
}


@pytest.mark.parametrize("damage", sorted(_DAMAGE))
def test_damaged_entries_are_a_checkpoint_error_naming_the_file(tmp_path, fake_logger, damage):
    good = trpo_ext.train("CartPole-v1", 128, log_dir=str(tmp_path / "a"), **SMALL).checkpoint_path
    state = torch.load(good, weights_only=True)
    _DAMAGE[damage](state)
    path = tmp_path / "damaged.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"damaged\.pt' is a damaged trpo_ext checkpoint"):
        trpo_ext.train(None, 256, resume=str(path))
    if damage in ("config without hidden_sizes", "config a list", "policy state a list"):
        with pytest.raises(CheckpointError, match="is a damaged trpo_ext checkpoint"):
            trpo_ext.load(str(path))


def test_bad_files_are_refused_with_checkpoint_error(tmp_path, fake_logger):
    good = trpo_ext.train("CartPole-v1", 128, log_dir=str(tmp_path / "a"), **SMALL).checkpoint_path
    data = open(good, "rb").read()
    cases = {}
    cases["truncated"] = data[: len(data) // 2]
    cases["empty"] = b""
    cases["text"] = b"hello, not a checkpoint\n"
    for name, content in cases.items():
        p = tmp_path / f"{name}.pt"
        p.write_bytes(content)
        with pytest.raises(CheckpointError, match="is not a trpo_ext checkpoint") as info:
            load_checkpoint(str(p))
        assert "weights_only" not in str(info.value)  # never suggest unsafe loading
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, foreign)
    with pytest.raises(CheckpointError, match="not a trpo_ext checkpoint"):
        trpo_ext.load(str(foreign))
    state = torch.load(good, weights_only=True)
    state["version"] = 99
    future = tmp_path / "future.pt"
    torch.save(state, future)
    with pytest.raises(CheckpointError, match="version 99"):
        trpo_ext.load(str(future))
    with pytest.raises(CheckpointError, match="does not exist"):
        trpo_ext.load(str(tmp_path / "missing.pt"))
    assert issubclass(CheckpointError, ValueError)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "trpo_ext.checkpoint", "version": 1, "x": Evil()}, evil)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(evil))  # weights_only refuses to run code
    assert "weights_only" not in str(info.value)


def test_sigkill_while_writing_leaves_the_last_good_checkpoint(tmp_path, fake_logger):
    log_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, sys, types
        module = types.ModuleType("trpo_ext.logger")
        exec({FAKE_LOGGER!r}, module.__dict__)
        sys.modules["trpo_ext.logger"] = module
        import trpo_ext, trpo_ext.checkpoint as ck
        writes = []
        def dying_write(path, data):
            writes.append(path)
            if len(writes) == 5:  # the third checkpoint's step file: die half-way through it
                d, name = os.path.split(path)
                with open(os.path.join(d, "." + name + ".tmp" + str(os.getpid())), "wb") as f:
                    f.write(data[: len(data) // 2]); f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real_write(path, data)
        real_write = ck.write_atomic
        ck.write_atomic = dying_write
        trpo_ext.train("CartPole-v1", 10 * 128, seed=0, log_dir={str(log_dir)!r},
                       checkpoint_every=1, n_envs=2, n_steps=64)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    last = log_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(str(last))
    assert state["total_steps_done"] == 256  # the second checkpoint, complete
    policy = trpo_ext.load(str(last))
    from test_train import episode_return
    assert trpo_ext.evaluate(policy, episodes=1) == episode_return(policy, "CartPole-v1", 0)

    # And a resumed run completes the budget.
    r = trpo_ext.train(None, 4 * 128, resume=str(last), log_dir=str(tmp_path / "resumed"))
    assert r.history[-1]["time/total_steps"] == 512 and len(r.history) == 4
