"""The trpo-ext command.

Two parts:
- the command's own logic (argument parsing, --help, what it passes to train/evaluate/load, what it
  prints, its errors), in process, against a stand-in driver that records its calls;
- end to end against the real driver (``trpo_ext.train`` …), in subprocesses where it matters: train a
  tiny budget → eval → plot, resume, a run SIGKILLed while writing a checkpoint, refused checkpoints,
  no progress bar without a terminal.  These skip until the driver is part of trpo_ext.

A stand-in cannot be the only cover of a contract (issue 19: one whose checkpoint carried a field
the real one lacked passed while the command was wrong): each stand-in test names, in its
docstring, the end-to-end test of the same contract (tests/test_resume.py holds those of
resuming).
"""
import csv
import dataclasses
import glob
import importlib.util
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import types

import pytest

import trpo_ext
from trpo_ext import cli
from trpo_ext.checkpoint import run_total_steps
from trpo_ext.config import TRPOConfig, config_fields

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png_size(path):
    """(width, height) of a well-formed PNG; fails the test otherwise."""
    import struct

    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    assert data[-12:-4] == b"\x00\x00\x00\x00IEND", f"{path} is truncated (no IEND chunk at the end)"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 0 and height > 0
    return width, height


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_main(argv, capsys):
    """main(argv) in process: (exit status, stdout, stderr); argparse's exits included."""
    try:
        rc = cli.main(argv)
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


# ============================================================================= parsing and --help
@pytest.mark.parametrize("argv", [[], ["train"], ["eval"], ["plot"]])
def test_help_everywhere(argv, capsys):
    rc, out, _ = run_main(argv + ["--help"], capsys)
    assert rc == 0
    assert out.startswith("usage: trpo-ext")


def test_no_command_is_a_usage_error(capsys):
    rc, _, err = run_main([], capsys)
    assert rc == 2 and "COMMAND" in err


def test_every_setting_has_a_flag_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    rc, out, _ = run_main(["train", "--help"], capsys)
    assert rc == 0
    lines = out.splitlines()
    checked = 0
    for name, _tp, default, help_text in config_fields():
        if name in cli._HANDWRITTEN:
            continue
        flag = "--" + name.replace("_", "-")
        (i,) = [i for i, ln in enumerate(lines) if re.match(rf"\s+{re.escape(flag)}[ ,]", ln)]
        line = lines[i]
        if len(line.strip().split("  ")) == 1:  # a long option: its help starts on the next line
            line = line + " " + lines[i + 1].strip()
        assert help_text in line, (name, line)
        assert f"(default: {cli._show_default(default)})" in line, (name, line)
        if isinstance(default, bool):
            assert f"--no-{flag[2:]}" in line
        checked += 1
    assert checked >= 15
    for flag in ("--env", "--steps", "--seed", "--log-dir", "--resume", "--eval-episodes", "--quiet"):
        assert any(ln.strip().startswith(flag) or f", {flag}" in ln for ln in lines), flag
    assert "(default: 100000" in out and "(default: CartPole-v1" in out


def test_flags_parse_to_typed_settings():
    args = cli.build_parser().parse_args([
        "train", "--hidden-sizes", "32,16", "--no-normalize-obs", "--max-kl", "0.02",
        "--cg-iters", "5", "--async-envs", "--gamma", "1", "--device", "cpu",
        "--env-kwargs", '{"max_episode_steps": 50, "render_mode": null}'])
    assert cli.train_settings(args) == {
        "hidden_sizes": (32, 16), "normalize_obs": False, "max_kl": 0.02, "cg_iters": 5,
        "async_envs": True, "gamma": 1.0, "device": "cpu",
        "env_kwargs": {"max_episode_steps": 50, "render_mode": None}}
    assert isinstance(cli.train_settings(args)["gamma"], float)
    # Unset settings are not passed: train() keeps its own defaults.
    assert cli.train_settings(cli.build_parser().parse_args(["train"])) == {}


