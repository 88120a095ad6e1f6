"""The trainer's plumbing, out of the way of reading the recipe: the shard format and its checks, the data stream's
order and loader workers, files that survive a crash or a full disk (the log, atomic checkpoints), the trackers and
sample grids, constant, path and device checks, signals and the time limit, the bench's lines. A leaf module: it
imports nothing of the project; the trainer, data_prep.py and sample.py import it.

The shard format, what data_prep.py writes and the trainer reads:

    DIR/train/shard-00000.parquet, ...   columns image (bytes, or the datasets Image feature {bytes, path}), caption
                                          (text), width, height (integers); hf shards add bucket and source_row;
                                          row groups of ~1 MiB (ShardRows reads a row by reading its group)
    DIR/heldout/heldout.parquet           the evaluation's reference images, never trained on
    DIR/text_emb/<shard path>.arrow       text-embedding sidecar: per row the encoder's bf16 output for the real
                                          tokens (text_emb bytes, n_tokens); its schema metadata names the encoder
                                          and a digest of the shard's captions
    DIR/repa/<shard path>.arrow           REPA-target sidecar (data_prep.py encode-repa): per row the bf16 DINOv3
                                          patch features of the image as a stage crops it (repa bytes); its
                                          metadata names the encoder, the grid (res:patch:aspect_max), the digest

Every check ends in a ValueError whose message is one line naming the file and the fix.
"""
import hashlib
import html
import collections
import copy
import dataclasses
import fcntl
import io
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import pickle
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def brief(e, n=100):  # an exception as one short line, "Type: message" (DCP's: that of its first failing rank)
    e = next(iter(e.failures.values()))[0] if isinstance(e, dcp.CheckpointException) else e
    return f"{type(e).__name__}: {' '.join(str(e).split())[:n]}"


# ----------------------------------------------------------------------------------------------------------------
# The shard format

SKIP = {"heldout", "text_emb", "repa"}  # folders under DIR that hold no training shards


def decode_image(raw, draft=None):
    """Image bytes -> (RGB image, cause): cause None, or 'mode_<M>' when converted (alpha composited on white), or
    'truncated' / 'undecodable' with no image. draft (w, h): JPEGs decode at the smallest DCT scale covering it.
    16/32-bit grey becomes 8 bits by its range: I;16 0..65535; I 0..255 or 0..65535 (beyond: 0..max) by its maximum;
    F 0..1 when its maximum is at most 1, else 0..255."""
    from PIL import Image
    try:
        img = Image.open(io.BytesIO(raw or b""))
        mode = img.mode
        if draft:
            img.draft("RGB", draft)
        img.load()
        if mode in ("I", "F") or mode.startswith("I;16"):  # PIL's own conversion clips them at 255: all white
            a = np.nan_to_num(np.asarray(img, dtype=np.float64))
            m = a.max(initial=0)
            top = (1 if m <= 1 else 255) if mode == "F" else 255 if mode == "I" and m <= 255 else max(m, 65535)
            img = Image.fromarray(np.clip(a * (255 / top), 0, 255).round().astype(np.uint8))
        if img.mode != "RGB":
            img = Image.alpha_composite(Image.new("RGBA", img.size, (255,) * 4), img.convert("RGBA")).convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError on bad bytes
        return None, "truncated" if "truncated" in str(e).lower() else "undecodable"
    return img, None if mode == "RGB" else f"mode_{mode}"


def parquet_footers(files, check, fix, types=True):
    """Each file's footer, no data read -> [(file, Arrow schema, rows, [(rows, bytes) of each row group])]. One
    line, ending in `fix`, names the first file that is no readable parquet or whose columns (names, and types unless
    types=False: a column of nulls in one source file is typed null) differ from the first's; check(file, schema) may
    refuse one too. The files are read as one table later: a bad one found there costs a traceback, or hours of
    work."""
    import pyarrow.parquet as pq
    out = []
    for f in files:
        try:
            meta = pq.read_metadata(f)
        except Exception as e:
            raise ValueError(f"{f} is not a readable parquet file ({brief(e)}); {fix}") from None
        schema = meta.schema.to_arrow_schema()
        check(f, schema)
        cols, first = ({c.name: str(c.type) for c in sc} if types else sorted(sc.names)
                       for sc in (schema, out[0][1] if out else schema))
        if cols != first:
            raise ValueError(f"{f} has columns {cols}, but {files[0]} has {first}; {fix}")
        out.append((f, schema, meta.num_rows, [(meta.row_group(j).num_rows, meta.row_group(j).total_byte_size)
                                               for j in range(meta.num_row_groups)]))
    return out


def column_type_error(schema, image="image", captions=("caption",), sizes=("width", "height")):
    """The first column of an Arrow schema that cannot hold what it should -> 'column c holds <type>, not <what>',
    or None. Image: bytes (binary, or a struct with binary `bytes`: the datasets Image feature); captions: text;
    sizes: integers."""
    import pyarrow as pa
    binary = lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)  # noqa: E731
    for c in schema.names:
        t = schema.field(c).type
        if c == image and not (binary(t) or pa.types.is_struct(t) and t.get_field_index("bytes") >= 0
                               and binary(t.field("bytes").type)):
            return f"column {c} holds {t}, not image bytes"
        if c in captions and not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            return f"column {c} holds {t}, not text"
        if c in sizes and not pa.types.is_integer(t):
            return f"column {c} holds {t}, not integers"
    return None


ROW_GROUP_BYTES = 1 << 20  # data_prep.py writes row groups of about this many bytes: one image read reads its group


class UnreadableGroup(ValueError):  # a row group that cannot be read: garbled data behind a valid footer
    def __init__(self, file, group, why):
        super().__init__(f"{file}: row group {group} is unreadable ({why}); re-create it with data_prep.py or delete "
                         "it")
        self.file = file


class ShardRows:
    """The rows of parquet shards, read where they lie: row i comes from its row group of its file (memory-mapped).
    No copy of the data is made (the datasets library's loader would first copy every shard into its Arrow cache).
    A random read costs its whole row group, hence data_prep.py's groups of ~ROW_GROUP_BYTES; the groups read last
    are kept up to CACHE_BYTES, so a small data set (the demo's) is read once and reading in order reads each group
    once. A group that cannot be read raises UnreadableGroup."""
    CACHE_BYTES = 64 << 20  # per process

    def __init__(self, files, names, groups):  # names: the columns; groups: per file, (rows, bytes) of each group
        self.files, self.names = [str(f) for f in files], list(names)
        self.file_of = np.array([k for k, g in enumerate(groups) for _ in g], dtype=np.int64)  # per global group
        self.index_in_file = np.array([j for g in groups for j in range(len(g))], dtype=np.int64)
        self.starts = np.cumsum([0] + [n for g in groups for n, _ in g])  # global row of each group's first row
        self.read_bytes = sum(n * b for g in groups for n, b in g) / max(1, self.starts[-1])  # per random row read
        self.cache, self.handle = collections.OrderedDict(), (None, None)  # group -> its image and caption columns

    def __len__(self):
        return int(self.starts[-1])

    def __getstate__(self):  # to loader workers: the index, not the open file or the groups read
        return {**self.__dict__, "cache": collections.OrderedDict(), "handle": (None, None)}

    def __getitem__(self, i):  # -> {"image": bytes | None, "caption": str | None}
        import pyarrow.parquet as pq
        g = int(np.searchsorted(self.starts, i, side="right")) - 1
        if g in self.cache:
            self.cache.move_to_end(g)
        else:
            k, j = int(self.file_of[g]), int(self.index_in_file[g])
            try:
                if self.handle[0] != k:
                    self.handle = (k, pq.ParquetFile(self.files[k], memory_map=True))
                self.cache[g] = self.handle[1].read_row_group(j, columns=["image", "caption"])
            except Exception as e:
                raise UnreadableGroup(self.files[k], j, brief(e)) from None
            while len(self.cache) > 1 and sum(t.nbytes for t in self.cache.values()) > self.CACHE_BYTES:
                self.cache.popitem(last=False)
        row = self.cache[g].slice(int(i - self.starts[g]), 1).to_pylist()[0]
        image = row["image"]
        return {"image": image.get("bytes") if isinstance(image, dict) else image, "caption": row["caption"]}

    def note(self, folder):  # "" or why reading the shards of folder is slow, with the fix
        if self.read_bytes <= 2 * ROW_GROUP_BYTES:
            return ""
        return (f"; each image read reads its row group, {self.read_bytes / 2 ** 20:.1f} MiB on average: "
                f"data_prep.py regroup --shards {folder} rewrites them in groups of "
                f"{ROW_GROUP_BYTES >> 20} MiB")

    def column(self, name, k=None):  # column `name` of file k, or of all files in order (pyarrow) -> ChunkedArray
        import pyarrow as pa
        import pyarrow.parquet as pq
        files = self.files if k is None else [self.files[k]]
        parts = []
        for f in files:
            try:
                parts += pq.read_table(f, columns=[name], memory_map=True).column(name).chunks
            except Exception as e:
                raise ValueError(f"{f} is corrupt ({brief(e)}); re-create it with data_prep.py or delete it") \
                    from None
        return pa.chunked_array(parts, type=parts[0].type if parts else pa.string())


