"""The six MER2024 emotion classes and the three modalities, in the order used everywhere."""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("neutral", "angry", "happy", "sad", "worried", "surprise")
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
NUM_CLASSES = len(CLASSES)

# Modalities, and the classifier names of docs/method.md §5 (A, V, T, plus F for fusion).
MODALITIES: tuple[str, ...] = ("visual", "acoustic", "text")
CLASSIFIER_OF_MODALITY: dict[str, str] = {"acoustic": "A", "visual": "V", "text": "T"}
CLASSIFIERS: tuple[str, ...] = ("A", "V", "T", "F")
# MER2024's labelled Train&Val set, videos per class (docs/method.md §1): the demo corpus and the
# synthetic benchmarks keep its proportions.
MER2024_TRAIN_COUNTS: dict[str, int] = {
    "neutral": 1248,
    "angry": 1208,
    "happy": 1038,
    "sad": 730,
    "worried": 616,
    "surprise": 190,
}