@pytest.mark.parametrize("argv, flag", [
    (["--max-kl", "abc"], "--max-kl"),
    (["--cg-iters", "2.5"], "--cg-iters"),
    (["--hidden-sizes", "64,x"], "--hidden-sizes"),
    (["--hidden-sizes", "8,,8"], "--hidden-sizes"),
    (["--hidden-sizes", "64,"], "--hidden-sizes"),
    (["--env-kwargs", "[1]"], "--env-kwargs"),
    (["--env-kwargs", "{max_episode_steps: 5}"], "--env-kwargs"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-5"], "--steps"),
    (["--steps", "12.5"], "--steps"),
    (["--steps", "1e400"], "--steps"),
    (["--seed", "-1"], "--seed"),
    (["--eval-episodes", "many"], "--eval-episodes"),
    (["--no-such-setting", "1"], "--no-such-setting"),
])
def test_bad_flags_are_usage_errors(argv, flag, capsys):
    rc, _, err = run_main(["train"] + argv, capsys)
    assert rc == 2
    assert flag in err
    # One line that names the problem and where the help is, not the whole usage block.
    assert len(err.strip().splitlines()) == 1 and "(see `trpo-ext" in err


def test_config_types_from_strings():
    # config.py has `from __future__ import annotations`: the types may arrive as strings.
    from typing import Optional, Tuple

    assert cli._split_type("int") == (int, False, False)
    assert cli._split_type("Optional[str]") == (str, True, False)
    assert cli._split_type("Tuple[int, ...]") == (int, False, True)
    assert cli._split_type(Optional[float]) == (float, True, False)
    assert cli._split_type(Tuple[float, ...]) == (float, False, True)
    parse = cli._value_parser(int, True, True, "--x")
    assert parse("none") is None and parse("1,2,3") == (1, 2, 3) and parse("") == ()


def test_default_log_dir(tmp_path):
    first = cli.default_log_dir("ALE/Pong-v5", 3, root=str(tmp_path), now=0.0)
    assert re.fullmatch(r"ALE_Pong-v5-3-\d{8}-\d{6}", os.path.basename(first))
    os.makedirs(first)
    second = cli.default_log_dir("ALE/Pong-v5", 3, root=str(tmp_path), now=0.0)
    assert second == first + "-2"


def test_console_script_entry_point():
    with open(os.path.join(REPO, "setup.py")) as f:
        assert '"trpo-ext=trpo_ext.cli:main"' in f.read()
    assert callable(cli.main)


def test_python_dash_m(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "trpo_ext", "--version"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"trpo_ext {trpo_ext.__version__}"


# ============================================================= the command against a stand-in driver
class StandInPolicy:
    def __init__(self, env_id, env_kwargs=None):
        self.env_id, self.env_kwargs = env_id, env_kwargs or {}


class StandInCheckpointError(ValueError):
    pass


@pytest.fixture
def standin(monkeypatch, tmp_path):
    """Replaces trpo_ext.train/evaluate_returns/load and trpo_ext.checkpoint with recorders.

    train() writes real logs with RunLogger, like the driver, so the command's report is checked
    against files that exist.
    """
    calls = {}
    checkpoints = {}

    def train(env="CartPole-v1", total_steps=100_000, *, seed=0, callback=None, **settings):
        calls["train"] = dict(env=env, total_steps=total_steps, seed=seed, **settings)
        if calls.get("interrupt"):
            raise KeyboardInterrupt
        if calls.get("train_error"):
            raise calls["train_error"]
        from trpo_ext.logger import RunLogger

        log_dir = settings["log_dir"]
        with RunLogger(log_dir, settings["progress"], total_steps, {"env_id": env, "seed": seed}) as log:
            for i in (1, 2):
                log.log({"time/iteration": i, "time/total_steps": i * total_steps // 2,
                         "rollout/ep_return_mean": 10.0 * i, "train/kl": 0.005})
        ckpt = os.path.join(log_dir, "checkpoints", "last.pt")
        os.makedirs(os.path.dirname(ckpt), exist_ok=True)
        open(ckpt, "w").close()
        return types.SimpleNamespace(policy=StandInPolicy(env), value_fn=None, history=[],
                                     checkpoint_path=ckpt, log_dir=log_dir)

    def evaluate_returns(policy, env=None, episodes=10, seed=0, deterministic=True):
        calls["evaluate"] = dict(policy=policy, env=env, episodes=episodes, seed=seed,
                                 deterministic=deterministic)
        return [1.0 if i % 2 == 0 else 3.0 for i in range(episodes)]

    def load(path):
        calls["load"] = path
        if path in checkpoints and checkpoints[path] is None:
            raise StandInCheckpointError("not a trpo_ext checkpoint (no 'format_version' key)")
        return StandInPolicy(checkpoints.get(path, {}).get("env_id"),
                             checkpoints.get(path, {}).get("env_kwargs"))

    def load_checkpoint(path):
        calls["load_checkpoint"] = path
        if checkpoints.get(path) is None:
            raise StandInCheckpointError(f"{path} is truncated")
        return checkpoints[path]

    module = types.ModuleType("trpo_ext.checkpoint")
    module.load_checkpoint = load_checkpoint
    module.run_total_steps = run_total_steps  # the real rule, on the stand-in's records
    module.CheckpointError = StandInCheckpointError
    monkeypatch.setitem(sys.modules, "trpo_ext.checkpoint", module)
    monkeypatch.setattr(trpo_ext, "train", train, raising=False)
    monkeypatch.setattr(trpo_ext, "evaluate_returns", evaluate_returns, raising=False)
    monkeypatch.setattr(trpo_ext, "load", load, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRPO_EXT_DEBUG", raising=False)
    return types.SimpleNamespace(calls=calls, checkpoints=checkpoints)


def test_train_with_no_arguments(standin, capsys, tmp_path):
    """End to end: test_e2e_defaults, test_e2e_train_files_and_report."""
    rc, out, err = run_main(["train"], capsys)
    assert rc == 0, err
    call = standin.calls["train"]
    log_dir = call.pop("log_dir")
    assert re.fullmatch(r"runs/CartPole-v1-0-\d{8}-\d{6}", log_dir)
    assert call == {"env": "CartPole-v1", "total_steps": 100_000, "seed": 0, "progress": True,
                    "resume": None}
    assert standin.calls["evaluate"]["episodes"] == 10
    assert standin.calls["evaluate"]["deterministic"] is True
    assert standin.calls["evaluate"]["seed"] == cli.EVAL_SEED_OFFSET
    lines = out.splitlines()
    assert "evaluation: mean return 2.00 ± 1.00 over 10 episodes (CartPole-v1, deterministic policy)" in lines
    plot = os.path.join(log_dir, "learning_curve.png")
    assert f"learning curve: {plot}" in lines
    png_size(tmp_path / plot)
    assert f"last checkpoint: {os.path.join(log_dir, 'checkpoints', 'last.pt')}" in lines
    assert "training CartPole-v1 for 100,000 steps (seed 0)" in err


def test_train_passes_given_settings_only(standin, capsys):
    """End to end: test_e2e_train_files_and_report (the settings the checkpoint records)."""
    rc, _, err = run_main(["train", "--env", "Pendulum-v1", "--steps", "4096", "--seed", "7",
                           "--max-kl", "0.05", "--hidden-sizes", "32", "-q", "--log-dir", "mine",
                           "--eval-episodes", "0"], capsys)
    assert rc == 0, err
    assert standin.calls["train"] == {
        "env": "Pendulum-v1", "total_steps": 4096, "seed": 7, "max_kl": 0.05,
        "hidden_sizes": (32,), "progress": False, "resume": None, "log_dir": "mine"}
    assert "evaluate" not in standin.calls


def test_steps_accepts_scientific_notation():
    parse = cli.build_parser().parse_args
    assert parse(["train", "--steps", "1e5"]).steps == 100_000
    assert parse(["train", "--steps", "250_000"]).steps == 250_000


def test_unknown_environment_is_one_line(standin, capsys):
    """End to end: test_e2e_user_errors."""
    import gymnasium

    standin.calls["train_error"] = gymnasium.error.NameNotFound("Environment `Nope` doesn't exist.")
    rc, _, err = run_main(["train", "--env", "Nope-v0"], capsys)
    assert rc == 1
    assert err.strip().splitlines()[-1] == "trpo-ext train: error: Environment `Nope` doesn't exist."


def test_no_progress_flag(standin, capsys):
    """End to end: test_e2e_progress_bar_on_a_terminal_only_when_asked."""
    assert run_main(["train", "--no-progress", "--eval-episodes", "0"], capsys)[0] == 0
    assert standin.calls["train"]["progress"] is False


def test_resume_takes_the_run_from_the_checkpoint(standin, capsys, tmp_path):
    """End to end: test_resume.py (every resume there gives --resume RUN_DIR alone)."""
    run_dir = tmp_path / "old-run"
    ckpt = str(run_dir / "checkpoints" / "last.pt")
    os.makedirs(os.path.dirname(ckpt))
    open(ckpt, "w").close()
    standin.checkpoints[ckpt] = {
        "env_id": "Acrobot-v1", "total_steps_done": 2048, "history": [], "seed": 3,
        "total_steps": 8192,
        "config": {"max_kl": 0.02, "n_envs": 4, "hidden_sizes": [32, 32], "log_dir": "elsewhere",
                   "progress": False, "resume": None, "not_a_setting": 1}}
    rc, out, err = run_main(["train", "--resume", str(run_dir), "--n-envs", "2"], capsys)
    assert rc == 0, err
    assert standin.calls["load_checkpoint"] == ckpt
    # Env, seed and total from the checkpoint; its settings, with the flags given now on top; the
    # log directory is the run's own.
    assert standin.calls["train"] == {
        "env": "Acrobot-v1", "seed": 3, "total_steps": 8192, "max_kl": 0.02, "n_envs": 2,
        "hidden_sizes": (32, 32), "progress": True, "resume": ckpt, "log_dir": str(run_dir)}
    assert "resuming Acrobot-v1 for 8,192 steps (seed 3)" in err


def test_resume_explicit_flags_win(standin, capsys, tmp_path):
    """End to end: test_e2e_checkpoint_of_a_callable_env,
    test_resume.py::test_flags_given_with_the_resume_win_and_define_the_run."""
    ckpt = str(tmp_path / "somewhere.pt")
    open(ckpt, "w").close()
    # Trained on a callable (no env id): --env names the task (the real driver refuses an id other
    # than the checkpoint's).
    standin.checkpoints[ckpt] = {"env_id": None, "config": {}, "total_steps_done": 1,
                                 "total_steps": 256, "history": []}
    rc, _, err = run_main(["train", "--resume", ckpt, "--env", "CartPole-v1", "--steps", "999",
                           "--seed", "5", "--eval-episodes", "0"], capsys)
    assert rc == 0, err
    call = standin.calls["train"]
    assert (call["env"], call["total_steps"], call["seed"]) == ("CartPole-v1", 999, 5)
    # Not inside a checkpoints/ directory: a fresh default log directory.
    assert call["log_dir"].startswith(os.path.join("runs", "CartPole-v1-5-"))


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: os.makedirs(p), "without checkpoints/last.pt"),
    (lambda p: open(p, "w").close(), "is truncated"),
])
def test_resume_refused(standin, capsys, tmp_path, make, message):
    """End to end: test_e2e_refused_checkpoints."""
    path = str(tmp_path / "ck.pt")
    make(path)
    rc, out, err = run_main(["train", "--resume", path], capsys)
    assert rc == 1
    assert "train" not in standin.calls
    (line,) = err.strip().splitlines()
    assert line.startswith("trpo-ext train: error: ") and message in line and path in line


