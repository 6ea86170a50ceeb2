"""What a stage declares, and what it is handed when it runs.

A stage is one module with one `STAGE = Stage(...)`: its name, the config sections it reads, the slice of
config that determines its output (`params`), the upstream artifacts it consumes (`needs`, possibly of another
split), the files it reads (`files`, fingerprinted into its key) and its `run` function. `wsss.pipeline`
resolves and runs the graph from these declarations alone.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from wsss.data import SegmentationSource, build_source, dataset_fingerprint
from wsss.fingerprint import FileGroup, hash_files, scan_dir


@dataclass(frozen=True)
class Need:
    """An upstream artifact a stage consumes: stage `stage` made for `split` (None: the consumer's split)."""

    stage: str
    split: str | None = None


@dataclass(frozen=True)
class Artifact:
    """A finished stage output: its directory and its manifest."""

    stage: str
    split: str
    key: str
    dir: Path
    manifest: dict[str, Any]

    def path(self, name: str) -> Path:
        """A path recorded in the manifest, relative to the artifact's directory (absolute ones stay)."""
        return self.dir / self.manifest[name]


class Fingerprints:
    """Memoised file fingerprints for one composed config (a split's files are scanned once per run)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self._splits: dict[str, dict[str, FileGroup]] = {}

    def dataset(self, split: str) -> dict[str, FileGroup]:
        """Everything the dataset's reader reads for `split` (split list, images, masks, annotations)."""
        if split not in self._splits:
            self._splits[split] = {f"dataset/{k}": v for k, v in dataset_fingerprint(self.cfg.dataset, split).items()}
        return self._splits[split]

    @staticmethod
    def folder(path: str | Path, label: str) -> FileGroup:
        """Name, size and mtime of every file in a folder."""
        return scan_dir(path, None, label)

    @staticmethod
    def content(path: str | Path, label: str) -> FileGroup:
        """sha256 of a file's bytes."""
        return hash_files([path], label)


def _no_needs(cfg: DictConfig, split: str) -> dict[str, Need]:
    return {}


def _no_files(cfg: DictConfig, split: str, fp: Fingerprints) -> dict[str, FileGroup]:
    return {}


def _eval_split(cfg: DictConfig) -> str:
    return str(cfg.dataset.eval_split)


def _no_ground_truth(cfg: DictConfig, split: str) -> bool:
    return False


@dataclass(frozen=True)
class Stage:
    """A stage's declaration.

    Args:
        name: The stage's name: its module, its `conf/stage/<name>.yaml`, its manifests' `stage`.
        run: `run(ctx) -> dict`; the dict goes into the manifest.
        config: Config sections (top-level keys) the stage reads; its context holds only these.
        params: `params(cfg, split) -> dict`: the config values that determine the output (key material).
        needs: `needs(cfg, split) -> {input name: Need}`.
        files: `files(cfg, split, fingerprints) -> {group: FileGroup}`: the files it reads.
        split: The split a `stage=<name>` request makes (default `dataset.eval_split`).
        report: `report(artifact, run_dir)`: logs and copies user-facing outputs when it was the requested stage.
        summary: What the stage makes, one whole sentence for `--help`; empty: the first sentence of its module's
            docstring (after `Stage `name`:`).
        ground_truth: `ground_truth(cfg, split) -> bool`: whether the stage needs the dataset's ground-truth
            masks (it trains on them), beside its upstream artifacts; `--help` lists it with `needs`.
    """

    name: str
    run: Callable[[StageContext], dict[str, Any]]
    config: tuple[str, ...]
    params: Callable[[DictConfig, str], dict[str, Any]]
    needs: Callable[[DictConfig, str], dict[str, Need]] = _no_needs
    files: Callable[[DictConfig, str, Fingerprints], dict[str, FileGroup]] = _no_files
    split: Callable[[DictConfig], str] = _eval_split
    report: Callable[[Artifact, Path | None], None] | None = None
    summary: str = ""
    ground_truth: Callable[[DictConfig, str], bool] = _no_ground_truth


@dataclass
class StageContext:
    """What a running stage gets: its config sections, its split, its resolved inputs, where to write.

    Attributes:
        stage: The stage's name.
        split: The split this node makes its output for.
        cfg: The config sections the stage declared, nothing more.
        inputs: Input name -> finished upstream artifact.
        out_dir: The artifact directory to write into (the manifest is the pipeline's).
        device: Where tensors go.
    """

    stage: str
    split: str
    cfg: DictConfig
    inputs: dict[str, Artifact]
    out_dir: Path
    device: torch.device
    _sources: dict[str, SegmentationSource] = field(default_factory=dict, repr=False)

    def source(self, split: str | None = None) -> SegmentationSource:
        """A split of the configured dataset (default: this node's), built once per pipeline."""
        split = self.split if split is None else split
        if split not in self._sources:
            self._sources[split] = build_source(self.cfg.dataset, split)
        return self._sources[split]


def check_classes(artifact: Artifact, class_names: list[str]) -> None:
    """Refuse an upstream artifact made for another class list, saying which."""
    theirs = artifact.manifest.get("class_names")
    if theirs is not None and list(theirs) != list(class_names):
        raise ValueError(
            f"{artifact.dir}: {artifact.stage} artifact classes {theirs} differ from the dataset's classes "
            f"{list(class_names)}"
        )


def model_provenance(train: Artifact) -> dict[str, Any]:
    """What identifies the model a train artifact holds: its seed (trained) or its checkpoint (given)."""
    config = train.manifest.get("config", {})
    if "checkpoint" in config:
        return {"checkpoint": config["checkpoint"], "seed": None}
    return {"seed": config.get("seed"), "key": train.key}


def environment(device: torch.device) -> dict[str, Any]:
    """The software and hardware a number was computed with: torch version, device and its name."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return {"torch": torch.__version__, "device": str(device), "device_name": name, "threads": torch.get_num_threads()}


def plain(node: Any) -> Any:
    """A config node as plain Python containers (enums as their string values)."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return node
