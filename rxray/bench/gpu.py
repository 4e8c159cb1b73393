"""`rxray bench gpu`: the one check to run on a lent GPU machine (sized for under 8 minutes), or rehearse on CPU.

In order, each writing its table:

1. ``bench train``: Ray Train SimCLR images/s against a plain loop and the GPU compute
   ceiling (goal: Ray Train >= 0.7 of the ceiling) -> docs/benchmarks.md;
2. ``bench embed --gpu``: the embed actor pool against a plain loop (goal >= 0.9)
   -> docs/benchmarks.md;
3. a short pipeline on GPUs (synth, ingest, pretrain, finetune, embed, explain, report:
   bf16 autocast, channels_last, GPU actors), timed per step -> the "GPU pipeline"
   section of docs/benchmarks.md;
4. ``bench ingest`` from local disk and S3 at 1024 px on every core (goals 0.8 and 0.7
   of the decode ceiling) -> docs/benchmarks-ingest.md.

``--tiny`` runs the same four parts on CPU at toy sizes into a scratch folder, so the
script is known to work on a machine without a GPU; it writes nothing under docs/.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Optional

from rxray.bench.scale import run_measured_pipeline, write_pipeline
from rxray.bench.tables import record_row
from rxray.config import ConfigError, load_config, option

# Sizes of each part: on the GPU machine (16 cores, one H200) and for the CPU rehearsal.
SIZES = {
    "gpu": {"train": dict(images=8192, size=128, batch_size=256, epochs=2),
            "embed": dict(images=16384, size=128, batch_size=1024),
            "pipeline": dict(size=128, epochs=5, batch_size=128),
            "ingest": dict(sites=256, scale=4, size=1024, storage="both")},
    "tiny": {"train": dict(images=64, size=32, batch_size=16, epochs=2),
             "embed": dict(images=64, size=32, batch_size=32),
             "pipeline": dict(size=32, epochs=1, batch_size=16),
             "ingest": dict(sites=8, scale=2, size=64, out_size=32, storage="local", seeds_sites=2)},
}
PIPELINE_TITLE = "## GPU pipeline"
PIPELINE_INTRO = ("`rxray bench gpu`: a short pipeline with every GPU path on (pretrain and finetune on Ray Train "
                  "GPU workers, embed and explain on GPU actors) on the default synthetic dataset; seconds per step.")
PIPELINE_HEADER = "| date | device | px | epochs | " + " | ".join(
    ["synth", "ingest", "pretrain", "finetune", "embed", "explain", "report", "total"]) + " |"


@dataclass
class BenchGpuConfig:
    """`rxray bench gpu`: train, embed, a GPU pipeline and ingest benchmarks in one run."""

    section = "bench_gpu"

    workdir: str = option("bench-gpu", "local scratch folder for data and runs", uri=True)
    tiny: bool = option(False, "rehearse on CPU at toy sizes (tables go under the work folder, not docs/)")
    parts: list[str] = option(["train", "embed", "pipeline", "ingest"], "parts to run, in this order",
                              choices=["train", "embed", "pipeline", "ingest"])
    note: str = option("", "a line recorded with each table (e.g. the machine)")


def _device() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, f"CPU ({os.cpu_count()} cores)"
    return True, f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"


def pipeline_document(run: str, source: str, sizes: dict[str, Any], gpu: bool) -> dict[str, Any]:
    """A short pipeline with every GPU path of rxray switched on (``gpu``), on the default synthetic dataset."""
    return {
        "pipeline": {"run": run, "source": source},
        "synth": {"size": max(64, sizes["size"])},
        "ingest": {"size": sizes["size"]},
        "pretrain": {"backbone": "resnet18", "epochs": sizes["epochs"], "batch_size": sizes["batch_size"],
                     "gpu": gpu},
        "finetune": {"name": "ifn-beta", "positive": "IFN-beta", "epochs": sizes["epochs"], "batch_size": 16,
                     "gpu": gpu},
        "embed": {"gpu": gpu},
        "explain": {"n": 8, "panels": 2, "gpu": gpu},
        "report": {},
    }


def bench_gpu(cfg: BenchGpuConfig) -> dict[str, Any]:
    """Run the chosen parts on the GPU (or on CPU with --tiny); returns each part's result."""
    from rxray.bench.embed import BenchEmbedConfig, bench_embed
    from rxray.bench.ingest import BenchIngestConfig, bench_ingest
    from rxray.bench.train import BenchTrainConfig, bench_train

    gpu, device = _device()
    if not gpu and not cfg.tiny:
        raise ConfigError("bench_gpu", "no GPU on this machine (torch.cuda.is_available() is False); "
                                       "--tiny rehearses the same script on CPU")
    sizes = SIZES["tiny" if cfg.tiny else "gpu"]
    os.makedirs(cfg.workdir, exist_ok=True)
    docs = os.path.join(cfg.workdir, "docs") if cfg.tiny else "docs"
    os.makedirs(docs, exist_ok=True)
    note = cfg.note or None
    results: dict[str, Any] = {"device": device}
    started = time.perf_counter()
    if "train" in cfg.parts:
        results["train"] = bench_train(load_config(BenchTrainConfig, values=dict(
            **sizes["train"], gpu=gpu, table=os.path.join(docs, "benchmarks.md"), note=note)))
    if "embed" in cfg.parts:
        results["embed"] = bench_embed(load_config(BenchEmbedConfig, values=dict(
            **sizes["embed"], gpu=gpu, table=os.path.join(docs, "benchmarks.md"), note=note)))
    if "pipeline" in cfg.parts:
        run, source = os.path.join(cfg.workdir, "run"), os.path.join(cfg.workdir, "synth")
        path = write_pipeline(pipeline_document(run, source, sizes["pipeline"], gpu),
                              os.path.join(cfg.workdir, "pipeline.yaml"))
        rows = run_measured_pipeline(path, label="bench gpu")
        seconds = {row["step"]: row["seconds"] for row in rows}
        cells = [time.strftime("%Y-%m-%d"), device, str(sizes["pipeline"]["size"]), str(sizes["pipeline"]["epochs"])]
        cells += [f"{seconds.get(step, '-')}" for step in ("synth", "ingest", "pretrain", "finetune/ifn-beta",
                                                           "embed", "explain", "report", "pipeline")]
        record_row(os.path.join(docs, "benchmarks.md"), PIPELINE_TITLE, PIPELINE_INTRO, PIPELINE_HEADER,
                   "| " + " | ".join(cells) + " |", note)
        results["pipeline"] = rows
    if "ingest" in cfg.parts:
        results["ingest"] = bench_ingest(load_config(BenchIngestConfig, values=dict(
            **sizes["ingest"], workdir=os.path.join(cfg.workdir, "ingest"),
            table=os.path.join(docs, "benchmarks-ingest.md"), note=cfg.note)))
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(f"bench gpu: {', '.join(cfg.parts)} on {device} in {results['seconds']} s; tables under {docs}/")
    return results
