"""Typed config schemas, registered in Hydra's ConfigStore; the YAML files under conf/ fill them in.

Checked at composition, with Hydra's own message: types (`pseudo.threshold=abc`), misspelled keys, and every
choice, which is an enum built from the registry it names (`cam.method` from `wsss.cam.METHODS`,
`model.backbone` from `wsss.models.BACKBONES`, ...). Ranges and relations between values (`conf_bg <=
conf_fg`, thresholds in [0, 1]) are checked by `validate`, which `wsss.run` calls before any stage starts.
"""

from __future__ import annotations

from wsss.config.checks import validate
from wsss.config.register import register_configs, run_stamp
from wsss.config.schema import *  # noqa: F403  (every schema and choice enum, as `wsss.config.X`)
from wsss.errors import ConfigError

__all__ = ["ConfigError", "register_configs", "run_stamp", "validate"]

register_configs()
