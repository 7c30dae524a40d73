"""An interrupted run finishes as if it had never been interrupted (issue 19).

End to end through the real ``trpo-ext`` command and the real driver: a run is killed (SIGKILL at a
random moment, or at a chosen one: in a rollout, in an update, in a checkpoint write; or SIGINT)
and resumed with ``trpo-ext train --resume RUN_DIR`` and no other flag.  Then it ends at the run's
own total steps with the run's own settings; ``progress.csv`` holds every iteration once, in order,
equal to the checkpoint's history; and a second resume of the same checkpoint gives a bit-identical
run (CPU).  The killed runs are subprocesses with timeouts; the resumes run in this process.
"""
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

import trpo_ext
from trpo_ext.checkpoint import CheckpointError, load_checkpoint
from trpo_ext.logger import RunLogger

from test_cli import read_rows, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses SIGKILL and /proc")

# 128 samples per iteration, a checkpoint after each; settings away from the defaults, so that a
# resume that forgot them would show.
PER_ITER = 128
STEPS = 16 * PER_ITER
SEED = 3
RUN = ["train", "--env", "CartPole-v1", "--n-envs", "2", "--n-steps", "64", "--max-kl", "0.02",
       "--seed", str(SEED), "--checkpoint-every", "1", "-q", "--eval-episodes", "0"]
TIMEOUT = 60  # per killed run; the whole file takes well under that on an idle machine

# Runs `trpo-ext train ARGS...` and SIGKILLs itself at the Nth call of: an environment step
# ("rollout"), the CG solve of an update ("update"), or an atomic checkpoint file write
# ("checkpoint": half of the temporary file written first; odd N a step_*.pt, even N last.pt).
KILLER = textwrap.dedent("""
    import os, signal, sys
    import trpo_ext.checkpoint as ck
    import trpo_ext.train
    tr = sys.modules["trpo_ext.train"]
    from trpo_ext.cli import main

    where, n = sys.argv[1], int(sys.argv[2])
    count = [0]

    def tick():
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    if where == "rollout":
        real_make = tr.make_vector_env
        def make(*args, **kwargs):
            envs = real_make(*args, **kwargs)
            real_step = envs.step
            def step(actions):
                tick()
                return real_step(actions)
            envs.step = step
            return envs
        tr.make_vector_env = make
    elif where == "update":
        real_cg = tr.conjugate_gradient
        def cg(*args, **kwargs):
            tick()
            return real_cg(*args, **kwargs)
        tr.conjugate_gradient = cg
    elif where == "checkpoint":
        real_write = ck.write_atomic
        def write(path, data):
            if count[0] + 1 == n:
                d, name = os.path.split(path)
                with open(os.path.join(d, "." + name + ".tmp" + str(os.getpid())), "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
            tick()
            real_write(path, data)
        ck.write_atomic = write
    sys.exit(main(sys.argv[3:]))
""")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TRPO_EXT_DEBUG")}
    env["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _start(argv, run_dir, kill_at=None):
    """The command in its own process group, output to files (a pipe nobody reads can block)."""
    prefix = ["-c", KILLER, *kill_at] if kill_at else ["-m", "trpo_ext"]
    out = open(os.path.join(os.path.dirname(run_dir), os.path.basename(run_dir) + ".log"), "w")
    return subprocess.Popen([sys.executable, *prefix, *argv, "--log-dir", run_dir], stdout=out,
                            stderr=subprocess.STDOUT, env=_env(), start_new_session=True), out


def _wait(proc, out, timeout=TIMEOUT):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the run did not end within {timeout} s")
    finally:
        out.close()


def _log(run_dir):
    with open(run_dir + ".log") as f:
        return f.read()


def _wait_for_rows(proc, run_dir, out, rows):
    """Polls progress.csv until it holds ``rows`` iterations (the checkpoint of the first comes
    right after its row: later ones always have one to resume from)."""
    path = os.path.join(run_dir, "progress.csv")
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            with open(path) as f:
                if f.read().count("\n") > rows:  # the header, then a line per iteration
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.002)  # leave the CPU to the run on a small machine
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            _wait(proc, out)
            pytest.fail(f"the run did not reach iteration {rows} (rc {proc.returncode}):\n"
                        f"{_log(run_dir)}")
        time.sleep(0.002)


