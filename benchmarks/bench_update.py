"""The TRPO update (steps 3–7: g, CG with Fisher-vector products, line search, critic fit) on three
paths, side by side in one process, for the same work:

* ``fast``: the built-in MLP, whose Jacobian products are in closed form;
* ``general``: the SAME MLP (same sizes, same initial weights) wrapped in ``nn.Sequential``, so that
  trpo_ext treats it as a user's network: g and every F·v by autograd (Jᵀ by a backward pass of
  one recorded forward, J v by reverse-over-reverse on it), the critic's gradients by autograd;
* ``sb3``: sb3-contrib's TRPO (``TRPO.train``) with the same network (64, 64) tanh for actor and
  critic, the same samples per update (8 envs × 256 steps), CG iterations, damping, line-search
  steps and ratio, max KL, and the same critic budget (our ``vf_epochs`` passes of minibatches of
  ``vf_minibatch_size``, read from TRPOConfig), one torch thread.

Each side trains ``--iterations`` updates on the task and the median update time over iterations
(after the first, which pays one-time costs) is reported; the sides alternate ``--repeats`` times.

    python benchmarks/bench_update.py [--envs HalfCheetah-v5 CartPole-v1] [--iterations 6]

``--jvp`` times the general path's two routes for J v instead (the choice in
``AutogradLinearization``), and ``--adam`` the critic's optimiser.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import trpo_ext  # noqa: E402
from benchmarks._common import describe_machine, print_table  # noqa: E402
from trpo_ext.config import TRPOConfig  # noqa: E402
from trpo_ext.policies import MLP, Policy, ValueFunction, space_spec  # noqa: E402

CFG = TRPOConfig()
SAMPLES = CFG.n_envs * CFG.n_steps
UPDATE_KEYS = ("time/gradient_s", "time/cg_s", "time/line_search_s", "time/critic_s")


def _update_times(history):
    assert all(h["train/kl"] <= CFG.max_kl for h in history)
    return [sum(h[k] for k in UPDATE_KEYS) for h in history[1:]]


def run_ours(env_id: str, iterations: int, seed: int, general: bool):
    nets = {}
    if general:
        import gymnasium as gym

        env = gym.make(env_id)
        spec = space_spec(env.observation_space, env.action_space)
        env.close()
        # The built-in networks, built as train() builds them, then hidden from the fast path.
        gen = torch.Generator().manual_seed(seed)
        policy = Policy(spec, CFG.hidden_sizes, generator=gen)
        value = ValueFunction(spec, CFG.hidden_sizes, gen)
        assert isinstance(policy.net, MLP)
        nets = dict(policy_net=nn.Sequential(policy.net), value_net=nn.Sequential(value.net))
    result = trpo_ext.train(env_id, iterations * SAMPLES, seed=seed, **nets)
    assert result.policy.fast_path != general
    return _update_times(result.history)


def run_sb3(env_id: str, iterations: int, seed: int):
    from sb3_contrib import TRPO
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(1)
    venv = make_vec_env(env_id, n_envs=CFG.n_envs, seed=seed)
    model = TRPO("MlpPolicy", venv, n_steps=CFG.n_steps, gamma=CFG.gamma,
                 gae_lambda=CFG.gae_lambda, cg_max_steps=CFG.cg_iters, cg_damping=CFG.cg_damping,
                 line_search_max_iter=CFG.line_search_steps,
                 line_search_shrinking_factor=CFG.backtrack_ratio, target_kl=CFG.max_kl,
                 n_critic_updates=CFG.vf_epochs, batch_size=CFG.vf_minibatch_size,
                 learning_rate=CFG.vf_lr, seed=seed, device="cpu",
                 policy_kwargs=dict(net_arch=dict(pi=list(CFG.hidden_sizes),
                                                  vf=list(CFG.hidden_sizes)),
                                    activation_fn=nn.Tanh))
    times = []
    inner = model.train

    def timed():
        t = time.perf_counter()
        inner()
        times.append(time.perf_counter() - t)

    model.train = timed
    model.learn(total_timesteps=iterations * SAMPLES)
    venv.close()
    return times[1:]


def adam_steps(n_params: int = 5_400, steps: int = 400) -> None:
    """Per-step time of trpo_ext's flat Adam against torch.optim.Adam (foreach, fused) on one flat
    parameter of the default critic's size; the update takes vf_epochs × B / minibatch steps."""
    from trpo_ext.policies import Adam

    torch.set_num_threads(1)
    grad = torch.randn(n_params)
    rows = []
    for _ in range(2):
        for name in ("trpo_ext", "torch foreach", "torch fused"):
            p = torch.randn(n_params)
            if name == "trpo_ext":
                opt = Adam(p, lr=1e-3)
                step = lambda: opt.step(grad)  # noqa: E731
            else:
                opt = torch.optim.Adam([p], lr=1e-3, **({"fused": True} if "fused" in name
                                                        else {"foreach": True}))
                p.grad = grad
                step = opt.step
            step()
            t = time.perf_counter()
            for _ in range(steps):
                step()
            rows.append([name, f"{(time.perf_counter() - t) / steps * 1e6:.0f}"])
    per_update = CFG.vf_epochs * SAMPLES // CFG.vf_minibatch_size
    print(f"Adam on one flat parameter of {n_params} entries ({per_update} steps an update)")
    print_table(["optimizer", "us/step"], rows)


