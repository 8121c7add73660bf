"""Thin runner for :mod:`swin.bench`: ``PYTHONPATH=src python3 benchmarks/bench.py --help``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from swin.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
