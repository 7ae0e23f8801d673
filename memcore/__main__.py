"""Command line: `python -m memcore demo` (see README)."""
import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m memcore", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="find injected label noise in scikit-learn's digits with CSL")
    d.add_argument("--noise", type=float, default=0.1, help="fraction of labels to flip (default 0.1)")
    d.add_argument("--epochs", type=int, default=40)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--top", type=int, default=10, help="how many suspicious samples to list")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.add_argument("--no-progress", action="store_true")
    from .experiment import add_arguments

    add_arguments(sub.add_parser("experiment", help="the papers' experiments: mislabels, duplicates, stability"))
    args = p.parse_args(argv)
    if args.cmd == "demo":
        from .demo import run_demo

        run_demo(noise=args.noise, epochs=args.epochs, seed=args.seed, top=args.top,
                 device=args.device, progress=not args.no_progress)
    elif args.cmd == "experiment":
        from .experiment import from_args, run

        run(from_args(args), argv if argv is not None else sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
