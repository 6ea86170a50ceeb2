"""The stage graph train -> cams -> pseudo_masks -> evaluate, with artifacts cached by config hash.

Each stage's artifact directory is `<cache_dir>/<stage>/<key>`, where `key` hashes exactly the config that
determines that stage's output plus the key of its upstream stage. A directory counts as complete only when
its `manifest.json` exists: the manifest is written last and atomically, so a killed run is simply rerun (files
it did finish, themselves written atomically, are reused by stages that resume).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import logging
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import wsss
from wsss.artifacts import read_json, write_json
from wsss.data import SegmentationSource, build_source, dataset_identity

log = logging.getLogger(__name__)

STAGES = ("train", "cams", "pseudo_masks", "evaluate")
UPSTREAM: dict[str, str | None] = {
    "train": None,
    "cams": "train",
    "pseudo_masks": "cams",
    "evaluate": "pseudo_masks",
}


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def digest(obj: Any) -> str:
    """Stable short hash of a JSON-able object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{wsss.__version__}+{sha}" if sha else wsss.__version__


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else as torch understands it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available")
    return device


def stage_config(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """The slice of `cfg` that determines `stage`'s own output (upstream keys are chained separately)."""
    d = cfg.dataset
    if stage == "train":
        if cfg.model.checkpoint:
            path = Path(cfg.model.checkpoint)
            if not path.is_file():
                raise FileNotFoundError(f"model.checkpoint not found: {path}")
            return {
                "checkpoint": str(path.resolve()),
                "sha256": file_digest(path),
                "class_names": dataset_identity(d, d.train_split)["class_names"],
                "dataset": d.name,
            }
        model = _plain(cfg.model)
        model.pop("checkpoint")
        train = _plain(cfg.train)
        train.pop("num_workers")  # does not change the result
        return {
            "dataset": dataset_identity(d, d.train_split),
            "model": model,
            "train": train,
            "seed": cfg.seed,
        }
    if stage == "cams":
        return {"dataset": dataset_identity(d, d.eval_split), "cam": _plain(cfg.cam)}
    if stage == "pseudo_masks":
        return {"pseudo": _plain(cfg.pseudo)}
    if stage == "evaluate":
        ev = _plain(cfg.evaluate)
        if ev["masks_dir"]:
            ev["masks_dir"] = str(Path(ev["masks_dir"]).resolve())
        return {"dataset": dataset_identity(d, d.eval_split), "evaluate": ev}
    raise ValueError(f"unknown stage {stage!r}; choose one of {list(STAGES)}")


def upstream_of(cfg: DictConfig, stage: str) -> str | None:
    """The stage `stage` consumes; evaluate with `evaluate.masks_dir` consumes a folder, not a stage."""
    if stage == "evaluate" and cfg.evaluate.masks_dir:
        return None
    return UPSTREAM[stage]


@dataclass
class StageContext:
    """What a stage gets besides its config: where to write, its inputs, the device, the run directory."""

    cfg: DictConfig
    stage: str
    out_dir: Path
    inputs: dict[str, Path]
    device: torch.device
    run_dir: Path | None
    pipeline: Pipeline
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)

    def source(self, split: str) -> SegmentationSource:
        """The dataset split, built once per pipeline."""
        return self.pipeline.source(split)

    def check_classes(self, upstream: str, source: SegmentationSource) -> None:
        """Refuse an upstream artifact made for another dataset or class list, saying which."""
        theirs = self.manifests[upstream].get("class_names")
        if theirs is not None and list(theirs) != list(source.class_names):
            raise ValueError(
                f"{self.inputs[upstream]}: {upstream} artifact classes {theirs} differ from "
                f"the dataset's classes {source.class_names}"
            )


