"""Patient-level splits: no patient's images are ever on both sides of a split.

Stratification is by (source, the patient's rarest kind), so a patient with a single
iodine image counts as an iodine patient; otherwise the few non-regular patients could all
land in one split. Within a stratum, patients are placed by systematic sampling from a
random start: expected shares are exact even for strata of one patient, and large strata
come within one patient of the requested fractions.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipelines.data.schema import Split, path_key


@dataclass(frozen=True)
class SplitFractions:
    train: float = 0.7
    val: float = 0.15
    test: float = 0.15

    def __post_init__(self) -> None:
        vals = (self.train, self.val, self.test)
        if any(v < 0 for v in vals) or not np.isclose(sum(vals), 1.0):
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {vals}")

    def as_dict(self) -> dict[str, float]:
        return {Split.TRAIN.value: self.train, Split.VAL.value: self.val, Split.TEST.value: self.test}


def _patient_strata(df: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: its source and its rarest kind (blank kinds count as 'unknown')."""
    kinds = df["kind"].replace("", "unknown")
    # descending count, rarer kinds later; a tie by name: value_counts' own order is the rows',
    # so reordered rows changed the strata and the split (an audit: 18 of 40 patients moved)
    rarity = kinds.value_counts().sort_index().sort_values(ascending=False, kind="stable")
    rank = {k: i for i, k in enumerate(rarity.index)}
    per = pd.DataFrame({"patient_id": df["patient_id"], "source": df["source"], "rank": kinds.map(rank)})
    grouped = per.groupby("patient_id", sort=True).agg(source=("source", "first"), rank=("rank", "max"))
    return grouped.reset_index()


def _assign(patients: Sequence[str], shares: dict[str, float], rng: np.random.Generator) -> dict[str, str]:
    """Systematic sampling of shuffled patients into named splits."""
    names = [n for n, s in shares.items() if s > 0]
    edges = np.cumsum([shares[n] for n in names])
    edges /= edges[-1]
    order = rng.permutation(len(patients))
    start = rng.random()
    out = {}
    for pos, idx in enumerate(order):
        u = (pos + start) / len(patients)
        out[patients[idx]] = names[min(int(np.searchsorted(edges, u, side="right")), len(names) - 1)]
    return out


def patient_split(df: pd.DataFrame, fractions: SplitFractions = SplitFractions(), seed: int = 0) -> pd.Series:
    """A split name per row; stratified by source and rarest kind; seeded."""
    rng = np.random.default_rng(seed)
    strata = _patient_strata(df)
    mapping: dict[str, str] = {}
    for _, group in strata.groupby(["source", "rank"], sort=True):
        mapping.update(_assign(list(group["patient_id"]), fractions.as_dict(), rng))
    return df["patient_id"].map(mapping).rename("split")


class PatientsAcrossSources(ValueError):
    """Patient ids found under several sources, which a split by source cannot keep on one side."""

    def __init__(self, patients: list[str]) -> None:
        super().__init__(f"{len(patients)} patient_id(s) appear under several sources (e.g. {patients[:5]}); a "
                         "cross-source split cannot keep them on one side: make the IDs unique per source")
        self.patients = patients


