"""Passkey retrieval with SmolLM2, dense vs hetero (same as `hetero bench needle`)."""
import sys

from hetero.tools.bench.needle import main

if __name__ == "__main__":
    sys.exit(main())