def jvp_routes(repeats: int = 20) -> None:
    """ms per J v of the general path's two routes, forward mode (recomputes the forward pass) and
    reverse-over-reverse (reuses the recorded one), on the default MLP at B = 2048 and the Nature
    CNN at B = 512, with the closed form for the MLP as a reference."""
    from trpo_ext.policies import AutogradLinearization, Linearization, NatureCNN

    torch.set_num_threads(1)
    from gymnasium import spaces

    box = spaces.Box(-1.0, 1.0, (17,))
    mlp = Policy(space_spec(box, spaces.Box(-1.0, 1.0, (6,))), CFG.hidden_sizes).net
    cases = [("MLP 17-64-64-6", mlp, torch.randn(2048, 17)),
             ("Nature CNN 3x36x36", nn.Sequential(NatureCNN((3, 36, 36)), nn.Linear(512, 4)),
              torch.rand(512, 3, 36, 36))]
    rows = []
    for name, net, x in cases:
        n = sum(p.numel() for p in net.parameters())
        v = torch.randn(n)
        lins = {route: AutogradLinearization(net, x, n, forward_mode=(route == "forward mode"))
                for route in ("forward mode", "reverse-over-reverse")}
        if isinstance(net, MLP):
            lins["closed form"] = Linearization(net, x, n)
        reps = repeats if x.shape[0] > 1000 else max(3, repeats // 4)
        for route, lin in lins.items():
            lin.jvp(v)
            t = time.perf_counter()
            for _ in range(reps):
                lin.jvp(v)
            rows.append([name, x.shape[0], route, f"{(time.perf_counter() - t) / reps * 1e3:.2f}"])
    print_table(["network", "B", "J v route", "ms"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", nargs="+", default=["HalfCheetah-v5", "CartPole-v1"])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-sb3", action="store_true")
    parser.add_argument("--adam", action="store_true", help="time the critic's optimiser only")
    parser.add_argument("--jvp", action="store_true", help="time the general path's J v routes only")
    args = parser.parse_args()
    if args.adam:
        return adam_steps()
    if args.jvp:
        return jvp_routes()
    print(describe_machine())
    print(f"same work on every side: {SAMPLES} samples per update ({CFG.n_envs} envs x "
          f"{CFG.n_steps} steps), networks {CFG.hidden_sizes} tanh, {CFG.cg_iters} CG iterations, "
          f"damping {CFG.cg_damping}, {CFG.line_search_steps} line-search steps x "
          f"{CFG.backtrack_ratio}, max KL {CFG.max_kl}, critic {CFG.vf_epochs} passes of "
          f"minibatches of {CFG.vf_minibatch_size} (Adam lr {CFG.vf_lr}), 1 torch thread")
    rows = []
    for env_id in args.envs:
        times = {"fast": [], "general": [], "sb3": []}
        for r in range(args.repeats):
            times["fast"] += run_ours(env_id, args.iterations, r, general=False)
            times["general"] += run_ours(env_id, args.iterations, r, general=True)
            if not args.no_sb3:
                times["sb3"] += run_sb3(env_id, args.iterations, r)
        med = {k: statistics.median(v) * 1e3 if v else float("nan") for k, v in times.items()}
        rows.append([env_id, f"{med['fast']:.1f}", f"{med['general']:.1f}", f"{med['sb3']:.1f}",
                     f"{med['general'] / med['fast']:.2f}", f"{med['sb3'] / med['general']:.2f}",
                     f"{med['sb3'] / med['fast']:.2f}"])
    print_table(["env", "fast ms", "general ms", "sb3 ms", "general/fast",
                 "sb3/general", "sb3/fast"], rows)


if __name__ == "__main__":
    main()
