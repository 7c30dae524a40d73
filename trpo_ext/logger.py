"""Per-iteration logging of a training run: CSV, TensorBoard, a progress bar and the learning curve.

:func:`trpo_ext.train` creates one :class:`RunLogger` when it is given a ``log_dir`` or asked for a
progress bar, calls :meth:`RunLogger.log` with each iteration's history entry and :meth:`RunLogger.close`
at the end.  Everything heavy is imported only when it is used: TensorBoard (through
``torch.utils.tensorboard``) when there is a log directory, tqdm when a bar is actually shown, matplotlib
when the learning curve is drawn.  ``import trpo_ext`` and ``train()`` without a log directory therefore
need only torch, numpy and gymnasium.

Files in ``log_dir``:

- ``progress.csv`` — one row per iteration, one column per history key (header = the keys of the first
  entry; a key that appears later extends the header).  Booleans are written as 0/1, NaN as ``nan``.
- ``tb/`` — TensorBoard event files, one scalar per numeric key, at global step ``time/total_steps``.
- ``config.json`` — the run's settings, as given.
- ``learning_curve.png`` — written by :meth:`RunLogger.close`.

Resuming (``resumed=True``) appends to the same files: CSV rows and TensorBoard events past
``start_steps`` (written after the checkpoint that is resumed, by a run that then stopped) are dropped,
so the history reads as one run.  Given the checkpoint's ``history``, the CSV is rewritten from it
instead: a run killed in the middle of writing a row leaves no torn row behind.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, TextIO

__all__ = ["RunLogger", "progress_allowed", "format_progress"]

STEPS_KEY = "time/total_steps"
RETURN_KEY = "rollout/ep_return_mean"
KL_KEY = "train/kl"
FPS_KEY = "time/fps"

CSV_NAME = "progress.csv"
TB_DIR = "tb"
CONFIG_NAME = "config.json"
PLOT_NAME = "learning_curve.png"


def progress_allowed(stream: Optional[TextIO] = None) -> bool:
    """Whether a progress bar may be drawn on ``stream`` (default: stderr).

    Only on a terminal: a bar written into a pipe or a CI log is a pile of carriage returns.  Setting
    ``CI`` (as CI services do) or ``TRPO_EXT_NO_PROGRESS`` to a non-empty value also turns it off, for CI
    runners that fake a terminal.
    """
    stream = sys.stderr if stream is None else stream
    if os.environ.get("CI") or os.environ.get("TRPO_EXT_NO_PROGRESS"):
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _fmt_number(x: Any, spec: str) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "-"
    return format(x, spec) if math.isfinite(x) else "-"


def format_progress(metrics: Dict[str, Any]) -> str:
    """The run-specific part of the progress line: mean return, KL and FPS of one history entry."""
    return (f"return {_fmt_number(metrics.get(RETURN_KEY), '.1f')} | "
            f"kl {_fmt_number(metrics.get(KL_KEY), '.4f')} | "
            f"{_fmt_number(metrics.get(FPS_KEY), ',.0f')} fps")


class _LineBar:
    """A one-line progress display for when tqdm is not installed: steps, return, KL, FPS and ETA."""

    def __init__(self, total: int, initial: int, stream: TextIO):
        self.total, self.initial, self.stream = total, initial, stream
        self.t0 = time.perf_counter()
        self._width = 0

    def update(self, steps: int, metrics: Dict[str, Any]) -> None:
        elapsed = time.perf_counter() - self.t0
        done_here = steps - self.initial
        rate = done_here / elapsed if elapsed > 0 and done_here > 0 else float("nan")
        eta = (self.total - steps) / rate if rate == rate and rate > 0 else float("nan")
        pct = 100.0 * steps / self.total if self.total > 0 else 100.0
        line = (f"{steps:,}/{self.total:,} steps {pct:3.0f}% | {format_progress(metrics)} | "
                f"elapsed {_fmt_duration(elapsed)} | ETA {_fmt_duration(max(eta, 0.0))}")
        pad = " " * max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + pad)
        self.stream.flush()

    def close(self) -> None:
        if self._width:
            self.stream.write("\n")
            self.stream.flush()


class _TqdmBar:
    def __init__(self, tqdm_cls, total: int, initial: int, stream: TextIO):
        # tqdm's own rate is replaced by the driver's FPS in the postfix, which excludes the time spent
        # between iterations on logging and checkpoints only as much as the driver decides.
        # A terminal that reports no size (a bare pty, some CI runners) would get no bar at all:
        # tqdm hides bars below the screen's last row and shrinks them to its width.
        try:
            size = os.get_terminal_size(stream.fileno())
            width, height = size.columns, size.lines
        except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
            width = height = 0
        self.bar = tqdm_cls(
            total=total, initial=initial, file=stream, unit="step", unit_scale=True,
            dynamic_ncols=width > 0, ncols=None if width > 0 else 100,
            nrows=None if height > 0 else 24, smoothing=0.3, leave=True,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
        )
        self.n = initial

    def update(self, steps: int, metrics: Dict[str, Any]) -> None:
        self.bar.set_postfix_str(format_progress(metrics), refresh=False)
        self.bar.update(max(0, steps - self.n))
        self.n = steps

    def close(self) -> None:
        self.bar.close()


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _csv_value(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if value is None:
        return ""
    return value


def _scalar(value: Any) -> Optional[float]:
    """A TensorBoard scalar, or None for values that are not numbers (or not finite)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return _scalar(item())
        except (TypeError, ValueError, RuntimeError):
            return None
    return None


