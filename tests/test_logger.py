"""RunLogger: CSV, TensorBoard, progress bar and learning curve, on synthetic metrics."""
import csv
import io
import json
import math
import os
import struct
import subprocess
import sys
import textwrap

import pytest

from trpo_ext import logger as logger_mod
from trpo_ext.logger import RunLogger, format_progress, progress_allowed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAZY = ("matplotlib", "tensorboard", "torch.utils.tensorboard", "tqdm")


def entry(i, steps_per_iter=128, ret=None, **extra):
    """A history entry shaped like the driver's (a subset of the contract's keys)."""
    m = {
        "time/iteration": i,
        "time/total_steps": steps_per_iter * i,
        "rollout/ep_return_mean": float("nan") if ret is None and i == 1 else (ret if ret is not None else 10.0 * i),
        "train/kl": 0.001 * i,
        "train/line_search_success": i % 2 == 0,
        "train/line_search_steps": i % 3,
        "time/fps": 1000.0 + i,
    }
    m.update(extra)
    return m


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def png_size(path):
    """(width, height) of a well-formed PNG; fails the test otherwise."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data[-12:-4] == b"\x00\x00\x00\x00IEND", f"{path} is truncated (no IEND chunk at the end)"
    assert width > 0 and height > 0
    return width, height


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def _no_ci(monkeypatch):
    # Test the TTY rule itself; the CI override has its own test.
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("TRPO_EXT_NO_PROGRESS", raising=False)


# ---------------------------------------------------------------------------------------------- CSV
def test_csv_rows_header_bools_and_nan(tmp_path):
    log = RunLogger(str(tmp_path), progress=False, total_steps=512, config={"max_kl": 0.01})
    for i in range(1, 5):
        log.log(entry(i))
        # Flushed every iteration: a crash loses at most the iteration in flight.
        _, rows = read_csv(tmp_path / "progress.csv")
        assert len(rows) == i
    log.close()
    header, rows = read_csv(tmp_path / "progress.csv")
    assert header == list(entry(1))
    assert [int(r["time/total_steps"]) for r in rows] == [128, 256, 384, 512]
    assert rows[0]["rollout/ep_return_mean"] == "nan"
    assert [r["train/line_search_success"] for r in rows] == ["0", "1", "0", "1"]
    assert float(rows[2]["train/kl"]) == pytest.approx(0.003)


def test_csv_new_key_extends_header(tmp_path):
    with RunLogger(str(tmp_path), progress=False, total_steps=384, config={}) as log:
        log.log(entry(1))
        log.log(entry(2, **{"train/new_metric": 7.5}))
        log.log(entry(3))
    header, rows = read_csv(tmp_path / "progress.csv")
    assert header[-1] == "train/new_metric"
    assert [r["train/new_metric"] for r in rows] == ["", "7.5", ""]
    assert [int(r["time/iteration"]) for r in rows] == [1, 2, 3]


def test_resume_appends_and_drops_rows_after_checkpoint(tmp_path):
    with RunLogger(str(tmp_path), progress=False, total_steps=768, config={}) as log:
        for i in range(1, 6):  # the first run reached 640 steps, its last checkpoint was at 384
            log.log(entry(i))
    with RunLogger(str(tmp_path), progress=False, total_steps=768, config={},
                   start_steps=384, resumed=True) as log:
        for i in range(4, 7):
            log.log(entry(i, ret=-1.0))
    _, rows = read_csv(tmp_path / "progress.csv")
    assert [int(r["time/total_steps"]) for r in rows] == [128, 256, 384, 512, 640, 768]
    # Rows 4 and 5 are the resumed run's, not the stopped run's.
    assert [float(r["rollout/ep_return_mean"]) for r in rows[3:]] == [-1.0, -1.0, -1.0]


def test_fresh_run_replaces_old_csv_with_a_warning(tmp_path):
    with RunLogger(str(tmp_path), progress=False, total_steps=256, config={}) as log:
        log.log(entry(1))
        log.log(entry(2))
    with pytest.warns(UserWarning, match="replaced"):
        log = RunLogger(str(tmp_path), progress=False, total_steps=256, config={})
    log.log(entry(1))
    log.close()
    assert len(read_csv(tmp_path / "progress.csv")[1]) == 1


def test_config_json(tmp_path):
    config = {"env_id": "CartPole-v1", "seed": 3, "hidden_sizes": (64, 32), "max_kl": 0.01,
              "log_dir": str(tmp_path), "odd": object()}
    RunLogger(str(tmp_path), progress=False, total_steps=1, config=config).close()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["env_id"] == "CartPole-v1" and saved["seed"] == 3
    assert saved["hidden_sizes"] == [64, 32] and saved["max_kl"] == 0.01
    assert isinstance(saved["odd"], str)


def test_no_log_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with RunLogger(None, progress=False, total_steps=256, config={"a": 1}) as log:
        log.log(entry(1))
        log.log(entry(2))
    assert os.listdir(tmp_path) == []
    assert log.plot_path is None and log.csv_path is None


# ---------------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(str(tmp_path), progress=False, total_steps=384, config={"max_kl": 0.01}) as log:
        for i in range(1, 4):
            log.log(entry(i, **{"note": "text is not a scalar"}))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/kl", "time/fps", "train/line_search_success", "rollout/ep_return_mean"} <= tags
    assert "note" not in tags
    kl = acc.Scalars("train/kl")
    assert [e.step for e in kl] == [128, 256, 384]
    assert [e.value for e in kl] == pytest.approx([0.001, 0.002, 0.003])
    # The NaN return of the first iteration is left out rather than drawn as a gap-making point.
    assert [e.step for e in acc.Scalars("rollout/ep_return_mean")] == [256, 384]


def test_logger_without_tensorboard_warns_and_keeps_csv(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    with pytest.warns(UserWarning, match="tensorboard is not installed"):
        log = RunLogger(str(tmp_path), progress=False, total_steps=128, config={})
    log.log(entry(1))
    log.close()
    assert not (tmp_path / "tb").exists()
    assert len(read_csv(tmp_path / "progress.csv")[1]) == 1


# ------------------------------------------------------------------------------------- progress bar
def test_progress_allowed_rules(monkeypatch):
    assert not progress_allowed(io.StringIO())
    assert progress_allowed(FakeTTY())
    monkeypatch.setenv("CI", "true")
    assert not progress_allowed(FakeTTY())
    monkeypatch.delenv("CI")
    monkeypatch.setenv("TRPO_EXT_NO_PROGRESS", "1")
    assert not progress_allowed(FakeTTY())


def test_no_bar_when_not_a_terminal_or_not_asked(tmp_path):
    for stream, progress in ((io.StringIO(), True), (FakeTTY(), False)):
        with RunLogger(None, progress=progress, total_steps=256, config={}, stream=stream) as log:
            log.log(entry(1))
            log.log(entry(2))
        assert stream.getvalue() == ""


def test_line_bar_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    stream = FakeTTY()
    with RunLogger(None, progress=True, total_steps=1280, config={}, stream=stream) as log:
        assert isinstance(log._bar, logger_mod._LineBar)
        for i in range(1, 4):
            log.log(entry(i, ret=123.4, **{"train/kl": 0.0087, "time/fps": 4321.0}))
    out = stream.getvalue()
    last = out.rstrip("\n").split("\r")[-1]
    assert "384/1,280 steps" in last and "30%" in last
    assert "return 123.4" in last and "kl 0.0087" in last and "4,321 fps" in last
    assert "ETA" in last
    assert out.count("\r") == 3 and out.endswith("\n")


def test_tqdm_bar(monkeypatch):
    pytest.importorskip("tqdm")
    stream = FakeTTY()
    with RunLogger(None, progress=True, total_steps=1280, config={}, stream=stream,
                   start_steps=256, resumed=True) as log:
        assert isinstance(log._bar, logger_mod._TqdmBar)
        log.log(entry(3, ret=55.0, **{"train/kl": 0.0051, "time/fps": 2000.0}))
        log.log(entry(4, ret=56.0, **{"train/kl": 0.0052, "time/fps": 2000.0}))
        assert log._bar.bar.n == 512
    out = stream.getvalue()
    assert "512/1.28k" in out and "return 56.0" in out and "kl 0.0052" in out and "2,000 fps" in out
    assert "<" in out  # tqdm's elapsed<remaining, the ETA


def test_format_progress_handles_nan_and_missing():
    assert format_progress({"rollout/ep_return_mean": math.nan}) == "return - | kl - | - fps"


@pytest.mark.parametrize("use_tqdm", [True, False])
def test_progress_bar_on_a_real_terminal(use_tqdm, monkeypatch):
    """On a real terminal (a pty, which reports a 0 x 0 size like some CI runners) the bar shows."""
    pty = pytest.importorskip("pty")
    if use_tqdm:
        pytest.importorskip("tqdm")
    else:
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w")
    # As sys.stderr itself: tqdm asks the terminal for its size only for sys.stderr/stdout.
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        assert progress_allowed()
        with RunLogger(None, progress=True, total_steps=256, config={}) as log:
            for i in (1, 2):
                log.log({"time/total_steps": 128 * i, "rollout/ep_return_mean": 9.5,
                         "train/kl": 0.004, "time/fps": 100.0})
        stream.flush()
        os.set_blocking(master, False)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except (BlockingIOError, OSError):
                break
            if not data:
                break
            chunks.append(data)
    finally:
        stream.close()
        os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert "return 9.5" in text and "kl 0.0040" in text and "256" in text, repr(text)


# --------------------------------------------------------------------------------------- lifecycle
def test_close_draws_learning_curve_and_is_idempotent(tmp_path):
    pytest.importorskip("matplotlib")
    log = RunLogger(str(tmp_path), progress=False, total_steps=640, config={"env_id": "X-v0"})
    for i in range(1, 6):
        log.log(entry(i))
    path = log.close()
    assert path == os.path.join(str(tmp_path), "learning_curve.png")
    png_size(path)
    assert log.close() == path
    with pytest.raises(RuntimeError, match="after close"):
        log.log(entry(6))


def test_close_without_matplotlib_warns(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    log = RunLogger(str(tmp_path), progress=False, total_steps=128, config={})
    log.log(entry(1))
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert log.close() is None
    assert not (tmp_path / "learning_curve.png").exists()


def _run_python(script, *args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # progress=True with stderr a pipe: no bar, not a byte.
    assert proc.stderr == "", proc.stderr
    return proc.stdout.strip()


def test_heavy_libraries_are_imported_only_when_used(tmp_path):
    """`import trpo_ext`, the CLI's parser and a logger without files or bar import none of them
    (beyond what torch itself imports: torch.hub takes tqdm when it is installed); a logger with a log
    directory imports TensorBoard but not tqdm (no terminal)."""
    pytest.importorskip("tensorboard")
    script = f"""
        import sys
        import torch, numpy, gymnasium
        LAZY = {LAZY!r}
        baseline = set(m for m in LAZY if m in sys.modules)
        def added():
            return sorted(m for m in LAZY if m in sys.modules and m not in baseline)
        import trpo_ext, trpo_ext.logger, trpo_ext.plot, trpo_ext.cli, trpo_ext.config
        trpo_ext.cli.build_parser()
        assert added() == [], added()
        log = trpo_ext.logger.RunLogger(None, progress=True, total_steps=10, config={{}})
        log.log({{"time/total_steps": 5, "rollout/ep_return_mean": 1.0}})
        log.close()
        assert added() == [], added()
        log = trpo_ext.logger.RunLogger(sys.argv[1], progress=True, total_steps=10, config={{}})
        log.log({{"time/total_steps": 5, "rollout/ep_return_mean": 1.0}})
        assert "torch.utils.tensorboard" in added(), added()
        assert "tqdm" not in added(), "tqdm imported without a terminal"
        print("ok")
    """
    assert _run_python(script, str(tmp_path)) == "ok"


def test_works_without_the_logging_libraries():
    """With matplotlib, tensorboard and tqdm unimportable, trpo_ext, its CLI parser and a logger
    without a log directory still work: they need only torch, numpy and gymnasium."""
    script = f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("matplotlib", "tensorboard", "tqdm"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import trpo_ext, trpo_ext.logger, trpo_ext.plot, trpo_ext.cli
        trpo_ext.cli.build_parser().parse_args(["train", "--max-kl", "0.02"])
        with trpo_ext.logger.RunLogger(None, progress=True, total_steps=10, config={{}}) as log:
            log.log({{"time/total_steps": 5, "rollout/ep_return_mean": 1.0}})
        print("ok")
    """
    assert _run_python(script) == "ok"
