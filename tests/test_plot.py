"""Learning-curve plots from progress.csv files: reading, finding runs, grouping seeds, the PNG."""
import csv
import json
import os
import struct

import numpy as np
import pytest

from trpo_ext.plot import (
    _mean_band,
    find_runs,
    group_runs,
    load_runs,
    plot_learning_curves,
    read_progress,
)


def png_size(path):
    """(width, height) of a well-formed PNG; fails the test otherwise."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    assert data[-12:-4] == b"\x00\x00\x00\x00IEND", f"{path} is truncated (no IEND chunk at the end)"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 0 and height > 0
    return width, height


def make_run(root, name, steps, returns, config=None, extra_cols=None):
    path = os.path.join(str(root), name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "progress.csv"), "w", newline="") as f:
        w = csv.writer(f)
        cols = ["time/iteration", "time/total_steps", "rollout/ep_return_mean"] + list(extra_cols or [])
        w.writerow(cols)
        for i, (s, r) in enumerate(zip(steps, returns)):
            w.writerow([i + 1, s, r] + ["" for _ in extra_cols or []])
    if config is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    return path


def test_read_progress_types(tmp_path):
    (tmp_path / "progress.csv").write_text(
        "time/total_steps,rollout/ep_return_mean,train/line_search_success,note\n"
        "128,nan,True,x\n256,12.5,False,\n384,,1,y\n")
    cols = read_progress(str(tmp_path))
    assert cols["time/total_steps"].tolist() == [128, 256, 384]
    r = cols["rollout/ep_return_mean"]
    assert np.isnan(r[0]) and r[1] == 12.5 and np.isnan(r[2])
    assert cols["train/line_search_success"].tolist() == [1.0, 0.0, 1.0]
    assert np.isnan(cols["note"]).all()
    assert read_progress(str(tmp_path / "progress.csv"))["time/total_steps"].tolist() == [128, 256, 384]


def test_find_runs(tmp_path):
    a = make_run(tmp_path / "runs", "a", [1], [1.0])
    b = make_run(tmp_path / "runs", "b", [1], [1.0])
    os.makedirs(tmp_path / "runs" / "empty")
    assert find_runs([a]) == [a]
    assert find_runs([os.path.join(b, "progress.csv")]) == [b]
    assert find_runs([str(tmp_path / "runs")]) == [a, b]
    assert find_runs([a, str(tmp_path / "runs")]) == [a, b]  # no duplicates
    with pytest.raises(FileNotFoundError, match="empty.*holds no training run"):
        find_runs([str(tmp_path / "runs" / "empty")])
    with pytest.raises(FileNotFoundError, match="nope.*neither a run directory"):
        find_runs([str(tmp_path / "nope")])


def test_load_runs_drops_nan_and_sorts(tmp_path):
    path = make_run(tmp_path, "r", [384, 128, 256, 512], [3.0, float("nan"), 2.0, 4.0])
    (run,) = load_runs([path])
    assert run.steps.tolist() == [256, 384, 512]
    assert run.returns.tolist() == [2.0, 3.0, 4.0]


def test_load_runs_missing_column(tmp_path):
    path = make_run(tmp_path, "r", [1, 2], [1.0, 2.0])
    with pytest.raises(ValueError, match="has no column 'train/kl'"):
        load_runs([path], y_key="train/kl")


def test_grouping_by_env_and_settings_across_seeds(tmp_path):
    base = {"max_kl": 0.01, "n_envs": 8, "log_dir": "x", "progress": True}
    runs = load_runs([
        make_run(tmp_path, "a", [1, 2], [1, 2], {**base, "env_id": "CartPole-v1", "seed": 0}),
        make_run(tmp_path, "b", [1, 2], [1, 2], {**base, "env_id": "CartPole-v1", "seed": 1,
                                                 "log_dir": "y"}),
        make_run(tmp_path, "c", [1, 2], [1, 2], {**base, "env_id": "CartPole-v1", "seed": 0,
                                                 "max_kl": 0.02}),
        make_run(tmp_path, "d", [1, 2], [1, 2], {**base, "env": "Pendulum-v1", "seed": 0}),
        # The CLI's default directory name says env and seed when there is no config.json.
        make_run(tmp_path, "Acrobot-v1-0-20260101-120000", [1, 2], [1, 2]),
        make_run(tmp_path, "Acrobot-v1-1-20260101-120001-2", [1, 2], [1, 2]),
        make_run(tmp_path, "whatever", [1, 2], [1, 2]),
    ])
    groups = {label: sorted(os.path.basename(r.path) for r in members)
              for label, members in group_runs(runs)}
    assert groups == {
        "CartPole-v1 max_kl=0.01": ["a", "b"],
        "CartPole-v1 max_kl=0.02": ["c"],
        "Pendulum-v1": ["d"],
        "Acrobot-v1": ["Acrobot-v1-0-20260101-120000", "Acrobot-v1-1-20260101-120001-2"],
        os.path.join(str(tmp_path), "whatever"): ["whatever"],
    }
    seeds = {os.path.basename(r.path): r.seed for r in runs}
    assert seeds["b"] == 1 and seeds["Acrobot-v1-1-20260101-120001-2"] == 1 and seeds["whatever"] is None


def test_mean_band_on_a_shared_grid(tmp_path):
    runs = load_runs([make_run(tmp_path, "a", [100, 200, 300], [1.0, 2.0, 6.0]),
                      make_run(tmp_path, "b", [100, 200, 300], [3.0, 4.0, 2.0])])
    grid, mean, std = _mean_band(runs)
    assert grid.tolist() == [100, 200, 300]
    assert mean.tolist() == [2.0, 3.0, 4.0]
    assert std.tolist() == [1.0, 1.0, 2.0]


def test_mean_band_interpolates_on_the_common_range(tmp_path):
    runs = load_runs([make_run(tmp_path, "a", [0, 100, 200, 300], [0.0, 10.0, 20.0, 30.0]),
                      make_run(tmp_path, "b", [50, 250], [0.0, 0.0])])
    grid, mean, std = _mean_band(runs)
    # Only where both runs have data; b's points and a's points inside [50, 250].
    assert grid.tolist() == [50, 100, 200, 250]
    np.testing.assert_allclose(mean, [2.5, 5.0, 10.0, 12.5])
    np.testing.assert_allclose(std, [2.5, 5.0, 10.0, 12.5])


def test_mean_band_needs_two_overlapping_runs(tmp_path):
    one = load_runs([make_run(tmp_path, "a", [1, 2], [1.0, 2.0])])
    assert _mean_band(one) is None
    apart = load_runs([make_run(tmp_path, "b", [1, 2], [1.0, 2.0]),
                       make_run(tmp_path, "c", [5, 6], [1.0, 2.0])])
    assert _mean_band(apart) is None


def test_plot_writes_a_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    steps = np.arange(1, 21) * 2048
    paths = [make_run(tmp_path / "runs", f"CartPole-v1-{seed}-20260101-12000{seed}", steps,
                      np.linspace(20, 400, 20) + 30 * seed) for seed in (0, 1)]
    paths.append(make_run(tmp_path / "runs", "Pendulum-v1-0-20260101-120000", steps,
                          np.linspace(-1500, -300, 20)))
    out = plot_learning_curves([str(tmp_path / "runs")])
    assert out == "learning_curves.png"
    w, h = png_size(tmp_path / out)
    assert (w, h) == (840, 540)
    # One run: into its directory by default.
    assert plot_learning_curves([paths[0]]) == os.path.join(paths[0], "learning_curve.png")
    png_size(os.path.join(paths[0], "learning_curve.png"))
    custom = plot_learning_curves(paths[:2], out=str(tmp_path / "sub" / "c.png"), title="two seeds")
    png_size(custom)
    assert not [f for f in os.listdir(tmp_path / "sub") if f != "c.png"]  # no temporary left


def test_plot_run_without_finished_episodes(tmp_path):
    pytest.importorskip("matplotlib")
    path = make_run(tmp_path, "r", [128, 256], [float("nan"), float("nan")])
    png_size(plot_learning_curves([path]))


def test_plot_draws_the_band_in_the_image(tmp_path):
    """The shaded band is really drawn: many more pixels of its light colour with 2 seeds than with 1."""
    pytest.importorskip("matplotlib")
    from PIL import Image  # matplotlib depends on pillow

    steps = np.arange(1, 11) * 1000
    a = make_run(tmp_path, "E-v0-0-20260101-120000", steps, np.linspace(0, 100, 10))
    b = make_run(tmp_path, "E-v0-1-20260101-120000", steps, np.linspace(0, 100, 10) + 40)

    def light_blue_pixels(path):
        img = np.asarray(Image.open(path).convert("RGB")).astype(int)
        # C0 (31, 119, 180) at alpha 0.2 on white ≈ (210, 228, 240).
        return int((np.abs(img - np.array([210, 228, 240])).sum(axis=2) < 20).sum())

    single = plot_learning_curves([a], out=str(tmp_path / "one.png"))
    both = plot_learning_curves([a, b], out=str(tmp_path / "two.png"))
    assert light_blue_pixels(both) > 20 * max(1, light_blue_pixels(single))