def _killed_run(tmp_path, name, how, steps=STEPS, argv=RUN):
    """Starts the run and interrupts it: ("random", (k, delay)) SIGKILLs the process group
    ``delay`` seconds after iteration k's row (k ≥ 2) appears; ("sigint", (k, delay)) sends SIGINT
    instead; (where, n) makes the run SIGKILL itself, see KILLER.  Returns the run directory and
    the exit status."""
    run_dir = str(tmp_path / name)
    argv = [*argv, "--steps", str(steps)]
    if how[0] in ("random", "sigint"):
        proc, out = _start(argv, run_dir)
        _wait_for_rows(proc, run_dir, out, how[1][0])
        time.sleep(how[1][1])
        os.killpg(proc.pid, signal.SIGKILL if how[0] == "random" else signal.SIGINT)
    else:
        proc, out = _start(argv, run_dir, kill_at=[how[0], str(how[1])])
    return run_dir, _wait(proc, out)




def _same(a, b):
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a)
                      and math.isnan(b))


def _timeless(entry):
    return {k: v for k, v in entry.items()
            if not k.startswith("time/") or k in ("time/iteration", "time/total_steps")}


def check_finished_run(run_dir, total, seed=SEED, max_kl=0.02):
    """The run ended at ``total`` with its own settings, and progress.csv is its history: one row
    per iteration, in order, no gap, no repeat."""
    state = load_checkpoint(os.path.join(run_dir, "checkpoints", "last.pt"))
    n = total // PER_ITER
    assert state["total_steps_done"] == total and state["total_steps"] == total
    assert state["iteration"] == n and state["seed"] == seed and state["env_id"] == "CartPole-v1"
    assert (state["config"]["n_envs"], state["config"]["n_steps"]) == (2, 64)
    assert state["config"]["max_kl"] == max_kl
    history = state["history"]
    assert [h["time/iteration"] for h in history] == list(range(1, n + 1))
    assert [h["time/total_steps"] for h in history] == [PER_ITER * i for i in range(1, n + 1)]
    rows = read_rows(os.path.join(run_dir, "progress.csv"))
    assert [int(r["time/iteration"]) for r in rows] == list(range(1, n + 1))
    assert [int(r["time/total_steps"]) for r in rows] == [PER_ITER * i for i in range(1, n + 1)]
    for row, entry in zip(rows, history):  # the CSV is the checkpoint's history, value for value
        for k, v in entry.items():
            assert _same(float(row[k]), float(v)), (entry["time/iteration"], k, row[k], v)
    return state


def assert_identical_runs(a, b):
    """Two finished runs' last checkpoints hold the same state, bit for bit, and history."""
    for key in ("policy_state", "value_state"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for x, y in zip(a["optimizer_state"].values(), b["optimizer_state"].values()):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])
    assert a["episode_returns"] == b["episode_returns"] and a["episodes"] == b["episodes"]
    assert len(a["history"]) == len(b["history"])
    for x, y in zip(a["history"], b["history"]):
        x, y = _timeless(x), _timeless(y)
        assert x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x), (x, y)


def resume_twice_and_check(tmp_path, run_dir, capsys, total=STEPS):
    """Resumes the killed run, and a copy of it, with no flag but --resume: both end at the run's
    own total, with progress.csv continuous, and identical."""
    twin = str(tmp_path / (os.path.basename(run_dir) + "-twin"))
    shutil.copytree(run_dir, twin)
    states = []
    for d in (run_dir, twin):
        rc, _, err = run_main(["train", "--resume", d, "-q", "--eval-episodes", "0"], capsys)
        assert rc == 0, err
        assert f"resuming CartPole-v1 for {total:,} steps (seed {SEED}); logs in {d}" in err
        states.append(check_finished_run(d, total))
    assert_identical_runs(*states)


# Kill moments: three at random (from a seeded generator: the same three every run; an iteration,
# then up to about one iteration's time past its row), then one in each phase: a rollout
# (iteration 5's 30th environment step), an update (iteration 9's), a write of the step file (the
# 3rd checkpoint's) and of last.pt after its step file (the 6th's).
_rng = random.Random(19)
KILLS = [("random", (_rng.randint(2, 12), round(_rng.uniform(0.0, 0.03), 4))) for _ in range(3)] + [
    ("rollout", 4 * 64 + 30), ("update", 9), ("checkpoint", 5), ("checkpoint", 12)]


