"""The ``trpo-ext`` command (also ``python -m trpo_ext``): train, eval and plot.

The ``train`` flags are generated from :func:`trpo_ext.config.config_fields`, so every setting of
:func:`trpo_ext.train` has a flag, with its documentation and default in ``--help``, without a line here.
Only the settings given on the command line are passed on; the others keep :class:`TRPOConfig`'s
defaults (or, with ``--resume``, the checkpoint's settings).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["main", "build_parser", "train_settings", "default_log_dir"]

PROG = "trpo-ext"
DEFAULT_ENV = "CartPole-v1"
DEFAULT_STEPS = 100_000
DEFAULT_SEED = 0
DEFAULT_EVAL_EPISODES = 10
# Evaluation episodes start from seeds the training run's first resets did not use.
EVAL_SEED_OFFSET = 1000

# Settings with a hand-written flag (or none): never generated from the config.
_HANDWRITTEN = {"log_dir", "resume", "progress", "env", "seed", "steps", "total_steps",
                "eval_episodes", "callback"}


class CLIError(Exception):
    """A problem with what the user asked for: printed as one line, no traceback."""


# ---------------------------------------------------------------------------------------------------
# Flags generated from the config
# ---------------------------------------------------------------------------------------------------
class _BoolFlag(argparse.Action):
    """``--x`` / ``--no-x`` for a boolean setting (argparse's BooleanOptionalAction, without the
    default it appends to the help on some Python versions, since ours is already there)."""

    def __init__(self, option_strings, dest, default=None, required=False, help=None):
        strings = []
        for s in option_strings:
            strings.append(s)
            if s.startswith("--"):
                strings.append("--no-" + s[2:])
        super().__init__(strings, dest, nargs=0, default=default, required=required, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def _resolved_types() -> Dict[str, Any]:
    from .config import TRPOConfig

    try:
        return typing.get_type_hints(TRPOConfig)
    except Exception:  # an annotation that cannot be evaluated: fall back to the strings
        return {}


def _type_from_string(text: str) -> Any:
    # config.py uses `from __future__ import annotations`, so its field types arrive as strings.
    text = text.replace("typing.", "").strip()
    m = re.fullmatch(r"Optional\[(.*)\]", text)
    if m:
        return Optional[_type_from_string(m.group(1))]
    m = re.fullmatch(r"(?:Tuple|tuple)\[(.*),\s*\.\.\.\]", text)
    if m:
        return Tuple[_type_from_string(m.group(1)), ...]
    if re.fullmatch(r"(?:Dict|dict)\[.*\]", text):
        return dict
    return {"int": int, "float": float, "bool": bool, "str": str}.get(text, str)


def _split_type(tp: Any) -> Tuple[Any, bool, bool]:
    """(element type, optional, is a variable-length tuple) of a field's annotation."""
    if isinstance(tp, str):
        tp = _type_from_string(tp)
    optional = False
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        optional = True
        rest = [a for a in args if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else str
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        return (args[0] if args else str), optional, True
    if origin is dict:
        return dict, optional, False
    return tp, optional, False


def _scalar_parser(element: Any, name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        text = text.strip()
        if element is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"{name}: expected true/false, got {text!r}")
        if element is dict:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = None
            if not isinstance(value, dict):
                raise argparse.ArgumentTypeError(f"{name}: expected a JSON object, e.g. "
                                                 f"'{{\"max_episode_steps\": 500}}', got {text!r}")
            return value
        if element in (int, float):
            try:
                return element(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{name}: expected {'an integer' if element is int else 'a number'}, got {text!r}"
                ) from None
        return text

    return parse


def _value_parser(element: Any, optional: bool, is_tuple: bool, name: str) -> Callable[[str], Any]:
    scalar = _scalar_parser(element, name)

    def parse(text: str) -> Any:
        if optional and text.strip().lower() == "none":
            return None
        if is_tuple:
            if not text.strip():
                return ()
            parts = text.split(",")
            if any(not p.strip() for p in parts):
                raise argparse.ArgumentTypeError(f"{name}: an empty entry in {text!r} (expected "
                                                 f"comma-separated values, e.g. 64,64)")
            return tuple(scalar(p) for p in parts)
        return scalar(text)

    parse.__name__ = getattr(element, "__name__", "value")  # argparse names it in its errors
    return parse


def _show_default(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "(empty)"
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    return str(value)


def _metavar(element: Any, is_tuple: bool) -> str:
    name = {int: "INT", float: "FLOAT", str: "STR", dict: "JSON"}.get(element, "VALUE")
    return f"{name},..." if is_tuple else name


def add_config_flags(group: "argparse._ArgumentGroup") -> List[str]:
    """One flag per setting of :class:`trpo_ext.config.TRPOConfig`; returns the setting names."""
    from .config import config_fields

    hints = _resolved_types()
    names = []
    for name, tp, default, help_text in config_fields():
        if name in _HANDWRITTEN:
            continue
        element, optional, is_tuple = _split_type(hints.get(name, tp))
        flag = "--" + name.replace("_", "-")
        doc = (help_text or name).replace("%", "%%")
        text = f"{doc} (default: {_show_default(default).replace('%', '%%')})"
        if element is bool and not is_tuple and not optional:
            group.add_argument(flag, dest=name, action=_BoolFlag, default=argparse.SUPPRESS,
                               help=text)
        else:
            if optional:
                text += "; 'none' for none"
            if is_tuple:
                text += "; a comma-separated list"
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS,
                               type=_value_parser(element, optional, is_tuple, flag),
                               metavar=_metavar(element, is_tuple), help=text)
        names.append(name)
    return names


def train_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The settings given explicitly on the command line (the others are left to train())."""
    return {name: getattr(args, name) for name in args._config_names if hasattr(args, name)}


# ---------------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------------
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; descriptions are wrapped by :func:`_wrap`."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34)


class _Parser(argparse.ArgumentParser):
    """A usage error is one line that names the problem and where the help is, exit status 2
    (argparse prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _wrap(text: str) -> str:
    import shutil
    import textwrap

    width = max(40, min(100, shutil.get_terminal_size((80, 24)).columns) - 2)
    return textwrap.fill(text, width)


def _positive_int(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            try:  # 1e6, 2.5e5: step budgets are often written so
                as_float = float(text)
            except ValueError:
                as_float = math.nan
            if not (math.isfinite(as_float) and as_float == int(as_float)):
                raise argparse.ArgumentTypeError(
                    f"{name}: expected an integer, got {text!r}") from None
            value = int(as_float)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name}: must be > 0, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def _nonnegative_int(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{name}: must be >= 0, got {value}")
        return value

    parse.__name__ = "int"
    return parse


_TRAIN_EPILOG = f"""\
examples:
  {PROG} train                                   # CartPole-v1, 100k steps, default settings
  {PROG} train --env InvertedPendulum-v5 --seed 1
  {PROG} train --env Hopper-v5 --steps 1000000 --max-kl 0.02 --hidden-sizes 64,64
  {PROG} train --preset Walker2d-v5 --steps 1000000  # the tuned settings of trpo_ext.presets
  {PROG} train --resume runs/CartPole-v1-0-20250101-120000/checkpoints/last.pt

Files in the log directory: progress.csv (one row per iteration), tb/ (TensorBoard:
`tensorboard --logdir DIR`), config.json, learning_curve.png, checkpoints/step_*.pt and last.pt.
"""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog=PROG, formatter_class=_Formatter,
        description=_wrap("Trust Region Policy Optimization with fused C++/CUDA kernels: train a "
                          "policy on a gymnasium task, evaluate a checkpoint, plot learning curves."),
        epilog=f"Run `{PROG} COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"trpo_ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    # train ---------------------------------------------------------------------------------------
    p = sub.add_parser(
        "train", formatter_class=_Formatter, epilog=_TRAIN_EPILOG,
        help="train a policy (default: CartPole-v1 for 100k steps)",
        description=_wrap("Train a policy with TRPO, log every iteration, checkpoint, and finally "
                          "evaluate it. With no arguments: CartPole-v1 for 100,000 steps with the "
                          "default settings (under a minute on 2 CPU cores)."))
    run = p.add_argument_group("run")
    run.add_argument("--env", default=None, metavar="ID",
                     help=f"gymnasium environment id (default: {DEFAULT_ENV}; with --resume: the "
                          "checkpoint's)")
    run.add_argument("--steps", type=_positive_int("--steps"), default=None, metavar="N",
                     help=f"total environment steps of the whole run, resumed part included, "
                          f"rounded up to whole updates of n_envs x n_steps (default: "
                          f"{DEFAULT_STEPS}; with --resume: the checkpoint's run's)")
    run.add_argument("--seed", type=_nonnegative_int("--seed"), default=None, metavar="S",
                     help=f"random seed (default: {DEFAULT_SEED}; with --resume: the checkpoint's)")
    run.add_argument("--log-dir", default=None, metavar="DIR",
                     help="directory for logs, the learning curve and checkpoints (default: "
                          "runs/<env>-<seed>-<YYYYmmdd-HHMMSS>; with --resume: the run directory "
                          "the checkpoint is in)")
    run.add_argument("--preset", default=None, metavar="NAME",
                     help="start from the tuned settings of trpo_ext.presets.PRESETS[NAME] (a task "
                          "id; also the default --env); flags given explicitly override them")
    run.add_argument("--resume", default=None, metavar="CHECKPOINT",
                     help="continue the run saved in this checkpoint (a .pt file, or a run "
                          "directory for its checkpoints/last.pt)")
    run.add_argument("--eval-episodes", type=_nonnegative_int("--eval-episodes"),
                     default=DEFAULT_EVAL_EPISODES, metavar="N",
                     help=f"episodes of the final deterministic evaluation; 0 skips it "
                          f"(default: {DEFAULT_EVAL_EPISODES})")
    run.add_argument("--progress", dest="progress", action=_BoolFlag, default=True,
                     help="progress bar with steps, return, KL, FPS and ETA; drawn only on a "
                          "terminal (default: on)")
    run.add_argument("-q", "--quiet", dest="progress", action="store_false",
                     help="no progress bar (same as --no-progress)")
    settings = p.add_argument_group(
        "TRPO settings", "The fields of trpo_ext.config.TRPOConfig; unset ones keep their defaults.")
    p.set_defaults(_config_names=add_config_flags(settings), _handler=_cmd_train)

    # eval ----------------------------------------------------------------------------------------
    p = sub.add_parser(
        "eval", formatter_class=_Formatter, help="evaluate a checkpoint: mean and std of the return",
        description=_wrap("Run a saved policy for some episodes and print the mean and standard "
                          "deviation of the episode return."))
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a checkpoint (.pt), or a run directory for its checkpoints/last.pt")
    p.add_argument("--episodes", type=_positive_int("--episodes"), default=10, metavar="N",
                   help="episodes to run (default: 10)")
    p.add_argument("--env", default=None, metavar="ID",
                   help="gymnasium environment id (default: the one the checkpoint was trained on)")
    p.add_argument("--seed", type=_nonnegative_int("--seed"), default=0, metavar="S",
                   help="seed of the evaluation episodes (default: 0)")
    p.add_argument("--stochastic", action="store_true",
                   help="sample actions from the policy instead of taking its mode (default: off)")
    p.set_defaults(_handler=_cmd_eval)

    # plot ----------------------------------------------------------------------------------------
    p = sub.add_parser(
        "plot", formatter_class=_Formatter, help="draw learning curves of one or more runs into a PNG",
        description=_wrap("Draw mean episode return against environment steps. Runs of the same "
                          "task and settings with different seeds are drawn as their mean with a "
                          "band of ± one standard deviation."))
    p.add_argument("log_dirs", nargs="+", metavar="LOG_DIR",
                   help="run directories (with progress.csv), or directories of runs such as runs/")
    p.add_argument("--out", default=None, metavar="PNG",
                   help="output file (default: LOG_DIR/learning_curve.png for one run, else "
                        "learning_curves.png here)")
    p.add_argument("--title", default=None, help="figure title (default: the task id)")
    p.set_defaults(_handler=_cmd_plot)
    return parser


# ---------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------
def default_log_dir(env: str, seed: int, root: str = "runs", now: Optional[float] = None) -> str:
    """``runs/<env>-<seed>-<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``… when that directory exists."""
    safe_env = re.sub(r"[^A-Za-z0-9._-]+", "_", env) or "env"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    base = os.path.join(root, f"{safe_env}-{seed}-{stamp}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def _require_driver(*names: str):
    import trpo_ext

    missing = [n for n in names if not hasattr(trpo_ext, n)]
    if missing:
        raise CLIError(f"this trpo_ext has no training driver ({', '.join('trpo_ext.' + n for n in missing)} "
                       "missing)")
    return trpo_ext


def _checkpoint_path(path: str) -> str:
    """A .pt file as given, or a run directory's checkpoints/last.pt."""
    if os.path.isdir(path):
        for candidate in (os.path.join(path, "checkpoints", "last.pt"), os.path.join(path, "last.pt")):
            if os.path.isfile(candidate):
                return candidate
        raise CLIError(f"{path!r} is a directory without checkpoints/last.pt")
    if not os.path.exists(path):
        raise CLIError(f"checkpoint {path!r} does not exist")
    return path


def _refused(path: str, exc: Exception) -> CLIError:
    message = str(exc)
    if path not in message:
        message = f"cannot use checkpoint {path}: {message}"
    return CLIError(message)


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n)


def _from_checkpoint(ckpt: Dict[str, Any], key: str) -> Any:
    config = ckpt.get("config")
    if key in ckpt:
        return ckpt[key]
    if isinstance(config, dict):
        return config.get(key)
    return None


def _cmd_train(args: argparse.Namespace) -> int:
    trpo_ext = _require_driver("train", "evaluate_returns")
    from .config import config_fields

    known = {name for name, *_ in config_fields()}
    settings = train_settings(args)
    env, seed, steps, log_dir = args.env, args.seed, args.steps, args.log_dir
    if args.preset is not None:
        from . import presets

        if args.preset not in presets.PRESETS:
            raise CLIError(f"--preset: no preset {args.preset!r}; presets: "
                           f"{', '.join(sorted(presets.PRESETS)) or 'none'}")
        settings = {**presets.get(args.preset), **settings}  # explicit flags win
        env = args.preset if env is None and args.resume is None else env
    resume = None
    if args.resume is not None:
        from .checkpoint import load_checkpoint, run_total_steps

        resume = _checkpoint_path(args.resume)
        try:
            ckpt = load_checkpoint(resume)
            if steps is None:
                steps = run_total_steps(ckpt, resume)
        except ValueError as exc:  # CheckpointError: corrupt, truncated, foreign or too new
            raise _refused(resume, exc) from exc
        if env is None:
            env = ckpt.get("env_id")
            if not isinstance(env, str):
                raise CLIError(f"checkpoint {resume!r} records no environment id: pass --env")
        if seed is None:
            seed = _from_checkpoint(ckpt, "seed")
        saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
        # The checkpoint's settings, overridden by the flags given now.
        settings = {**{k: v for k, v in saved.items() if k in known and k not in _HANDWRITTEN},
                    **settings}
        if isinstance(settings.get("hidden_sizes"), list):
            settings["hidden_sizes"] = tuple(settings["hidden_sizes"])
        if log_dir is None:
            ckpt_dir = os.path.dirname(os.path.abspath(resume))
            if os.path.basename(ckpt_dir) == "checkpoints":
                log_dir = os.path.dirname(ckpt_dir)
    env = DEFAULT_ENV if env is None else env
    seed = DEFAULT_SEED if not isinstance(seed, int) else seed
    steps = DEFAULT_STEPS if not isinstance(steps, int) else steps
    rank = _torchrun_rank()
    if log_dir is None and rank is not None and settings.get("distributed") != "off":
        # Every rank, and a restarted run, must name the directory that rank 0 writes.
        raise CLIError("under torchrun, pass --log-dir DIR (the same on every rank)")
    if log_dir is None:
        log_dir = default_log_dir(env, seed)

    what = "resuming" if resume else "training"
    if not rank:  # data-parallel: rank 0 alone reports
        print(f"{PROG}: {what} {env} for {steps:,} steps (seed {seed}); logs in {log_dir}",
              file=sys.stderr, flush=True)
    try:
        result = trpo_ext.train(env, total_steps=steps, seed=seed, log_dir=log_dir,
                                progress=args.progress, resume=resume, **settings)
    except KeyboardInterrupt:
        last = os.path.join(log_dir, "checkpoints", "last.pt")
        hint = (f"; continue with `{PROG} train --resume {last}`" if os.path.isfile(last) else "")
        if not rank:
            print(f"\n{PROG}: interrupted{hint}", file=sys.stderr)
        return 130

    if rank:
        return 0
    run_dir = getattr(result, "log_dir", None) or log_dir
    if args.eval_episodes > 0:
        # The policy's own environment: env made with the run's env_kwargs.
        returns = trpo_ext.evaluate_returns(result.policy, episodes=args.eval_episodes,
                                            seed=seed + EVAL_SEED_OFFSET, deterministic=True)
        mean, std = _mean_std(list(returns))
        print(f"evaluation: mean return {mean:.2f} ± {std:.2f} over {len(returns)} episodes "
              f"({env}, deterministic policy)")
    plot = os.path.join(run_dir, "learning_curve.png")
    print(f"learning curve: {plot if os.path.isfile(plot) else 'not drawn (is matplotlib installed?)'}")
    # checkpoints/last.pt is the name to resume from; the driver's path may be the step file.
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    checkpoint = last if os.path.isfile(last) else getattr(result, "checkpoint_path", None)
    print(f"last checkpoint: {checkpoint or 'none written'}")
    print(f"logs: {run_dir} (progress.csv; TensorBoard: tensorboard --logdir {os.path.join(run_dir, 'tb')})")
    return 0


def _torchrun_rank() -> Optional[int]:
    """This process's rank when torchrun started it, else None."""
    return int(os.environ["RANK"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else None


def _cmd_eval(args: argparse.Namespace) -> int:
    trpo_ext = _require_driver("load", "evaluate_returns")
    path = _checkpoint_path(args.checkpoint)
    try:
        policy = trpo_ext.load(path)
    except ValueError as exc:  # CheckpointError: corrupt, truncated, foreign or too new
        raise _refused(path, exc) from exc
    env = args.env or getattr(policy, "env_id", None)
    if not env:
        raise CLIError(f"checkpoint {path!r} records no environment id: pass --env")
    # Without --env, the policy's own environment (made with its run's env_kwargs).
    returns = list(trpo_ext.evaluate_returns(policy, args.env or None, episodes=args.episodes,
                                             seed=args.seed, deterministic=not args.stochastic))
    mean, std = _mean_std(returns)
    kind = "stochastic" if args.stochastic else "deterministic"
    if not args.env and policy.env_kwargs:
        env = f"{env} {json.dumps(policy.env_kwargs)}"
    print(f"mean return {mean:.2f} ± {std:.2f} over {len(returns)} episodes "
          f"({env}, {kind} policy, {path})")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_learning_curves

    try:
        out = plot_learning_curves(args.log_dirs, out=args.out, title=args.title)
    except ImportError as exc:
        raise CLIError(f"plotting needs matplotlib (pip install matplotlib): {exc}") from exc
    print(out)
    return 0


def _user_errors() -> Tuple[type, ...]:
    from .distributed import DistributedError

    errors: List[type] = [CLIError, FileNotFoundError, IsADirectoryError, PermissionError,
                          ValueError, TypeError, DistributedError]
    try:  # an unknown or misconfigured environment id
        from gymnasium.error import Error as GymnasiumError

        errors.append(GymnasiumError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``trpo-ext``; returns the exit status (0 ok, 1 error, 2 usage, 130 interrupted).

    Errors from what the user asked for (bad settings, missing files, refused checkpoints) print one
    line; set ``TRPO_EXT_DEBUG=1`` to get the traceback instead.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._handler(args) or 0)
    except _user_errors() as exc:
        if os.environ.get("TRPO_EXT_DEBUG"):
            raise
        from . import distributed

        rank = _torchrun_rank()
        if rank:
            # Under torchrun the other ranks would repeat rank 0's error: a rank > 0 speaks only
            # of an error of its own, raised once training started, not of a peer's loss.
            if not distributed.started() or isinstance(exc, distributed.DistributedError):
                return 1
            print(f"{PROG} {args.command}: error on rank {rank}: {exc}", file=sys.stderr)
            return 1
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
