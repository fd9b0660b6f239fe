"""Statistics of the language subnetworks (the paper's Appendix D and Fig 8 left): their one home. The
subnetwork stage's ``subnetworks/stats/`` and the report's mask sections both compute from here.

Masks are L×H arrays of 0/1 where 1 marks an enabled head, so a language's subnetwork
is the set of its ones. Every function takes ``masks`` (language -> mask) and the
language order to report in; ``write_mask_statistics`` turns them into the CSV tables
and annotated PNG heatmaps of ``subnetworks/stats/`` (names fixed by the file contract).
numpy + matplotlib only: no Lightning, so a notebook can import this.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .atomic import save_figure, write_csv_atomic
from .masks import MaskError, load_subnetworks


def _stack(masks: dict[str, np.ndarray], languages: list[str]) -> np.ndarray:
    """(N, L, H) int array of the languages' masks, in order; shapes must agree."""
    missing = [lang for lang in languages if lang not in masks]
    if missing:
        raise MaskError(f"no mask for language(s) {missing}; have {sorted(masks)}")
    shapes = {lang: np.shape(masks[lang]) for lang in languages}
    if len(set(shapes.values())) > 1:
        raise MaskError(f"masks have different shapes (layers x heads): {shapes}")
    return np.stack([np.asarray(masks[lang], dtype=np.int64) for lang in languages])


def disabled_heads(masks: dict[str, np.ndarray], languages: list[str]) -> list[dict]:
    """Table 1: per language, the number of disabled heads, all heads, and the percentage disabled."""
    stacked = _stack(masks, languages)
    total = int(stacked[0].size) if len(languages) else 0
    rows = []
    for lang, mask in zip(languages, stacked):
        off = int(total - mask.sum())
        rows.append(
            {
                "language": lang,
                "disabled_heads": off,
                "total_heads": total,
                "percent_disabled": 100.0 * off / total,
            }
        )
    return rows


def head_usage(masks: dict[str, np.ndarray], languages: list[str]) -> np.ndarray:
    """Fig 12: L×H, how many of the languages' subnetworks enable each head (0..N)."""
    return _stack(masks, languages).sum(axis=0)


def usage_per_layer(masks: dict[str, np.ndarray], languages: list[str]) -> np.ndarray:
    """L×(N+1): entry (l, k) counts the heads of layer l enabled by exactly k languages."""
    usage = head_usage(masks, languages)
    n = len(languages)
    return np.stack([np.bincount(row, minlength=n + 1) for row in usage])


def overlap_absolute(masks: dict[str, np.ndarray], languages: list[str]) -> np.ndarray:
    """N×N: entry (a, b) = heads enabled in both a's and b's subnetworks (diagonal: a's size)."""
    flat = _stack(masks, languages).reshape(len(languages), -1)
    return flat @ flat.T


def overlap_percent(masks: dict[str, np.ndarray], languages: list[str]) -> np.ndarray:
    """N×N: entry (a, b) = % of a's enabled heads that b also enables (row a is the denominator).

    Not symmetric: a small subnetwork can sit entirely inside a large one (the paper's
    German-inside-English example). NaN for a language with no enabled head.
    """
    both = overlap_absolute(masks, languages).astype(np.float64)
    size = np.diag(both).copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(size[:, None] > 0, 100.0 * both / size[:, None], np.nan)


