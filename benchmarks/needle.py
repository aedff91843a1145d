"""Passkey retrieval with SmolLM2, dense vs hetero (same as `hetero bench needle`)."""
import sys

from hetero.tools.cli import main

if __name__ == "__main__":  # through the CLI: its one-line errors and exit codes
    sys.exit(main(["bench", "needle"] + sys.argv[1:]))
