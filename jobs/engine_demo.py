"""The main job (engine only): E[M] exact vs Monte Carlo vs the full-batch prediction.

Heavy ball and AdamW (eps inside the sqrt) on the embedded digits data (scikit-learn's
bundled 1797 images, no download), GELU MLP 64-128-10 at a seeded initialisation, batches of
32 (56 batches), fixed batches permuted each epoch. Prints the comparison table and writes a
Markdown report. Usage: python jobs/engine_demo.py [--permutations P] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from noisemem import expected_correction, full_batch_correction
from noisemem.analysis.compare import comparison
from noisemem.optim import AdamW, HeavyBall
from noisemem.studies.data import digits, split_batches
from noisemem.studies.models import gelu_mlp
from noisemem.system import keep_freed_memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--permutations", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args(argv)
    keep_freed_memory()

    torch.manual_seed(args.seed)
    x, y = digits(torch.float64)
    batches = split_batches(x, y, args.batch_size)
    model = gelu_mlp().double()
    loss_fn = torch.nn.functional.cross_entropy
    m = len(batches)
    print(f"digits: {len(x)} samples, {m} batches of {args.batch_size}; GELU MLP 64-128-10")

    optimizers = {
        "HeavyBall(lr=0.1, beta=0.9)": HeavyBall(0.1, 0.9),
        "AdamW(lr=1e-3, 0.9, 0.999, eps=1e-8, wd=0.01)": AdamW(1e-3, 0.9, 0.999, 1e-8, 0.01),
    }
    rows = []
    for name, opt in optimizers.items():
        for epochs in (1, 2):
            t0 = time.perf_counter()
            step = epochs * m - 1
            mc = expected_correction(
                model,
                loss_fn,
                batches,
                opt,
                epochs=epochs,
                method="monte_carlo",
                permutations=args.permutations,
                seed=args.seed,
            )
            exact = (
                expected_correction(model, loss_fn, batches, opt, epochs=epochs)
                if opt.linear
                else None
            )
            fb = full_batch_correction(model, loss_fn, batches, opt, step=step)
            assert mc.stderr is not None
            rows.append(
                {
                    "config": name,
                    "probe": "init",
                    "step": step,
                    **comparison(
                        mc.mean.numpy(),
                        mc.stderr.numpy(),
                        args.permutations,
                        exact=None if exact is None else exact.mean.numpy(),
                        full_batch=fb.numpy(),
                        noise_part=None if exact is None else exact.noise_part.numpy(),
                    ),
                }
            )
            print(f"  {name}, {epochs} epoch(s): {time.perf_counter() - t0:.1f} s")
    table = pd.DataFrame(rows)
    with_pd_opts = table.to_string(index=False, float_format=lambda v: f"{v:.4g}")
    print()
    print(with_pd_opts)
    notes = [
        "E[M] is the expected memory correction (Eq. 9) over random batch orders; "
        "'full-batch' is the memoryless prediction at the same step (Lemmas K.1, K.2).",
        "Heavy ball: the exact expectation splits into the full-batch part and a noise part "
        "along grad of the mini-batch gradient variance, an implicit regularizer (Sec. 6.2).",
        "AdamW has no closed-form expectation; its Monte Carlo E[M] minus the full-batch "
        "prediction is the correction that mini-batch noise adds (open in the paper, App. A). "
        "With beta2 > beta1 AdamW's memory anti-regularizes (Sec. 4).",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / "engine_demo.md"
    lines = ["# noisemem: E[M] on digits", "", table.to_markdown(index=False, floatfmt=".4g"), ""]
    report.write_text("\n".join(lines + [f"- {n}" for n in notes]) + "\n")
    print(f"\nreport: {report.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
