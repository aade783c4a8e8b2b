"""dqfast command line: ``python -m dqfast <command>``.

demo        run every op with every available backend and print a table
train       train a model on a folder of images (cae, dqvae, dqtransformer)
compress    image -> dqfast bitstream;  decompress: bitstream -> PNG;  info: show a file's header
eval        rate-distortion table over a folder, against JPEG and JPEG 2000
sample      images from a DQ-Transformer and its DQ-VAE (a PNG grid, --stages: the coarse stage too)
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from dqfast import train
    from dqfast.codec import cli as codec_cli

    parser = argparse.ArgumentParser(
        prog="python -m dqfast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run every op with every available backend and print a table")
    demo.add_argument("--ops-only", action="store_true", help="only the op table, not the codec demo")
    train.add_arguments(sub.add_parser("train", help="train a model on a folder of images"))
    codec_cli.add_arguments(sub)
    from dqfast import sample

    sample.add_arguments(sub.add_parser("sample", help="images from a DQ-Transformer and its DQ-VAE"))
    return parser


def main(argv: list[str] | None = None) -> int:
    from dqfast.codec import cli as codec_cli

    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from dqfast.demo import main as demo_main

        return demo_main(ops_only=args.ops_only)
    if args.command == "train":
        from dqfast import train

        # One ``error:`` line and status 1 for every failure (130 when interrupted), as the codec commands.
        def train_command() -> int:
            train.run(args)
            return 0

        return codec_cli.guarded(train_command)
    if args.command == "sample":
        from dqfast import sample

        return sample.run(args)
    if args.command in codec_cli.COMMANDS:
        return codec_cli.run(args)
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
