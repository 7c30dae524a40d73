"""trpo_ext.presets: every preset is valid train() settings with its measurements, get() hands out
a copy, and `trpo-ext train --preset` applies one under the explicit flags."""
import json
import math
import os
import statistics

import gymnasium as gym
import pytest

import trpo_ext
from trpo_ext import cli, presets
from trpo_ext.checkpoint import load_checkpoint
from trpo_ext.config import TRPOConfig
from trpo_ext.train import _make_config


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_each_preset_is_valid_and_says_what_it_measured(name):
    gym.spec(name)  # a registered task id
    entry = presets.PRESETS[name]
    cfg = _make_config(presets.get(name))  # raises on an unknown or invalid setting
    assert cfg != TRPOConfig(), "a preset that equals the defaults"
    assert entry["note"]
    m = entry["measured"]
    assert len(m["returns"]) == len(m["seeds"]) >= 2 and m["steps"] >= 100_000
    assert math.isclose(m["return"], statistics.fmean(m["returns"]), abs_tol=0.5)
    assert len(m["commit"]) >= 7


def test_get_copies_and_unknown_names_are_refused(monkeypatch):
    monkeypatch.setitem(presets.PRESETS, "CartPole-v1",
                        {"settings": {"hidden_sizes": (8,)}, "note": "test", "measured": {}})
    s = presets.get("CartPole-v1")
    s["hidden_sizes"] = (9,)
    assert presets.get("CartPole-v1") == {"hidden_sizes": (8,)}
    with pytest.raises(KeyError, match="no preset 'Nope-v0'"):
        presets.get("Nope-v0")


def test_cli_preset_under_explicit_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(presets.PRESETS, "CartPole-v1", {
        "settings": {"n_envs": 2, "n_steps": 64, "hidden_sizes": (8,)}, "note": "test",
        "measured": {}})
    log_dir = str(tmp_path / "run")
    rc = cli.main(["train", "--preset", "CartPole-v1", "--steps", "256", "--n-steps", "32",
                   "--eval-episodes", "0", "-q", "--log-dir", log_dir])
    assert rc == 0, capsys.readouterr().err
    ckpt = load_checkpoint(f"{log_dir}/checkpoints/last.pt")
    assert ckpt["env_id"] == "CartPole-v1"  # the preset's task when --env is not given
    assert ckpt["config"]["n_steps"] == 32  # the explicit flag
    assert ckpt["config"]["n_envs"] == 2 and ckpt["config"]["hidden_sizes"] == [8]
    assert cli.main(["train", "--preset", "Nope-v0", "-q"]) == 1
    assert "no preset 'Nope-v0'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_each_presets_measurements_are_on_record(name, monkeypatch):
    # Every return a preset claims is a run in the benchmark's records that learned with the
    # preset's settings (read against today's defaults, as the report reads them).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(os.path.join(root, "benchmarks"))
    import _settings

    with open(os.path.join(root, "benchmarks", "results", "mujoco_1m.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    settings = _settings.relative({"task": name, "config": _settings.config(presets.get(name))})
    m = presets.PRESETS[name]["measured"]
    preset_runs = [r for r in records if r["task"] == name and r.get("status") == "ok"
                   and r["steps"] == m["steps"] and _settings.relative(r) == settings]
    for seed, ret in zip(m["seeds"], m["returns"]):
        runs = [r for r in preset_runs if r["seed"] == seed]
        assert any(abs(r["return"] - ret) < 0.05 for r in runs), (name, seed, ret)
