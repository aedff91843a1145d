"""Host sparse-attention kernels vs streaming bandwidth (same as `hetero bench cpu-sparse`)."""
import sys

from hetero.tools.cli import main

if __name__ == "__main__":  # through the CLI: its one-line errors and exit codes
    sys.exit(main(["bench", "cpu-sparse"] + sys.argv[1:]))
