import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: everything loads from local folders


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (tens of seconds); CI runs them too")


def global_batches(samplers, world, micro, batch, steps):
    """Concatenate the ranks' micro-batches of each step: the global batch as the index lists of every rank."""
    its = [iter(s) for s in samplers]
    out = []
    for _ in range(steps):
        ids = []
        for it in its:
            for _ in range(batch // (world * micro)):
                ids += next(it)
        out.append(ids)
    return out
