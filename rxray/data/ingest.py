"""`rxray ingest`: stream RxRx2 sites from storage into Parquet shards with Ray Data.

The work list comes from ``metadata.csv`` (never a bucket listing). Selected sites are
sorted by site_id and cut into shards of ``shard_rows`` sites, so shard k always holds
the same sites. Each pending shard is one Ray Data row, written by a pool of
:class:`~rxray.data.shard_writer.ShardWriter` actors; each commits its shard and then
the ``_shards/part-NNNNNN.json`` record that marks it complete. The driver sees only
one small outcome row per site, never an image. A rerun skips shards with a record,
so a killed run resumes where it stopped and ends with the same rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from rxray import storage
from rxray.config import ConfigError, IngestConfig
from rxray import layout
from rxray.data import select, shards
from rxray.data.shard_writer import ShardWriter
from rxray.errors import StepFailed
from rxray.outputs import read_manifest
from rxray.results import IngestResult
from rxray.runner import step_function
from rxray.runtime import Timer, ensure_ray

# Content of a shard depends on these config fields; the others (thresholds, threads)
# may change between a run and its resume.
_CONTENT_FIELDS = ("source", "size", "treatments", "group", "controls", "balance", "labels", "shard_rows",
                   "seed")


# --------------------------------------------------------------------------- the work list


@dataclass
class IngestPlan:
    """The deterministic work list: valid sites in site_id order, cut into shards."""

    work: pa.Table                    # metadata (+ label) columns of the sites to fetch
    metadata_rejects: pd.DataFrame    # selected rows with bad metadata (site_id, path, reason)
    label_columns: list[str]
    selected_per_class: dict[str, int]
    shard_rows: int
    fingerprint: str

    @property
    def selected(self) -> int:
        """Rows selected from metadata.csv, valid or not."""
        return self.work.num_rows + len(self.metadata_rejects)

    @property
    def n_shards(self) -> int:
        """Number of shards the valid sites fill."""
        return -(-self.work.num_rows // self.shard_rows)

    def shard_sites(self, index: int) -> pa.Table:
        """The sites of shard ``index``."""
        return self.work.slice(index * self.shard_rows, self.shard_rows)


def plan_ingest(cfg: IngestConfig) -> IngestPlan:
    """Read metadata.csv, select, validate, join labels and fingerprint the result."""
    metadata = select.read_metadata(cfg.source)
    if metadata.empty:
        raise ConfigError("ingest.source", f"{layout.METADATA_FILE} under {cfg.source} has no rows")
    wanted = select.resolve_treatments(cfg.treatments, cfg.group, cfg.controls, metadata["treatment"])
    chosen = select.select_sites(metadata, wanted, cfg.balance, cfg.seed)
    if chosen.empty:
        raise ConfigError("ingest.treatments", "the selection matches no sites")
    valid, metadata_rejects = select.validate_metadata(chosen)
    valid, label_columns = select.join_labels(valid, cfg.labels)
    work = pa.Table.from_pandas(valid, preserve_index=False)
    content = {name: getattr(cfg, name) for name in _CONTENT_FIELDS}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode())
    digest.update(pd.util.hash_pandas_object(valid, index=False).to_numpy().tobytes())
    digest.update(pd.util.hash_pandas_object(metadata_rejects, index=False).to_numpy().tobytes())
    return IngestPlan(work=work, metadata_rejects=metadata_rejects, label_columns=label_columns,
                      selected_per_class=select.class_counts(chosen), shard_rows=cfg.shard_rows,
                      fingerprint=digest.hexdigest())


# --------------------------------------------------------------------------- the step


@step_function("ingest")
def ingest(cfg: IngestConfig) -> IngestResult:
    """Run `rxray ingest`: stream the selected sites into shards; returns the counts and the shards' statistics."""
    timer = Timer()
    started = time.perf_counter()
    with timer.time("plan"):
        plan = plan_ingest(cfg)
        done = _check_output(cfg.out, plan)
    if done is not None:
        counts = done["counts"]
        _say(f"ingest: already complete: {counts['written']} written, {counts['rejected']} rejected "
             f"of {counts['selected']} selected sites in {cfg.out}")
        return IngestResult.from_manifest(done, status="already complete", unchanged=True)

    if cfg.balance is not None:
        short = {name: n for name, n in plan.selected_per_class.items() if n < cfg.balance}
        if short:
            listed = ", ".join(f"{name} {n}" for name, n in list(short.items())[:5])
            _say(f"ingest: --balance {cfg.balance}: {len(short)} class(es) have fewer sites and keep them all "
                 f"({listed}{', ...' if len(short) > 5 else ''})")
    finished = _finished_shards(cfg.out)
    pending = [k for k in range(plan.n_shards) if k not in finished]
    with timer.time("pipeline"):
        processed = _run_pipeline(cfg, plan, pending) if pending else {"sites": 0, "first_shard_s": None}
    if processed["first_shard_s"] is not None:  # start-up latency: actors launch before the first shard
        timer.seconds["first_shard"] = processed["first_shard_s"]
    with timer.time("finalize"):
        counts, rejects, histogram = _collect_results(cfg.out, plan)
        counts["shards_resumed"] = plan.n_shards - len(pending)
    rate = processed["sites"] / timer.seconds["pipeline"] if processed["sites"] else 0.0
    if counts["rejected"] > cfg.max_reject_frac * plan.selected:
        common = rejects["reason"].str.replace(r"'[^']*'", "'…'", regex=True).value_counts().head(3)
        top = "; ".join(f"{count} x {reason}" for reason, count in common.items())
        raise StepFailed(f"{counts['rejected']} of {plan.selected} selected sites rejected "
                         f"({counts['rejected'] / plan.selected:.1%} > --max-reject-frac {cfg.max_reject_frac:g}); "
                         f"most common: {top}; all in {storage.join(cfg.out, shards.REJECTS_FILE)}")
    mean, std = _channel_stats(histogram)
    timer.seconds["total"] = round(time.perf_counter() - started, 3)
    result = IngestResult(
        counts=counts, timings=timer.seconds, sites_per_second=round(rate, 2), fingerprint=plan.fingerprint,
        channel_mean=mean, channel_std=std, channel_names=layout.CHANNEL_NAMES,
        image_shape=[layout.N_CHANNELS, cfg.size, cfg.size], image_dtype="uint8",
        label_columns=plan.label_columns, selected_per_class=plan.selected_per_class,
        rejects_file=shards.REJECTS_FILE)
    _say(f"ingest: {counts['written']} written, {counts['rejected']} rejected of {plan.selected} selected sites "
         f"in {timer.seconds['total']:.1f} s ({rate:.1f} sites/s this run; {counts['shards_resumed']} of "
         f"{plan.n_shards} shards were already done) -> {cfg.out}")
    return result


