import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.data.splits import SplitFractions, cross_source_split, patient_split

KINDS = ["regular", "regular", "regular", "green", "iodine", "no_cervix", ""]


@st.composite
def manifests(draw) -> pd.DataFrame:
    n_patients = draw(st.integers(1, 40))
    sources = draw(st.lists(st.sampled_from(["A", "B", "C", "D"]), min_size=1, max_size=4, unique=True))
    rows = []
    for p in range(n_patients):
        src = draw(st.sampled_from(sources))
        for j in range(draw(st.integers(1, 6))):
            rows.append({"path": f"{p}/{j}.jpg", "patient_id": f"{src}{p}", "source": src,
                         "device": "d", "kind": draw(st.sampled_from(KINDS))})
    return pd.DataFrame(rows)


fractions = st.tuples(st.floats(0.05, 1), st.floats(0, 1), st.floats(0, 1)).map(
    lambda t: SplitFractions(*(v / sum(t) for v in t))
)


@settings(max_examples=150, deadline=None)
@given(df=manifests(), shares=fractions, seed=st.integers(0, 2**16))
def test_no_patient_is_ever_in_two_splits(df, shares, seed):
    split = patient_split(df, shares, seed)
    assert split.notna().all() and split.isin(["train", "val", "test"]).all()
    assert (df.assign(split=split).groupby("patient_id")["split"].nunique() == 1).all()
    pd.testing.assert_series_equal(split, patient_split(df, shares, seed))  # seeded


@settings(max_examples=150, deadline=None)
@given(df=manifests(), seed=st.integers(0, 2**16), data=st.data())
def test_cross_source_split_keeps_each_source_in_its_own_splits(df, seed, data):
    present = sorted(df["source"].unique())
    train = data.draw(st.lists(st.sampled_from(present), min_size=1, unique=True))
    val = data.draw(st.lists(st.sampled_from(present), unique=True))
    test = data.draw(st.lists(st.sampled_from(present), unique=True))
    split = cross_source_split(df, train, val, test, seed=seed)
    allowed = {s: {n for n, members in (("train", train), ("val", val), ("test", test)) if s in members} or {""}
               for s in present}
    for source, got in df.assign(split=split).groupby("source")["split"]:
        assert set(got) <= allowed[source]
    assert (df.assign(split=split).groupby("patient_id")["split"].nunique() == 1).all()


def test_large_strata_come_within_one_patient_of_the_fractions():
    rows = [{"path": f"{p}.jpg", "patient_id": f"p{p}", "source": "A", "device": "d",
             "kind": "green" if p % 10 == 0 else "regular"} for p in range(1000)]
    df = pd.DataFrame(rows)
    split = patient_split(df, SplitFractions(0.7, 0.15, 0.15), seed=3)
    for kind, n in (("regular", 900), ("green", 100)):
        got = split[df["kind"] == kind].value_counts()
        assert abs(got["train"] - 0.7 * n) <= 1 and abs(got["val"] - 0.15 * n) <= 1


def test_patients_with_a_few_non_regular_photos_are_spread_as_their_rarest_kind():
    """Two regular photos and one iodine make an iodine patient: counted as regular, the three
    such patients could all land in one split (a mutation taking the commoner kind survived)."""
    rows = [{"path": f"r{p}.jpg", "patient_id": f"r{p}", "source": "A", "device": "d", "kind": "regular"}
            for p in range(10)]
    rows += [{"path": f"m{p}-{k}.jpg", "patient_id": f"m{p}", "source": "A", "device": "d", "kind": kind}
             for p in range(3) for k, kind in enumerate(("regular", "regular", "iodine"))]
    df = pd.DataFrame(rows)
    for seed in range(10):
        split = patient_split(df, SplitFractions(1 / 3, 1 / 3, 1 / 3), seed=seed)
        mixed = split[df["patient_id"].str.startswith("m")].groupby(df["patient_id"]).first()
        assert sorted(mixed) == ["test", "train", "val"], seed


def test_paper_style_cross_source_split_divides_a_shared_source_by_patient():
    # China is in train and val, Nigeria train only, MobileODT val only, Peru test only.
    rows = []
    for src, n in (("china", 100), ("nigeria", 50), ("mobileodt", 30), ("peru", 20)):
        rows += [{"path": f"{src}/{p}.jpg", "patient_id": f"{src}-{p}", "source": src, "device": "d",
                  "kind": "regular"} for p in range(n)]
    df = pd.DataFrame(rows)
    split = cross_source_split(df, ["china", "nigeria"], ["china", "mobileodt"], ["peru"], seed=0)
    by = df.assign(split=split).groupby("source")["split"]
    assert set(by.get_group("peru")) == {"test"}
    assert set(by.get_group("nigeria")) == {"train"}
    china = by.get_group("china").value_counts()
    assert set(china.index) == {"train", "val"} and china["train"] > china["val"]


def test_cross_source_split_refuses_unknown_sources_and_patients_spanning_sources():
    df = pd.DataFrame([{"path": "a", "patient_id": "p", "source": "A", "device": "d", "kind": "regular"},
                       {"path": "b", "patient_id": "p", "source": "B", "device": "d", "kind": "regular"}])
    with pytest.raises(ValueError, match=r"unknown source\(s\) \['Z'\]"):
        cross_source_split(df, ["A"], ["Z"], [])
    with pytest.raises(ValueError, match="appear under several sources"):
        cross_source_split(df, ["A"], ["B"], [])


