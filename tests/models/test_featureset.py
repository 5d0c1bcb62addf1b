"""The FeatureSet input convention and its checks."""

from __future__ import annotations

import numpy as np
import pytest

from models.featureset import FeatureSet
from tests.models.synthetic import make_featureset


def test_subset_and_concat_keep_rows_aligned() -> None:
    fs = make_featureset(12, missing=0.3)
    part = fs.subset(np.array([3, 3, 7]))
    assert part.video_ids.tolist() == [fs.video_ids[3], fs.video_ids[3], fs.video_ids[7]]
    assert np.array_equal(part.features["text"][2], fs.features["text"][7])
    both = FeatureSet.concat([fs, part])
    assert len(both) == 15 and both.present["visual"][12] == fs.present["visual"][3]
    assert fs.dims == {"visual": 24, "acoustic": 32, "text": 40}


def test_missing_rows_may_hold_nan_but_present_ones_may_not() -> None:
    fs = make_featureset(6)
    feats = {m: v.copy() for m, v in fs.features.items()}
    present = {m: v.copy() for m, v in fs.present.items()}
    feats["visual"][2] = np.nan
    present["visual"][2] = False
    FeatureSet(fs.video_ids, feats, present, fs.labels)  # fine: the row is marked missing
    present["visual"][2] = True
    with pytest.raises(ValueError, match="non-finite values in 1 present rows"):
        FeatureSet(fs.video_ids, feats, present, fs.labels)


def test_rows_without_any_modality_and_bad_labels_are_rejected() -> None:
    fs = make_featureset(6)
    present = {m: np.ones(6, bool) for m in fs.present}
    for m in present:
        present[m][4] = False
    with pytest.raises(ValueError, match=r"no modality present .*sample_00_00004"):
        FeatureSet(fs.video_ids, fs.features, present, fs.labels)
    with pytest.raises(ValueError, match=r"labels must be in -1\.\.5"):
        FeatureSet(fs.video_ids, fs.features, fs.present, np.full(6, 7))
    with pytest.raises(ValueError, match="exactly"):
        FeatureSet(fs.video_ids, {"visual": fs.features["visual"]}, fs.present, fs.labels)