class RunLogger:
    """Writes each iteration's metrics to CSV and TensorBoard and shows a progress bar.

    Args:
        log_dir: directory for ``progress.csv``, ``tb/``, ``config.json`` and ``learning_curve.png``
            (created if missing); ``None`` writes no files.
        progress: show a progress bar — only when ``stream`` (stderr) is a terminal, see
            :func:`progress_allowed`.  tqdm is used when installed, else a one-line display.
        total_steps: the run's step budget (the bar's 100 %).
        config: the run's settings; stored in ``config.json``.  ``env_id`` and ``seed`` entries, when
            present, let :mod:`trpo_ext.plot` group runs of one task across seeds.
        start_steps: steps already done (when resuming).
        resumed: continue the files of an earlier run in ``log_dir`` instead of starting them afresh.
        history: with ``resumed``, the entries of the iterations done so far (the checkpoint's):
            ``progress.csv`` is rewritten to hold exactly these rows, whatever the file held.
        stream: where the bar goes (default ``sys.stderr``).

    Use as a context manager or call :meth:`close` (idempotent) at the end.
    """

    def __init__(self, log_dir: Optional[str], progress: bool, total_steps: int,
                 config: Optional[Dict[str, Any]] = None, start_steps: int = 0,
                 resumed: bool = False, *, stream: Optional[TextIO] = None,
                 history: Optional[List[Dict[str, Any]]] = None):
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.total_steps = int(total_steps)
        self.start_steps = int(start_steps)
        self.resumed = bool(resumed)
        self.config = dict(config or {})
        self.plot_path: Optional[str] = None
        self._closed = False
        self._iterations = 0
        self._header: List[str] = []
        self._csv_file: Optional[TextIO] = None
        self._csv_writer = None
        self._tb = None
        self._bar = None

        stream = sys.stderr if stream is None else stream
        if progress and progress_allowed(stream):
            try:
                from tqdm.auto import tqdm as tqdm_cls  # noqa: WPS433 (lazy by design)
            except ImportError:
                self._bar = _LineBar(self.total_steps, self.start_steps, stream)
            else:
                self._bar = _TqdmBar(tqdm_cls, self.total_steps, self.start_steps, stream)

        if self.log_dir is not None:
            os.makedirs(self.log_dir, exist_ok=True)
            _atomic_write_text(os.path.join(self.log_dir, CONFIG_NAME),
                               json.dumps(_json_safe(self.config), indent=2, sort_keys=True) + "\n")
            self._open_csv(history if self.resumed else None)
            self._open_tensorboard()

    # -- paths ----------------------------------------------------------------------------------
    @property
    def csv_path(self) -> Optional[str]:
        return None if self.log_dir is None else os.path.join(self.log_dir, CSV_NAME)

    @property
    def tb_dir(self) -> Optional[str]:
        return None if self.log_dir is None else os.path.join(self.log_dir, TB_DIR)

    # -- CSV ------------------------------------------------------------------------------------
    def _open_csv(self, history: Optional[List[Dict[str, Any]]]) -> None:
        path = self.csv_path
        assert path is not None
        if history is not None:
            header: List[str] = []
            if os.path.exists(path):  # keep the file's column order
                with open(path, newline="") as f:
                    header = list(csv.DictReader(f).fieldnames or [])
            for entry in history:
                header += [k for k in entry if k not in header]
            self._header = header
            if header:
                self._rewrite_csv([{k: _csv_value(v) for k, v in e.items()} for e in history])
        elif self.resumed and os.path.exists(path):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                kept = [row for row in reader if not self._after_start(row)]
            self._header = header
            self._rewrite_csv(kept)
        elif os.path.exists(path):
            warnings.warn(f"{path} exists and this run is not a resume: it is replaced", stacklevel=3)
            os.remove(path)
        if self._header:
            self._csv_file = open(path, "a", newline="")
            self._csv_writer = csv.DictWriter(self._csv_file, fieldnames=self._header, restval="")

    def _after_start(self, row: Dict[str, str]) -> bool:
        try:
            return float(row.get(STEPS_KEY, "") or "nan") > self.start_steps
        except ValueError:
            return False

    def _rewrite_csv(self, rows: List[Dict[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self._header, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        _atomic_write_text(self.csv_path, buf.getvalue())  # type: ignore[arg-type]

    def _write_csv_row(self, metrics: Dict[str, Any]) -> None:
        new_keys = [k for k in metrics if k not in self._header]
        if new_keys or self._csv_writer is None:
            # A new column: rewrite the file once with the wider header (rare: first row, or a key the
            # driver starts reporting later).
            old_rows: List[Dict[str, Any]] = []
            if self._csv_file is not None:
                self._csv_file.close()
                with open(self.csv_path, newline="") as f:  # type: ignore[arg-type]
                    old_rows = list(csv.DictReader(f))
            self._header = self._header + new_keys
            self._rewrite_csv(old_rows)
            self._csv_file = open(self.csv_path, "a", newline="")  # type: ignore[arg-type]
            self._csv_writer = csv.DictWriter(self._csv_file, fieldnames=self._header, restval="")
        self._csv_writer.writerow({k: _csv_value(v) for k, v in metrics.items()})
        self._csv_file.flush()  # type: ignore[union-attr]

    # -- TensorBoard ----------------------------------------------------------------------------
    def _open_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: WPS433 (lazy by design)
        except ImportError:
            warnings.warn("tensorboard is not installed, so no TensorBoard event files are written "
                          "(pip install tensorboard, or trpo_ext[log])", stacklevel=3)
            return
        # purge_step hides the events a stopped run wrote after the checkpoint we resume from.
        purge = self.start_steps + 1 if self.resumed else None
        self._tb = SummaryWriter(self.tb_dir, purge_step=purge)
        if self.config:
            self._tb.add_text("config", "```\n" + json.dumps(_json_safe(self.config), indent=2,
                                                              sort_keys=True) + "\n```",
                              global_step=self.start_steps)

    # -- the interface the driver calls -------------------------------------------------------
    def log(self, metrics: Dict[str, Any]) -> None:
        """Record one iteration's history entry (namespaced keys, see the module docstring)."""
        if self._closed:
            raise RuntimeError("RunLogger.log() called after close()")
        self._iterations += 1
        steps_value = metrics.get(STEPS_KEY)
        steps = int(steps_value) if isinstance(steps_value, (int, float)) and not isinstance(
            steps_value, bool) and math.isfinite(steps_value) else self.start_steps + self._iterations
        if self.log_dir is not None:
            self._write_csv_row(metrics)
            if self._tb is not None:
                for key, value in metrics.items():
                    scalar = _scalar(value)
                    if scalar is not None:
                        self._tb.add_scalar(key, scalar, global_step=steps)
        if self._bar is not None:
            self._bar.update(steps, metrics)

    def close(self) -> Optional[str]:
        """Flush and close everything; with a log directory, draw ``learning_curve.png``.

        Returns the path of the PNG, or None (no log directory, or matplotlib missing).
        """
        if self._closed:
            return self.plot_path
        self._closed = True
        try:
            if self._bar is not None:
                self._bar.close()
        finally:
            try:
                if self._csv_file is not None:
                    self._csv_file.close()
            finally:
                if self._tb is not None:
                    self._tb.close()
        if self.log_dir is not None and os.path.exists(self.csv_path):  # type: ignore[arg-type]
            from .plot import plot_learning_curves
            try:
                self.plot_path = plot_learning_curves(
                    [self.log_dir], out=os.path.join(self.log_dir, PLOT_NAME))
            except ImportError:
                warnings.warn("matplotlib is not installed, so no learning_curve.png is drawn "
                              "(pip install matplotlib, or trpo_ext[log])", stacklevel=2)
        return self.plot_path

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
