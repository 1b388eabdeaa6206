"""Dataset statistics: counts per source x kind x split, the imbalance, and a log-scale chart
in the manner of hSDB's Fig. 3 (class counts span orders of magnitude, so linear bars hide
exactly the classes that matter)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipelines.data.schema import NON_REGULAR_KINDS, Kind
from pipelines.outputs import finite_or_null

_KIND_ORDER = [k.value for k in Kind] + ["unknown"]


@dataclass
class DatasetStats:
    table: pd.DataFrame  # rows (source, kind); columns: one per split, then "total"
    n_images: int
    n_patients: int
    by_kind: dict[str, int]
    imbalance_ratio: float  # regular : non-regular (inf when there is no non-regular image)
    split_imbalance: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        rows = [
            {"source": s, "kind": k, **{c: int(v) for c, v in r.items()}}
            for (s, k), r in self.table.iterrows()
        ]
        return {
            "n_images": self.n_images, "n_patients": self.n_patients, "by_kind": self.by_kind,
            # no non-regular image: null, as JSON has no Infinity (json.dumps wrote one, invalid JSON)
            "imbalance_ratio": finite_or_null(self.imbalance_ratio),
            "split_imbalance": finite_or_null(self.split_imbalance),
            "counts": rows,
        }


def _ratio(kinds: pd.Series) -> float:
    regular = int((kinds == Kind.REGULAR.value).sum())
    nonreg = int(kinds.isin([k.value for k in NON_REGULAR_KINDS]).sum())
    return regular / nonreg if nonreg else math.inf


def compute_stats(df: pd.DataFrame) -> DatasetStats:
    kinds = df["kind"].replace("", "unknown")
    splits = df["split"].replace("", "unsplit") if "split" in df.columns else pd.Series("all", index=df.index)
    table = pd.crosstab([df["source"], kinds.rename("kind")], splits.rename("split"))
    table["total"] = table.sum(axis=1)
    order = sorted(table.index, key=lambda sk: (sk[0], _KIND_ORDER.index(sk[1]) if sk[1] in _KIND_ORDER else 99))
    table = table.loc[order]
    split_imb = {str(s): _ratio(kinds[splits == s]) for s in sorted(splits.unique())}
    return DatasetStats(
        table=table,
        n_images=len(df),
        n_patients=int(df["patient_id"].nunique()),
        by_kind={k: int(v) for k, v in kinds.value_counts().items()},
        imbalance_ratio=_ratio(kinds),
        split_imbalance=split_imb,
    )


def plot_counts(stats: DatasetStats, path: str | Path) -> Path:
    """Grouped bars, one panel per split, sources on x, a bar per kind, log-scale counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [c for c in stats.table.columns if c != "total"]
    sources = list(dict.fromkeys(s for s, _ in stats.table.index))
    kinds = [k for k in _KIND_ORDER if k in {k for _, k in stats.table.index}]
    colours = {"regular": "#6b8fb8", "green": "#3fa34d", "iodine": "#a0522d", "no_cervix": "#888888", "unknown": "#cccccc"}
    fig, axes = plt.subplots(1, len(splits), figsize=(4.5 * len(splits) + 1, 4.2), squeeze=False, sharey=True)
    width = 0.8 / max(1, len(kinds))
    for ax, split in zip(axes[0], splits):
        for j, kind in enumerate(kinds):
            xs, ys = [], []
            for i, src in enumerate(sources):
                n = int(stats.table[split].get((src, kind), 0))
                if n > 0:
                    xs.append(i + (j - (len(kinds) - 1) / 2) * width)
                    ys.append(n)
            ax.bar(xs, ys, width=width, label=kind, color=colours.get(kind, "#999999"))
        ax.set_yscale("log")
        ax.set_title(f"{split}")
        ax.set_xticks(range(len(sources)), sources, rotation=30, ha="right")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("images (log scale)")
    axes[0][-1].legend(title="kind", fontsize=8)
    ratio = "inf" if math.isinf(stats.imbalance_ratio) else f"{stats.imbalance_ratio:.1f}"
    fig.suptitle(f"{stats.n_images} images, {stats.n_patients} patients; regular : non-regular = {ratio} : 1")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
