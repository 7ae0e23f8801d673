"""memcore from the command line: two commands, both from the research harness (memcore.eval,
``pip install 'torch-memcore[eval]'``).

  demo        train a small MLP on scikit-learn's digits with 10% flipped labels, print how well each
              score finds them, write every sample's scores to runs/demo/scores.csv (about a minute
              on a CPU)
  experiment  the papers' experiments on digits, MNIST or CIFAR: mislabel and duplicate detection
              (AUROC of every score and baseline) and agreement with the stability estimator;
              tables, results.json and plots in a fresh runs/<dataset>-<time> directory

`python -m memcore COMMAND --help` lists a command's flags with their defaults.
"""

import argparse
import sys
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    # the harness modules import without the eval extra (each checks it where it is used), so the
    # help works on a core-only install
    from .eval import _args, demo, experiment

    p = argparse.ArgumentParser(
        prog="python -m memcore", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{demo,experiment}")
    demo.add_arguments(
        sub.add_parser(
            "demo",
            formatter_class=_args.Formatter,
            help="find injected label noise in scikit-learn's digits",
            description=demo.__doc__,
        )
    )
    experiment.add_arguments(
        sub.add_parser(
            "experiment",
            formatter_class=_args.Formatter,
            help="the papers' experiments: mislabels, duplicates, stability agreement",
            description=experiment.__doc__,
        )
    )
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    from .eval import MissingExtraError, demo, experiment

    try:
        if args.cmd == "demo":
            demo.run_demo(**demo.from_args(args))
        elif args.cmd == "experiment":
            experiment.run(experiment.from_args(args), argv if argv is not None else sys.argv[1:])
    except (MissingExtraError, FileNotFoundError) as e:  # a missing extra or data directory: no traceback
        p.exit(2, f"{p.prog} {args.cmd}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