def test_train_errors_are_one_line(standin, capsys):
    """End to end: test_e2e_user_errors."""
    standin.calls["train_error"] = TypeError("unknown setting 'foo'; valid settings: n_envs, ...")
    rc, _, err = run_main(["train", "--eval-episodes", "0"], capsys)
    assert rc == 1
    assert err.strip().splitlines()[-1] == ("trpo-ext train: error: unknown setting 'foo'; valid "
                                            "settings: n_envs, ...")
    assert "Traceback" not in err


def test_debug_shows_the_traceback(standin, capsys, monkeypatch):
    """End to end: test_e2e_user_errors."""
    standin.calls["train_error"] = ValueError("max_kl must be > 0")
    monkeypatch.setenv("TRPO_EXT_DEBUG", "1")
    with pytest.raises(ValueError, match="max_kl"):
        cli.main(["train", "--eval-episodes", "0"])


def test_interrupt_points_to_resume(standin, capsys, tmp_path):
    """End to end: test_e2e_defaults (in process), and with a real SIGINT
    test_resume.py::test_sigint_points_to_resume_and_the_resume_finishes."""
    standin.calls["interrupt"] = True
    os.makedirs("run/checkpoints")
    open("run/checkpoints/last.pt", "w").close()
    rc, _, err = run_main(["train", "--log-dir", "run"], capsys)
    assert rc == 130
    assert "interrupted; continue with `trpo-ext train --resume run/checkpoints/last.pt`" in err


