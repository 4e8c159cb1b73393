"""`rxray synth`: a synthetic RxRx2 dataset in exactly the real layout, generated on Ray.

The driver builds the plan (treatments with hidden phenotypes, plate layouts, batch
effects: :mod:`rxray.data.synth_design`) and the site list; Ray tasks render chunks
of sites, write their PNGs straight to storage and return only CSV text for
``embeddings.csv``. Every random draw comes from a generator keyed by (seed, name),
e.g. (seed, "site", site_id), so the dataset is identical for a seed however it is
chunked or scheduled.

Outputs under ``out``: ``images/...`` (w1..w6 PNGs), ``metadata.csv`` (the 9 real
columns), ``embeddings.csv`` (site_id + 128 features), ``moa.csv`` (treatment ->
mechanism, with one rare class), ``truth.json`` (the planted answers, never in the
metadata) and ``_manifest.json`` (written last: the dataset is complete).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import ray

from rxray import storage
from rxray.config import SynthConfig
from rxray import layout
from rxray.data import cells
from rxray.layout import MOA_FILE
from rxray.data.synth_design import (RARE_MOA, Plan, Site, Treatment, batch_effects, build_sites, build_treatments,
                                    site_conditions, stable_rng)
from rxray.errors import StepFailed
from rxray.results import SynthResult
from rxray.runner import step_function
from rxray.runtime import Timer, ensure_ray

TRUTH_FILE = "truth.json"
CONTROL_MOA = "control"
# Shot noise defeats LZ matching: Huffman-only level 1 is the fastest and smallest option measured.
PNG_OPTIONS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
WRITE_THREADS = 6  # one site's six PNGs in flight at once: object-store PUTs are latency-bound


@ray.remote(num_cpus=1, max_retries=2, retry_exceptions=[OSError])
def _render_chunk(plan: Plan, sites: list[Site]) -> str:
    """Render and write the PNGs of some sites; return their embeddings.csv rows (never images)."""
    cv2.setNumThreads(1)  # one Ray CPU per task: no hidden thread pools competing for it
    rows, previous = [], []
    # Threads overlap the PUTs of one site with rendering the next; at most two sites are held.
    with ThreadPoolExecutor(WRITE_THREADS) as pool:
        for site in sites:
            morph, acq = site_conditions(plan, site)
            image = cells.render_site(stable_rng(plan.seed, "site", site.site_id), morph, acq, plan.size)
            paths = layout.site_image_paths(site.experiment, site.plate, site.well, site.site)
            current = [pool.submit(storage.write_bytes, storage.join(plan.out, path),
                                   cv2.imencode(".png", stain, PNG_OPTIONS)[1].tobytes())
                       for path, stain in zip(paths, image)]
            rows.append(site.site_id + "," + ",".join(f"{v:.6g}" for v in cells.embed_site(image)) + "\n")
            for write in previous:
                write.result()
            previous = current
        for write in previous:
            write.result()
    return "".join(rows)


def metadata_csv(sites: list[Site]) -> str:
    """metadata.csv text: the 9 RxRx2 columns; controls have an empty treatment_conc."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(layout.METADATA_COLUMNS)
    for s in sites:
        conc = "" if s.conc is None else repr(float(s.conc))
        writer.writerow([s.site_id, s.well_id, s.cell_type, s.experiment, s.plate, s.well, s.site, s.treatment,
                         conc])
    return buffer.getvalue()


def _moa_csv(treatments: list[Treatment]) -> str:
    """moa.csv text: every annotated treatment (controls included) and its mechanism class."""
    lines = ["treatment,moa", f"{layout.CONTROL},{CONTROL_MOA}"]
    lines += [f"{t.name},{t.moa}" for t in treatments if t.annotated]
    return "\n".join(lines) + "\n"


def _truth(cfg: SynthConfig, treatments: list[Treatment], batch: dict[str, Any]) -> dict[str, Any]:
    """The planted answers: each treatment's phenotype and channel, and the batch effects.

    ``kind``/``channel`` are the leading kind of the individual phenotype and its stain
    (``own_parts`` all its kinds with their unit-length weights); ``moa_kind``/``moa_channel``
    the mechanism's shared component ("none"/None where absent); ``leading_channel`` the stain
    of the stronger of the two, the one an attribution method should rank first. ``annotated``
    is False for a compound left out of moa.csv (``unannotated`` lists them): its ``moa`` is the
    answer a mechanism prediction should give.
    """
    table = {}
    for t in treatments:
        channel = None if t.null else cells.effect_channel(t.kind)
        own_channel = None if channel is None else channel + 1
        moa_channel = None if t.moa_kind == "none" else cells.effect_channel(t.moa_kind) + 1
        leading_weight = abs(t.own_parts[0][1]) if t.own_parts else 1.0
        mechanism_leads = moa_channel is not None and abs(t.moa_top_strength) > leading_weight * abs(t.top_strength)
        table[t.name] = dict(kind="none" if t.null else t.kind, null=t.null, moa=t.moa,
                             channel_index=channel, channel=own_channel,
                             channel_name=None if channel is None else layout.CHANNEL_NAMES[channel],
                             strength_per_conc=round(t.strength_per_conc, 6), top_strength=round(t.top_strength, 6),
                             moa_kind=t.moa_kind, moa_channel=moa_channel,
                             leading_channel=moa_channel if mechanism_leads else own_channel,
                             moa_strength_per_conc=round(t.moa_strength_per_conc, 6),
                             moa_top_strength=round(t.moa_top_strength, 6),
                             concentrations=list(t.concentrations), annotated=t.annotated,
                             own_parts=[list(part) for part in t.own_parts])
    return dict(seed=cfg.seed, controls=[layout.CONTROL], rare_moa=RARE_MOA,
                unannotated=[t.name for t in treatments if not t.annotated],
                channels=[f"w{i + 1} {name} ({target})" for i, (name, target)
                          in enumerate(zip(layout.CHANNEL_NAMES, layout.CHANNEL_TARGETS))],
                treatments=table, batch=batch)


