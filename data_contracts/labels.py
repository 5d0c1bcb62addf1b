"""The six MER2024 emotion classes and the three modalities, in the order used everywhere."""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("neutral", "angry", "happy", "sad", "worried", "surprise")
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
NUM_CLASSES = len(CLASSES)

# Modalities, and the classifier names of docs/method.md §5 (A, V, T, plus F for fusion).
MODALITIES: tuple[str, ...] = ("visual", "acoustic", "text")
CLASSIFIER_OF_MODALITY: dict[str, str] = {"acoustic": "A", "visual": "V", "text": "T"}
CLASSIFIERS: tuple[str, ...] = ("A", "V", "T", "F")