def test_without_driver(monkeypatch, capsys):
    """The command's own check: no real driver can be missing."""
    monkeypatch.delattr(trpo_ext, "train", raising=False)
    rc, _, err = run_main(["train"], capsys)
    assert rc == 1 and "no training driver (trpo_ext.train" in err


def test_eval(standin, capsys, tmp_path):
    """End to end: test_e2e_eval_and_plot."""
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.pt")
    os.makedirs(os.path.dirname(ckpt))
    open(ckpt, "w").close()
    standin.checkpoints[ckpt] = {"env_id": "CartPole-v1"}
    rc, out, err = run_main(["eval", ckpt, "--episodes", "4"], capsys)
    assert rc == 0, err
    assert out.strip() == (f"mean return 2.00 ± 1.00 over 4 episodes (CartPole-v1, deterministic "
                           f"policy, {ckpt})")
    assert standin.calls["evaluate"]["seed"] == 0
    assert standin.calls["evaluate"]["env"] is None  # the policy's own environment
    # Made with its run's env_kwargs, which the report names.
    standin.checkpoints[ckpt]["env_kwargs"] = {"max_episode_steps": 50}
    rc, out, err = run_main(["eval", ckpt, "--episodes", "4"], capsys)
    assert rc == 0, err
    assert '(CartPole-v1 {"max_episode_steps": 50}, deterministic' in out
    # A run directory stands for its last checkpoint; --env and --stochastic are passed on.
    rc, out, err = run_main(["eval", str(tmp_path / "run"), "--env", "CartPole-v0", "--stochastic",
                             "--seed", "9", "--episodes", "1"], capsys)
    assert rc == 0, err
    assert standin.calls["load"] == ckpt
    assert standin.calls["evaluate"]["env"] == "CartPole-v0"
    assert standin.calls["evaluate"]["deterministic"] is False
    assert standin.calls["evaluate"]["seed"] == 9
    assert "mean return 1.00 ± 0.00 over 1 episodes (CartPole-v0, stochastic policy" in out


def test_eval_errors(standin, capsys, tmp_path):
    """End to end: test_e2e_refused_checkpoints, test_e2e_checkpoint_of_a_callable_env."""
    missing = str(tmp_path / "missing.pt")
    rc, _, err = run_main(["eval", missing], capsys)
    assert rc == 1 and err.strip() == f"trpo-ext eval: error: checkpoint {missing!r} does not exist"

    bad = str(tmp_path / "bad.pt")
    open(bad, "w").close()
    standin.checkpoints[bad] = None
    rc, _, err = run_main(["eval", bad], capsys)
    assert rc == 1
    assert err.strip() == (f"trpo-ext eval: error: cannot use checkpoint {bad}: not a trpo_ext "
                           "checkpoint (no 'format_version' key)")

    anonymous = str(tmp_path / "anon.pt")
    open(anonymous, "w").close()
    standin.checkpoints[anonymous] = {"env_id": None}
    rc, _, err = run_main(["eval", anonymous], capsys)
    assert rc == 1 and "records no environment id: pass --env" in err


