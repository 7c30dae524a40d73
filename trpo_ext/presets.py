"""Tuned settings per task, like the RL Zoo's hyperparameter files.

``PRESETS[env_id]`` is a dict: ``settings`` (keyword arguments of :func:`trpo_ext.train`), ``note``
(why they differ from the defaults) and ``measured`` (what they reached: the deterministic
evaluation return of the final policy, mean of 20 episodes, per training seed, at ``steps``, with
``benchmarks/mujoco_suite.py``).  A task is listed only where its settings beat the defaults on
measured seeds.  Use::

    from trpo_ext import presets
    trpo_ext.train("Walker2d-v5", 1_000_000, **presets.get("Walker2d-v5"))

or ``trpo-ext train --preset Walker2d-v5`` (explicit flags override the preset's settings).
"""
from __future__ import annotations

import copy
from typing import Any, Dict

__all__ = ["PRESETS", "get", "EARLIER_DEFAULTS"]

# The defaults before they became std e^-1 (times half the action range) and max_kl 0.04: presets
# measured then spell them out, so that they stay what was measured.
EARLIER_DEFAULTS: Dict[str, Any] = {"init_log_std": 0.0, "max_kl": 0.01}

PRESETS: Dict[str, Dict[str, Any]] = {
    "Hopper-v5": {
        "settings": {"gamma": 0.995, **EARLIER_DEFAULTS},
        "note": "a longer horizon, with the earlier std 1 and max_kl 0.01: with gamma 0.99 a fall "
                "some 500 steps ahead costs almost nothing, and some seeds settle in a fast gait "
                "that falls (the earlier defaults: 5 of seeds 0-19 below 2000). Chosen on seeds "
                "0-4 (3434 against those defaults' 2517); confirmed on seeds 5-9 (3412 against "
                "3296) and 10-19 (3141 against 2786); one seed of 20 below 3200 (seed 15: 1793). "
                "gamma 0.999 stalls near 980 (4 of seeds 0-4). Below the published 3618.",
        "measured": {"steps": 1_000_000, "seeds": list(range(20)),
                     "returns": [3308.2, 3537.8, 3391.7, 3284.9, 3646.7, 3474.6, 3302.7, 3261.8,
                                 3658.7, 3361.0, 3270.3, 3311.8, 3290.1, 3277.9, 3251.3, 1792.9,
                                 3274.9, 3234.2, 3288.2, 3420.9], "return": 3282.0,
                     "commit": "394d383001"},
    },
    "Walker2d-v5": {
        "settings": {"n_steps": 128, **EARLIER_DEFAULTS},
        "note": "updates twice as often (8 x 128 samples each), with the earlier std 1 and max_kl "
                "0.01: those defaults were still climbing at 10^6 steps. Chosen on seeds 0, 1 "
                "(5252, 4243 against the earlier defaults' 4627, 4673) and 2-4 (4489 over 0-4 "
                "against those defaults' 3691 and max_kl=0.02's 4423); seeds 5-9 confirm (4997 "
                "against 3865 and 4410). On Hopper and HalfCheetah, seeds 0, 1: 1949, 3320 and "
                "1871, 5192 (the earlier defaults: 1262, 3431 and 1716, 4140). Below the "
                "published 4933.",
        "measured": {"steps": 1_000_000, "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
                     "returns": [5251.8, 4242.6, 3939.1, 4369.5, 4643.9, 4241.2, 5313.6, 5563.5,
                                 4609.4, 5254.9], "return": 4743.0,
                     "commit": "16b0bfbe85 (seeds 0, 1), 394d383001 (seeds 2-9)"},
    },
    "Ant-v5": {
        "settings": {"env_kwargs": {"include_cfrc_ext_in_observation": False}},
        "note": "the defaults, without the 78 contact-force entries of Ant-v5's observation (27 "
                "entries left): the published Ant-v3 agents saw zeros there (MuJoCo 2.0 stopped "
                "filling them), and the defaults learn better without them. Chosen on seeds "
                "0-4 (3884 against the defaults' 2970); seeds 5-9 confirm (3139 against 2522, "
                "above the defaults on every seed); 3511 over 0-9. It changes the observation, "
                "not the reward: evaluate the policy on its own env (evaluate(policy)).",
        "measured": {"steps": 1_000_000, "seeds": list(range(10)),
                     "returns": [4125.6, 4084.3, 3347.5, 3249.4, 4611.3, 3350.2, 2638.3, 3333.5,
                                 3521.4, 2850.7], "return": 3511.2,
                     "commit": "82b42e77d5"},
    },
    "Humanoid-v5": {
        "settings": {"init_log_std": -1.0, "max_kl": 0.04},
        "note": "std e^-1 (actions are bounded at +-0.4, so the earlier std 1 was mostly clipped "
                "noise; the defaults' e^-1 of the half-range, 0.147, reached 816, 724 on seeds 0, "
                "1) and max_kl 0.04. Chosen on seeds 0, 1 (830, 771; the earlier defaults "
                "500, 579; max_kl 0.02 had reached 857 on seed 0 but 641, 511 on seeds 1, 5); "
                "seeds 5-9 reached 917 (585, 708, 1635, 766, 894; median 766) against those "
                "defaults' 553 (528, 570, 475, 453, 737), above them on every seed; seeds 10-14 "
                "reached 737. Still rising at 10^6 steps.",
        "measured": {"steps": 1_000_000, "seeds": list(range(15)),
                     "returns": [829.9, 771.1, 850.4, 982.2, 673.0, 584.5, 707.7, 1634.5, 766.1,
                                 893.8, 671.8, 684.6, 686.0, 904.6, 735.2], "return": 825.0,
                     "commit": "3cb94814ff (seeds 0-5), f5846004ce (seeds 6-9), 48d996f18d "
                               "(seeds 10-14)"},
    },
    "MountainCarContinuous-v0": {
        "settings": dict(EARLIER_DEFAULTS),
        "note": "the earlier std 1 and max_kl 0.01: the reward is found only by exploring, and "
                "the default std e^-1 rarely reaches the flag in 10^5 steps (seeds 0-4: 17.0, "
                "5-9: 0.0; one seed of ten reaches it). Seeds 0-4 94.0; seeds 5-9 confirm "
                "(93.7).",
        "measured": {"steps": 100_000, "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
                     "returns": [94.0, 94.1, 94.2, 94.1, 93.6, 93.7, 93.8, 93.7, 93.8, 93.7],
                     "return": 93.9, "commit": "96a319ae39"},
    },
    "Swimmer-v5": {
        "settings": {"gamma": 0.9999, "normalize_rewards": True, "vf_epochs": 20,
                     "vf_minibatch_size": 128, "cg_iters": 25, "init_log_std": 0.5,
                     "max_kl": 0.01},
        "note": "the RL Zoo's Swimmer recipe: forward progress pays only over hundreds of steps, "
                "which gamma 0.99 discounts away (the defaults reached 38, 26 on seeds 0, 1, "
                "the earlier ones 35, 66, 51 on seeds 0, 5, 6); std e^0.5: with std 1, seeds 4 "
                "and 9 stayed in a ~115 gait (the recipe alone: 298 over seeds 0-9); max_kl "
                "0.01, the default it was measured with. Tried first on those two and seeds 0, "
                "1, then run on the rest: seeds 0-4 357.5 against the recipe alone's 305.0, 5-9 "
                "358.9 against 291.3 (5-8, never looked at before: 358.8 against 334.8); every "
                "seed 356-362. std e^1 gave 354.9, 359.1 (seeds 0, 1). Below the published 366.",
        "measured": {"steps": 1_000_000, "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
                     "returns": [356.5, 356.8, 356.7, 359.5, 357.8, 356.3, 362.1, 359.5, 357.2,
                                 359.4], "return": 358.2,
                     "commit": "394d383001"},
    },
}


def get(name: str) -> Dict[str, Any]:
    """The preset's ``settings`` (a copy), to pass to :func:`trpo_ext.train` as ``**settings``."""
    if name not in PRESETS:
        raise KeyError(f"no preset {name!r}; presets: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name]["settings"])
