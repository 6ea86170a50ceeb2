"""The stage registry: name -> `Stage` declaration (see `wsss.stages.base`).

Adding a stage means one module that defines `STAGE = Stage(...)`, one line here, and `conf/stage/<name>.yaml`.
"""

from __future__ import annotations

from wsss.stages import (
    affinity,
    cams,
    evaluate,
    faithfulness,
    irn,
    pseudo_masks,
    refine,
    segment,
    segment_train,
    train,
)
from wsss.stages.base import Artifact, Need, Stage, StageContext

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        *(m.STAGE for m in (train, cams, affinity, irn, refine, pseudo_masks, evaluate, faithfulness)),
        segment_train.STAGE,
        segment_train.GT_STAGE,
        segment.STAGE,
        segment.GT_STAGE,
    )
}

__all__ = ["STAGES", "Artifact", "Need", "Stage", "StageContext"]