def test_plot_command(capsys, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    for seed in (0, 1):
        d = tmp_path / "runs" / f"CartPole-v1-{seed}-20260101-120000"
        d.mkdir(parents=True)
        (d / "progress.csv").write_text("time/total_steps,rollout/ep_return_mean\n"
                                        f"100,{1 + seed}\n200,{5 + seed}\n300,{9 + seed}\n")
    rc, out, err = run_main(["plot", "runs", "--out", "curves.png", "--title", "t"], capsys)
    assert rc == 0, err
    assert out.strip() == "curves.png"
    png_size(tmp_path / "curves.png")
    rc, _, err = run_main(["plot", "nothing-here"], capsys)
    assert rc == 1 and "nothing-here" in err and "Traceback" not in err


# ===================================================================== end to end, the real driver
def _has_driver():
    return (all(hasattr(trpo_ext, n) for n in ("train", "evaluate", "evaluate_returns", "load"))
            and importlib.util.find_spec("trpo_ext.checkpoint") is not None)


driver = pytest.mark.skipif(not _has_driver(), reason="needs the driver (trpo_ext.train, "
                            "evaluate, load, trpo_ext.checkpoint), not merged yet")

# 2 envs x 64 steps = 128 samples per update: a few iterations take well under a second.
TINY = ["--env", "CartPole-v1", "--n-envs", "2", "--n-steps", "64", "--eval-episodes", "2"]
CONTRACT_KEYS = [
    "time/iteration", "time/total_steps", "rollout/ep_return_mean", "rollout/ep_length_mean",
    "rollout/episodes", "train/kl", "train/kl_max_row", "train/surrogate_improvement",
    "train/expected_improvement", "train/line_search_steps", "train/line_search_success",
    "train/cg_residual", "train/cg_iterations", "train/entropy", "train/value_loss",
    "train/explained_variance", "time/fps", "time/elapsed_s", "time/sampling_s", "time/gae_s",
    "time/gradient_s", "time/cg_s", "time/line_search_s", "time/critic_s"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TRPO_EXT_NO_PROGRESS",
                                                             "TRPO_EXT_DEBUG")}
    env["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    return env


def _cli(*argv, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "trpo_ext", *argv], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=timeout)


