"""Writing one ingest shard: fetch, decode, validate, resize and stack its sites' PNGs, then commit it.

:class:`ShardWriter` is the Ray Data callable class of `rxray ingest`: each actor keeps
its filesystem clients and fetch threads, and for each shard writes the Parquet file
(atomically: temp file + rename locally, one upload on object stores) and then the
``_shards/part-NNNNNN.json`` record that marks it complete, with its rejects and
per-channel histograms. Only one small outcome row per site goes back to the driver.
"""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rxray import layout, storage
from rxray.data import shards

# Small row groups let readers stream a shard without holding all of it (64 rows of
# 6 x 256 x 256 is 25 MB).
ROW_GROUP_ROWS = 64
PARQUET_COMPRESSION = "zstd"
# Parquet's path of the pixel values inside the image column (a tensor extension over large_list<uint8>).
IMAGE_PIXELS_PATH = f"{shards.IMAGE_COLUMN}.list.element"


class SiteRejected(Exception):
    """A site that cannot be ingested; ``path`` is the offending file, ``str()`` the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(reason)
        self.path = path


def decode_channel(data: bytes, path: str) -> np.ndarray:
    """One 8-bit single-channel PNG as a 2-D uint8 array, or SiteRejected saying what is wrong."""
    import cv2

    if not data:
        raise SiteRejected(path, "empty file")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise SiteRejected(path, "cannot decode (corrupt or truncated PNG)")
    if image.ndim != 2:
        raise SiteRejected(path, f"not single-channel (decoded shape {image.shape})")
    if image.dtype != np.uint8:
        raise SiteRejected(path, f"not 8-bit ({image.dtype})")
    return image


def stack_site(channels: list[np.ndarray], paths: list[str], size: int) -> np.ndarray:
    """Six same-sized 2-D channels resized (area interpolation) and stacked to (6, size, size) uint8."""
    import cv2

    height, width = channels[0].shape
    out = np.empty((len(channels), size, size), dtype=np.uint8)
    for index, (channel, path) in enumerate(zip(channels, paths)):
        if channel.shape != (height, width):
            raise SiteRejected(path, f"size {channel.shape[1]}x{channel.shape[0]} differs from "
                                     f"w1's {width}x{height}")
        out[index] = channel if channel.shape == (size, size) else \
            cv2.resize(channel, (size, size), interpolation=cv2.INTER_AREA)
    return out


class ShardWriter:
    """Ray Data callable class: fetch, decode and stack the sites of one shard, then commit it.

    Input batch: ``shard`` (index) and ``sites_ipc`` (the shard's metadata rows as Arrow
    IPC bytes). Output: one row per site with ``site_id``, ``shard`` and ``reason`` ('' when
    written). Filesystem clients and the thread pool are made once per actor.
    """

    def __init__(self, source_fs: pafs.FileSystem, source_root: str, out_fs: pafs.FileSystem, out_root: str,
                 size: int, fetch_threads: int, rename_commit: bool):
        import cv2

        cv2.setNumThreads(1)  # parallelism comes from actors and fetch threads, not OpenCV's own pool
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # bad PNGs become rejects, not noise
        self.source_fs, self.source_root = source_fs, source_root.rstrip("/")
        self.out_fs, self.out_root = out_fs, out_root.rstrip("/")
        self.size = size
        self.rename_commit = rename_commit
        self.pool = ThreadPoolExecutor(max_workers=fetch_threads, thread_name_prefix="fetch")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        site_ids, shard_ids, reasons = [], [], []
        for shard_index, payload in zip(batch["shard"], batch["sites_ipc"]):
            sites = pa.ipc.open_stream(payload).read_all()
            outcome = self.write_shard(int(shard_index), sites)
            site_ids.extend(sites.column("site_id").to_pylist())
            shard_ids.extend([int(shard_index)] * sites.num_rows)
            reasons.extend(outcome)
        return {"site_id": np.array(site_ids, dtype=object), "shard": np.array(shard_ids, dtype=np.int64),
                "reason": np.array(reasons, dtype=object)}

    def load_site(self, experiment: str, plate: int, well: str, site: int) -> np.ndarray:
        """The (6, size, size) image of one site, or SiteRejected."""
        paths = [f"{self.source_root}/{p}" for p in layout.site_image_paths(experiment, plate, well, site)]
        channels = []
        for path in paths:
            try:
                data = storage.with_retries(lambda: self._read(path))
            except FileNotFoundError:
                raise SiteRejected(path, "missing file") from None
            channels.append(decode_channel(data, path))
        return stack_site(channels, paths, self.size)

    def _read(self, path: str) -> bytes:
        with self.source_fs.open_input_stream(path) as handle:
            return handle.read()

    def write_shard(self, index: int, sites: pa.Table) -> list[str]:
        """Build, commit and record one shard; the reject reason per site ('' for written ones)."""
        images = np.empty((sites.num_rows, layout.N_CHANNELS, self.size, self.size), dtype=np.uint8)
        keys = zip(*(sites.column(c).to_pylist() for c in ("experiment", "plate", "well", "site")))

        def load_into(slot: int, key: tuple) -> tuple[str, str]:
            try:
                images[slot] = self.load_site(*key)
                return "", ""
            except SiteRejected as rejected:
                return rejected.path, str(rejected)

        results = list(self.pool.map(load_into, range(sites.num_rows), keys))
        good = np.array([reason == "" for _, reason in results], dtype=bool)
        kept = images if good.all() else images[good]
        histogram = np.stack([np.bincount(kept[:, c].ravel(), minlength=256)
                              for c in range(layout.N_CHANNELS)]) if len(kept) else np.zeros((6, 256), np.int64)
        name = shards.shard_name(index)
        if len(kept):
            table = sites.filter(pa.array(good)).append_column(shards.IMAGE_COLUMN, shards.image_column(kept))
            self.commit(name, parquet_bytes(table))
        site_ids = sites.column("site_id").to_pylist()
        record = {
            "shard": index, "file": name if len(kept) else None, "sites": sites.num_rows, "written": int(good.sum()),
            "rejects": [{"site_id": site_ids[i], "path": path, "reason": reason}
                        for i, (path, reason) in enumerate(results) if reason],
            "histogram": histogram.astype(np.int64).tolist(),
        }
        self.commit(shards.shard_record_name(index), json.dumps(record).encode())
        return [reason for _, reason in results]

    def commit(self, relative: str, data: bytes | pa.Buffer) -> None:
        """Make a file appear whole or not at all: temp + rename locally, a single upload on object stores."""
        final = f"{self.out_root}/{relative}"
        if not self.rename_commit:
            storage.with_retries(lambda: self._write(final, data))
            return
        folder, base = final.rsplit("/", 1)
        temp = f"{folder}/.{base}.{uuid.uuid4().hex}.tmp"
        self._write(temp, data)
        self.out_fs.move(temp, final)

    def _write(self, path: str, data: bytes | pa.Buffer) -> None:
        with self.out_fs.open_output_stream(path) as handle:
            handle.write(data)


def parquet_bytes(table: pa.Table) -> pa.Buffer:
    """A shard table as zstd Parquet, in memory.

    Parquet has no 8-bit type, so uint8 pixels are stored as 4-byte INT32. The
    BYTE_STREAM_SPLIT encoding puts each byte position in its own stream, so the
    three zero bytes vanish under zstd and the pixel bytes compress as they are.
    Measured on synthetic 256 px sites against the dictionary encoding used before:
    the same size (176 vs 179 KB a site; zstd alone: 283 KB), written 3.7x faster
    (4.2 vs 15.7 ms a site, a fifth of a site's CPU budget next to decoding its six
    PNGs, ~53 ms) and read 1.6x faster. Min/max statistics of pixels help no reader: skipped.
    """
    plain_columns = [name for name in table.column_names if name != shards.IMAGE_COLUMN]
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=PARQUET_COMPRESSION, row_group_size=ROW_GROUP_ROWS,
                   use_dictionary=plain_columns, write_statistics=plain_columns,
                   column_encoding={IMAGE_PIXELS_PATH: "BYTE_STREAM_SPLIT"})
    return sink.getvalue()
