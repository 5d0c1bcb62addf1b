"""The store check: `check_stores` reads every feature table and reports findings: per table,
rows, missing modalities by reason, NaN / all-zero / outlying-norm vectors, dimension and
contract version; leakage (the same bytes, or features with cosine > 0.99, across the labelled
and unlabelled pools or across CV folds); drift between a modality's newest table and the one
before it. The videos checked are those training takes (tasks/stores/quality.py current_videos): the
manifest's and those imported without their files. Findings go to the `findings` table and to
`<data_root>/reports/check.md`.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts import tables
from data_contracts.labels import MODALITIES
from data_contracts.store import Store
from data_contracts.tables import NO_VIDEO
from tasks.engine.errors import BadInputError
from tasks.stores.quality import (
    LABELLED_POOL,
    LEVELS,
    PASS_THROUGH,
    REPORT,
    UPSTREAM,
    FeatureTable,
    Finding,
    Findings,
    current_videos,
    find_feature_tables,
    mean_std,
    near_duplicate_pairs,
    newest_first,
    norms_and_finite,
    quality_signals,
    read_features,
)
from tasks.training.folds import fold_assignment

log = logging.getLogger(__name__)


# -- the check ---------------------------------------------------------------------------------
@dataclass
class _Context:
    current: pd.DataFrame  # video_id, sha256, pool of the current videos (current_videos)
    folds: dict[str, int]
    failures: pd.DataFrame
    cosine: float
    norm_z: float
    block: int


def _ids(values: Any) -> tuple[str, ...]:
    return tuple(sorted({str(v) for v in values}))


def _content_duplicates(ctx: _Context) -> list[Finding]:
    """The same bytes (SHA-256) under several video ids: across pools or folds, it is leakage."""
    out = []
    m = ctx.current[ctx.current.sha256 != NO_VIDEO]  # feature-only: no bytes to compare
    for sha, group in m[m.sha256.duplicated(keep=False)].groupby("sha256"):
        ids = _ids(group.video_id)
        pools = sorted(set(group.pool))
        folds = {ctx.folds[v] for v in ids if v in ctx.folds}
        detail = {"sha256": sha, "pools": pools, "folds": sorted(folds)}
        if LABELLED_POOL in pools and len(pools) > 1:
            code, level, why = "duplicate-content-across-pools", "error", f"pools {pools}"
        elif len(folds) > 1:
            code, level, why = "duplicate-content-across-folds", "error", f"CV folds {folds}"
        else:
            code, level, why = "duplicate-content", "warning", f"pool {pools[0]}"
        out.append(
            Finding(
                level, code, tables.MANIFEST.name,
                f"identical bytes (sha256 {sha[:12]}) under {len(ids)} names in {why}; remove the "
                f"copies or keep them in one pool and one fold",
                ids, detail,
            )
        )  # fmt: skip
    return out


def _missing(ft: FeatureTable, held: set[tuple], ctx: _Context) -> tuple[dict, list[Finding]]:
    """Current videos that lack a row in this table, grouped by the recorded reason."""
    stage, *upstream = UPSTREAM[ft.modality]
    f = ctx.failures
    own = f[(f.stage == stage) & (f.extractor_id == ft.extractor_id)]
    own = {(r.video_id, r.sha256): r for r in own.itertuples(index=False)}
    up = f[f.stage.isin(upstream)]
    up = {(r.video_id, r.sha256, r.stage): r for r in up.itertuples(index=False)}
    reasons: dict[str, list[str]] = {}
    examples: dict[str, str] = {}
    for key in zip(ctx.current.video_id, ctx.current.sha256, strict=True):
        if key in held:
            continue
        if key[1] == NO_VIDEO:  # nothing to extract from: only an import adds its row
            reason = "feature-only, not in this table"
            reasons.setdefault(reason, []).append(key[0])
            examples[reason] = (
                "imported without their video files; `merflow import-features ... "
                "--without-videos` into this table adds them, else training masks the modality"
            )
            continue
        row = own.get(key)
        if row is None or row.error_type == PASS_THROUGH:
            cause = next((up[(*key, s)] for s in upstream if (*key, s) in up), None)
            row = cause if cause is not None else row
        reason = "not extracted" if row is None else f"{row.stage}: {row.error_type}"
        reasons.setdefault(reason, []).append(key[0])
        examples.setdefault(reason, "" if row is None else row.message)
    findings = []
    for reason, ids in sorted(reasons.items()):
        if reason == "not extracted":
            msg = (
                f"{len(ids)} manifest video(s) have neither a {ft.modality} row nor a recorded "
                f"failure under this extractor; run the extraction (it computes only these)"
            )
            findings.append(Finding("warning", "not-extracted", ft.ref.name, msg, _ids(ids)))
        else:
            msg = f"{len(ids)} video(s) lack {ft.modality} features ({reason}): {examples[reason]}"
            findings.append(
                Finding("info", "missing-modality", ft.ref.name, msg[:500], _ids(ids),
                        {"reason": reason})
            )  # fmt: skip
    return {k: len(v) for k, v in sorted(reasons.items())}, findings


def _leakage(
    ft: FeatureTable, keys: pd.DataFrame, x: np.ndarray, use: np.ndarray, mean: np.ndarray,
    ctx: _Context,
) -> list[Finding]:  # fmt: skip
    """Near-duplicate features (centred cosine) across the pools and across CV folds."""
    rows = np.flatnonzero(use)
    vid = keys.video_id.to_numpy().astype(str)
    sha = keys.sha256.to_numpy().astype(str)
    pool = keys.video_id.map(dict(zip(ctx.current.video_id, ctx.current.pool, strict=True)))
    fold = keys.video_id.map(ctx.folds).fillna(-1).to_numpy(dtype=np.int64)
    labelled = pool.to_numpy() == LABELLED_POOL
    checks = [
        ("near-duplicate-across-pools", rows[labelled[rows]], rows[~labelled[rows]], "pools"),
        ("near-duplicate-across-folds", rows[fold[rows] >= 0], None, "CV folds"),
    ]
    out = []
    for code, a, b, what in checks:
        if len(a) == 0 or (b is not None and len(b) == 0):
            continue
        i, j, cos, total = near_duplicate_pairs(x, a, b, ctx.cosine, ctx.block, center=mean)
        capped = total > len(i)  # only the first pairs were kept: the counts are lower bounds
        # Identical bytes are reported once, from the manifest; feature-only rows have none.
        keep = (sha[i] != sha[j]) | (sha[i] == NO_VIDEO)
        if code.endswith("folds"):
            keep &= fold[i] != fold[j]
        i, j, cos = i[keep], j[keep], cos[keep]
        if len(i) == 0:
            continue
        order = np.argsort(-cos)
        pairs = [[vid[i[k]], vid[j[k]], round(float(cos[k]), 5)] for k in order[:50]]
        candidates = len(a) * len(b) if b is not None else len(a) * (len(a) - 1) // 2
        msg = (
            f"{len(i)} pair(s) of different videos across {what} have {ft.modality} features "
            f"with centred cosine > {ctx.cosine} (closest: {pairs[0][0]} ~ {pairs[0][1]}, "
            f"{pairs[0][2]}); check whether they are the same clip re-encoded"
        )
        if capped:
            msg += f"; {total} candidate pairs over the threshold, only the first were examined"
        if len(i) >= 10 and len(i) > 0.01 * candidates:
            msg += f"; {len(i) / candidates:.0%} of all pairs: the features may have collapsed"
        out.append(
            Finding("warning", code, ft.ref.name, msg, _ids([*vid[i], *vid[j]]),
                    {"n_pairs": len(i), "pairs": pairs, "candidates": candidates,
                     "capped": capped})
        )  # fmt: skip
    return out


def _check_table(
    store: Store, ft: FeatureTable, newest: bool, ctx: _Context
) -> tuple[dict, list[Finding], tuple[np.ndarray, np.ndarray, int]]:
    """Row-level health of one table; missing modalities and leakage for a modality's newest."""
    name = ft.ref.name
    keys, x, _ = read_features(store, ft)
    current_keys = set(zip(ctx.current.video_id, ctx.current.sha256, strict=True))
    current = np.array(
        [k in current_keys for k in zip(keys.video_id, keys.sha256, strict=True)], dtype=bool
    )
    norms, finite = norms_and_finite(x)
    zero = finite & (norms == 0)
    ok = finite & ~zero
    vid = keys.video_id.to_numpy().astype(str)
    findings = []
    if (~finite).any():
        findings.append(
            Finding("error", "nan-vectors", name,
                    f"{int((~finite).sum())} vector(s) hold NaN, inf or null; the extractor that "
                    f"wrote them is broken: delete the rows and re-extract", _ids(vid[~finite]))
        )  # fmt: skip
    if zero.any():
        findings.append(
            Finding("error", "zero-vectors", name,
                    f"{int(zero.sum())} all-zero vector(s): a missing modality must be a failure "
                    f"row, never a zero vector; delete the rows and re-extract", _ids(vid[zero]))
        )  # fmt: skip
    use = ok & current
    outliers = np.zeros(len(x), dtype=bool)
    if use.sum() >= 10:
        med = float(np.median(norms[use]))
        mad = 1.4826 * float(np.median(np.abs(norms[use] - med)))
        if mad > 0:
            z = np.where(use, np.abs(norms - med) / mad, 0.0)
            outliers = z > ctx.norm_z
            if outliers.any():
                top = np.argsort(-z)[: min(20, int(outliers.sum()))]
                findings.append(
                    Finding("warning", "outlying-norms", name,
                            f"{int(outliers.sum())} vector(s) have a norm more than {ctx.norm_z} "
                            f"robust SDs from the median {med:.4g} (MAD-SD {mad:.3g})",
                            _ids(vid[outliers]),
                            {"median": med, "mad_sd": mad,
                             "z": {vid[k]: round(float(z[k]), 2) for k in top}})
                )  # fmt: skip
    stale = int((~current).sum())
    if stale:
        findings.append(
            Finding("info", "stale-rows", name,
                    f"{stale} row(s) belong to videos gone from the manifest or whose bytes "
                    f"changed, or are feature-only rows of ids the manifest now holds; training "
                    f"ignores them", _ids(vid[~current]))
        )  # fmt: skip
    missing: dict[str, int] = {}
    if newest:
        held = set(zip(keys.video_id[ok], keys.sha256[ok], strict=True))
        missing, more = _missing(ft, held, ctx)
        findings += more
    mean, std = mean_std(x, np.flatnonzero(use))
    if newest and use.any():
        findings += _leakage(ft, keys, x, use, mean, ctx)
    summary = {
        "table": name,
        "modality": ft.modality,
        "extractor_id": ft.extractor_id,
        "rows": len(x),
        "current": int(current.sum()),
        "dim": ft.dim,
        "contract": f"{ft.ref.contract.name} v{ft.version}",
        "newest": newest,
        "nan": int((~finite).sum()),
        "zero": int(zero.sum()),
        "outliers": int(outliers.sum()),
        "stale": stale,
        "missing": missing,
    }
    findings.insert(
        0,
        Finding("info", "table", name,
                f"{len(x)} rows ({summary['current']} of current videos), dim {ft.dim}, "
                f"contract {summary['contract']}", (), summary),
    )  # fmt: skip
    return summary, findings, (mean, std, int(use.sum()))


