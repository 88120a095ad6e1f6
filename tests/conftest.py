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


def few_prompts(folder):
    """Cut a shapes folder's prompt files to a few lines: the end-of-run shapes score of a tiny test run then takes a
    twentieth of the time. The demo's text encoder takes its vocabulary from the seen and held-out lines: seen lines
    are kept until every word of both files is in, so the vocabulary keeps its words."""
    lines = {n: (folder / f"prompts_{n}.txt").read_text().splitlines() for n in ("seen", "heldout", "two")}
    kept, words = [], set()
    for line in lines["seen"]:
        if set(line.split()) - words:  # a line with a word not yet kept
            kept.append(line)
            words |= set(line.split())
    assert words == {w for n in ("seen", "heldout") for line in lines[n] for w in line.split()}
    for name, keep in (("seen", kept), ("heldout", lines["heldout"][:2]), ("two", lines["two"][:2])):
        (folder / f"prompts_{name}.txt").write_text("\n".join(keep) + "\n")
    return folder


def corrupt_copy(src, dst, seed, every_shard=False):
    """Copy a shard folder, then damage random rows of its first shard (or of each shard): garbage or truncated image
    bytes, other modes, empty or missing captions. -> {row of the folder: [causes the loader must count]}."""
    import io
    import shutil

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    import data_prep as dp
    shutil.copytree(src, dst)
    rng, damage, offset = np.random.default_rng(seed), {}, 0
    for shard in sorted((dst / "train").glob("*.parquet"))[:None if every_shard else 1]:
        rows = pq.read_table(shard).to_pylist()
        for j, i in enumerate(rng.choice(len(rows), len(rows) // 4, replace=False)):
            kind, raw, at = j % 6, rows[i]["image"]["bytes"], offset + i
            if kind == 0:
                rows[i]["image"]["bytes"], damage[at] = rng.bytes(50), ["undecodable"]
            elif kind == 1:
                rows[i]["image"]["bytes"], damage[at] = raw[:len(raw) // 2], ["truncated"]
            elif kind in (2, 3):
                mode = ("L", "RGBA")[kind - 2]
                buf = io.BytesIO()
                Image.open(io.BytesIO(raw)).convert(mode).save(buf, format="PNG")
                rows[i]["image"]["bytes"], damage[at] = buf.getvalue(), [f"mode_{mode}"]
            else:
                rows[i]["caption"], damage[at] = ("", None)[kind - 4], ["empty_caption"]
        dp.write_rows(shard, {c: [r[c] for r in rows] for c in rows[0]})
        offset += len(rows)
    return damage


def expected_skips(drawn, damage, n):
    """Reference: each drawn row, then the next rows (cyclically) until one is usable; count every cause met."""
    counts = {}
    for i in drawn:
        while True:
            causes = damage.get(i, [])
            for c in causes:
                counts[c] = counts.get(c, 0) + 1
            if not causes or causes[0].startswith("mode_"):
                break
            i = (i + 1) % n
    return counts
