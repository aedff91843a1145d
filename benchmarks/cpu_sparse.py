"""Host sparse-attention kernels vs streaming bandwidth (same as `hetero bench cpu-sparse`)."""
import sys

from hetero.tools.bench.cpu_sparse import main

if __name__ == "__main__":
    sys.exit(main())