def _drift(
    modality: str, new: FeatureTable, old: FeatureTable, stats: dict, drift_warn: float
) -> Finding:
    """Per-dimension mean/std shift of a modality's newest table against the previous one."""
    name = new.ref.name
    (m1, s1, n1), (m0, s0, n0) = stats.get(new.ref.name), stats.get(old.ref.name)
    if new.dim != old.dim or not n0 or not n1:
        why = f"dims {new.dim} vs {old.dim}" if new.dim != old.dim else "a table has no rows"
        return Finding(
            "info", "drift-not-comparable", name,
            f"{modality}: {new.extractor_id} (newest) and {old.extractor_id} are not comparable "
            f"({why})", (), {"previous": old.ref.name},
        )  # fmt: skip
    pooled = np.sqrt((s0 * s0 + s1 * s1) / 2) + 1e-12
    shift = np.abs(m1 - m0) / pooled  # standardised mean difference per dimension
    ratio = (s1 + 1e-12) / (s0 + 1e-12)
    detail = {
        "previous": old.ref.name,
        "rows": [n1, n0],
        "mean_shift": float(shift.mean()),
        "max_shift": float(shift.max()),
        "dims_over_0.5": float((shift > 0.5).mean()),
        "std_ratio_median": float(np.median(ratio)),
        "std_ratio_range": [float(ratio.min()), float(ratio.max())],
    }
    level = "warning" if detail["mean_shift"] > drift_warn else "info"
    return Finding(
        level, "drift", name,
        f"{modality}: {new.extractor_id} (newest, {n1} rows) vs {old.extractor_id} ({n0} rows): "
        f"mean per-dimension shift {detail['mean_shift']:.3f} pooled SD (max "
        f"{detail['max_shift']:.2f}, {detail['dims_over_0.5']:.0%} of dims over 0.5); std ratio "
        f"median {detail['std_ratio_median']:.3f}"
        + ("; retrain models fitted on the previous table" if level == "warning" else ""),
        (), detail,
    )  # fmt: skip


