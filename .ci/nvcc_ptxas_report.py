#!/usr/bin/env python3
"""nvcc with its ptxas resource report kept: runs the nvcc given as the first argument with the rest, passes
its output through, and writes the ptxas lines (registers, stack, spills per kernel; the build passes
-Xptxas=-v) to <FUSED_LSTM_PTXAS_REPORT>/<object file>.txt, one file per compiled source, so an incremental
build keeps the reports of the sources it did not recompile. setup.py routes nvcc through this script when
that variable is set; tests/test_resources.py checks the reports."""
import os
import subprocess
import sys


def main() -> int:
    result = subprocess.run(sys.argv[1:], stderr=subprocess.PIPE, text=True)
    sys.stderr.write(result.stderr)
    folder = os.environ.get("FUSED_LSTM_PTXAS_REPORT")
    args = sys.argv[1:]
    target = args[args.index("-o") + 1] if "-o" in args[:-1] else None
    lines = [line for line in result.stderr.splitlines()
             if line.startswith("ptxas info") or "bytes stack frame" in line]
    if folder and target and lines and result.returncode == 0:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, os.path.basename(target) + ".txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