def _collect_results(out: str, plan: IngestPlan) -> tuple[dict[str, int], pd.DataFrame, np.ndarray]:
    """Counts, the rejects table (also written to ``_rejects.csv``) and the summed channel histograms."""
    records = _read_records(out, plan.n_shards)
    rejects = pd.concat([plan.metadata_rejects, *(pd.DataFrame(r["rejects"], columns=select.REJECT_COLUMNS)
                                                  for r in records)], ignore_index=True)
    rejects = rejects.sort_values("site_id", kind="stable").reset_index(drop=True)
    storage.write_text(storage.join(out, shards.REJECTS_FILE), rejects.to_csv(index=False))
    written = sum(r["written"] for r in records)
    counts = {"selected": plan.selected, "written": written, "rejected": len(rejects), "shards": plan.n_shards}
    if written + len(rejects) != plan.selected:  # every selected site is written or rejected, never dropped
        raise RuntimeError(f"ingest bookkeeping is off: {counts}")
    histogram = np.zeros((layout.N_CHANNELS, 256), dtype=np.int64)
    for record in records:
        histogram += np.asarray(record["histogram"], dtype=np.int64)
    return counts, rejects, histogram


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _check_output(out: str, plan: IngestPlan) -> dict[str, Any] | None:
    """The manifest if this exact ingest already completed at ``out``; records the plan otherwise.

    An output that holds a different ingest (other config or metadata) is refused
    rather than mixed.
    """
    plan_uri = storage.join(out, shards.PLAN_FILE)
    if storage.exists(plan_uri):
        previous = json.loads(storage.read_text(plan_uri))
        if previous.get("fingerprint") != plan.fingerprint:
            raise ConfigError("ingest.out", f"{out} holds an ingest of other sites or settings; "
                                            "use a new --out or delete it")
        manifest = read_manifest(out)
        if manifest is not None and manifest.get("fingerprint") == plan.fingerprint:
            return manifest
    storage.ensure_bucket(out)
    storage.makedirs(storage.join(out, shards.SHARD_RECORDS_DIR))
    _remove_stale_temp_files(out)
    storage.write_text(plan_uri, json.dumps({"fingerprint": plan.fingerprint, "selected": plan.selected,
                                             "sites_to_fetch": plan.work.num_rows, "shards": plan.n_shards,
                                             "shard_rows": plan.shard_rows}, indent=2))
    return None


