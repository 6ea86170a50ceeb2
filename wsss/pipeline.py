"""The stage graph: resolved from the stages' declarations, built where missing, reused where every input matches.

A node is (stage, split). Its key hashes everything its output depends on: the stage's config slice
(`Stage.params`), the keys of the nodes it consumes, the wsss source code, and a fingerprint of every file it
reads (`Stage.files`: split lists by content; images, masks, annotation files, a folder of masks to score by name,
size and mtime; a checkpoint by content). The artifact lives in `<cache_dir>/<stage>/<key>/`.

An artifact is complete when its `manifest.json` exists (written last, atomically) and every output file it
lists is there with its listed size. Reuse needs no lock and no write, so a finished cache can sit on a
read-only filesystem. A build takes an exclusive `flock` on `<cache_dir>/<stage>/<key>.lock`, so parallel jobs
never build one artifact twice at once; it first removes temp files a killed run left behind, and stages that
resume (the CAM stage) keep the files that were finished. A file of an input artifact that a stage cannot read back
(`DamagedFileError`) is deleted, that input is rebuilt (resuming: only that file is made again), and the stage
runs again. When a configuration was built before under other inputs, the log says what changed.

The digests that make the keys (config material, the code a stage runs) live in `wsss.provenance`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from wsss import dist
from wsss.artifacts import read_json, write_json
from wsss.config import validate
from wsss.data import resolve_class_names
from wsss.errors import CacheError, DamagedFileError
from wsss.fingerprint import FileGroup, describe_changes, sha256_file
from wsss.provenance import code_digest, code_version, digest
from wsss.rundir import link_artifacts, result_line
from wsss.stages import STAGES
from wsss.stages.base import Artifact, Fingerprints, Stage, StageContext

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FINGERPRINT = "fingerprint.json"
MAX_REPAIRS = 10  # damaged input files repaired per build before giving up


@dataclass
class Node:
    """One (stage, split) of the resolved graph, with its inputs, config slice, file fingerprint and key."""

    stage: Stage
    split: str
    inputs: dict[str, Node]
    params: dict[str, Any]
    files: dict[str, FileGroup]
    key: str
    recipe: str  # hash of the config alone (no file, code or upstream key): finds the previous build to compare
    label: str  # the stage's name, plus "[split]" for a split other than the one a request for it makes


def _walk_files(root: Path) -> dict[str, int]:
    """relative path -> size of every file under `root` except the manifest."""
    out: dict[str, int] = {}
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.name != MANIFEST:
                    out[str(Path(e.path).relative_to(root))] = e.stat().st_size
    return out


def _remove_temp_files(root: Path) -> int:
    """Delete `.<name>.*.tmp` files that a killed run's atomic writes left; returns how many."""
    n = 0
    for p in root.rglob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n


