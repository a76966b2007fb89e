#!/usr/bin/env python
# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Loss curves and AP-vs-iteration curves from Detectron2's ``metrics.json``
(:mod:`resnext_det.plots`)::

    python tools/plot_results.py output/demo                 # -> output/demo/loss_curves.png
    python tools/plot_results.py output/a output/b --output plots/
"""
import argparse
import sys

from resnext_det.cli.tool import run_tool
from resnext_det.plots import plot_results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="OUTPUT_DIR(s) or metrics.json file(s)")
    parser.add_argument("--output", help="folder for the PNGs (default: the first folder)")
    args = parser.parse_args(argv)
    for path in plot_results(args.folders, args.output).values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, "plot_results.py"))