def _remove_stale_temp_files(out: str) -> None:
    """Delete temp files a killed run left behind (local outputs only; object stores have none)."""
    if storage.is_remote(out):
        return
    for folder in (storage.strip_scheme(out), storage.strip_scheme(storage.join(out, shards.SHARD_RECORDS_DIR))):
        for name in os.listdir(folder):
            if name.startswith(".") and name.endswith(".tmp"):
                os.remove(os.path.join(folder, name))


def _finished_shards(out: str) -> set[int]:
    """Indices of shards whose completion record exists (one listing of our own output prefix)."""
    done = set()
    for uri in storage.list_dir(storage.join(out, shards.SHARD_RECORDS_DIR)):
        name = uri.rsplit("/", 1)[-1]
        if name.startswith(shards.SHARD_PREFIX) and name.endswith(".json"):
            done.add(int(name[len(shards.SHARD_PREFIX):-len(".json")]))
    return done


def _read_records(out: str, n_shards: int) -> list[dict[str, Any]]:
    """The completion records of all shards (read concurrently: one small GET each on object stores)."""
    uris = [storage.join(out, shards.shard_record_name(k)) for k in range(n_shards)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return [json.loads(text) for text in pool.map(storage.read_text, uris)]


def _channel_stats(histogram: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (uint8 units) from (6, 256) intensity histograms."""
    values = np.arange(256, dtype=np.float64)
    counts = histogram.astype(np.float64)
    total = np.maximum(counts.sum(axis=1), 1.0)
    mean = counts @ values / total
    var = np.maximum(counts @ values**2 / total - mean**2, 0.0)
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in np.sqrt(var)]


def _run_pipeline(cfg: IngestConfig, plan: IngestPlan, pending: list[int]) -> dict[str, Any]:
    """Stream the pending shards through a ShardWriter actor pool; sites done and start-up latency."""
    import ray
    import ray.data

    ensure_ray()
    items = [{"shard": k, "sites_ipc": _ipc_bytes(plan.shard_sites(k))} for k in pending]
    source_fs, source_root = storage.pyarrow_filesystem(cfg.source)
    out_fs, out_root = storage.pyarrow_filesystem(cfg.out)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    outcomes = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardWriter,
        batch_size=1,
        fn_constructor_kwargs=dict(source_fs=source_fs, source_root=source_root, out_fs=out_fs, out_root=out_root,
                                   size=cfg.size, fetch_threads=cfg.fetch_threads,
                                   rename_commit=not storage.is_remote(cfg.out)),
        # Start as wide as the cluster is now and grow with it. A shard is seconds of work,
        # so two in flight per actor (the least that lets the pool autoscale) keeps actors
        # busy without leaving a long backlog behind one slow actor at the tail.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=None, initial_size=min(cpus, len(items)),
                                           max_tasks_in_flight_per_actor=2),
        num_cpus=1,
    )
    sites = 0
    started, first_shard_s = time.perf_counter(), None
    for batch in outcomes.iter_batches(batch_size=None, batch_format="pyarrow"):
        sites += batch.num_rows  # per-site outcomes only: the images stay in the shards
        if first_shard_s is None:
            first_shard_s = round(time.perf_counter() - started, 3)
    return {"sites": sites, "first_shard_s": first_shard_s}


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
