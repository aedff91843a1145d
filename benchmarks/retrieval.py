"""Retrievers on real SmolLM2 attention at 8K context (same as `hetero bench retrieval`)."""
import sys

from hetero.tools.cli import main

if __name__ == "__main__":  # through the CLI: its one-line errors and exit codes
    sys.exit(main(["bench", "retrieval"] + sys.argv[1:]))