def cross_source_split(
    df: pd.DataFrame,
    train_sources: Sequence[str],
    val_sources: Sequence[str],
    test_sources: Sequence[str],
    fractions: SplitFractions = SplitFractions(),
    seed: int = 0,
) -> pd.Series:
    """Each source goes to the splits that list it, as the paper trains on China + Nigeria
    and tests on Peru. A source listed under several splits (the paper's China is in both
    train and val) is divided among them by patient, with `fractions` renormalised over
    those splits. Rows of sources listed nowhere get an empty split and are left out.
    """
    groups = {Split.TRAIN.value: set(train_sources), Split.VAL.value: set(val_sources),
              Split.TEST.value: set(test_sources)}
    known = set(df["source"].unique())
    unknown = sorted(set().union(*groups.values()) - known)
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; the manifest has {sorted(known)}")
    if not groups[Split.TRAIN.value]:
        raise ValueError("cross-source split needs at least one training source")
    spanning = df.groupby("patient_id")["source"].nunique()
    spanning = sorted(spanning[spanning > 1].index)
    if spanning:
        raise PatientsAcrossSources(spanning)
    rng = np.random.default_rng(seed)
    strata = _patient_strata(df)
    base = fractions.as_dict()
    mapping: dict[str, str] = {}
    for (source, _), group in strata.groupby(["source", "rank"], sort=True):
        targets = {name: base[name] or 1e-9 for name, members in groups.items() if source in members}
        if targets:
            mapping.update(_assign(list(group["patient_id"]), targets, rng))
    return df["patient_id"].map(mapping).fillna("").rename("split")


def case_folds(df: pd.DataFrame, k: int, seed: int = 0) -> pd.Series:
    """Fold number (0..k-1) per row, by patient, stratified by source and rarest kind."""
    if k < 3:
        raise ValueError("folds: need at least 3 (one test, one validation, the rest training)")
    strata = _patient_strata(df)
    mapping: dict[str, int] = {}
    shares = {str(i): 1.0 / k for i in range(k)}
    for (source, _), group in strata.groupby(["source", "rank"], sort=True):
        # one generator per stratum, seeded by its source and members: adding a collection to
        # the manifest leaves every other collection's folds as they were
        members = ",".join(sorted(group["patient_id"]))
        rng = np.random.default_rng([seed, zlib.crc32(f"{source}|{members}".encode())])
        mapping.update({p: int(f) for p, f in _assign(list(group["patient_id"]), shares, rng).items()})
    return df["patient_id"].map(mapping).rename("fold")


def fold_split(df: pd.DataFrame, k: int, fold: int, seed: int = 0,
               test_only_sources: Sequence[str] = ()) -> pd.Series:
    """Rotation `fold` of a k-fold split by patient: test = fold `fold`, validation = the next
    fold, training = the rest; every patient is tested in exactly one rotation. Sources in
    `test_only_sources` (held-out collections) are test in every rotation."""
    if k < 3:  # checked first: with --folds 0 the range below read "0..-1"
        raise ValueError("folds: need at least 3 (one test, one validation, the rest training)")
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in 0..{k - 1}, got {fold}")
    unknown = sorted(set(test_only_sources) - set(df["source"]))
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; the manifest has {sorted(set(df['source']))}")
    held = df["source"].isin(list(test_only_sources))
    # a patient both in a held-out source and in the rotation would be trained on and tested
    crossing = sorted(set(df.loc[held, "patient_id"]) & set(df.loc[~held, "patient_id"]))
    if crossing:
        raise PatientsAcrossSources(crossing)
    folds = pd.Series(-1, index=df.index)
    if (~held).any():
        patients = df.loc[~held, "patient_id"].nunique()
        if k > patients:  # 100 folds of 18 patients wrote a split without test rows, exit 0 (an audit)
            raise ValueError(f"--folds {k}: the manifest has {patients} patients to fold; give at most {patients}")
        folds[~held] = case_folds(df[~held], k, seed)
        # folds are dealt per source and kind, so even k <= patients can leave one empty: 9 folds of 9
        # patients wrote an all-train rotation (an audit)
        empty = [name for name, f in (("test", fold), ("validation", (fold + 1) % k)) if not (folds == f).any()]
        if empty:
            raise ValueError(f"--folds {k}: rotation {fold} has no {' and no '.join(empty)} patient among the "
                             f"{patients} folded (folds are dealt per source and kind); give fewer folds")
    names = folds.map(lambda f: Split.TEST.value if f == fold else
                      Split.VAL.value if f == (fold + 1) % k else Split.TRAIN.value)
    names[held] = Split.TEST.value
    return names.rename("split")


