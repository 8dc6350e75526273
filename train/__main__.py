"""`accelerate launch -m train CONFIG.yaml [key=value ...] [--resume latest]` (or `python -m train`)."""

import argparse
import sys

from . import load_config, main


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("config", nargs="?", help="YAML training config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--resume", choices=["latest"],
                        help="continue each stage from its newest complete checkpoint")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides + (
            [f"resume={args.resume}"] if args.resume else []))
    except (OSError, ValueError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    main(config)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
