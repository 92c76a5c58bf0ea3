"""Regenerate the golden outputs of every example: ``python tests/golden/regen.py``.

Each ``tests/golden/<name>.pt`` holds fixed-seed inputs, the default parameters, an initial
state, and the reference output and final state (float64). ``tests/test_golden.py`` fails
when the reference drifts from them; regenerate only when a change of meaning is intended,
and say so in the commit message.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import mixc

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent.parent / "examples"
SHAPE = {"B": 2, "T": 9, "H": 2}
SIZES = {"K": 4, "V": 5, "N": 6, "P": 3, "D": 4}
# constants small enough that masks matter at T = 9
CONSTS = {"sliding_window_attention": {"W": 3}, "segment_attention": {"L": 4}}


def case(name: str) -> tuple[mixc.Mixer, dict, dict, dict]:
    """The mixer, inputs, parameters and initial state of one golden case."""
    m = mixc.load(EXAMPLES / f"{name}.mix", **CONSTS.get(name, {}))
    sizes = {k: v for k, v in SIZES.items() if k in m.meta["sizes"]}
    inputs = m.random_inputs(SHAPE["B"], SHAPE["T"], SHAPE["H"], dtype=torch.float64, seed=1234, **sizes)
    params = m.parameters_init(SHAPE["H"], dtype=torch.float64, **sizes)
    gen = torch.Generator().manual_seed(99)
    state0 = {}
    for s, sm in m.meta["states"].items():
        if "T@cache" in sm["axes"]:  # an attention file's key/value cache starts empty in the golden case
            continue
        bound = {**m.meta["consts_as_sizes"], **{k: d for k, d in m.meta["sizes"].items() if d}, **sizes}
        shape = (SHAPE["B"], SHAPE["H"], *[bound[a] for a in sm["axes"]])
        x = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
        if sm["complex"]:
            x = torch.complex(x, 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64))
        state0[s] = x
    return m, inputs, params, state0


def main() -> int:
    names = sorted(p.stem for p in EXAMPLES.glob("*.mix"))
    for name in names:
        m, inputs, params, state0 = case(name)
        o, final = m.reference(**inputs, **params, initial_state=state0, output_final_state=True)
        torch.save({"inputs": inputs, "params": params, "initial_state": state0, "output": o,
                    "final_state": final, "consts": CONSTS.get(name, {})}, HERE / f"{name}.pt")
        print(f"{name}: output {tuple(o.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