def _step_files(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step_*.pt")))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """`trpo-ext train` on a tiny budget, in a subprocess with stderr a pipe (as in CI)."""
    if not _has_driver():
        pytest.skip("needs the driver")
    run_dir = str(tmp_path_factory.mktemp("e2e") / "run")
    proc = _cli("train", *TINY, "--steps", "512", "--checkpoint-every", "2", "--seed", "7",
                "--max-kl", "0.05", "--log-dir", run_dir)
    assert proc.returncode == 0, proc.stderr
    return run_dir, proc


@driver
def test_e2e_train_files_and_report(trained_run):
    run_dir, proc = trained_run
    lines = proc.stdout.splitlines()
    assert any(re.fullmatch(r"evaluation: mean return -?\d+\.\d\d ± \d+\.\d\d over 2 episodes "
                            r"\(CartPole-v1, deterministic policy\)", ln) for ln in lines), lines
    plot = os.path.join(run_dir, "learning_curve.png")
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    assert f"learning curve: {plot}" in lines
    assert f"last checkpoint: {last}" in lines or f"last checkpoint: {os.path.abspath(last)}" in lines
    png_size(plot)

    rows = read_rows(os.path.join(run_dir, "progress.csv"))
    assert [int(r["time/total_steps"]) for r in rows] == [128, 256, 384, 512]
    assert [int(r["time/iteration"]) for r in rows] == [1, 2, 3, 4]
    assert set(CONTRACT_KEYS) <= set(rows[0]), set(CONTRACT_KEYS) - set(rows[0])
    if importlib.util.find_spec("tensorboard") is not None:
        assert glob.glob(os.path.join(run_dir, "tb", "events.out.tfevents.*"))
    else:  # an optional dependency: the run says so and goes on
        assert "tensorboard is not installed" in proc.stderr, proc.stderr

    from trpo_ext.checkpoint import load_checkpoint

    steps = [int(re.search(r"step_(\d{9})\.pt$", p).group(1)) for p in _step_files(run_dir)]
    assert steps == [256, 512]
    for path, n in zip(_step_files(run_dir), steps):
        assert load_checkpoint(path)["total_steps_done"] == n
    state = load_checkpoint(last)
    assert state["total_steps_done"] == 512 == state["total_steps"]
    assert state["env_id"] == "CartPole-v1" and state["seed"] == 7
    # The settings given reached the driver; the others kept its defaults.
    given = {"n_envs": 2, "n_steps": 64, "max_kl": 0.05, "checkpoint_every": 2, "progress": True,
             "log_dir": run_dir}
    defaults = {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(TRPOConfig()).items()}
    assert state["config"] == {**defaults, **given}
    # The evaluation: deterministic, from seed + EVAL_SEED_OFFSET.
    mean = float(re.search(r"evaluation: mean return (-?\d+\.\d\d)", proc.stdout).group(1))
    returns = trpo_ext.evaluate_returns(trpo_ext.load(last), "CartPole-v1", episodes=2,
                                        seed=7 + cli.EVAL_SEED_OFFSET, deterministic=True)
    assert mean == pytest.approx(sum(returns) / 2, abs=0.006)


@driver
def test_e2e_no_progress_bar_without_a_terminal(trained_run):
    _, proc = trained_run
    assert "\r" not in proc.stderr
    assert not re.search(r"return .* \| kl .* fps", proc.stderr), proc.stderr


@driver
def test_e2e_eval_and_plot(trained_run, tmp_path, capsys):
    # In process: the checkpoint is read back from disk all the same, and a second interpreter
    # start would double this test's time.
    run_dir, _ = trained_run
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    rc, out, err = run_main(["eval", last, "--episodes", "3", "--seed", "4"], capsys)
    assert rc == 0, err
    m = re.fullmatch(r"mean return (-?\d+\.\d\d) ± (\d+\.\d\d) over 3 episodes \(CartPole-v1, "
                     r"deterministic policy, .*last\.pt\)", out.strip())
    assert m, out
    returns = trpo_ext.evaluate_returns(trpo_ext.load(last), "CartPole-v1", episodes=3, seed=4)
    assert float(m.group(1)) == pytest.approx(sum(returns) / 3, abs=0.006)

    # A run directory stands for its last.pt; --env, --stochastic and --seed are passed on.
    rc, out, err = run_main(["eval", run_dir, "--env", "CartPole-v0", "--stochastic", "--seed", "9",
                             "--episodes", "2"], capsys)
    assert rc == 0, err
    returns = trpo_ext.evaluate_returns(trpo_ext.load(last), "CartPole-v0", episodes=2, seed=9,
                                        deterministic=False)
    mean, std = sum(returns) / 2, abs(returns[0] - returns[1]) / 2
    assert out.strip() == (f"mean return {mean:.2f} ± {std:.2f} over 2 episodes (CartPole-v0, "
                           f"stochastic policy, {last})")

    out_png = str(tmp_path / "curve.png")
    rc, out, err = run_main(["plot", run_dir, "--out", out_png], capsys)
    assert rc == 0, err
    assert out.strip() == out_png
    png_size(out_png)


@driver
def test_e2e_resume_continues_the_run(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    rc, _, err = run_main(["train", *TINY, "--steps", "256", "--checkpoint-every", "1", "-q",
                           "--eval-episodes", "0", "--log-dir", run_dir], capsys)
    assert rc == 0, err
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    # No --env, --n-envs, --n-steps: all from the checkpoint; the log directory is the run's own.
    rc, out, err = run_main(["train", "--resume", last, "--steps", "512", "-q",
                             "--eval-episodes", "0"], capsys)
    assert rc == 0, err
    assert "evaluation:" not in out  # --eval-episodes 0
    rows = read_rows(os.path.join(run_dir, "progress.csv"))
    assert [int(r["time/total_steps"]) for r in rows] == [128, 256, 384, 512]
    assert [int(r["time/iteration"]) for r in rows] == [1, 2, 3, 4]

    from trpo_ext.checkpoint import load_checkpoint

    ckpt = load_checkpoint(last)
    assert ckpt["total_steps_done"] == 512 and ckpt["env_id"] == "CartPole-v1"
    assert [h["time/total_steps"] for h in ckpt["history"]] == [128, 256, 384, 512]
    assert len(_step_files(run_dir)) == 4


_KILLER = textwrap.dedent("""
    # Runs `trpo-ext train` and SIGKILLs itself half way through writing checkpoint file number
    # KILL_AT: through torch.save when the driver saves to a file, else in the fsync before the rename.
    import io, os, signal, sys
    import torch
    from trpo_ext.cli import main

    KILL_AT = int(sys.argv[1])
    real_save, real_fsync = torch.save, os.fsync
    count = {"saves": 0, "fsyncs": 0}

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def save(obj, f, *args, **kwargs):
        if not isinstance(f, io.BytesIO):
            count["saves"] += 1
            if count["saves"] == KILL_AT:
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                fh = open(f, "wb") if isinstance(f, (str, bytes, os.PathLike)) else f
                fh.write(data[: len(data) // 2])
                fh.flush()
                real_fsync(fh.fileno())
                die()
        return real_save(obj, f, *args, **kwargs)

    def fsync(fd):
        # Only files being written into checkpoints/ count (not the logger's CSV or config).
        if count["saves"] == 0 and "/checkpoints/" in os.readlink(f"/proc/self/fd/{fd}"):
            count["fsyncs"] += 1
            if count["fsyncs"] == KILL_AT:
                die()
        return real_fsync(fd)

    torch.save, os.fsync = save, fsync
    sys.exit(main(sys.argv[2:]))
""")


@driver
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and SIGKILL")
def test_e2e_sigkill_while_writing_a_checkpoint(tmp_path, capsys):
    from trpo_ext.checkpoint import load_checkpoint

    run_dir = str(tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, "5", "train", *TINY, "--steps", "1024",
         "--checkpoint-every", "1", "-q", "--eval-episodes", "0", "--log-dir", run_dir],
        capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == -9, ("the run was not killed while writing a checkpoint: "
                                   f"rc={proc.returncode}\n{proc.stderr}")
    steps = _step_files(run_dir)
    assert steps, os.listdir(os.path.join(run_dir, "checkpoints"))
    done = [load_checkpoint(p)["total_steps_done"] for p in steps]  # every one readable
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    last_done = load_checkpoint(last)["total_steps_done"]
    assert last_done in done and last_done < 1024
    policy = trpo_ext.load(last)
    assert policy.env_id == "CartPole-v1"

    rc, _, err = run_main(["train", "--resume", last, "--steps", "1024", "-q",
                           "--eval-episodes", "0"], capsys)
    assert rc == 0, err
    rows = read_rows(os.path.join(run_dir, "progress.csv"))
    totals = [int(r["time/total_steps"]) for r in rows]
    assert totals == list(range(128, 1025, 128)), totals
    assert load_checkpoint(last)["total_steps_done"] == 1024


@driver
def test_e2e_refused_checkpoints(trained_run, tmp_path, capsys):
    import torch
    from trpo_ext.checkpoint import CheckpointError, load_checkpoint

    run_dir, _ = trained_run
    good = os.path.join(run_dir, "checkpoints", "last.pt")
    with open(good, "rb") as f:
        data = f.read()
    marker = str(tmp_path / "code-ran")

    class Payload:
        def __reduce__(self):
            return (open, (marker, "w"))

    bad = {
        "garbage.pt": b"this is not a checkpoint at all" * 10,
        "empty.pt": b"",
        "truncated.pt": data[: len(data) // 2],
        "pickle-with-code.pt": pickle.dumps(Payload()),
    }
    for name, content in bad.items():
        with open(tmp_path / name, "wb") as f:
            f.write(content)
    torch.save({"model": {"w": torch.zeros(3)}, "epoch": 3}, str(tmp_path / "foreign-dict.pt"))
    torch.save(torch.zeros(3), str(tmp_path / "foreign-tensor.pt"))
    names = list(bad) + ["foreign-dict.pt", "foreign-tensor.pt"]
    os.makedirs(tmp_path / "empty-run")
    for name, message in (("missing.pt", "does not exist"),
                          ("empty-run", "without checkpoints/last.pt")):
        path = str(tmp_path / name)
        for argv in (["eval", path], ["train", "--resume", path, "--eval-episodes", "0"]):
            rc, _, err = run_main(argv, capsys)
            assert rc == 1 and err.startswith(f"trpo-ext {argv[0]}: error: "), err
            assert message in err and path in err and "Traceback" not in err
        assert os.listdir(tmp_path / "empty-run") == []  # nothing started

    ckpt = torch.load(good, weights_only=True)
    version_keys = [k for k in ckpt if "version" in str(k).lower()]
    if version_keys:  # the same file claiming a format from the future
        ckpt[version_keys[0]] = 10 ** 6
        torch.save(ckpt, str(tmp_path / "future.pt"))
        names.append("future.pt")

    for name in names:
        path = str(tmp_path / name)
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
        with pytest.raises(CheckpointError) as info:
            trpo_ext.load(path)
        assert isinstance(info.value, ValueError)
        for argv in (["eval", path], ["train", "--resume", path, "--eval-episodes", "0"]):
            rc, _, err = run_main(argv, capsys)
            assert rc == 1, (name, argv)
            # The error comes first (nothing started); the driver's message may run over lines.
            first = err.strip().splitlines()[0]
            assert first.startswith(f"trpo-ext {argv[0]}: error: ") and path in first, err
            assert "Traceback" not in err
    assert not os.path.exists(marker), "loading a checkpoint ran code"


@driver
def test_e2e_defaults(tmp_path, capsys, monkeypatch):
    """`trpo-ext train` with no run flag: CartPole-v1, 100,000 steps, seed 0, the default settings,
    runs/CartPole-v1-0-<time>; interrupted (Ctrl-C after the first checkpoint, in process) it exits
    130 and says how to continue."""
    import trpo_ext.checkpoint as ck
    from trpo_ext.checkpoint import load_checkpoint

    real_save = ck.save_checkpoint

    def save_then_interrupt(state, paths):
        real_save(state, paths)
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_checkpoint", save_then_interrupt)
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_main(["train", "--checkpoint-every", "1"], capsys)
    assert rc == 130, err
    (run_dir,) = glob.glob(os.path.join("runs", "CartPole-v1-0-*"))
    assert re.fullmatch(r"runs/CartPole-v1-0-\d{8}-\d{6}", run_dir)
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    assert f"training CartPole-v1 for 100,000 steps (seed 0); logs in {run_dir}" in err
    assert f"interrupted; continue with `trpo-ext train --resume {last}`" in err
    state = load_checkpoint(last)
    assert (state["env_id"], state["seed"], state["total_steps"]) == ("CartPole-v1", 0, 100_000)
    defaults = {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(TRPOConfig()).items()}
    assert state["config"] == {**defaults, "checkpoint_every": 1, "progress": True,
                               "log_dir": run_dir}


@driver
def test_e2e_user_errors(tmp_path, capsys, monkeypatch):
    """Unknown env ids and bad settings from the real driver: one line, no traceback, nothing
    written; TRPO_EXT_DEBUG=1 shows the traceback."""
    monkeypatch.delenv("TRPO_EXT_DEBUG", raising=False)
    log_dir = str(tmp_path / "run")
    for argv, message in ((["--env", "Nope-v0"], "Nope"), (["--n-envs", "0"], "n_envs")):
        rc, _, err = run_main(["train", *argv, "--log-dir", log_dir], capsys)
        assert rc == 1, err
        (line,) = err.strip().splitlines()[-1:]
        assert line.startswith("trpo-ext train: error: ") and message in line, err
        assert "Traceback" not in err
    assert not os.path.exists(os.path.join(log_dir, "progress.csv"))
    monkeypatch.setenv("TRPO_EXT_DEBUG", "1")
    with pytest.raises(ValueError, match="n_envs"):
        cli.main(["train", "--n-envs", "0", "--log-dir", log_dir])


@driver
def test_e2e_progress_bar_on_a_terminal_only_when_asked(tmp_path, monkeypatch):
    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("TRPO_EXT_NO_PROGRESS", raising=False)
    for flags, bar in (([], True), (["--no-progress"], False)):
        stderr = FakeTTY()
        monkeypatch.setattr(sys, "stderr", stderr)
        rc = cli.main(["train", *TINY, "--steps", "256", "--eval-episodes", "0", *flags,
                       "--log-dir", str(tmp_path / f"run{len(flags)}")])
        monkeypatch.undo()
        assert rc == 0, stderr.getvalue()
        assert bool(re.search(r"256/256.*return .* \| kl .* fps", stderr.getvalue())) == bar, \
            stderr.getvalue()


@driver
def test_e2e_checkpoint_of_a_callable_env(tmp_path, capsys, monkeypatch):
    """A checkpoint trained on a callable records no env id: eval and resume ask for --env; with
    it, and --steps and --seed, the resume runs on, in a fresh default log directory (the file is
    not in a run's checkpoints/)."""
    import gymnasium as gym
    from trpo_ext.checkpoint import load_checkpoint

    first = trpo_ext.train(lambda: gym.make("CartPole-v1"), 128, seed=1, n_envs=2, n_steps=64,
                           log_dir=str(tmp_path / "first"))
    ckpt = str(tmp_path / "anonymous.pt")
    shutil.copy(first.checkpoint_path, ckpt)
    for argv in (["eval", ckpt], ["train", "--resume", ckpt, "--eval-episodes", "0"]):
        rc, _, err = run_main(argv, capsys)
        assert rc == 1 and "records no environment id: pass --env" in err, err
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_main(["train", "--resume", ckpt, "--env", "CartPole-v1", "--steps", "384",
                           "--seed", "5", "-q", "--eval-episodes", "0"], capsys)
    assert rc == 0, err
    (run_dir,) = glob.glob(os.path.join("runs", "CartPole-v1-5-*"))
    state = load_checkpoint(os.path.join(run_dir, "checkpoints", "last.pt"))
    assert (state["env_id"], state["seed"], state["total_steps_done"]) == ("CartPole-v1", 5, 384)
    assert [int(r["time/total_steps"]) for r in read_rows(os.path.join(run_dir, "progress.csv"))] \
        == [128, 256, 384]
    rc, out, err = run_main(["eval", ckpt, "--env", "CartPole-v1", "--episodes", "1"], capsys)
    assert rc == 0 and "(CartPole-v1, deterministic policy" in out, err


@driver
def test_e2e_train_needs_no_logging_libraries():
    """train() without a log directory works with matplotlib, tensorboard and tqdm unimportable."""
    script = textwrap.dedent("""
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("matplotlib", "tensorboard", "tqdm"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import trpo_ext
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = trpo_ext.train("CartPole-v1", total_steps=256, n_envs=2, n_steps=64)
        assert len(result.history) == 2
        noisy = [str(w.message) for w in caught if any(
            lib in str(w.message) for lib in ("matplotlib", "tensorboard", "tqdm"))]
        assert not noisy, noisy
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@driver
@pytest.mark.slow
def test_default_train_solves_cartpole(tmp_path):
    """The README's `trpo-ext train`, exactly: CartPole-v1, 100k steps, default settings."""
    proc = _cli("train", cwd=str(tmp_path), timeout=1800)
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"evaluation: mean return (\d+\.\d\d) ± \d+\.\d\d over 10 episodes", proc.stdout)
    assert m, proc.stdout
    assert float(m.group(1)) >= 475.0, proc.stdout
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "CartPole-v1-0-*"))
    png_size(os.path.join(run_dir, "learning_curve.png"))
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "last.pt"))