# --- duplicates: copies of one photo must not sit on both sides of a split -------------------

def _members(df: pd.DataFrame, groups: pd.DataFrame) -> pd.DataFrame:
    """The manifest rows that are members of a duplicate group: row index, path, group."""
    group_of = {path_key(p): g for p, g in zip(groups["path"].astype(str), groups["group"].astype(int))}
    rows = [(i, p, group_of[path_key(p)]) for i, p in zip(df.index, df["path"].astype(str)) if path_key(p) in group_of]
    return pd.DataFrame(rows, columns=["row", "path", "group"])


def duplicates_across_splits(df: pd.DataFrame, groups: pd.DataFrame) -> dict[int, dict[str, list[str]]]:
    """Groups (find_duplicates' table) whose members landed in more than one split:
    group -> {split: [paths]}. A blank split (a source left out) holds nothing, so it never
    counts as a side."""
    found: dict[int, dict[str, list[str]]] = {}
    members = _members(df, groups)
    members["split"] = df.loc[members["row"], "split"].to_numpy() if len(members) else []
    for group, part in members[members["split"] != ""].groupby("group", sort=True):
        if part["split"].nunique() > 1:
            found[int(group)] = {s: sorted(p["path"]) for s, p in part.groupby("split", sort=True)}
    return found


@dataclass(frozen=True)
class PatientMerge:
    patient_id: pd.Series  # a patient id per row, copies of one photo under one id
    groups_merged: int  # groups whose members had several patient ids
    patients_merged: int  # patient ids that were folded into another


def merge_duplicate_patients(df: pd.DataFrame, groups: pd.DataFrame) -> PatientMerge:
    """One patient id for every patient holding a member of one group: a copy filed under
    two ids is more likely one patient entered twice than two patients, and the patient's
    other photos must then follow it. Ids are joined transitively and the merged patient
    takes the id of its first photo in path order."""
    members = _members(df, groups)
    members["patient"] = df.loc[members["row"], "patient_id"].to_numpy() if len(members) else []
    parent: dict[str, str] = {}

    def find(p: str) -> str:
        while parent.get(p, p) != p:
            parent[p] = parent.get(parent[p], parent[p])
            p = parent[p]
        return p

    spanning = 0
    for _, part in members.groupby("group", sort=True):
        ids = list(dict.fromkeys(part.sort_values("path")["patient"]))
        spanning += len(ids) > 1
        for other in ids[1:]:
            a, b = find(ids[0]), find(other)
            if a != b:
                parent[b] = a
    if not parent:
        return PatientMerge(df["patient_id"].copy(), 0, 0)
    root = df["patient_id"].map(lambda p: find(p))
    # name each merged patient after its first photo in path order, not the union's accident
    first_id = df.assign(_root=root).sort_values("path").groupby("_root", sort=False)["patient_id"].first()
    merged = root.map(first_id)
    changed = df.loc[merged != df["patient_id"], "patient_id"].nunique()
    return PatientMerge(merged.rename("patient_id"), spanning, int(changed))


def split_fingerprint(df: pd.DataFrame) -> str | None:
    """Which photo is in which split, wherever the files lie: the sha256 of the sorted
    `photo sha256,split` lines (None without both columns). Cards record the one their
    models were trained under, so that an evaluation on another split is said: the recipe's
    split, rebuilt with copies merged into one patient, put 53 of the shipped weights'
    training photos into its test split."""
    if "sha256" not in df.columns or "split" not in df.columns:
        return None
    # a row without a sha256 counts by its path: left out, two such rows could trade splits
    # and the split still read as the weights' own (an audit); hex digits in either case
    shas = df["sha256"].fillna("").astype(str).str.strip().str.lower()
    lines = sorted(f"{s},{p}" if s else f"path:{path},{p}"
                   for s, path, p in zip(shas, df["path"].astype(str), df["split"].astype(str)))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest() if any(shas) else None
