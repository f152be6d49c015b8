"""`python -m ablations.speech`: Table 2, Random / DM / DSDM on Mini Speech Commands at IPC 10 and 20.

ConvNet-4 on 64x64 log-magnitude spectrograms, factor 2 along time (dsdm/speech.py). Point
`--data-root` at the folder of word sub-folders (or its parent holding mini_speech_commands/).
"""
from __future__ import annotations

import sys

from ablations.cli import build_parser, cli
from ablations.methods import run_methods

METHODS = ["random", "dm", "dsdm"]
NOTE = ("The paper's numbers are for the full Mini Speech Commands (8 000 clips); unless "
        "--data-root holds that set, ours come from a smaller stand-in and are not comparable with them.")


def run(args):
    return run_methods(args, "speech", METHODS, notes=[NOTE])


def main(argv=None) -> int:
    return cli(run, build_parser("python -m ablations.speech", __doc__, dataset="speechcommands", ipc="10,20"), argv)


if __name__ == "__main__":
    sys.exit(main())
