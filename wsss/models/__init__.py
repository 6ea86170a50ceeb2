"""Classifiers with a GAP head."""

from wsss.models.affinity import AffinityNet
from wsss.models.classifier import BACKBONES, Classifier, load_checkpoint, save_checkpoint

__all__ = ["BACKBONES", "AffinityNet", "Classifier", "load_checkpoint", "save_checkpoint"]
