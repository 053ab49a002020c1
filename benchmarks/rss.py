"""`python -m benchmarks.rss CMD ...`: run CMD and print its peak resident memory (MB) last.

A small launcher, because Linux carries a parent's RSS high-water mark into a forked child even
across exec: measuring from a big benchmark process would report the benchmark's own memory.
"""

import resource
import subprocess
import sys

if __name__ == "__main__":
    code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
    if code != 0:
        sys.exit(code)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
