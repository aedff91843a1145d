"""Retrievers on real SmolLM2 attention at 8K context (same as `hetero bench retrieval`)."""
import sys

from hetero.tools.bench.retrieval import main

if __name__ == "__main__":
    sys.exit(main())