def open_shards(folder):
    """The training shards of a folder, checked from their footers (no data read) -> (files, rows per file,
    ShardRows). A garbled data page behind a valid footer is found when its row group is read."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*.parquet") if not SKIP & set(p.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"no parquet shards under {folder}; run data_prep.py first")

    def columns_ok(f, schema):  # an image and a caption column of the right types
        if not {"image", "caption"} <= set(schema.names):
            raise ValueError(f"{f} has columns {schema.names}, not image and caption; convert it with data_prep.py")
        if err := column_type_error(schema):
            raise ValueError(f"{f}: {err}; re-create the shard with data_prep.py or delete it")
    footers = parquet_footers(files, columns_ok, "re-create it with data_prep.py or delete it")
    return files, [n for _, _, n, _ in footers], ShardRows(files, footers[0][1].names, [g for *_, g in footers])


def sidecar_path(root, shard, kind="text_emb"):  # a shard file's sidecar: kind text_emb (encode-text) or repa
    return Path(root) / kind / Path(shard).relative_to(root).with_suffix(".arrow")


CLEANING = "ftfy+unescape2+strip"  # clean_caption's version: a sidecar records it; another one must be re-encoded


def clean_caption(text):
    """A caption cleaned as diffusers' PRXPixelPipeline cleans a prompt (ftfy's repair of mis-decoded text, HTML
    entities undone twice, outer whitespace dropped), in training, encode-text and sampling alike, so that an
    exported model meets at inference the text it was trained on."""
    import ftfy
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def caption_digest(captions):
    """A digest of a shard's captions (pyarrow strings), which its sidecars record: row count, total bytes (from the
    offsets alone), sha1 of 64 captions spread over the shard. Cheap at every start, where hashing every caption of
    terabytes of shards is not; a re-conversion that draws other captions (another --seed) changes it."""
    import pyarrow.compute as pc
    n = len(captions)
    probe = "\n".join(c or "" for c in captions.take(np.linspace(0, n - 1, min(n, 64)).astype(int)).to_pylist())
    return f"{n}:{pc.sum(pc.binary_length(captions)).as_py() or 0}:{hashlib.sha1(probe.encode()).hexdigest()}"


def text_emb_meta(captions, text_encoder):  # what a text sidecar encodes, kept in its Arrow schema metadata
    return {"text_encoder": str(text_encoder), "captions": caption_digest(captions), "cleaning": CLEANING}


def repa_meta(captions, repa_encoder, res, patch, aspect_max):  # what a REPA sidecar holds, in its schema metadata
    return {"repa_encoder": str(repa_encoder), "captions": caption_digest(captions),
            "grid": repa_grid(res, patch, aspect_max)}


def open_sidecars(root, files, rows, captions, kind, command):
    """The `kind` sidecars of `files` (rows each; captions(k): file k's caption column) as one memory-mapped dataset
    and each file's metadata, or (None, None) when there is no <root>/<kind>/. Each must mirror its shard row for row
    (row count and caption digest); all or none must exist (never a silent fall-back to computing them online)."""
    import datasets
    import pyarrow as pa
    paths = [sidecar_path(root, f, kind) for f in files]
    missing = [e for e in paths if not e.exists()]
    if missing and (Path(root) / kind).exists() and len(missing) < len(paths):
        raise ValueError(f"{len(missing)} of {len(paths)} files of {root}/{kind} are missing (e.g. {missing[0]}); "
                         f"run data_prep.py {command} again (it adds them) or delete {kind}/")
    if missing or not files:
        return None, None
    try:  # Arrow stream files, memory-mapped where they lie (no copy into the datasets cache)
        parts = [datasets.Dataset.from_file(str(e)) for e in paths]
        records = [pa.ipc.open_stream(pa.memory_map(str(e))).schema.metadata or {} for e in paths]
    except Exception as e:
        raise ValueError(f"{root}/{kind}: a file is unreadable ({brief(e)}); delete it and run data_prep.py "
                         f"{command} again") from None
    metas = []
    for k, (f, e, part, rec, n) in enumerate(zip(files, paths, parts, records, rows)):
        have = {k.decode(): v.decode() for k, v in rec.items()}
        redo = f"delete {root}/{kind}/ and run data_prep.py {command} --shards {root} again"
        if "captions" not in have:
            raise ValueError(f"{e} does not record which captions it belongs to (an older {command}); {redo}")
        if len(part) != n or have["captions"] != caption_digest(captions(k)):
            raise ValueError(f"{e} does not mirror {f} row for row (other captions: re-converted?); {redo}")
        metas.append(have)
    return datasets.concatenate_datasets(parts), metas


def open_text_emb(root, files, rows, captions, text_encoder="", text_dim=0):
    """The text sidecars (open_sidecars), or None: each must hold captions cleaned as clean_caption cleans them and,
    when text_encoder is given, that encoder's embeddings (and text_dim, when given, their width)."""
    out, metas = open_sidecars(root, files, rows, captions, "text_emb", "encode-text")
    if out is None:
        return None
    redo = f"delete {root}/text_emb/ and run data_prep.py encode-text --shards {root} again"
    for f, have in zip(files, metas):
        if have.get("cleaning") != CLEANING:
            raise ValueError(f"{sidecar_path(root, f)} holds captions encoded without this trainer's cleaning "
                             f"({CLEANING}); {redo}")
        if text_encoder and have.get("text_encoder") != text_encoder:
            raise ValueError(f"{sidecar_path(root, f)} holds embeddings of text encoder {have.get('text_encoder')}, "
                             f"not of text_encoder={text_encoder}; set text_encoder to that one, or {redo}")
    dim = len(out[0]["text_emb"]) // (2 * max(1, out[0]["n_tokens"]))  # bf16 bytes of n tokens: the width follows
    if text_dim and dim != text_dim:
        raise ValueError(f"{root}/text_emb holds {dim}-d embeddings but text_dim={text_dim}; encode them with the "
                         "run's text encoder (data_prep.py encode-text) or set text_dim")
    return out


def open_repa_targets(root, files, rows, captions, repa_encoder=""):
    """The REPA-target sidecars (open_sidecars) -> (dataset, grid "res:patch:aspect_max"), or (None, None): all of one
    grid and, when repa_encoder is given, of that encoder."""
    out, metas = open_sidecars(root, files, rows, captions, "repa", "encode-repa")
    if out is None:
        return None, None
    redo = f"delete {root}/repa/ and run data_prep.py encode-repa --shards {root} again"
    for f, have in zip(files, metas):
        if have.get("grid") != metas[0].get("grid"):
            raise ValueError(f"{sidecar_path(root, f, 'repa')} holds targets of grid {have.get('grid')}, others of "
                             f"{metas[0].get('grid')} (res:patch:aspect_max); {redo}")
        if repa_encoder and have.get("repa_encoder") != repa_encoder:
            raise ValueError(f"{sidecar_path(root, f, 'repa')} holds targets of {have.get('repa_encoder')}, not of "
                             f"repa_encoder={repa_encoder}; set repa_encoder to that one, or {redo}")
    return out, metas[0]["grid"]


def repa_grid(res, patch, aspect_max):  # the crops a REPA sidecar was computed on, as its metadata records them
    return f"{res}:{patch}:{float(aspect_max)}"


def pack_text_emb(h, mask):
    """Encoder output (B, L, D), mask (B, L) -> per caption (bf16 bytes of its n real tokens, n), wherever the
    padding is."""
    return [(hi[mi.bool()].to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes(), int(mi.sum()))
            for hi, mi in zip(h, mask)]


TEXT_MULTIPLE = 32  # a batch's text is padded to its longest caption rounded up to this (a few kernel shapes)


def text_pad_len(longest, max_len):  # the padded text length of a batch whose longest caption has `longest` tokens
    return min(max_len, max(1, -(-longest // TEXT_MULTIPLE) * TEXT_MULTIPLE))


def pad_text(txt, mask, length):  # (B, L, D), (B, L) -> zero-padded to `length` >= L tokens
    return F.pad(txt, (0, 0, 0, length - txt.shape[1])), F.pad(mask, (0, length - mask.shape[1]))


def same_text_len(*pairs):  # (txt, mask) pairs, each padded to its own longest caption -> all to the longest's
    L = max(t.shape[1] for t, _ in pairs)
    return [pad_text(t, m, L) for t, m in pairs]


def unpack_text_emb(items, max_len, dim):
    """Inverse of pack_text_emb, padded with zeros to the longest caption's text_pad_len (at most max_len tokens):
    -> (B, L, dim) bf16 (as stored: half the loader's shared memory and the host-to-device copy of fp32), mask
    (B, L)."""
    L = text_pad_len(max(n for _, n in items), max_len)
    txt = torch.zeros(len(items), L, dim, dtype=torch.bfloat16)
    mask = torch.zeros(len(items), L, dtype=torch.bool)
    for b, (raw, n) in enumerate(items):
        n = min(n, L)
        e = torch.frombuffer(bytearray(raw), dtype=torch.int16).view(torch.bfloat16).view(-1, dim)
        txt[b, :n], mask[b, :n] = e[:n], True
    return txt, mask


# ----------------------------------------------------------------------------------------------------------------
# The data stream and its loader workers

BUCKET_AREA_TOL = 0.1  # a bucket's area (its token count) lies within 10 % of the square's


def aspect_buckets(res, patch, aspect_max):  # -> [(w, h)] sorted by aspect ratio, the square (res, res) included
    out = {(res, res)}
    for h in range(patch, res, patch):  # the landscape bucket of short side h nearest res^2 in area, and its transpose
        w = min(range(h + patch, int(h * aspect_max) + 1, patch), key=lambda w: abs(w * h - res * res), default=h)
        if w > h and abs(w * h / res ** 2 - 1) <= BUCKET_AREA_TOL:
            out |= {(w, h), (h, w)}
    return sorted(out, key=lambda b: b[0] / b[1])


def nearest_bucket(buckets, w, h):  # image sizes -> index of the (sorted) bucket nearest in log aspect ratio
    r = np.log([bw / bh for bw, bh in buckets])
    return np.searchsorted((r[1:] + r[:-1]) / 2, np.log(np.asarray(w, dtype=float) / np.asarray(h, dtype=float)))


def deal_by_length(lengths, world):
    """The slots 0..G-1 of a global batch in the order the ranks take them (rank r: the r-th G / world), given each
    slot's caption length: sorted by length and dealt round-robin, so that every rank gets the same spread of lengths
    (no rank waits for another) and each of its micro-batches captions of similar lengths (each micro-batch is padded
    to its longest: at ~130 +- 60 tokens, 173 tokens on average instead of 251 at the record's stage 1)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return order.reshape(-1, world).T.reshape(-1).tolist()


class StreamSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches (lists of indices) from image position `start` onward. groups: row indices
    per aspect bucket (default one group, all rows); first: the image position where this stage began; lengths: each
    row's caption tokens, to deal every global batch by length (deal_by_length). Each micro-batch's slots in its
    global batch (where its training draws come from) are appended to `slots` as it is yielded."""

    def __init__(self, n, seed, start, batch, micro, rank, world, groups=None, first=0, lengths=None):
        self.n, self.seed, self.start, self.batch, self.micro, self.rank, self.world = \
            n, seed, start, batch, micro, rank, world
        self.groups = [g for g in (groups if groups is not None else [np.arange(n)]) if len(g)]
        self.first, self._perms, self.lengths, self.slots = first, {}, lengths, collections.deque()

    def __iter__(self):
        sizes = np.array([len(g) for g in self.groups])
        cdf, rng = np.cumsum(sizes) / sizes.sum(), np.random.default_rng([self.seed, self.first])
        pick = lambda u: np.minimum(np.searchsorted(cdf, u, side="right"), len(sizes) - 1)  # one draw per batch
        k, rem = divmod(self.start - self.first, self.batch)  # replay this stage's k global batches so far
        pos = self.first * sizes // sizes.sum() + self.batch * np.bincount(pick(rng.random(k)), minlength=len(sizes))
        pos += rem  # pos: the next position in each group's stream
        while True:
            g = int(pick(rng.random()))
            glob = [self._index(g, pos[g] + j) for j in range(self.batch)]
            pos[g] += self.batch
            per_rank = self.batch // self.world
            dealt = range(self.batch) if self.lengths is None else deal_by_length(self.lengths[glob], self.world)
            mine = dealt[self.rank * per_rank:(self.rank + 1) * per_rank]
            for j in range(0, per_rank, self.micro):
                self.slots.append(list(mine[j:j + self.micro]))
                yield [glob[s] for s in mine[j:j + self.micro]]

    def _index(self, g, pos):
        epoch, k = divmod(int(pos), len(self.groups[g]))
        if self._perms.get(g, (None,))[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 999_983 * g)
            self._perms[g] = epoch, self.groups[g][torch.randperm(len(self.groups[g]), generator=gen).numpy()]
        return int(self._perms[g][1][k])


def collate_batch(items, text_len, text_dim):
    """ShardDataset items -> images (B, 3, h, w) uint8, captions, (txt, mask) or None, REPA targets (B, N * E) bf16
    or None, bad-row causes."""
    emb = unpack_text_emb([it[2] for it in items], text_len, text_dim) if items[0][2] is not None else None
    targets = torch.stack([torch.frombuffer(bytearray(it[3]), dtype=torch.int16) for it in items]).view(
        torch.bfloat16) if items[0][3] is not None else None
    return (torch.stack([it[0] for it in items]), [it[1] for it in items], emb, targets,
            [c for it in items for c in it[4]])


class NoUsableRow(RuntimeError):  # a whole bucket damaged; a loader worker's comes back as its traceback's text
    def line(self):  # its message alone: the last line of the text (the whole text when raised in this process)
        return str(self).strip().splitlines()[-1].split("NoUsableRow: ")[-1]


def own_session(worker_id):
    """A loading worker leaves the trainer's process group and ignores SIGTERM and SIGINT: whether a signal goes to
    the group (Ctrl-C) or to every process (a scheduler), the trainer alone acts on it and stops cleanly (a dead
    worker would crash it); the workers end with the trainer."""
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


# Loading workers ignore SIGTERM (own_session), and at exit multiprocessing terminates its daemonic children and then
# joins them: any still running (an exit from inside the loop) would be waited on forever. Its exit finalizers run
# first, so this one kills them.
mp.util.Finalize(None, lambda: [p.kill() for p in mp.active_children() if p.daemon], exitpriority=100)


# ----------------------------------------------------------------------------------------------------------------
# Files of a run: the log, sample grids, checkpoints

class Logger:  # rank 0 writes log.txt (and the console) and metrics.jsonl; a full disk costs lines, never the run
    def __init__(self, run_dir, master):
        self.master, self.lost, self.tracker = master, 0, None  # lost: lines a full disk took; tracker: Tracker
        if master:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.log = open(Path(run_dir, "log.txt"), "a")
            self.jsonl = open(Path(run_dir, "metrics.jsonl"), "a")

    def __call__(self, msg, console=True):
        if self.master and console:
            print(msg, flush=True)
        if self.master:
            self.write(self.log, msg)

    def metrics(self, d):
        if self.master:
            self.write(self.jsonl, json.dumps(d))
            self.track("scalars", d)

    def track(self, what, *args):  # the tracker's call; a failing tracker is said once and dropped, never the run
        try:
            self.tracker and getattr(self.tracker, what)(*args)
        except Exception as e:
            self(f"warning: tracker={self.tracker.kind} failed ({brief(e)}); it gets nothing more, metrics.jsonl and "
                 "samples/ go on")
            self.tracker = None

    def close(self):  # the tracker's files completed (wandb's run finished)
        self.track("close")
        self.tracker = None

    def write(self, f, line):  # said once, on stderr
        try:
            f.write(line + "\n")
            f.flush()
        except OSError as e:
            if not self.lost:
                print(f"warning: cannot write {f.name} ({e.strerror or e}); training goes on, log lines are lost "
                      "until there is space again", file=sys.stderr, flush=True)
            self.lost += 1


class Tracker:
    """tracker=tensorboard (run_dir/tensorboard) or tracker=wandb (run_dir/wandb; WANDB_MODE=offline needs no network,
    `wandb sync` uploads later): the numbers of every metrics.jsonl row under its names (nested ones as a/b), each
    sample grid with its captions. Rank 0 only. A resume: tensorboard hides the stopped process's rows past the
    checkpoint (purge_step), wandb keeps the run (its id in run_dir/wandb_id) and drops steps it already holds.
    ValueError, one line: a missing package, a wandb that cannot start (not logged in, no network)."""
    def __init__(self, kind, run_dir, config):
        self.kind, self.dir, self.step = kind, Path(run_dir), 0
        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
                self.out = SummaryWriter(self.dir / "tensorboard")
            else:
                import wandb
        except ImportError:
            raise ValueError(f"tracker={kind} needs the {kind} package: pip install {kind}, or tracker=none") from None
        if kind == "wandb":
            ids = self.dir / "wandb_id"
            run_id = ids.read_text().strip() if ids.exists() else os.urandom(8).hex()
            ids.write_text(run_id)
            try:
                self.out = wandb.init(dir=self.dir, project=os.environ.get("WANDB_PROJECT", "prx-speedrun"),
                                      name=self.dir.name, id=run_id, resume="allow", config=config)
            except Exception as e:
                raise ValueError(f"tracker=wandb cannot start ({brief(e)}); run wandb login, or set WANDB_MODE=offline "
                                 "(no network; wandb sync uploads later), or tracker=none") from None

    def scalars(self, row):  # a metrics.jsonl row
        if "resumed_from" in row:  # a resume's marker, no figures
            if self.kind == "tensorboard":  # the stopped process's rows past the checkpoint: hidden, written again
                from torch.utils.tensorboard import SummaryWriter
                self.out.close()
                self.out = SummaryWriter(self.dir / "tensorboard", purge_step=row["resumed_from"] + 1)
            return
        self.step = row.get("step", self.step)
        flat = numbers({k: v for k, v in row.items() if k != "step"})
        if self.kind == "tensorboard":
            for k, v in flat.items():
                self.out.add_scalar(k, v, self.step)
            self.out.flush()
        else:
            self.out.log(flat, step=self.step)

    def images(self, tag, u8, captions, grid):  # u8 (B, H, W, 3), their captions (or None), the grid's PNG file
        if self.kind == "tensorboard":
            from PIL import Image
            self.out.add_image(tag, np.asarray(Image.open(grid).convert("RGB")), self.step, dataformats="HWC")
            if captions:
                self.out.add_text(tag, "\n\n".join(f"{i}: {c}" for i, c in enumerate(captions)), self.step)
            self.out.flush()
        else:
            import wandb
            self.out.log({tag: [wandb.Image(x, caption=c) for x, c in zip(u8, captions or [None] * len(u8))]},
                         step=self.step)

    def close(self):
        if self.kind == "tensorboard":
            self.out.close()
        else:
            self.out.finish()


def numbers(row, prefix=""):  # {"a": 1, "b": {"c": 2.0}, "d": "x"} -> {"a": 1, "b/c": 2.0}
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[prefix + k] = v
    return out


def read_metrics(run_dir):
    """metrics.jsonl as one history: at each {"resumed_from": step} row (a resume) the rows that the stopped process
    wrote for later steps are dropped, since the resumed one writes them again -> [row], markers left out."""
    rows = []
    for line in Path(run_dir, "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill or a full disk
            continue
        if "resumed_from" in row:
            rows = [r for r in rows if r.get("step", 0) <= row["resumed_from"]]
        else:
            rows.append(row)
    return rows


def lock_run_dir(run_dir):
    """An exclusive lock on run_dir/.lock for this process's life, its holder written in it -> the file descriptor
    (keep it open). A POSIX lock: the kernel drops it when the process dies (no stale lock after SIGKILL), loading
    workers do not inherit it, and network file systems (NFS) share it between nodes. ValueError naming the holder."""
    fd = os.open(Path(run_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ValueError(f"run_dir {run_dir} is in use by another run ({holder}); wait for it to end or stop it, or "
                         "set run_dir to another folder") from None
    try:  # who holds it, for the message above; the lock holds without it (a full disk)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {platform.node()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
                  .encode(), 0)
    except OSError:
        pass
    return fd


def open_log(run_dir, token, master, group=None, tracker=("none", None)):
    """run_dir made and locked (lock_run_dir) and its log and tracker (kind, config) opened by rank 0, and seen by every
    rank (group: gloo, under torchrun): else rank 0 would rename checkpoint folders that lack the other nodes' shards.
    -> Logger; ValueError, one line, on every rank."""
    probe, err, log = Path(run_dir, "ckpt", f".probe{token}.tmp"), None, None
    try:  # rank 0 locks, opens log.txt and writes a probe file in ckpt/, which every rank must then see
        if master:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            lock = lock_run_dir(run_dir)
        log = Logger(run_dir, master)
        if master:
            log.lock = lock  # held as long as the log
            probe.parent.mkdir(exist_ok=True)
            probe.touch()
            log.tracker = None if tracker[0] == "none" else Tracker(tracker[0], run_dir, tracker[1])
    except OSError as e:
        err = f"run_dir {run_dir} is not writable ({e.strerror}: {e.filename}); set run_dir to another folder"
    except ValueError as e:
        err = str(e)
    if dist.is_initialized():
        err = on_master(lambda: err)
    if err:
        raise ValueError(err)
    if dist.is_initialized():
        dist.barrier(group=group)
        seen = torch.tensor(float(probe.exists()))
        dist.all_reduce(seen, op=dist.ReduceOp.MIN, group=group)
        if not seen:
            raise ValueError(f"run_dir {run_dir} must be on a file system every node sees (a rank does not see rank "
                             "0's files); put it on shared storage")
    if master:
        probe.unlink()
    return log


def describe_run(log, source, config, demo, device, world):
    """The head of the log: the trainer's source, the versions, the hardware and the config."""
    log("=" * 100 + "\n" + Path(source).read_text() + "\n" + "=" * 100, console=False)
    if demo:  # the first line on the console
        log("preset cpu: the built-in CPU demo (no CUDA device, or preset=cpu). Its text, DINOv3 and DINOv2 "
            "encoders are tiny RANDOM models and LPIPS uses a random VGG: this shows the pipeline at toy scale, "
            "not the real recipe's quality.")
    import transformers
    log(f"python {platform.python_version()} torch {torch.__version__} transformers {transformers.__version__} "
        f"host {platform.node()} world {world} device {device}")
    if torch.cuda.is_available():
        try:
            log(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout, console=False)
        except (OSError, subprocess.SubprocessError):
            log("nvidia-smi unavailable")
    else:
        log(f"cpu: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    log("config: " + json.dumps(config))


def to_uint8(images):  # (B, 3, H, W) in [-1, 1] -> numpy (B, H, W, 3) uint8
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


GRID_BORDER = 128  # grey 2-px tile borders: seen on white and on black images
CAPTION_MIN_W = 128  # with captions, narrower tiles are enlarged (nearest, by an integer factor) to fit the text
CAPTION_LINES = 3  # a caption's lines under its tile at most (the rest cut, "...")


def wrap(text, font, width, max_lines):  # text -> lines of at most `width` px in `font`, words kept whole if they fit
    lines = []
    for word in text.split():
        while font.getlength(word) > width:  # a word wider than the tile: cut
            cut = 1
            while font.getlength(word[:cut + 1]) <= width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        elif word:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and font.getlength(lines[-1] + "...") > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "..."
    return lines


def save_grid(images, path, nrow, captions=None):
    """images (B, 3, H, W) in [-1, 1] -> a PNG grid of nrow columns with 2-px grey borders; captions: each image's,
    written under it (tiles under CAPTION_MIN_W px wide enlarged to fit it)."""
    from PIL import Image, ImageDraw, ImageFont
    x = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)
    if captions:
        f = -(-CAPTION_MIN_W // x.shape[-1])
        x = x.repeat_interleave(f, 2).repeat_interleave(f, 3)
    B, _, H, W = x.shape
    font = ImageFont.load_default()
    lines = [wrap(c or "", font, W - 4, CAPTION_LINES) for c in captions] if captions else [[]] * B
    line_h = font.getbbox("Ag")[3] + 2
    strip = CAPTION_LINES * line_h + 4 if captions else 0  # the caption's white strip under each tile
    ncol = min(nrow, B)
    grid = torch.full((3, math.ceil(B / ncol) * (H + strip + 2) + 2, ncol * (W + 2) + 2), GRID_BORDER,
                      dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, ncol)
        top, left = 2 + r * (H + strip + 2), 2 + c * (W + 2)
        grid[:, top:top + H, left:left + W] = x[i]
        grid[:, top + H:top + H + strip, left:left + W] = 255
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(lines):
        r, c = divmod(i, ncol)
        for j, line in enumerate(text):
            draw.text((4 + c * (W + 2), 4 + r * (H + strip + 2) + H + j * line_h), line, fill=(0, 0, 0), font=font)
    img.save(path)


def write_grid(imgs, path, nrow, log, captions=None):  # a full disk costs the picture, never the run
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            path.parent.mkdir(exist_ok=True)
            save_grid(imgs, path, nrow, captions)
            log(f"samples: {path}")
        except OSError as e:
            log(f"samples: {path} not written ({e.strerror or e}); training goes on")
            return
        log.track("images", "samples" if path.stem.startswith("step") else path.stem, to_uint8(imgs), captions, path)


def all_ranks(obj):  # every rank's obj, in rank order
    out = [obj] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(out, obj)
    return out


def bad_row_counts(here, before):  # bad rows met by cause, summed over ranks, with those before a resume
    seen = all_ranks(here) + [before]
    return {c: sum(b.get(c, 0) for b in seen) for c in sorted(set().union(*seen))}


def last_checkpoint(run_dir):
    return ([str(p) for p in sorted(Path(run_dir, "ckpt").glob("step*"))] or ["none"])[-1]


def on_master(fn, *args):  # fn(*args) on rank 0 only (it writes files); every rank gets its result
    out = [fn(*args) if not dist.is_initialized() or dist.get_rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(out, 0)
    return out[0]


def save_atomic(write, path, keep):
    """write(tmp) writes a checkpoint (file or folder) that becomes `path` once complete; then only the newest `keep`
    step* checkpoints are kept (0: all). On any error (a full disk) the temporary is removed, the older checkpoints
    stay as they were, and the error comes back as one line."""
    tmp = path.with_name(f".{path.name}.tmp")
    rm = lambda p: shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        rm(tmp)
        return f"{type(e).__name__}: {e}"
    older = sorted(p for p in path.parent.glob("step*") if p != path)
    for p in (older[:max(0, len(older) - keep + 1)] if keep else []) + list(path.parent.glob(".*.tmp")):
        rm(p)  # and temporaries left by a process killed while writing


def write_checkpoint(path, modules, optimizers, files, keep):
    """A checkpoint folder `path`: the sharded state of `modules` and `optimizers` via torch.distributed.checkpoint
    (each rank writes its shards; it loads on any world size) and, from rank 0, files {name: object} (torch.save).
    Written to .<name>.tmp, synced and renamed: complete or absent; then the newest `keep` are kept (save_atomic).
    Collective. -> None, or the error as one line (on every rank)."""
    tmp, err, master = path.with_name(f".{path.name}.tmp"), None, not dist.is_initialized() or dist.get_rank() == 0
    if master:  # the remains of a save that crashed; DCP makes the folder (an error there is caught below)
        shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    model, optim = get_state_dict(modules, optimizers)
    try:  # every rank writes its shards into tmp
        dcp.save(dict(model=model, optim=optim), checkpoint_id=tmp, no_dist=not dist.is_initialized())
    except (Exception, dcp.CheckpointException) as e:  # a full disk (DCP raises on every rank; no Exception)
        err = brief(e, 200)

    def finish(tmp):  # rank 0 adds the files; on disk before the rename makes them the checkpoint
        for name, obj in files.items():
            torch.save(obj, tmp / name)
        for f in [tmp / name for name in files] + [tmp]:  # (DCP syncs its own; a folder's fsync writes its entries)
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)  # only where this very step was saved before
    if master:
        err = err or save_atomic(finish, path, keep)
        shutil.rmtree(tmp, ignore_errors=True)
    return on_master(lambda: err)


# A checkpoint is data, never code: every file of one is read by an unpickler that builds tensors and plain Python
# values only (torch's weights_only; DCP's index by an allowlist of its own record types), so a shared checkpoint
# cannot run anything when loaded. One that is not plain data is refused, not passed over as damaged.

class NotPlainData(ValueError):
    pass


def refused(path, e):  # -> NotPlainData naming the file and what its pickle asked for
    what = re.search(r"GLOBAL (\S+)", str(e))
    return NotPlainData(f"{path} is not plain data: loading it would call {what.group(1) if what else 'code'}; "
                        "refused (load only checkpoints from a source you trust, or move this one away)")


def architecture_error(cks, arch):
    """The newest readable checkpoint of `cks` (oldest first) against `arch` ({constant: value}) -> one line, or None
    (also when none is readable: loading names those)."""
    for path in reversed(cks):
        try:
            saved = load_plain(path / "extra.pt")["config"]
        except NotPlainData as e:
            return str(e)
        except Exception:
            continue
        diff = "; ".join(f"{k}={saved.get(k)}, not {v}" for k, v in arch.items() if saved.get(k) != v)
        return f"{path} is a checkpoint of another architecture ({diff}); use a new run_dir" if diff else None
    return None


def load_plain(path):  # torch.load of tensors and plain values only -> the object; NotPlainData, or the load's error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a torch.save file (zip) asking for a global; garbage is damage
        if "Unsupported global" in str(e) and zipfile.is_zipfile(path):
            raise refused(path, e) from None
        raise


class PlainIndex(pickle.Unpickler):  # DCP's .metadata: its record types, paths, sizes and dtypes, nothing else
    SAFE = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
            ("pathlib", "WindowsPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module, name):
        obj = getattr(sys.modules.get(module), name, None) if "." not in name else None
        if not ((module, name) in self.SAFE or module == "torch" and isinstance(obj, torch.dtype) or
                module == "torch.distributed.checkpoint.metadata" and getattr(obj, "__module__", None) == module):
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        return super().find_class(module, name)


def check_index(folder):  # DCP's index of a checkpoint folder read as plain data first: NotPlainData, or its error
    path = Path(folder, ".metadata")
    try:
        with open(path, "rb") as f:
            PlainIndex(f).load()
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise refused(path, e) from None
        raise


class PlainPlanner(DefaultLoadPlanner):  # DCP's non-tensor items (optimizer settings) checked as plain data first
    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def load_bytes(self, read_item, value):
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise refused(f"{read_item.dest_index.fqn} of {self.folder}", e) from None
        value.seek(0)
        super().load_bytes(read_item, value)


# the trainer's architecture constants as diffusers' PRXTransformer2DModel names them: init= reads a diffusers config
# with it, sample.py's export writes one
DIFFUSERS_ARCH = dict(hidden="hidden_size", depth="depth", heads="num_heads", mlp_ratio="mlp_ratio",
                      patch="patch_size", bottleneck="bottleneck_size", text_dim="context_in_dim")


def read_init(path, arch):
    """init=PATH, the DiT's weights to start from, read as plain data -> a state dict on the CPU. PATH: a checkpoint
    folder of ours (its ema.pt: the EMA weights), a run folder (its newest checkpoint), or a diffusers
    PRXTransformer2DModel folder (config.json and safetensors only; a pipeline folder's transformer/). Its
    architecture must be `arch` ({constant: value}); else ValueError, one line."""
    p = Path(path)
    p = p / "transformer" if (p / "transformer" / "config.json").is_file() else p
    if (p / "config.json").is_file():
        from safetensors.torch import load_file
        config, files = json.loads((p / "config.json").read_text()), sorted(p.glob("*.safetensors"))
        if not files:
            raise ValueError(f"init {p} has a config.json but no safetensors weights; export it again")
        have, sd = {k: config.get(v) for k, v in DIFFUSERS_ARCH.items()}, {}
        for f in files:  # one file, or the shards of a large model
            sd.update(load_file(f))
    else:
        cks = [p] if (p / "ema.pt").is_file() else sorted(c.parent for c in p.glob("ckpt/step*/ema.pt"))
        if not cks:
            raise ValueError(f"init {path} holds no checkpoint (ema.pt, ckpt/step*/ema.pt) and no diffusers "
                             "config.json; give a run, checkpoint or diffusers PRXTransformer2DModel folder")
        ck = load_plain(cks[-1] / "ema.pt")
        have, sd = {k: ck["config"].get(k) for k in arch}, ck["ema"]
    diff = [f"{k}={have.get(k)}, not {v}" for k, v in arch.items() if have.get(k) != v]
    if diff:
        raise ValueError(f"init {path} is a model of another architecture ({'; '.join(diff)}); set these constants "
                         "to its values")
    return sd


def rng_states(device):  # this process's RNG states, as tensors and plain values
    key, state, *rest = np.random.get_state()
    return dict(torch=torch.get_rng_state(), numpy=[key, torch.from_numpy(state.astype(np.int64)), *rest],
                python=random.getstate(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_states(rng, device):
    torch.set_rng_state(rng["torch"].cpu())
    key, state, *rest = rng["numpy"]
    np.random.set_state((key, state.numpy().astype(np.uint32), *rest))
    random.setstate(rng["python"])
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)


def load_full_state(module, sd):  # a full state dict into a module, FSDP-sharded (each rank keeps its rows) or not
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor
    if not any(isinstance(p, DTensor) for p in module.parameters()):
        return module.load_state_dict(sd)
    set_model_state_dict(module, dict(sd), options=StateDictOptions(full_state_dict=True))  # (it rewrites the dict)


def read_checkpoint(paths, modules, optimizers, apply, warn):
    """The newest loadable checkpoint of `paths` (oldest first) into `modules` and `optimizers` (resharded to this
    run's world size), then apply({file name: object}) of its other files (read on the CPU) -> (its path, those
    files), or (None, None) when none loads. One with any damaged file is passed over with warn(line): the one
    before is loaded over what it filled in. One that is not plain data: NotPlainData."""
    logging.disable(logging.WARNING)  # DCP logs a traceback per unreadable file: the warning is one line
    try:
        for path in reversed(paths):
            try:
                files = {f.name: load_plain(f) for f in sorted(path.glob("*.pt"))}
                model, optim = get_state_dict(modules, optimizers)  # this run's layout, filled in place
                sd = dict(model=model, optim=optim)
                check_index(path)
                dcp.load(sd, checkpoint_id=path, planner=PlainPlanner(path), no_dist=not dist.is_initialized())
                set_state_dict(modules, optimizers, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
                apply(files)
                return path, files
            except (Exception, dcp.CheckpointException) as e:  # the latter is no Exception
                inner = next(iter(e.failures.values()))[0] if isinstance(e, dcp.CheckpointException) else e
                if isinstance(inner, NotPlainData):
                    raise inner from None
                warn(f"warning: checkpoint {path} is unreadable ({brief(e, 120)}); trying the one before")
    finally:
        logging.disable(logging.NOTSET)
    return None, None


# ----------------------------------------------------------------------------------------------------------------
# Constants, paths, kernels

def fit_micro_batches(stages, world):
    """A stage whose batch gives each of the `world` devices fewer images than its micro-batch (torchrun on the CPU
    demo: 64 images on 2 processes, micro-batch 64) gets that share as its micro-batch: the global batch, and so the
    losses, stay the same. -> the lines that say so; ValueError, one line, for a batch the devices cannot split."""
    notes = []
    for i, st in enumerate(stages, 1):
        share = st.batch // world
        if st.batch % world == 0 and 0 < share < st.micro_batch:
            notes.append(f"stage{i}.micro_batch {st.micro_batch} lowered to {share}: a batch of {st.batch} gives "
                         f"each of {world} devices {share} images (the same global batch)")
            st.micro_batch = share
        if st.batch % (world * st.micro_batch):
            raise ValueError(f"stage{i}.batch={st.batch} is not divisible by world size {world} x micro_batch "
                             f"{st.micro_batch}; change stage{i}.micro_batch")
    return notes


def converted_res(folder):  # the resolution data_prep.py hf converted a folder at (its meta.json), or None
    try:
        return int(json.loads(Path(folder, "meta.json").read_text())["res"])
    except (OSError, ValueError, KeyError, TypeError):  # no meta.json (the shapes data, shards of one's own)
        return None


def check_paths(hp, demo_data):
    """The trainer's data and encoder folders that do not exist (an encoder may also be a hub id, org/name), before any
    model is built: ValueError, one line. demo_data: the CPU demo's folder, made by data_prep.py shapes."""
    for name, d in [("data", hp.data)] + [(f"stage{i}.data", st.data) for i, st in enumerate(hp.stages, 1) if st.data]:
        if not (hp.bench or Path(d).is_dir()):
            fix = "render the demo's data with python data_prep.py shapes" if hp.preset == "cpu" and d == demo_data \
                else f"create it with data_prep.py or set {name}=PATH"
            raise ValueError(f"{name} folder {d} does not exist; {fix}")
    missing = [n for n in ("seen", "heldout", "two") if not Path(hp.data, f"prompts_{n}.txt").is_file()]
    if hp.preset == "cpu" and not hp.bench and missing:  # its vocabulary, sample grid and score
        raise ValueError(f"{hp.data}/prompts_{missing[0]}.txt is missing: preset=cpu (the shapes demo) needs the "
                         "prompt files of data_prep.py's shapes data; set data to such a folder, or preset=record")
    if hp.tracker not in ("none", "tensorboard", "wandb"):
        raise ValueError(f"tracker must be none, tensorboard or wandb, got {hp.tracker!r}")
    try:
        prompts = grid_prompts(hp, None) if hp.sample_prompts else True
    except (OSError, ValueError):  # a missing file, a folder, not text
        prompts = None
    if not prompts:
        raise ValueError(f"sample_prompts={hp.sample_prompts} is not a file of prompts (one per line); fix the path, "
                         "or sample_prompts= for the built-in grid")
    for name in ("text_encoder", "repa_encoder", "pdino_encoder"):
        p = getattr(hp, name)
        hub_id = p.count("/") == 1 and not p.startswith((".", "/", "~"))
        if p and not (hp.bench or hub_id or Path(p).exists()):
            raise ValueError(f"{name}={p} is neither a local folder nor a hub id (org/name); set {name}=PATH or ID")


def grid_prompts(hp, default):  # the sample grids' prompts: sample_prompts's lines, the demo's, or `default`
    if hp.sample_prompts:
        return [p for p in Path(hp.sample_prompts).read_text().splitlines() if p.strip()]
    if hp.preset == "cpu" and not hp.bench:  # 4 lines of each prompt file
        return [p for n in ("seen", "heldout", "two") for p in Path(hp.data, f"prompts_{n}.txt").read_text()
                .splitlines()[::15][:4]]
    return default


MIN_DRIVER = {13: 580, 12: 525, 11: 450}  # CUDA major version -> the oldest Linux driver that runs it


def gpu_driver():  # -> (driver version, GPU names) as nvidia-smi reports them, or None: no driver, no GPU
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[c.strip() for c in line.split(",", 1)] for line in out.stdout.splitlines() if "," in line]
    return (rows[0][0], [r[1] for r in rows]) if out.returncode == 0 and rows else None


def cpu_has_bf16(cpuinfo="/proc/cpuinfo"):
    """Has this CPU bf16 instructions (AVX512-BF16, AMX)? Without them its bf16 matmuls run ~25x slower than fp32."""
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:  # not Linux: fp32, the safe choice
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_device(hp, cuda, argv):
    """Without a CUDA device torch can use: a GPU that the driver sees (unless preset=cpu was asked for), and the
    record's model (preset=record with its architecture), are refused. ValueError, one line."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")  # GPUs hidden on purpose
    seen = None if cuda or hidden or "preset=cpu" in argv else gpu_driver()
    if seen:
        driver, names = seen
        need = MIN_DRIVER.get(int(torch.version.cuda.split(".")[0])) if torch.version.cuda else None
        why = "it is a CPU-only build" if not torch.version.cuda else f"it is built for CUDA {torch.version.cuda}" + (
            f", which needs driver >= {need}" if need and int(driver.split(".")[0]) < need else "")
        raise ValueError(f"the NVIDIA driver {driver} sees {len(names)} GPU(s) ({names[0]}) but torch "
                         f"{torch.__version__} cannot use them: {why}; install the torch build for your driver's CUDA "
                         "(README: older NVIDIA drivers) or update the driver; preset=cpu runs the CPU demo")
    record = type(hp)()  # the record preset's defaults
    if not cuda and hp.preset == "record" and (hp.hidden, hp.depth) == (record.hidden, record.depth):
        raise ValueError("preset=record trains the record's 1.2B-parameter model, which needs a CUDA device, and torch "
                         "sees none; run the CPU demo (no preset), or shrink the model (hidden=, depth=) to run the "
                         "record's code path on the CPU")


def parse_constants(argv, cls, stage_cls, presets, preset):
    """name=value overrides of the dataclass `cls` under a preset (preset=NAME picks another; stageK.name sets a field
    of stage K; stages=N keeps the first N) -> an instance. --help prints the constants. ValueError, one line."""
    if "--help" in argv or "-h" in argv:
        try:
            print(constants_help(cls, stage_cls, presets), flush=True)
        except BrokenPipeError:  # | head: the rest unread, no traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    for a in argv:
        if "=" not in a:
            raise ValueError(f"expected name=value (--help lists the constants), got {a!r}")
    pairs = [a.split("=", 1) for a in argv]
    preset = dict(pairs).get("preset", preset)
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(presets)}")
    hp = cls(**copy.deepcopy(presets[preset]))
    hp.preset = preset
    names = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "stages"}
    stage_names = [f.name for f in dataclasses.fields(stage_cls)]
    for name, text in pairs:
        head, _, key = name.partition(".")
        if name == "stages":
            n = convert(text, int, name)
            if not 1 <= n <= len(hp.stages):
                raise ValueError(f"stages must be in 1..{len(hp.stages)}, got {n}")
            hp.stages = hp.stages[:n]
        elif head.startswith("stage") and key:  # stage1.steps=100
            k = head[len("stage"):]
            if not k.isdigit() or not 1 <= int(k) <= len(hp.stages) or key not in stage_names:
                raise ValueError(f"unknown constant {name!r}; stage constants are stageK.{{{','.join(stage_names)}}}"
                                 f" with K in 1..{len(hp.stages)}")
            setattr(hp.stages[int(k) - 1], key, convert(text, type(getattr(hp.stages[int(k) - 1], key)), name))
        elif name in names:
            setattr(hp, name, convert(text, names[name], name))
        else:
            valid = ", ".join(list(names) + ["stages", "stageK.(" + ",".join(stage_names) + ")"])
            raise ValueError(f"unknown constant {name!r}; valid names: {valid}")
    return hp


def check_config(hp):
    """The trainer's constants (a Hyperparameters): impossible values and combinations, caught before any model is
    built -> ValueError, one line."""
    def need(ok, msg):
        if not ok:
            raise ValueError(msg)
    for f in dataclasses.fields(hp):  # nan would pass every range below; inf is allowed where it means something
        v = getattr(hp, f.name)
        need(f.type is not float or math.isfinite(v) or f.name == "grad_clip" and v == math.inf,
             f"{f.name} must be a finite number, got {v}")
    for bound, names in ((1, ("hidden", "depth", "heads", "patch", "bottleneck", "text_dim", "text_len", "log_every",
                              "ema_every", "sample_steps", "eval_n", "max_bad_steps", "pdino_res", "bench_devices",
                              "last_rolls")),
                         (0, ("sample_every", "ckpt_every", "bench", "num_workers", "warmup", "eval_every",
                              "shard_size", "keep_ckpts", "time_limit", "repa_weight", "lpips_weight", "pdino_weight",
                              "cfg", "restarts", "grid_shift", "text_keep"))):
        for name in names:
            need(getattr(hp, name) >= bound, f"{name} must be >= {bound}, got {getattr(hp, name)}")
    for name in ("lr", "grad_clip", "t_shift", "mlp_ratio", "peak_tflops"):
        need(getattr(hp, name) > 0, f"{name} must be > 0, got {getattr(hp, name)}")
    for name, ok in (("resume", ("auto", "off")), ("stage_switch", ("carry", "reset", "reset_ema"))):
        need(getattr(hp, name) in ok, f"{name} must be one of {', '.join(ok)}, got {getattr(hp, name)!r}")
    for name in ("t_min_div", "loss_t_min"):
        need(0 < getattr(hp, name) < 1, f"{name} must be in (0, 1), got {getattr(hp, name)}")
    need(all(0 <= x <= 1 for x in (hp.cooldown, hp.caption_dropout, hp.uniform_t, hp.ema_decay)),
         "cooldown, caption_dropout, uniform_t and ema_decay must lie in [0, 1]")
    need(0 <= hp.eta <= 1 and 0 <= hp.eta_lo <= 1, f"eta and eta_lo must lie in [0, 1], got {hp.eta}, {hp.eta_lo}")
    need(hp.hidden % hp.heads == 0 and (hp.hidden // hp.heads) % 4 == 0,
         f"hidden={hp.hidden} must split into heads={hp.heads} of a size divisible by 4 (2-D RoPE)")
    need(0 <= hp.tread_frac < 1, f"tread_frac must be in [0, 1), got {hp.tread_frac}")
    need(hp.tread_frac == 0 or 0 <= hp.tread_start <= hp.tread_end < hp.depth,
         f"TREAD blocks {hp.tread_start}..{hp.tread_end} must lie within 0..{hp.depth - 1}")
    need(hp.repa_weight == 0 or 0 <= hp.repa_block < hp.depth,
         f"repa_block={hp.repa_block} is beyond the model's depth {hp.depth}")
    need(0 <= hp.cfg_lo <= hp.cfg_hi <= 1,
         f"the guidance interval needs 0 <= cfg_lo <= cfg_hi <= 1, got [{hp.cfg_lo}, {hp.cfg_hi}]")
    need(0 <= hp.restart_lo < hp.restart_hi <= 1,
         f"restarts need 0 <= restart_lo < restart_hi <= 1, got [{hp.restart_lo}, {hp.restart_hi}]")
    need(hp.last_rolls == 1 or hp.grid_shift > 0, f"last_rolls={hp.last_rolls} needs grid_shift > 0 (or last_rolls=1)")
    need(hp.aspect_max >= 1, f"aspect_max must be >= 1 (1: square crops only), got {hp.aspect_max}")
    need(0 < hp.perc_frac <= 1, f"perc_frac must be in (0, 1], got {hp.perc_frac}")
    need(hp.pdino_weight == 0 or hp.pdino_res >= 14,
         f"pdino_res={hp.pdino_res} is less than one 14-px DINOv2 patch; set pdino_res=224 or pdino_weight=0")
    for i, st in enumerate(hp.stages, 1):
        need(st.res >= hp.patch and st.res % hp.patch == 0, f"stage{i}.res={st.res} is not divisible by "
             f"patch={hp.patch}")
        need(st.batch >= 1 and st.micro_batch >= 1 and st.batch % st.micro_batch == 0,
             f"stage{i}.batch={st.batch} must be a positive multiple of stage{i}.micro_batch={st.micro_batch}")
        need(st.steps >= 1, f"stage{i}.steps must be >= 1, got {st.steps}")
        side = min(min(b) for b in aspect_buckets(st.res, hp.patch, hp.aspect_max))  # VGG halves it 4 times
        need(hp.lpips_weight == 0 or side >= 32, f"lpips_weight>0 needs images of 32 px a side or more, but "
             f"stage{i}'s aspect buckets have {side}-px sides; raise stage{i}.res, set aspect_max=1 or lpips_weight=0")
    block_set(hp.recompute, hp.depth)
    need(hp.sdpa and set(hp.sdpa.split(",")) <= {"flash", "efficient", "cudnn", "math"},
         f"sdpa={hp.sdpa!r}: list kernels from flash, efficient, cudnn, math, e.g. cudnn,efficient")


def constants_help(cls, stage_cls, presets):
    """--help: every constant as name=default with its comment (read from the dataclasses' source), each preset's
    changes and stages."""
    import inspect

    def stages(sts):
        return "  ".join(f"stage{k}: " + " ".join(f"{f}={v!r}" for f, v in dataclasses.asdict(st).items())
                         for k, st in enumerate(sts, 1))
    out = [f"usage: {Path(sys.argv[0]).name} [name=value ...]   (stageK.name sets a field of stage K; stages=N keeps "
           "the first N; preset=NAME starts from a preset)", ""]
    for c, prefix, default in ((cls, "", cls()), (stage_cls, "stageK.", None)):
        for line in inspect.getsource(c).splitlines()[2:]:  # after the decorator and the class line
            code, _, comment = line.strip().partition("  # ")
            name = code.split(":")[0].strip()
            if code.startswith("#"):  # a section's title
                out.append(f"  {code}")
            elif name == "stages":
                out.append(f"  {stages(default.stages)}")
            elif ":" in code and name.isidentifier():
                value = repr(getattr(default, name)) if default else "(per stage)"
                out.append((f"  {prefix}{name}={value}".ljust(40) + (f"  # {comment}" if comment else "")).rstrip())
        out.append("")
    for name, changes in presets.items():
        if changes:
            out.append(f"preset={name}: " + ", ".join(f"{k}={v!r}" for k, v in changes.items() if k != "stages") +
                       (f"; {stages(changes['stages'])}" if "stages" in changes else ""))
    return "\n".join(out)


def convert(text, typ, name):
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    if typ is bool and text.lower() not in words:
        raise ValueError(f"{name} expects a bool (1/0/true/false), got {text!r}")
    try:
        return words[text.lower()] if typ is bool else typ(text)
    except ValueError:
        raise ValueError(f"{name} expects {typ.__name__}, got {text!r}") from None


def block_set(spec, depth):  # "0-3,7" -> {0, 1, 2, 3, 7}; "all" -> every block; ValueError on a bad spec
    try:
        ids = {i for r in spec.replace("all", f"0-{depth - 1}").split(",") if r
               for i in range(int(r.split("-")[0]), int(r.split("-")[-1]) + 1)}
    except ValueError:
        raise ValueError(f"recompute={spec!r} is not a list of blocks like 0-3,7 or all") from None
    if not all(0 <= i < depth for i in ids):
        raise ValueError(f"recompute={spec!r} names blocks outside 0..{depth - 1}; use indices of the {depth} blocks")
    return ids


CPU_EXPLICIT_ATTENTION = True  # False: SDPA on CPU too (the memory tests count what its fused kernels save)


def attention(q, k, v, mask):
    """Attention of q (B, H, N, Dh) over k, v (B, H, L, Dh); mask (B, 1, 1, L) bool (True: attend) or None. On a
    GPU, SDPA (its kernel chosen by attention_backend); on CPU the explicit product, scores and softmax in fp32: at
    the demo's sizes half the time of SDPA's math kernel and a third of its CPU flash kernel (bf16, fwd and bwd)."""
    if q.device.type != "cpu" or not CPU_EXPLICIT_ATTENTION:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = ((q * q.shape[-1] ** -0.5) @ k.mT).float()
    return (scores if mask is None else scores.masked_fill(~mask, -math.inf)).softmax(-1).to(v.dtype) @ v


def attention_backend(device, order="flash,efficient,cudnn,math"):
    """SDPA kernels, tried in this order (the text padding mask rules flash out); on CPU the math kernel, 2x faster
    than the CPU flash kernel at the demo's sizes (the DiT's own attention there is `attention`'s explicit product)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if device.type == "cpu":
        return sdpa_kernel(SDPBackend.MATH)
    kernels = dict(flash=SDPBackend.FLASH_ATTENTION, efficient=SDPBackend.EFFICIENT_ATTENTION,
                   cudnn=SDPBackend.CUDNN_ATTENTION, math=SDPBackend.MATH)
    return sdpa_kernel([kernels[k] for k in order.split(",")], set_priority=True)


def quiet_transformers():  # and two harmless warnings: the REPA projector's output is a view; DCP on one process
    import transformers
    import warnings
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*(returned a view tensor|assuming the intent is to)")


def seed_all(seed):  # torch's, Python's and numpy's global generators
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# Signals and the time limit

STOP = dict(signal=None, scoring=False)  # set by on_signal; read after setup and after every step


def on_signal(signum, frame):  # SIGTERM, SIGINT: a flag; a second one ends the process at once
    STOP["signal"] = signal.Signals(signum).name
    signal.signal(signum, signal.SIG_DFL)
    if STOP["scoring"]:  # after training: stop the scoring now
        raise KeyboardInterrupt


def stop_reason(time_limit, timer, group=None):
    """A signal, or the time_limit would pass within two steps (the host may run one ahead of the device) and a
    checkpoint (timer: t0, the previous call's time, the last checkpoint's seconds). Every step, on the host; under
    torchrun all-reduced over `group` (gloo): all ranks stop after the same step."""
    now = time.monotonic()
    step_s = now - timer["tick"]
    timer["tick"] = now
    late = time_limit > 0 and now + 2 * step_s + timer["ckpt_s"] > timer["t0"] + time_limit
    flags = torch.tensor([STOP["signal"] is not None, late], dtype=torch.float32)
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return (STOP["signal"] or "signal") if flags[0] else "time_limit" if flags[1] else None


# ----------------------------------------------------------------------------------------------------------------
# The bench: synthetic batches, one line per stage; the analytic FLOPs of a step (also the log's mfu and ETAs)

SHAPES_TARGETS = dict(seen=0.95, heldout=0.90, two=0.85)  # the CPU demo's targets, fully right (docs/demo.md)


def log_end(log, hp, run_dir, ckpt, scores=None):
    """The end of a finished run: its final checkpoint, the demo's shapes scores next to their targets, and the
    commands that come next (samples, a diffusers pipeline)."""
    log(f"final checkpoint: {ckpt}")
    for name, target in SHAPES_TARGETS.items() if scores else ():
        full = scores[name]["full"]
        log(f"shapes {name}: {full:.3f} fully right, target {target:.2f}: {'met' if full >= target else 'missed'}")
    example = f"--prompts {hp.data}/prompts_heldout.txt --score" if hp.preset == "cpu" else '--prompt "a red fox"'
    log(f"next: python sample.py --ckpt {run_dir} {example} --out {run_dir}/sampled   # images\n"
        f"      python sample.py --ckpt {run_dir} --export-diffusers {run_dir}/diffusers   # a diffusers pipeline")


def etas(stages, k, state, start, loop, costs):
    """Seconds left in stage k and in the run, for the step lines: this stage's measured seconds per step (training
    clock since `start` = (train_time, timed_steps) at the stage's start), scaled to later stages by `costs` (a step's
    FLOPs per stage), plus the overheads measured in this process per step (wall-clock beyond the training clock since
    `loop` = (monotonic time, train_time, step) at the loop's start: logging, samples, checkpoints, evaluations,
    waits for data). -> "eta_stage:… eta_run:…"."""
    n = state.timed_steps - start[1]
    if not n:
        return "eta_stage:n/a eta_run:n/a"
    per = (state.train_time - start[0]) / n
    over = max(0.0, time.monotonic() - loop[0] - state.train_time + loop[1]) / max(1, state.step - loop[2])
    left = sum(st.steps for st in stages[:k + 1]) - state.step
    stage_s = left * (per + over)
    run_s = stage_s + sum(st.steps * (per * c / costs[k] + over) for st, c in zip(stages[k + 1:], costs[k + 1:]))
    hms = [f"{int(x // 3600)}h{int(x % 3600 // 60):02d}m" if x >= 60 else f"{x:.0f}s" for x in (stage_s, run_s)]
    return f"eta_stage:{hms[0]} eta_run:{hms[1]}"


BENCH_CAPTION_TOKENS = (130, 60)  # the bench's caption lengths: mean and spread of a normal (clipped to 1..text_len)


def expected_text_len(hp, stage, world, batches=64):
    """The mean padded text length of a stage's micro-batches on `world` devices, for captions of
    BENCH_CAPTION_TOKENS: each micro-batch padded to its longest caption (text_pad_len), the global batch dealt by
    length first with text_sort (deal_by_length), as the loader does. The time budget counts the DiT's text at it."""
    g = torch.Generator().manual_seed(0)
    micro = min(stage.micro_batch, stage.batch // world)
    out = []
    for _ in range(batches):
        n = torch.normal(*map(float, BENCH_CAPTION_TOKENS), (stage.batch,), generator=g).round().clamp(1, hp.text_len)
        n = n[deal_by_length(n, world)] if hp.text_sort else n
        out += [text_pad_len(int(n[i:i + micro].max()), hp.text_len) for i in range(0, stage.batch, micro)]
    return sum(out) / len(out)


def dit_train_flops(hp, res, repa_dim=0):
    """Analytic FLOPs of one training step per image of the trainer's PRXDiT (the REPA projector's too when
    repa_dim > 0), for the log's mfu, its ETAs and the bench: 2 per multiply-add; backward twice the forward (no
    input gradient for the first layer of each input path), attention's 2.5 times. Tested against FlopCounterMode."""
    D, L, P, Bn = hp.hidden, hp.text_len, 3 * hp.patch ** 2, hp.bottleneck
    F_ = int(D * hp.mlp_ratio)
    N = (res // hp.patch) ** 2
    K = N - round(N * hp.tread_frac)  # tokens inside the routed blocks
    routed = lambda i: hp.tread_frac > 0 and hp.tread_start <= i <= hp.tread_end
    lin = 2 * N * (P * Bn + Bn * D) + 2 * L * hp.text_dim * D + 2 * (256 * D + D * D)  # img_in, txt_in, time_in
    lin += 2 * N * D * P + 2 * D * 2 * D  # final layer and its adaLN
    attn = 0
    for i in range(hp.depth):
        n = K if routed(i) else N
        lin += 2 * n * D * 3 * D + 2 * L * D * 2 * D + 2 * n * D * D  # img qkv, text kv, out
        lin += 2 * n * D * 2 * F_ + 2 * n * F_ * D + 2 * D * 6 * D  # gate + up, down, modulation
        attn += 4 * n * (L + n) * D  # QK^T and AV over [text; image] keys
    if repa_dim:
        n = K if routed(hp.repa_block) else N
        lin += 2 * n * (D * repa_dim + 2 * repa_dim * repa_dim)
    no_input_grad = 2 * N * P * Bn + 2 * L * hp.text_dim * D + 2 * 256 * D
    return 3 * lin - no_input_grad + 3.5 * attn


def bench_stages(hp, world):
    """The bench's stages: each device does its share of the global batch on hp.bench_devices devices (its
    accumulation, optimizer and EMA cadence), for N + 2 steps: the first two (one per aspect bucket) compile."""
    share = [max(st.micro_batch, st.batch // hp.bench_devices) * world for st in hp.stages]
    return [dataclasses.replace(st, steps=hp.bench + 2, batch=b) for st, b in zip(hp.stages, share)]


def synthetic_batches(stage, hp, world, buckets, repa_dim=0):
    """The bench's micro-batches (images, captions, text, REPA targets, slots), forever: random images, global batches
    alternating between the squarest and the most elongated of `buckets` (w, h); random text embeddings of caption
    lengths drawn around BENCH_CAPTION_TOKENS for the global batch of hp.bench_devices devices, dealt by length as the
    loader deals them (text_sort; rank 0's share) and padded as it pads (unpack_text_emb); random repa_dim-wide REPA
    targets as repa/ gives them (none with repa_online=1 or repa_dim=0: computed in the step); pinned on a GPU host.
    It also starts the device's peak-memory count of the stage."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    B = min(stage.micro_batch, stage.batch // world)
    pin = (lambda t: t.pin_memory()) if torch.cuda.is_available() else (lambda t: t)
    share = stage.batch // world  # one device's share of the global batch on bench_devices devices
    cycle = []
    for w, h in (min(buckets, key=lambda b: abs(math.log(b[0] / b[1]))), buckets[0]):
        n_all = torch.normal(*map(float, BENCH_CAPTION_TOKENS), (share * hp.bench_devices,), generator=g)
        n_all = n_all.round().clamp(1, hp.text_len).long()
        mine = deal_by_length(n_all, hp.bench_devices)[:share] if hp.text_sort else range(share)
        for a in range(share // B):  # one global batch of each bucket
            n = n_all[list(mine[a * B:(a + 1) * B])]
            txt, mask = unpack_text_emb([(torch.randn(int(k), hp.text_dim, generator=g).bfloat16().view(
                torch.int16).numpy().tobytes(), int(k)) for k in n], hp.text_len, hp.text_dim)
            imgs = torch.randint(0, 256, (B, 3, h, w), dtype=torch.uint8, generator=g)
            tokens = (h // hp.patch) * (w // hp.patch)
            targets = pin(torch.randn(B, tokens * repa_dim, generator=g).bfloat16()) \
                if repa_dim and not hp.repa_online else None
            cycle.append((pin(imgs), None, (pin(txt), pin(mask)), targets, pin(torch.arange(a * B, (a + 1) * B))))
    return itertools.cycle(cycle)


def log_bench(stage, k, hp, env, state, start, step_flops, log, hours_so_far):
    """The bench line of stage k; its hours on one device appended to hours_so_far; after the last stage, the
    schedule's projected total."""
    dt = (state.train_time - start[0]) / max(1, state.timed_steps - start[1])  # its timed steps
    ips = stage.batch / dt / env.world  # images per second per device
    tflops = step_flops / stage.batch * ips / 1e12
    hours = hp.stages[k].steps * hp.stages[k].batch / ips / 3600  # the schedule's, not the bench's
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if env.device.type == "cuda" else None
    log(f"bench stage:{k + 1} res:{stage.res} micro_batch:{stage.micro_batch} "
        f"accum:{stage.batch // (env.world * stage.micro_batch)} tread:{hp.tread_frac} "
        f"compile:{int(hp.compile)} step:{dt * 1000:.1f}ms img/s/device:{ips:.1f} dit_tflops/device:{tflops:.2f} "
        f"mfu:{f'{100 * tflops / hp.peak_tflops:.1f}%' if peak else 'n/a'} "
        f"peak_mem:{f'{peak:.1f}GiB' if peak else 'n/a'} stage_hours@{hp.bench_devices}:{hours / hp.bench_devices:.2f}")
    log.metrics(dict(bench=True, stage=k + 1, res=stage.res, step_ms=dt * 1000, img_s=ips, dit_tflops=tflops,
                     peak_mem_gib=peak))
    hours_so_far.append(hours)
    if k == len(hp.stages) - 1:
        total = sum(hours_so_far)
        log(f"bench projected schedule: {total / 8:.2f} h on 8 devices, {total / hp.bench_devices:.2f} h on "
            f"{hp.bench_devices} (DiT and encoders, no data loading or communication)")