def _store_kind(store: Store, current: pd.DataFrame, has_manifest: bool) -> list[Finding]:
    """An error when there is nothing to check; an info finding naming feature-only videos."""
    only = current.video_id[current.sha256 == NO_VIDEO]
    if not has_manifest and only.empty:
        return [
            Finding("error", "no-manifest", tables.MANIFEST.name,
                    f"the manifest under {store.root} is empty and no feature table holds "
                    f"feature-only rows; run `merflow extract` first, or, with features and no "
                    f"videos, `merflow import-features MODALITY NAME SOURCE --without-videos`")
        ]  # fmt: skip
    if only.empty:
        return []
    if has_manifest:
        code, what = "feature-only-videos", f"besides the manifest's {len(current) - len(only)}"
    else:
        code, what = "features-only-store", "and no manifest: a features-only store"
    return [
        Finding("info", code, tables.MANIFEST.name,
                f"{len(only)} video(s) imported without their files (sha256 {NO_VIDEO}) "
                f"{what}; training takes them, checked here like the others (they have no "
                f"quality signals)", _ids(only), {"feature_only": len(only)})
    ]  # fmt: skip


def check_stores(
    store: Store,
    n_splits: int | None = None,
    seed: int | None = None,
    cosine_threshold: float = 0.99,
    norm_z: float = 5.0,
    drift_warn: float = 0.1,
    block: int = 4096,
    write: bool = True,
) -> Findings:
    """Check every feature table of the store; write the findings table and reports/check.md.

    Leakage across CV folds is tested on the latest training run's folds (tasks/training/folds.py),
    or, before any run or for other n_splits/seed, on the folds a run would make."""
    if not store.has_stores():
        raise BadInputError(
            f"{store.root} holds no stores/ folder: it is not a merflow data root; give the data "
            f"root of an extraction (default <corpus>/merflow)"
        )
    now = datetime.now(UTC)
    check_id = f"{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    items: list[Finding] = []
    found, problems = find_feature_tables(store)
    # The videos training takes from any of these tables: the manifest's and the feature-only.
    current = current_videos(store, [ft.ref for ft in found])
    has_manifest = bool((current.sha256 != NO_VIDEO).any())  # scanned bytes are digests
    items += _store_kind(store, current, has_manifest)
    folds: dict[str, int] = {}
    fold_source = "none"
    try:
        if not current.empty:
            assignment = fold_assignment(store, n_splits, seed)
            folds, fold_source = assignment.folds, assignment.source
            n_splits, seed = assignment.n_splits, assignment.seed
    except ValueError as e:
        items.append(Finding("info", "folds-unavailable", tables.LABELS.name, str(e)))
    ctx = _Context(current, folds, store.read(tables.FAILURES), cosine_threshold, norm_z, block)
    items += _content_duplicates(ctx)
    items += problems
    by_modality = newest_first(store, found)
    summaries, stats = [], {}
    for modality in MODALITIES:
        for k, ft in enumerate(by_modality.get(modality, [])):
            summary, more, stats[ft.ref.name] = _check_table(store, ft, k == 0, ctx)
            summaries.append(summary)
            items += more
        fts = by_modality.get(modality, [])
        if len(fts) > 1:
            items.append(_drift(modality, fts[0], fts[1], stats, drift_warn))
    signals = quality_signals(store) if has_manifest else None  # extraction's, manifest only
    order = {lv: i for i, lv in enumerate(LEVELS)}
    items.sort(key=lambda f: order[f.level])  # stable: errors first, tables in order
    findings = Findings(
        check_id, str(store.root), now, items, summaries, signals,
        {"n_splits": n_splits, "seed": seed, "folds": fold_source, "cosine": cosine_threshold,
         "norm_z": norm_z, "drift_warn": drift_warn},
    )  # fmt: skip
    if write:
        write_findings(store, findings)
    log.info(
        "check %s: %d error(s), %d warning(s)", check_id, findings.count("error"),
        findings.count("warning"),
    )  # fmt: skip
    return findings


def write_findings(store: Store, findings: Findings) -> Path | str:
    """Append the findings to the `findings` table and write reports/check.md; returns its path
    (its URL for a data root on object storage)."""
    if findings.items:
        store.upsert(tables.FINDINGS, findings.frame())
    return store.write_text(REPORT, findings.markdown())


@task(name="check-stores", cache_policy=NO_CACHE)
def check_task(
    data_root: str,
    n_splits: int | None = None,
    seed: int | None = None,
    cosine_threshold: float = 0.99,
    drift_warn: float = 0.1,
) -> Findings:
    """Prefect task: check the feature stores (never cached: the stores change under it)."""
    return check_stores(Store(data_root), n_splits, seed, cosine_threshold, drift_warn=drift_warn)
