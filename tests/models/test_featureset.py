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


def test_to_tensors_gives_copies_of_a_video_one_group() -> None:
    import torch

    from models.featureset import take, to_tensors

    fs = make_featureset(8, missing=0.2)
    idx = np.array([0, 1, 2, 3, 4, 5, 6, 7, 2, 5, 2])  # oversampling: repeats of rows 2 and 5
    batch = to_tensors(fs.subset(idx))
    g = batch.groups
    assert g is not None and g.dtype == torch.int64 and g.shape == (len(idx),)
    for i in range(len(idx)):
        for j in range(len(idx)):
            assert (g[i] == g[j]).item() == (idx[i] == idx[j])
    assert len(torch.unique(g)) == 8
    # take and to carry the groups along, row for row.
    part = take(batch, torch.tensor([8, 2, 0])).to("cpu")
    assert part.groups.tolist() == [g[8].item(), g[2].item(), g[0].item()]
    assert part.groups[0] == part.groups[1] != part.groups[2]
    assert to_tensors(fs.subset(np.arange(0))).groups.shape == (0,)