@step_function("synth")
def synthesize(cfg: SynthConfig) -> SynthResult:
    """Write a synthetic RxRx2 dataset to cfg.out; returns what was written."""
    timer = Timer()
    start = time.perf_counter()
    with timer.time("plan"):
        treatments = build_treatments(cfg)
        sites = build_sites(cfg, treatments)
        batch = batch_effects(cfg)
        plan = Plan(cfg.out, cfg.size, cfg.seed, {t.name: t for t in treatments}, batch)
    storage.ensure_bucket(cfg.out)
    storage.makedirs(cfg.out)
    with timer.time("ray_start"):
        ensure_ray()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Small datasets get smaller chunks so every CPU stays busy to the end (the output is the same).
    chunk_sites = max(1, min(cfg.chunk_sites, math.ceil(len(sites) / (4 * cpus))))
    chunks = [sites[i:i + chunk_sites] for i in range(0, len(sites), chunk_sites)]
    with timer.time("render"):
        _render_all(plan, chunks, storage.join(cfg.out, layout.EMBEDDINGS_FILE), window=4 * cpus)
    with timer.time("tables"):
        storage.write_text(storage.join(cfg.out, layout.METADATA_FILE), metadata_csv(sites))
        storage.write_text(storage.join(cfg.out, MOA_FILE), _moa_csv(treatments))
        storage.write_text(storage.join(cfg.out, TRUTH_FILE), json.dumps(_truth(cfg, treatments, batch), indent=1))
    seconds = round(time.perf_counter() - start, 3)
    counts = dict(sites=len(sites), images=len(sites) * layout.N_CHANNELS, wells=len({s.well_id for s in sites}),
                  plates=cfg.experiments * cfg.plates, treatments=len(treatments),
                  null_treatments=sum(t.null for t in treatments), size=cfg.size)
    timer.seconds["total"] = seconds
    return SynthResult(counts=counts, timings=timer.seconds, chunks=len(chunks),
                       sites_per_second=round(len(sites) / max(seconds, 1e-9), 1))


def _render_all(plan: Plan, chunks: list[list[Site]], embeddings_uri: str, window: int) -> None:
    """Run the chunk tasks, stream embeddings.csv in site order, and print progress.

    At most `window` chunks are in flight or waiting to be written, which bounds both
    the scheduler's queue and the rows held while an earlier chunk is still running.
    """
    plan_ref = ray.put(plan)
    total = sum(len(chunk) for chunk in chunks)
    pending: dict[ray.ObjectRef, int] = {}
    finished: dict[int, str] = {}  # chunks done but not yet written (they finish out of order)
    submitted = written = done_sites = 0
    start, last_print = time.perf_counter(), 0.0
    header = "site_id," + ",".join(f"feature_{i}" for i in range(layout.EMBEDDING_DIM)) + "\n"
    with storage.open_file(embeddings_uri, "wb") as handle:
        handle.write(header.encode())
        while written < len(chunks):
            while submitted < len(chunks) and len(pending) + len(finished) < window:
                pending[_render_chunk.remote(plan_ref, chunks[submitted])] = submitted
                submitted += 1
            [ref], _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ref)
            try:
                finished[index] = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                for other in pending:
                    ray.cancel(other)
                raise StepFailed(f"synth: chunk {index} ({chunks[index][0].site_id}...) failed: "
                                 f"{str(exc.cause or exc).splitlines()[-1]}") from exc
            done_sites += len(chunks[index])
            while written in finished:
                handle.write(finished.pop(written).encode())
                written += 1
            elapsed = time.perf_counter() - start
            if elapsed - last_print >= 1.0 or written == len(chunks):
                print(f"synth: {done_sites}/{total} sites, {written}/{len(chunks)} chunks written, "
                      f"{elapsed:.1f}s", file=sys.stderr, flush=True)
                last_print = elapsed
