"""benchmarks/mujoco_suite.py in its smallest form: the records it appends, resuming, and the report."""
import json
import os
import statistics
import subprocess
import sys

from trpo_ext.config import TRPOConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def harness(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "mujoco_suite.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_records_resume_and_report(tmp_path):
    out = str(tmp_path / "runs.jsonl")
    # InvertedPendulum-v5 is a MuJoCo task: the workers must import the real mujoco package.
    common = ["--tasks", "InvertedPendulum-v5", "--steps", "2048", "--episodes", "3",
              "--settings", '{"n_envs": 2, "n_steps": 256}', "--out", out]
    harness(*common, "--seeds", "0", "1", "--jobs", "2")
    recs = [json.loads(line) for line in open(out)]
    assert sorted(r["seed"] for r in recs) == [0, 1]
    for r in recs:
        assert r["status"] == "ok", r.get("traceback")
        assert r["task"] == "InvertedPendulum-v5" and r["steps"] == 2048
        assert r["settings"] == {"n_envs": 2, "n_steps": 256} and r["preset"] is None
        assert r["config"]["n_envs"] == 2 and r["config"]["max_kl"] == TRPOConfig().max_kl
        assert len(r["commit"]) == 40 and isinstance(r["dirty"], bool)
        assert r["machine"]["cpu"] and r["machine"]["cores"] >= 1
        assert len(r["returns"]) == 3 and r["return"] == statistics.fmean(r["returns"])
        assert all(1 <= x <= 1000 for x in r["returns"])  # one point a step, at most 1000 steps
        assert r["eval_seed"] == 10_000 + 1000 * r["seed"]
        assert r["wall_s"] >= r["train_s"] > 0 and r["eval_s"] > 0
        # 512 steps an iteration (the settings reached train()), one curve point each.
        assert r["curve"]["steps"] == [512, 1024, 1536, 2048] and r["iterations"] == 4
        assert len(r["curve"]["ep_return_mean"]) == 4
    assert recs[0]["returns"] != recs[1]["returns"] or recs[0]["curve"] != recs[1]["curve"]

    # Done runs are skipped (also when a default is spelt out: the same learning settings); a
    # failing run is recorded as an error, not lost.
    log = harness(*common, "--seeds", "0", "1", "--jobs", "1")
    assert log.count("skip") == 2 and len(open(out).readlines()) == 2
    spelt = harness("--tasks", "InvertedPendulum-v5", "--steps", "2048", "--episodes", "3",
                    "--settings", json.dumps({"n_envs": 2, "n_steps": 256,
                                              "max_kl": TRPOConfig().max_kl}),
                    "--out", out, "--seeds", "0")
    assert spelt.count("skip") == 1 and len(open(out).readlines()) == 2
    harness("--tasks", "InvertedPendulum-v5", "--steps", "2048", "--episodes", "3", "--seeds", "0",
            "--settings", '{"no_such_setting": 1}', "--out", out)
    bad = json.loads(open(out).readlines()[-1])
    assert bad["status"] == "error" and "no_such_setting" in bad["error"]

    table = str(tmp_path / "report" / "table.md")
    text = harness("--report", table, "--steps", "2048", "--out", out)
    assert open(table).read() == text
    mean = statistics.fmean(r["return"] for r in recs)
    std = statistics.stdev(r["return"] for r in recs)
    row = next(line for line in text.splitlines() if line.startswith("| InvertedPendulum-v5"))
    assert f"| 2 | {mean:.0f} ± {std:.0f} |" in row and '"n_envs": 2' in row
    assert "mean of 3 deterministic" in text and recs[0]["commit"][:10] in text
    png = str(tmp_path / "report" / "table.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_records_read_against_todays_defaults(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import _settings

    # A record without "config" ran the defaults of its day: std 1, max_kl 0.01.
    old = {"task": "Hopper-v5", "settings": {"gamma": 0.995}}
    assert _settings.relative(old) == {"gamma": 0.995, "init_log_std": 0.0, "max_kl": 0.01}
    # On ±1 actions the default std is e^-1, so spelling it out is the same run as the defaults;
    # on InvertedPendulum's ±3 it is not.
    spelt = {"init_log_std": -1.0, "max_kl": TRPOConfig().max_kl}
    assert _settings.relative({"task": "Hopper-v5", "settings": spelt}) == {}
    assert _settings.relative({"task": "Hopper-v5", "config": _settings.config({})}) == {}
    assert _settings.relative({"task": "InvertedPendulum-v5",
                               "config": _settings.config(spelt)}) == {"init_log_std": -1.0}
    # Settings that say where a run executes are not learning settings.
    assert _settings.relative({"task": "Hopper-v5",
                               "config": _settings.config({"num_threads": 3})}) == {}