def test_fractions_must_sum_to_one():
    with pytest.raises(ValueError, match="sum to 1"):
        SplitFractions(0.5, 0.2, 0.2)


def test_k_fold_rotations_test_every_patient_once_and_keep_held_out_sources_in_test():
    from pipelines.data.splits import fold_split

    rng = np.random.default_rng(3)
    n = 120
    df = pd.DataFrame({"patient_id": [f"p{i // 2}" for i in range(n)],
                       "source": np.where(np.arange(n) < 100, "site", "gi"),
                       "kind": rng.choice(["regular"] * 8 + ["green", "iodine"], n)})
    df.loc[df.source == "gi", "kind"] = "no_cervix"
    tested = pd.Series(0, index=df.index)
    for fold in range(5):
        split = fold_split(df, 5, fold, seed=1, test_only_sources=["gi"])
        assert set(split[df.source == "gi"]) == {"test"}
        for patient, group in split.groupby(df["patient_id"]):
            assert group.nunique() == 1, patient  # a patient never straddles two splits
        tested += (split == "test") & (df.source == "site")
        nxt = fold_split(df, 5, (fold + 1) % 5, seed=1, test_only_sources=["gi"])
        assert ((split == "val") == ((nxt == "test") & (df.source == "site"))).all()  # val = next rotation's test
    assert (tested[df.source == "site"] == 1).all()
    for k in (2, 0, -2):  # --folds 0 said "fold must be in 0..-1"
        with pytest.raises(ValueError, match="at least 3"):
            fold_split(df, k, 0)
    with pytest.raises(ValueError, match="unknown source"):
        fold_split(df, 5, 0, test_only_sources=["nowhere"])


def test_a_patient_in_a_held_out_source_and_in_the_rotation_is_refused():
    """Held-out sources are test in every rotation: a patient also filed under a rotating source
    landed in train there and in test here, with exit 0."""
    from pipelines.data.splits import PatientsAcrossSources, fold_split

    df = pd.DataFrame({"patient_id": ["p1", "p2", "p3", "p4", "p1"], "source": ["a", "a", "a", "a", "b"],
                       "kind": ["regular"] * 5})
    with pytest.raises(PatientsAcrossSources, match="1 patient_id"):
        fold_split(df, 3, 0, test_only_sources=["b"])
    df.loc[4, "patient_id"] = "p9"
    assert fold_split(df, 3, 0, test_only_sources=["b"])[4] == "test"


def test_adding_a_collection_leaves_the_other_collections_folds_alone():
    from pipelines.data.splits import case_folds

    site = pd.DataFrame({"patient_id": [f"p{i}" for i in range(40)], "source": "site",
                         "kind": ["green" if i % 5 == 0 else "regular" for i in range(40)]})
    more = pd.DataFrame({"patient_id": [f"n{i}" for i in range(300)], "source": "gi", "kind": "no_cervix"})
    alone = case_folds(site, 5, seed=2)
    together = case_folds(pd.concat([site, more], ignore_index=True), 5, seed=2)[: len(site)]
    assert (alone == together).all()


def test_the_split_does_not_depend_on_the_rows_order_when_two_kinds_are_equally_rare():
    df = pd.DataFrame({"path": [f"{i}.jpg" for i in range(80)], "patient_id": [f"p{i // 2}" for i in range(80)],
                       "source": "s", "kind": ["green"] * 40 + ["iodine"] * 40})
    forward = patient_split(df, SplitFractions(0.6, 0.2, 0.2), seed=3)
    backward = patient_split(df.iloc[::-1].reset_index(drop=True), SplitFractions(0.6, 0.2, 0.2), seed=3)[::-1]
    assert dict(zip(df["patient_id"], forward)) == dict(zip(df["patient_id"], backward))


def test_the_split_fingerprint_counts_rows_without_a_sha256_by_path_and_reads_hex_in_either_case():
    from pipelines.data.splits import split_fingerprint

    df = pd.DataFrame({"path": ["a.jpg", "b.jpg", "c.jpg"], "sha256": ["ab" * 32, "", ""],
                       "split": ["train", "train", "test"]})
    traded = df.assign(split=["train", "test", "train"])  # the two photos without a sha256 trade sides
    assert split_fingerprint(df) != split_fingerprint(traded)
    assert split_fingerprint(df) == split_fingerprint(df.assign(sha256=["AB" * 32, "", ""]))
    assert split_fingerprint(df.assign(sha256="")) is None


def test_a_rotation_whose_test_or_validation_fold_came_out_empty_is_refused():
    """Folds are dealt per source and kind: 9 folds of 9 patients wrote a rotation without
    validation (or test) patients, exit 0 (an audit)."""
    from pipelines.data.splits import fold_split

    df = pd.DataFrame({"path": [f"{i}.jpg" for i in range(9)], "patient_id": [f"p{i}" for i in range(9)],
                       "source": ["a"] * 3 + ["b"] * 3 + ["c"] * 3, "kind": ["regular", "green", "iodine"] * 3})
    with pytest.raises(ValueError, match="rotation 0 has no validation patient among the 9 folded"):
        fold_split(df, 9, 0, seed=0)
    with pytest.raises(ValueError, match="the manifest has 9 patients to fold; give at most 9"):
        fold_split(df, 10, 0, seed=0)