class Pipeline:
    """Resolves the stage graph for one composed config and runs what is missing.

    Args:
        cfg: The composed config.
        run_dir: Hydra's output directory of this job, where user-facing outputs (metrics.json) also go.
    """

    def __init__(self, cfg: DictConfig, run_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.cache_dir = Path(cfg.paths.cache_dir)
        self.device = resolve_device(cfg.device)
        self._sources: dict[str, SegmentationSource] = {}
        self._keys: dict[str, str] = {}
        self.report: dict[str, str] = {}  # stage -> "reused" | "ran"

    def source(self, split: str) -> SegmentationSource:
        if split not in self._sources:
            self._sources[split] = build_source(self.cfg.dataset, split)
        return self._sources[split]

    def key(self, stage: str) -> str:
        if stage not in self._keys:
            up = upstream_of(self.cfg, stage)
            payload = {
                "stage": stage,
                "config": stage_config(self.cfg, stage),
                "upstream": self.key(up) if up else None,
            }
            self._keys[stage] = digest(payload)
        return self._keys[stage]

    def artifact_dir(self, stage: str) -> Path:
        return self.cache_dir / stage / self.key(stage)

    @contextlib.contextmanager
    def _lock(self, stage: str) -> Iterator[None]:
        """Serialise parallel sweep jobs that need the same artifact (one builds it, the others reuse it)."""
        path = self.cache_dir / stage / f"{self.key(stage)}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def ensure(self, stage: str) -> tuple[Path, dict[str, Any]]:
        """Make sure `stage`'s artifact exists (running upstream stages first); return its dir and manifest."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; choose one of {list(STAGES)}")
        up = upstream_of(self.cfg, stage)
        inputs: dict[str, Path] = {}
        manifests: dict[str, dict[str, Any]] = {}
        if up is not None:
            inputs[up], manifests[up] = self.ensure(up)
        out_dir = self.artifact_dir(stage)
        manifest_path = out_dir / "manifest.json"
        with self._lock(stage):
            if manifest_path.is_file():
                log.info("%s: reusing %s", stage, out_dir)
                self.report[stage] = "reused"
                return out_dir, read_json(manifest_path)
            log.info("%s: running -> %s", stage, out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            ctx = StageContext(self.cfg, stage, out_dir, inputs, self.device, self.run_dir, self, manifests)
            module = importlib.import_module(f"wsss.stages.{stage}")
            start = time.perf_counter()
            result = module.run(self.cfg, ctx)
            seconds = time.perf_counter() - start
            manifest = {
                "stage": stage,
                "key": self.key(stage),
                "config": stage_config(self.cfg, stage),
                "code_version": code_version(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "inputs": {
                    name: {
                        "dir": str(path),
                        "key": manifests[name]["key"],
                        "manifest_sha256": file_digest(path / "manifest.json"),
                    }
                    for name, path in inputs.items()
                },
                "timings": {"seconds": round(seconds, 3)},
                **result,
            }
            write_json(manifest_path, manifest)
            self.report[stage] = "ran"
            log.info("%s: done in %.1f s", stage, seconds)
            return out_dir, manifest

    def maps_for_split(self, split: str) -> tuple[SegmentationSource, Path]:
        """The source and CAM folder of another split (made with the same model and CAM config if missing)."""
        cfg = self.cfg.copy()
        cfg.dataset.eval_split = split
        other = Pipeline(cfg, self.run_dir)
        _, manifest = other.ensure("cams")
        for stage, how in other.report.items():
            self.report[f"{stage}[{split}]"] = how
        return other.source(split), Path(manifest["maps_dir"])

    def run(self, stage: str) -> dict[str, Any]:
        """Run `stage` (and whatever upstream is missing), let it report; return its manifest."""
        out_dir, manifest = self.ensure(stage)
        summary = ", ".join(f"{s} {how}" for s, how in self.report.items())
        log.info("pipeline: %s", summary)
        module = importlib.import_module(f"wsss.stages.{stage}")
        if hasattr(module, "report"):
            module.report(self.cfg, out_dir, manifest, self.run_dir)
        return manifest
