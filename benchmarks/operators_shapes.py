"""pOps operators on the shapes world: fine-tune operators from a trained demo cascade's prior
(as `clipgen demo` does for union and recolour) and score each with the
`operator_retrieval` evaluator on test and held-out inputs: cosine to the true target
embedding, top-1 retrieval of the target among the split's targets, and the oracle on the
output rendered through the cascade, each against pOps' mean-of-inputs baseline and the
decoder's reading of the true targets.

  python benchmarks/operators_shapes.py --workdir=workdir/demo [--operators=scene,instruct]
      [--oracle-examples=32]

Needs the workdir of a finished `clipgen demo` (its CLIP, prior, decoder and upsamplers);
operators already trained there resume. Prints one JSON line per operator.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipgen import demo
from clipgen.demo import operators


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="workdir/demo")
    parser.add_argument("--operators", default="union,recolour,scene,instruct")
    parser.add_argument("--preset", default="demo")
    parser.add_argument(
        "--oracle-examples", type=int, default=None, help="rendered per split (default: preset's)"
    )
    args = parser.parse_args()
    workdir = Path(args.workdir)
    prior = demo.cascade_configs(workdir, args.preset, demo.PLAN_MINUTES)["prior"]
    names = tuple(args.operators.split(","))
    report = operators.train_and_score(workdir, args.preset, prior, names, args.oracle_examples)
    for name, entry in report.items():
        print(json.dumps({"operator": name, **entry}), flush=True)


if __name__ == "__main__":
    main()
