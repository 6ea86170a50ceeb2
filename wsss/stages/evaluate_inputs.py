"""Where `evaluate`'s inputs come from: the masks, maps and seeds folders of its upstream artifacts, the rule
that made the masks, and the provenance blocks of metrics.json (which model, which CAM method or imported
folder, which images an import left out)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsss.stages.base import Artifact, StageContext, check_classes


def cams_input(ctx: StageContext) -> Artifact | None:
    """The cams artifact the scored maps (or the refined maps' seeds) come from; None for a masks folder."""
    return next((ctx.inputs[k] for k in ("maps", "seeds") if k in ctx.inputs and ctx.inputs[k].stage == "cams"), None)


def model_provenance(ctx: StageContext) -> dict[str, Any] | None:
    """Which model made the maps: the maps' record, with the train artifact's key also for a given checkpoint
    (that key covers the checkpoint's bytes), so runs of one model can be told from runs of another."""
    cams = cams_input(ctx)
    if cams is None:
        return None
    model = dict(ctx.inputs["maps"].manifest.get("model") or {})
    if "key" not in model:  # imported maps carry key None: no wsss model made them
        model["key"] = cams.manifest["inputs"]["train"]["key"]
    return model


def missing_imports(ctx: StageContext, ids: list[str]) -> list[str]:
    """Of `ids`, those an imported `cams` or `pseudo_masks` artifact left out (`dataset.on_error=skip`)."""
    imported = [a for a in ctx.inputs.values() if a.stage in ("cams", "pseudo_masks") and is_imported(a)]
    have = set.intersection(*(set(a.manifest["ids"]) for a in imported)) if imported else None
    return [] if have is None else [i for i in ids if i not in have]


def is_imported(artifact: Artifact) -> bool:
    return "imported" in (artifact.manifest.get("model") or {})


def cam_provenance(ctx: StageContext) -> dict[str, Any] | None:
    """The CAM method and its cost (from the cams artifact the scored maps or seeds come from)."""
    cams = cams_input(ctx)
    if cams is None:
        imported = (ctx.inputs["masks"].manifest.get("model") or {}) if "masks" in ctx.inputs else {}
        return {"imported": imported["imported"]} if "imported" in imported else None
    cam = cams.manifest["config"]["cam"]
    out = {"method": cam.get("method"), "key": cams.key, "cost": cams.manifest.get("cost")}
    if cam.get("source") is not None:  # another method's maps: which folder and format, not a wsss method
        out.update(method=None, imported=(cams.manifest.get("model") or {}).get("imported"))
    return out


def mask_rule(pseudo: dict[str, Any]) -> dict[str, Any]:
    """How the masks were made: one background threshold, or the confident fg / bg band (no threshold then)."""
    if pseudo.get("conf_fg") is not None:
        return {"conf_fg": pseudo["conf_fg"], "conf_bg": pseudo["conf_bg"]}
    if str(pseudo.get("refine", "none")) in ("crf", "clip_es_crf", "rw", "irn"):  # the threshold: seeds only
        return {"threshold": pseudo["threshold"], "refined_against": f"the {pseudo['refine']} background map"}
    return {"threshold": pseudo["threshold"]}


def inputs(ctx: StageContext) -> tuple[Path, Path | None, dict[str, Any] | None, Path | None]:
    """masks dir, maps dir (CAMs or refined maps), the masks' rule, and the seeds' CAM dir when refined."""
    ev = ctx.cfg.evaluate
    if ev.masks_dir:
        masks_dir = Path(ev.masks_dir)
        if not masks_dir.is_dir():
            raise FileNotFoundError(f"evaluate.masks_dir not found: {masks_dir}")
        return masks_dir, None, None, None
    masks = ctx.inputs["masks"]
    check_classes(masks, ctx.source().class_names)
    if "maps" not in ctx.inputs:  # pseudo.source: another method's masks, no maps to sweep
        return masks.path("masks_dir"), None, {"imported": masks.manifest["model"]["imported"]}, None
    seeds = ctx.inputs["seeds"].path("maps_dir") if "seeds" in ctx.inputs else None
    rule = mask_rule(masks.manifest["config"]["pseudo"])
    return masks.path("masks_dir"), ctx.inputs["maps"].path("maps_dir"), rule, seeds