class Pipeline:
    """Resolves the stage graph of one composed config and builds what is missing.

    Args:
        cfg: The composed config (validated here).
        run_dir: Hydra's output directory of this job, where user-facing outputs (metrics.json) also go.
        stages: The stage registry (default `wsss.stages.STAGES`).
    """

    def __init__(
        self, cfg: DictConfig, run_dir: str | Path | None = None, stages: dict[str, Stage] | None = None
    ) -> None:
        cfg = cfg.copy()
        OmegaConf.resolve(cfg)  # a stage sees only its own sections, so interpolations across sections go now
        validate(cfg)
        names = resolve_class_names(cfg)
        if names is not None:  # a folder's labels file names them: from now on they are the config's
            cfg.dataset.class_names = names
            log.info("dataset: %d classes from %s: %s", len(names), cfg.dataset.root, ", ".join(names))
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.cache_dir = Path(cfg.paths.cache_dir)
        self.device = dist.local_device(str(cfg.device))
        self.stages = STAGES if stages is None else stages
        self.fingerprints = Fingerprints(cfg)
        self.report: dict[str, str] = {}  # node label -> "reused" | "ran"
        self._nodes: dict[tuple[str, str], Node] = {}
        self._sources: dict[str, Any] = {}

    # -- the graph -------------------------------------------------------------------------------------------

    def node(self, name: str, split: str | None = None, _path: tuple[str, ...] = ()) -> Node:
        """The node of stage `name` for `split` (default: the split a request for that stage makes)."""
        if name not in self.stages:
            raise ValueError(f"stage={name!r}: unknown stage; choose one of {sorted(self.stages)}")
        stage = self.stages[name]
        split = stage.split(self.cfg) if split is None else split
        if (name, split) in self._nodes:
            return self._nodes[(name, split)]
        if name in _path:
            raise ValueError(f"stage graph has a cycle: {' -> '.join((*_path, name))}")
        inputs = {
            k: self.node(n.stage, split if n.split is None else n.split, (*_path, name))
            for k, n in stage.needs(self.cfg, split).items()
        }
        params = stage.params(self.cfg, split)
        files = stage.files(self.cfg, split, self.fingerprints)
        recipe = digest(
            {"stage": name, "split": split, "params": params, "inputs": {k: n.recipe for k, n in inputs.items()}}
        )
        key = digest(
            {
                "recipe": recipe,
                "code": code_digest(stage.run.__module__),
                "inputs": {k: n.key for k, n in inputs.items()},
                "files": {k: g.digest for k, g in sorted(files.items())},
            }
        )
        label = name if split == stage.split(self.cfg) else f"{name}[{split}]"
        node = Node(stage, split, inputs, params, files, key, recipe, label)
        self._nodes[(name, split)] = node
        return node

    def key(self, name: str, split: str | None = None) -> str:
        """The cache key of a node."""
        return self.node(name, split).key

    def artifact_dir(self, name: str, split: str | None = None) -> Path:
        """Where a node's artifact lives."""
        node = self.node(name, split)
        return self._dir(node)

    def _dir(self, node: Node) -> Path:
        return self.cache_dir / node.stage.name / node.key

    # -- running ---------------------------------------------------------------------------------------------

    def run(self, name: str) -> dict[str, Any]:
        """Build stage `name` (and whatever upstream is missing), let it report; return its manifest."""
        node = self.node(name)
        artifact = self.ensure(node)
        log.info("pipeline: %s", ", ".join(f"{s} {how}" for s, how in self.report.items()))
        if not dist.is_main():
            return artifact.manifest
        if self.run_dir is not None:  # the run directory links what it used and built
            used = self.upstream(node)
            link_artifacts(self.run_dir, {n.label: (n.stage.name, n.key, self._dir(n)) for n in used})
        if node.stage.report is not None:
            node.stage.report(artifact, self.run_dir)
        log.info("result: %s", result_line(name, node.label, artifact.dir, artifact.manifest, self.run_dir))
        return artifact.manifest

    def upstream(self, node: Node) -> list[Node]:
        """The node and every node it depends on, inputs first (each once)."""
        seen: dict[tuple[str, str], Node] = {}

        def visit(n: Node) -> None:
            for i in n.inputs.values():
                visit(i)
            seen.setdefault((n.stage.name, n.split), n)

        visit(node)
        return list(seen.values())

    def ensure(self, node: Node) -> Artifact:
        """The node's finished artifact: reused when complete, else built (its inputs first).

        Under several ranks, rank 0 alone checks the cache and takes the lock, and tells the others what it
        found; every rank runs the stage (on its shard) and rank 0 writes the manifest after all are done.
        """
        if self._decide(node, lambda: self._complete(node)):
            log.info("%s: reusing %s (key matched)", node.label, self._dir(node))
            self.report.setdefault(node.label, "reused")
            if dist.is_main():
                self._touch(self._dir(node))
            return self._read(node)
        inputs = {k: self.ensure(n) for k, n in node.inputs.items()}
        with self._lock(node):
            if self._decide(node, lambda: self._complete(node)):  # another job built it while we waited
                log.info("%s: reusing %s (built by another job)", node.label, self._dir(node))
                self.report.setdefault(node.label, "reused")
                return self._read(node)
            artifact = self._build(node, inputs)
        self.report[node.label] = "ran"
        return artifact

    @staticmethod
    def _decide(node: Node, complete: Any) -> bool:
        """Whether the artifact is complete, decided on rank 0 and told to every rank."""
        return bool(dist.broadcast(complete() is not None if dist.is_main() else None))

    def _read(self, node: Node) -> Artifact:
        """The finished artifact of a node, from its manifest."""
        out = self._dir(node)
        return Artifact(node.stage.name, node.split, node.key, out, read_json(out / MANIFEST))

    def _complete(self, node: Node) -> Artifact | None:
        """The artifact if its manifest exists and every listed output is there with its size; else None.

        Damaged outputs (missing, wrong size) and an unreadable manifest are removed when the cache is
        writable, so the next build resumes from what is intact.
        """
        out = self._dir(node)
        path = out / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = read_json(path)
        except DamagedFileError as e:
            log.warning("%s: %s; rebuilding", node.label, e)
            self._discard(path)
            return None
        bad: dict[str, str] = {}
        for rel, size in manifest.get("outputs", {}).items():
            try:
                actual = (out / rel).stat().st_size
            except FileNotFoundError:
                bad[rel] = f"{rel} missing"
                continue
            if actual != size:
                bad[rel] = f"{rel} has {actual} bytes, the manifest lists {size}"
        if bad:
            shown = "; ".join(list(bad.values())[:3]) + (" ..." if len(bad) > 3 else "")
            log.warning("%s: artifact %s is damaged (%d files: %s); rebuilding them", node.label, out, len(bad), shown)
            for rel in bad:
                self._discard(out / rel)
            self._discard(path)
            return None
        return Artifact(node.stage.name, node.split, node.key, out, manifest)

    def _build(self, node: Node, inputs: dict[str, Artifact]) -> Artifact:
        """Run the stage into its artifact directory (every rank), then rank 0 writes the manifest last."""
        out = self._dir(node)
        left = _remove_temp_files(out) if dist.is_main() else 0
        dist.barrier()  # no rank writes before the leftovers are gone
        log.info(
            "%s: running -> %s (%s)",
            node.label,
            out,
            self._why(node) + (f"; removed {left} temp files" if left else ""),
        )
        ctx = StageContext(
            stage=node.stage.name,
            split=node.split,
            cfg=OmegaConf.masked_copy(self.cfg, list(node.stage.config)),
            inputs=inputs,
            out_dir=out,
            device=self.device,
            _sources=self._sources,
        )
        start = time.perf_counter()
        result = self._run_repairing_inputs(node, ctx) if not dist.is_dist() else node.stage.run(ctx)
        seconds = time.perf_counter() - start
        dist.barrier()  # every rank's files are written
        if dist.is_main():
            write_json(out / FINGERPRINT, {k: g.to_json() for k, g in node.files.items()})
            write_json(out / MANIFEST, self._manifest(node, ctx.inputs, result, seconds))
            write_json(self.cache_dir / node.stage.name / "recipes" / f"{node.recipe}.json", {"key": node.key})
        dist.barrier()
        log.info("%s: done in %.1f s", node.label, seconds)
        return self._read(node)

    def _run_repairing_inputs(self, node: Node, ctx: StageContext) -> dict[str, Any]:
        """Run the stage; a damaged file of an input artifact is removed, that input rebuilt, and the stage rerun."""
        for repair in range(MAX_REPAIRS + 1):
            try:
                return node.stage.run(ctx)
            except DamagedFileError as e:  # noqa: PERF203 (a retry loop: the exception is the point)
                name = next((k for k, a in ctx.inputs.items() if e.path.is_relative_to(a.dir)), None)
                if name is None or repair == MAX_REPAIRS:
                    raise
                log.warning("%s: %s (in the %s artifact); removing it and rebuilding that input", node.label, e, name)
                self._discard(e.path)
                self._discard(ctx.inputs[name].dir / MANIFEST)
                ctx.inputs[name] = self.ensure(node.inputs[name])
        raise AssertionError("unreachable")

    def _manifest(self, node: Node, inputs: dict[str, Artifact], result: dict[str, Any], seconds: float) -> dict:
        """What the artifact records: identity, config slice, code, inputs, file digests, result, outputs."""
        return {
            "stage": node.stage.name,
            "split": node.split,
            "key": node.key,
            "recipe": node.recipe,
            "config": node.params,
            "code_version": code_version(),
            "code_digest": code_digest(node.stage.run.__module__),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": str(self.device),
            "inputs": {
                k: {
                    "stage": a.stage,
                    "split": a.split,
                    "key": a.key,
                    "dir": str(a.dir),
                    "manifest_sha256": sha256_file(a.dir / MANIFEST),
                }
                for k, a in inputs.items()
            },
            "files": {k: g.digest for k, g in node.files.items()},
            "timings": {"seconds": round(seconds, 3)},
            **result,
            "outputs": _walk_files(self._dir(node)),
        }

    def _why(self, node: Node) -> str:
        """Why a node is being built: first build, an unfinished one, or what changed since the last build."""
        if self._dir(node).is_dir() and any(self._dir(node).iterdir()):
            return "resuming an unfinished build"
        pointer = self.cache_dir / node.stage.name / "recipes" / f"{node.recipe}.json"
        try:
            old_key = read_json(pointer)["key"]
            old_dir = self.cache_dir / node.stage.name / old_key
            old = read_json(old_dir / MANIFEST)
            old_files = {k: FileGroup.from_json(v) for k, v in read_json(old_dir / FINGERPRINT).items()}
        except (OSError, ValueError, KeyError):
            return "no artifact for this configuration yet"
        reasons = []
        if old.get("code_digest") != code_digest(node.stage.run.__module__):
            reasons.append("wsss source changed")
        for k, n in node.inputs.items():
            if old.get("inputs", {}).get(k, {}).get("key") != n.key:
                reasons.append(f"input {n.label} changed")
        reasons += describe_changes(old_files, node.files)
        return "; ".join(reasons) or "inputs changed"

    @contextlib.contextmanager
    def _lock(self, node: Node) -> Iterator[None]:
        """Exclusive flock on `<cache>/<stage>/<key>.lock` while the node is built; clear errors if unwritable.

        Taken by rank 0 only: no other rank ever waits on a lock, so a collective can never wait on a rank that
        waits on a lock held by another rank of the same job.
        """
        if not dist.is_main():
            yield
            return
        path = self.cache_dir / node.stage.name / f"{node.key}.lock"
        try:
            self._dir(node).mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise CacheError(
                f"{self._dir(node)}: the {node.label} artifact is missing and cannot be built: "
                f"{e.strerror or e} (paths.cache_dir={self.cache_dir})"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @staticmethod
    def _discard(path: Path) -> None:
        """Delete a file of a damaged artifact (nothing to do on a read-only cache: the rebuild will say so)."""
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise

    @staticmethod
    def _touch(path: Path) -> None:
        """Record a use (the directory's mtime, read by `wsss.cache list`); skipped on a read-only cache."""
        with contextlib.suppress(OSError):
            os.utime(path)