@LINUX
@pytest.mark.parametrize("how", KILLS, ids=[f"{w}-{n}" if w != "random" else
                                             f"random-{n[0]}-{n[1]}" for w, n in KILLS])
def test_sigkilled_run_resumes_to_its_own_end(tmp_path, capsys, how):
    run_dir, rc = _killed_run(tmp_path, "run", how)
    assert rc == -signal.SIGKILL, _log(run_dir)
    done = load_checkpoint(os.path.join(run_dir, "checkpoints", "last.pt"))["total_steps_done"]
    assert 0 < done < STEPS
    # Killed in iteration k's rollout or update, or while writing its checkpoint (its step file,
    # or last.pt after it): last.pt holds iteration k - 1.
    killed_in = {"rollout": lambda n: (n - 1) // 64 + 1, "update": lambda n: n,
                 "checkpoint": lambda n: (n + 1) // 2}
    if how[0] in killed_in:
        assert done == (killed_in[how[0]](how[1]) - 1) * PER_ITER
    resume_twice_and_check(tmp_path, run_dir, capsys)


@LINUX
def test_sigint_points_to_resume_and_the_resume_finishes(tmp_path, capsys):
    """Ctrl-C: exit status 130, a line saying how to continue, and that command finishes the run."""
    # Early in the run (14 of 16 iterations left): on a loaded machine the signal may come late.
    run_dir, rc = _killed_run(tmp_path, "run", ("sigint", (2, 0.005)))
    log = _log(run_dir)
    assert rc == 130, log
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    assert f"trpo-ext: interrupted; continue with `trpo-ext train --resume {last}`" in log
    resume_twice_and_check(tmp_path, run_dir, capsys)


# ------------------------------------------------------------------------------ the Python API
SMALL = dict(n_envs=2, n_steps=64, max_kl=0.02)


def _stopped_run(tmp_path, total=6 * PER_ITER, stop_at=2):
    """A run of ``total`` steps stopped by its callback after ``stop_at`` iterations."""
    log_dir = str(tmp_path / "run")
    trpo_ext.train("CartPole-v1", total, seed=SEED, log_dir=log_dir, checkpoint_every=1,
                   callback=lambda e: e["time/iteration"] < stop_at, **SMALL)
    return log_dir, os.path.join(log_dir, "checkpoints", "last.pt")


def test_flags_given_with_the_resume_win_and_define_the_run(tmp_path, capsys):
    run_dir, _ = _stopped_run(tmp_path, STEPS, stop_at=4)
    longer = STEPS + 4 * PER_ITER
    rc, _, err = run_main(["train", "--resume", run_dir, "--steps", str(longer), "--seed", "5",
                           "--max-kl", "0.03", "-q", "--eval-episodes", "0"], capsys)
    assert rc == 0, err
    assert f"resuming CartPole-v1 for {longer:,} steps (seed 5)" in err
    check_finished_run(run_dir, longer, seed=5, max_kl=0.03)
    # The flags redefined the run: resuming it again (nothing left to do) keeps them.
    rc, _, err = run_main(["train", "--resume", run_dir, "-q", "--eval-episodes", "0"], capsys)
    assert rc == 0, err
    assert f"resuming CartPole-v1 for {longer:,} steps (seed 5)" in err
    check_finished_run(run_dir, longer, seed=5, max_kl=0.03)


def test_train_resume_without_total_steps_finishes_the_run(tmp_path):
    log_dir, last = _stopped_run(tmp_path)
    assert load_checkpoint(last)["total_steps"] == 6 * PER_ITER
    r = trpo_ext.train(resume=last)
    assert [h["time/total_steps"] for h in r.history] == [PER_ITER * i for i in range(1, 7)]
    check_finished_run(log_dir, 6 * PER_ITER)
    # A total given, positionally or by keyword, still wins.
    assert trpo_ext.train(None, 7 * PER_ITER, resume=last).history[-1]["time/total_steps"] == \
        7 * PER_ITER
    assert trpo_ext.train(resume=last, total_steps=8 * PER_ITER).history[-1][
        "time/total_steps"] == 8 * PER_ITER


def test_checkpoint_without_total_steps(tmp_path, capsys):
    """Checkpoints from before the entry existed: the run's config.json (with a warning), else an
    error asking for the total; an explicit total needs neither."""
    log_dir, last = _stopped_run(tmp_path)
    old = torch.load(last, weights_only=True)
    del old["total_steps"]
    torch.save(old, last)
    with pytest.warns(UserWarning, match=r"does not record its run's total steps .* using 768, "
                                         r"from .*config\.json"):
        r = trpo_ext.train(resume=last)
    assert r.history[-1]["time/total_steps"] == 6 * PER_ITER

    elsewhere = str(tmp_path / "old.pt")
    torch.save(old, elsewhere)
    with pytest.raises(CheckpointError, match=r"old\.pt' does not record its run's total steps .* "
                                              r"pass total_steps="):
        trpo_ext.train(resume=elsewhere)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trpo_ext.train(None, 3 * PER_ITER, resume=elsewhere).history[-1][
            "time/total_steps"] == 3 * PER_ITER
    # The command says the same in one line, and takes --steps.
    rc, _, err = run_main(["train", "--resume", elsewhere, "-q", "--eval-episodes", "0"], capsys)
    assert rc == 1 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("trpo-ext train: error: ") and "--steps N" in line and elsewhere in line


def test_resume_rewrites_a_torn_csv_from_the_history(tmp_path):
    """A run killed while writing a row after its checkpoint leaves a torn last line: the resumed
    CSV is the checkpoint's history, not that row (which a filter on its step count would keep)."""
    history = [{"time/iteration": i, "time/total_steps": 128 * i, "train/kl": 0.001 * i,
                "train/line_search_success": True, "rollout/ep_return_mean": float("nan")}
               for i in range(1, 4)]
    with RunLogger(str(tmp_path), False, 1024, {}) as log:
        for entry in history:
            log.log(entry)
    with open(tmp_path / "progress.csv", "a") as f:
        f.write("4,1")  # iteration 4's row, cut after the first digit of its 512 steps
    with RunLogger(str(tmp_path), False, 1024, {}, start_steps=384, resumed=True,
                   history=history) as log:
        log.log({**history[0], "time/iteration": 4, "time/total_steps": 512})
    rows = read_rows(tmp_path / "progress.csv")
    assert list(rows[0]) == list(history[0])
    assert [r["time/iteration"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["train/line_search_success"] for r in rows] == ["1"] * 4
    assert [r["train/kl"] for r in rows[:3]] == [str(h["train/kl"]) for h in history]


# ------------------------------------------------------------------- by hand: a MuJoCo task
@pytest.mark.skipif(not os.environ.get("TRPO_EXT_RESUME_MUJOCO"),
                    reason="by hand: TRPO_EXT_RESUME_MUJOCO=Hopper-v5 (about a minute per kill)")
@LINUX
@pytest.mark.parametrize("how", [("random", (3, 0.5)), ("random", (11, 1.0)),
                                 ("rollout", 7 * 256 + 100),
                                 ("update", 12), ("checkpoint", 29)])
def test_mujoco_by_hand(tmp_path, capsys, how):
    env_id = os.environ["TRPO_EXT_RESUME_MUJOCO"]
    steps = 40_960  # 20 iterations of the default 8 x 256
    argv = ["train", "--env", env_id, "--seed", "1", "--checkpoint-every", "1", "-q",
            "--eval-episodes", "0"]
    run_dir, rc = _killed_run(tmp_path, "run", how, steps=steps, argv=argv)
    assert rc == -signal.SIGKILL, _log(run_dir)
    done = load_checkpoint(os.path.join(run_dir, "checkpoints", "last.pt"))["total_steps_done"]
    twin = str(tmp_path / "twin")
    shutil.copytree(run_dir, twin)
    states = []
    for d in (run_dir, twin):
        rc, _, err = run_main(["train", "--resume", d, "-q", "--eval-episodes", "0"], capsys)
        assert rc == 0, err
        state = load_checkpoint(os.path.join(d, "checkpoints", "last.pt"))
        assert state["total_steps_done"] == steps == state["total_steps"]
        rows = read_rows(os.path.join(d, "progress.csv"))
        assert [int(r["time/iteration"]) for r in rows] == list(range(1, 21))
        states.append(state)
    assert_identical_runs(*states)
    print(f"{env_id}: killed ({how}) at {done} steps, resumed to {steps} twice, identical")
