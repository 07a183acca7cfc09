"""The task families of the detection benchmark, one module each, by name."""

from __future__ import annotations

from collections.abc import Callable

from detection_families.base import (
    Batch,
    CommonLabelNoise,
    FamilySettings,
    FullBatchRun,
    TaskFamily,
)
from detection_families.char_lm import CharLMTask
from detection_families.compositional_mlp import CompositionalMLPTask
from detection_families.digits import DigitsTask
from detection_families.keyword_text import KeywordTextTask
from detection_families.minority_class import MinorityClassTask
from detection_families.pulse_cnn import PulseCNNTask
from detection_families.token_rule import TokenRuleTask

_CLASSES = (MinorityClassTask, TokenRuleTask, DigitsTask, CharLMTask, CompositionalMLPTask,
            PulseCNNTask, KeywordTextTask)
FAMILIES: dict[str, Callable[[], TaskFamily]] = {cls.name: cls for cls in _CLASSES}
# Read without building a family (some load data sets when built).
SETTINGS: dict[str, FamilySettings] = {cls.name: cls.settings for cls in _CLASSES}

__all__ = ["FAMILIES", "SETTINGS", "Batch", "CommonLabelNoise", "FamilySettings",
           "FullBatchRun", "TaskFamily"]