def _cosine(flat: np.ndarray) -> np.ndarray:
    flat = flat.astype(np.float64)
    norms = np.linalg.norm(flat, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (flat @ flat.T) / np.outer(norms, norms)


def mask_cosine(masks: dict[str, np.ndarray], languages: list[str]) -> np.ndarray:
    """Fig 8 (left): N×N cosine similarity of the flattened 0/1 masks (NaN if a mask is all zeros)."""
    return _cosine(_stack(masks, languages).reshape(len(languages), -1))


def mask_cosine_per_layer(masks: dict[str, np.ndarray], languages: list[str]) -> np.ndarray:
    """(L, N, N): the cosine similarity of each layer's masks (Fig 9's per-layer similarity)."""
    stacked = _stack(masks, languages)
    return np.stack([_cosine(stacked[:, layer, :]) for layer in range(stacked.shape[1])])


# -- files ---------------------------------------------------------------------------------


def _cell(value) -> str:
    if isinstance(value, float | np.floating):
        return "nan" if np.isnan(value) else repr(float(value))
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


OUTCOME_KEYS = ("majority_rate", "degenerate")  # of each subnetworks/<lang>.json, appended to Table 1


def search_outcomes(subnetworks_dir: Path, languages: list[str]) -> dict[str, list]:
    """Per language, the JSON's ``majority_rate`` and ``degenerate`` ("" where the key is missing:
    JSONs written before the search recorded them), so Table 1 shows which subnetworks are noise."""
    outcomes = {}
    for lang in languages:
        data = json.loads((subnetworks_dir / f"{lang}.json").read_text(encoding="utf-8"))
        outcomes[lang] = ["" if data.get(key) is None else data[key] for key in OUTCOME_KEYS]
    return outcomes


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    """Write a CSV atomically, numbers at full precision."""
    return write_csv_atomic(path, header, [[_cell(v) for v in row] for row in rows])


def _matrix_rows(matrix: np.ndarray, languages: list[str]) -> list[list]:
    return [[lang, *matrix[i].tolist()] for i, lang in enumerate(languages)]


def plot_heatmap(
    matrix: np.ndarray,
    row_labels: list[str],
    col_labels: list[str],
    title: str,
    path: Path,
    fmt: str = "{:.0f}",
    xlabel: str = "",
    ylabel: str = "",
    ax=None,
) -> Path | None:
    """An annotated heatmap (rows top to bottom in the given order); PNG written atomically.

    With ``ax`` it draws into that axis and writes nothing (for multi-panel figures).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        width = max(4.0, 0.6 * len(col_labels) + 2.0)
        height = max(3.0, 0.5 * len(row_labels) + 1.5)
        fig, ax = plt.subplots(figsize=(width, height))
    values = np.asarray(matrix, dtype=np.float64)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(col_labels)), labels=col_labels)
    ax.set_yticks(range(len(row_labels)), labels=row_labels)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            text = "n/a" if not np.isfinite(v) else fmt.format(v)
            color = "gray" if not np.isfinite(v) else "black" if v > middle else "white"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=7)
    if not own:
        return None
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def _plot_per_layer(cosines: np.ndarray, languages: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = cosines.shape[0]
    cols = min(4, n_layers)
    rows = -(-n_layers // cols)
    side = max(2.5, 0.45 * len(languages) + 1.0)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows), squeeze=False)
    for layer in range(rows * cols):
        ax = axes[layer // cols][layer % cols]
        if layer >= n_layers:
            ax.axis("off")
            continue
        plot_heatmap(cosines[layer], languages, languages, f"layer {layer}", path, "{:.2f}", ax=ax)
    fig.suptitle("cosine similarity of subnetwork masks per layer")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def write_mask_statistics(subnetworks_dir: str | Path, languages: list[str]) -> dict[str, Path]:
    """Read ``<subnetworks_dir>/<lang>.json`` for each language and write ``<subnetworks_dir>/stats/``.

    Returns name -> path of every file written. Rows and columns follow ``languages``.
    """
    subnetworks_dir = Path(subnetworks_dir)
    languages = list(languages)
    if not languages:
        raise MaskError(f"{subnetworks_dir}: no languages given to compute mask statistics for")
    masks = load_subnetworks(subnetworks_dir, languages)
    out = subnetworks_dir / "stats"
    out.mkdir(parents=True, exist_ok=True)
    n_layers, n_heads = masks[languages[0]].shape
    n = len(languages)
    files: dict[str, Path] = {}

    table = disabled_heads(masks, languages)
    header = ["language", "disabled_heads", "total_heads", "percent_disabled"]
    outcome = search_outcomes(subnetworks_dir, languages)
    files["table1"] = write_csv(
        out / "table1_disabled_heads.csv",
        [*header, *OUTCOME_KEYS],  # new columns at the end: readers index the first four
        [[*(r[k] for k in header), *outcome[r["language"]]] for r in table],
    )

    usage = head_usage(masks, languages)
    files["head_usage"] = write_csv(
        out / "head_usage.csv",
        ["layer", "head", "n_languages", "languages"],
        [
            [layer, head, int(usage[layer, head]), " ".join(g for g in languages if masks[g][layer, head])]
            for layer in range(n_layers)
            for head in range(n_heads)
        ],
    )
    heads = [str(h) for h in range(n_heads)]
    layers = [str(layer) for layer in range(n_layers)]
    files["head_usage_png"] = plot_heatmap(
        usage,
        layers,
        heads,
        f"languages using each head (0..{n})",
        out / "heads_usage.png",
        xlabel="head",
        ylabel="layer",
    )
    per_layer = usage_per_layer(masks, languages)
    files["usage_per_layer"] = write_csv(
        out / "heads_usage_per_layer.csv",
        ["layer", *[f"used_by_{k}" for k in range(n + 1)]],
        [[layer, *per_layer[layer].tolist()] for layer in range(n_layers)],
    )
    files["usage_per_layer_png"] = plot_heatmap(
        per_layer,
        layers,
        [str(k) for k in range(n + 1)],
        "heads per layer used by k languages",
        out / "heads_usage_per_layer.png",
        xlabel="k languages",
        ylabel="layer",
    )

    header = ["language", *languages]
    absolute = overlap_absolute(masks, languages)
    files["overlap_absolute"] = write_csv(
        out / "overlap_absolute.csv", header, _matrix_rows(absolute, languages)
    )
    files["overlap_absolute_png"] = plot_heatmap(
        absolute, languages, languages, "heads enabled in both subnetworks", out / "overlap_absolute.png"
    )
    percent = overlap_percent(masks, languages)
    files["overlap_percent"] = write_csv(
        out / "overlap_percent.csv", header, _matrix_rows(percent, languages)
    )
    files["overlap_percent_png"] = plot_heatmap(
        percent,
        languages,
        languages,
        "% of the row language's heads shared with the column language",
        out / "overlap_percent.png",
        "{:.0f}",
    )
    cosine = mask_cosine(masks, languages)
    files["cosine"] = write_csv(out / "mask_cosine.csv", header, _matrix_rows(cosine, languages))
    files["cosine_png"] = plot_heatmap(
        cosine,
        languages,
        languages,
        "cosine similarity of flattened masks",
        out / "mask_cosine.png",
        "{:.2f}",
    )
    per_layer_cos = mask_cosine_per_layer(masks, languages)
    files["cosine_per_layer"] = write_csv(
        out / "mask_cosine_per_layer.csv",
        ["layer", "language_a", "language_b", "cosine"],
        [
            [layer, a, b, float(per_layer_cos[layer, i, j])]
            for layer in range(n_layers)
            for i, a in enumerate(languages)
            for j, b in enumerate(languages)
        ],
    )
    files["cosine_per_layer_png"] = _plot_per_layer(
        per_layer_cos, languages, out / "mask_cosine_per_layer.png"
    )
    return files
