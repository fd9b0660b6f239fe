"""Are the language subnetworks stable across training seeds?

A language's subnetwork is the set of enabled heads (the ones) of its L×H 0/1 mask. When
the model is fine-tuned with several training seeds and the head-importance pruning is run
on each, we get one mask per (seed, language). The modularity claim — "a language has its
own subnetwork" — only means something if a language's masks from two seeds are closer to
each other than to another language's masks, and closer than two random masks of the same
sizes would be. This module measures exactly that:

* per language: the mean pairwise Jaccard of its masks across seeds, the heads disabled in
  every seed and in no seed, and the Jaccard two random masks of the same sizes would have
  (exact, from the hypergeometric law of the intersection);
* Table 1 over seeds: disabled heads min / max / mean and the number of degenerate masks;
* one number for modularity, J_same − J_other, with a permutation p-value that shuffles the
  language labels within each seed.

The numbers only; ``mask_stability_files.write_mask_stability`` writes them as the CSV, the JSON
summary and two figures. numpy only (no Lightning, no torch, no scipy); every random draw comes from a
generator seeded by ``name_seed``, never from the global RNG.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..masks import MaskError, _read_subnetwork, check_mask, name_seed

SeedMasks = dict[int, dict[str, np.ndarray]]
"""training seed -> language -> L×H 0/1 mask."""

RANDOM_DRAWS = 2000
PERMUTATIONS = 2000


# -- input ---------------------------------------------------------------------------------


class LoadedSeedMasks(NamedTuple):
    """What ``load_seed_masks`` read: the masks plus the files' optional per-mask keys."""

    masks: SeedMasks
    degenerate: dict[int, dict[str, bool]]
    """seed -> language -> the file's ``degenerate`` flag (False where the key is absent)."""
    disabled_heads: dict[int, dict[str, object]]
    """seed -> language -> the file's ``disabled_heads`` value as stored (None where absent)."""


def check_seed_masks(masks: SeedMasks) -> tuple[list[int], list[str], tuple[int, int]]:
    """Validate ``masks`` and return (seeds in ascending order, languages, mask shape).

    Stability is only defined when every seed has a mask for the same languages, all of
    one shape; a mismatch is refused here, naming the seed and the language, rather than
    silently comparing different things. The language order is the first seed's.
    """
    if not isinstance(masks, dict) or len(masks) < 2:
        found = sorted(masks) if isinstance(masks, dict) else type(masks).__name__
        raise MaskError(f"mask stability needs masks from at least 2 training seeds, got {found}")
    seeds = sorted(masks)
    ref = seeds[0]
    languages = list(masks[ref])
    if not languages:
        raise MaskError(f"seed {ref}: no language masks")
    shape: tuple[int, int] | None = None
    for seed in seeds:
        have = masks[seed]
        if not isinstance(have, dict):
            raise MaskError(f"seed {seed}: expected language -> mask, found {type(have).__name__}")
        for lang in languages:
            if lang not in have:
                raise MaskError(f"seed {seed}: no mask for language {lang!r} (seed {ref} has one)")
        for lang in have:
            if lang not in languages:
                raise MaskError(f"seed {seed}: mask for language {lang!r} that seed {ref} does not have")
        for lang in languages:
            arr = check_mask(have[lang], shape, f"seed {seed}, language {lang!r}")
            shape = shape or (int(arr.shape[0]), int(arr.shape[1]))
    assert shape is not None
    return seeds, languages, shape


def load_seed_masks(subnetwork_dirs: dict[int, Path], languages: list[str] | None = None) -> LoadedSeedMasks:
    """Read ``<dir>/<lang>.json`` (key ``mask``) for every training seed's subnetworks dir.

    Without ``languages``, every ``*.json`` in each dir is a language (its file stem). The
    optional keys ``degenerate`` (absent: False) and ``disabled_heads`` come back alongside,
    so a degenerate search can be counted and marked instead of passing for a real mask.
    The result is validated with ``check_seed_masks``.
    """
    masks: SeedMasks = {}
    degenerate: dict[int, dict[str, bool]] = {}
    disabled: dict[int, dict[str, object]] = {}
    for seed, directory in sorted(subnetwork_dirs.items()):
        directory = Path(directory)
        if not directory.is_dir():
            raise MaskError(f"seed {seed}: subnetworks directory not found: {directory}")
        langs = languages if languages is not None else sorted(p.stem for p in directory.glob("*.json"))
        if not langs:
            raise MaskError(f"seed {seed}: no <lang>.json subnetwork files in {directory}")
        masks[seed], degenerate[seed], disabled[seed] = {}, {}, {}
        for lang in langs:
            path = directory / f"{lang}.json"
            data = _read_subnetwork(path)
            if "language" in data and data["language"] != lang:
                raise MaskError(
                    f"{path}: key 'language' is {data['language']!r}, expected {lang!r} (file name)"
                )
            masks[seed][lang] = check_mask(data["mask"], None, f"{path}: key 'mask'")
            flag = data.get("degenerate", False)
            if not isinstance(flag, bool):
                raise MaskError(f"{path}: key 'degenerate' must be true or false, found {flag!r}")
            degenerate[seed][lang] = flag
            disabled[seed][lang] = data.get("disabled_heads")
    check_seed_masks(masks)
    return LoadedSeedMasks(masks, degenerate, disabled)


def _check_degenerate(
    degenerate: dict[int, dict[str, bool]] | None, seeds: list[int], languages: list[str]
) -> dict[int, dict[str, bool]]:
    """Every (seed, language) -> bool; a flag for a mask that is not there is refused."""
    out = {seed: dict.fromkeys(languages, False) for seed in seeds}
    for seed, flags in (degenerate or {}).items():
        if seed not in out:
            raise MaskError(f"degenerate flags for seed {seed}, which has no masks (seeds {seeds})")
        for lang, flag in flags.items():
            if lang not in out[seed]:
                raise MaskError(f"seed {seed}: degenerate flag for language {lang!r}, which has no mask")
            out[seed][lang] = bool(flag)
    return out


def _stack(masks: SeedMasks) -> tuple[list[int], list[str], tuple[int, int], np.ndarray]:
    """(seeds, languages, shape, (S, G, L*H) bool array of the masks)."""
    seeds, languages, shape = check_seed_masks(masks)
    flat = np.stack([np.stack([np.asarray(masks[s][g]).reshape(-1) != 0 for g in languages]) for s in seeds])
    return seeds, languages, shape, flat


# -- Jaccard -------------------------------------------------------------------------------


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A∩B| / |A∪B| of the enabled-head sets of two masks; 1.0 when both are empty.

    Jaccard rather than cosine because it is a set overlap that does not reward two large
    subnetworks for sharing heads merely by being large (the random baseline says how much).
    Two empty subnetworks are the same set, hence 1.0.
    """
    a = check_mask(a, None, "jaccard: first mask")
    b = check_mask(b, a.shape, "jaccard: second mask")
    inter = int(np.logical_and(a, b).sum())
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else inter / union


def _jaccard_all(flat: np.ndarray) -> np.ndarray:
    """(M, M) Jaccard between every pair of rows of an (M, N) 0/1 array (1.0 for two empty rows)."""
    x = flat.astype(np.int64)
    inter = x @ x.T
    size = x.sum(axis=1)
    union = size[:, None] + size[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _pair_jaccard(flat: np.ndarray) -> np.ndarray:
    """(S, G, S, G): Jaccard between the mask of (seed s, language g) and that of (t, h)."""
    s, g, n = flat.shape
    return _jaccard_all(flat.reshape(s * g, n)).reshape(s, g, s, g)


def _per_language(pj: np.ndarray, languages: list[str]) -> dict[str, tuple[float, float]]:
    """Per language (J_same(lang), J_other(lang)) from an (S, G, S, G) pairwise Jaccard array.

    J_other(lang): the language's masks against other languages' masks from other seeds
    (NaN with a single language)."""
    n_seeds = pj.shape[0]
    cross = ~np.eye(n_seeds, dtype=bool)
    out = {}
    for g, lang in enumerate(languages):
        block = pj[:, g, :, :]  # (S, S, G): (s, t, h)
        same = block[:, :, g][cross].mean()  # each unordered pair twice: the same mean
        others = np.delete(block, g, axis=2)[cross]
        out[lang] = (float(same), float(others.mean()) if others.size else float("nan"))
    return out


def expected_random_jaccard(a: int, b: int, n: int) -> float:
    """E[J] of two independent uniformly random subsets of sizes ``a`` and ``b`` of ``n`` heads.

    The chance level a stability Jaccard must be compared with: sparse masks overlap little
    and dense ones a lot even at random. The intersection size k is hypergeometric,
    P(k) = C(a,k) C(n−a,b−k) / C(n,b), and J = k / (a+b−k), so E[J] = Σ_k P(k) k/(a+b−k)
    exactly (big-integer arithmetic, so no overflow). Both empty: 1.0, as in ``jaccard``.
    """
    for name, v in (("a", a), ("b", b), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise ValueError(f"expected_random_jaccard: {name} must be an integer, got {v!r}")
    a, b, n = int(a), int(b), int(n)
    if n < 0 or not (0 <= a <= n and 0 <= b <= n):
        raise ValueError(f"expected_random_jaccard: need 0 <= a, b <= n, got a={a}, b={b}, n={n}")
    if a == 0 and b == 0:
        return 1.0
    total = math.comb(n, b)
    expected = 0.0
    for k in range(max(1, a + b - n), min(a, b) + 1):  # k = 0 adds nothing
        expected += (math.comb(a, k) * math.comb(n - a, b - k) / total) * (k / (a + b - k))
    return expected


@dataclass(frozen=True)
class RandomBaseline:
    """Mean pairwise Jaccard across seeds expected for random masks of the same sizes."""

    mean: float
    """exact: the mean over seed pairs of ``expected_random_jaccard``."""
    low: float
    """2.5 % quantile of the mean pairwise Jaccard over seeded random draws."""
    high: float
    """97.5 % quantile of the same."""
    draws: int


def random_jaccard_baseline(
    enabled: Sequence[int], n_heads: int, lang: str, draws: int = RANDOM_DRAWS
) -> RandomBaseline:
    """What ``jaccard_across_seeds`` would be if each seed's mask were a random set of its size.

    ``enabled`` holds the per-seed numbers of enabled heads. The mean is exact; the 95 %
    range of the mean over seed pairs has no closed form, so it is read off ``draws``
    random draws from a generator seeded by ``name_seed("mask-stability", lang, ...)``,
    the same numbers in every process.
    """
    sizes = [int(k) for k in enabled]
    if len(sizes) < 2:
        raise ValueError(f"random_jaccard_baseline: need at least 2 seeds' sizes, got {sizes}")
    if draws < 1:
        raise ValueError(f"random_jaccard_baseline: draws must be >= 1, got {draws}")
    pairs = list(itertools.combinations(range(len(sizes)), 2))
    mean = float(np.mean([expected_random_jaccard(sizes[i], sizes[j], n_heads) for i, j in pairs]))
    rng = np.random.default_rng(name_seed("mask-stability", lang, "random-baseline", n_heads, *sizes))
    order = np.argsort(rng.random((draws, len(sizes), n_heads)), axis=2)
    chosen = np.arange(n_heads)[None, None, :] < np.asarray(sizes)[None, :, None]
    drawn = np.zeros((draws, len(sizes), n_heads), dtype=np.int64)
    np.put_along_axis(drawn, order, np.broadcast_to(chosen, drawn.shape).astype(np.int64), axis=2)
    inter = np.einsum("dsn,dtn->dst", drawn, drawn)
    size = np.asarray(sizes)
    union = size[:, None] + size[None, :] - inter
    jac = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    ii, jj = np.array(pairs).T
    per_draw = jac[:, ii, jj].mean(axis=1)
    low, high = np.quantile(per_draw, [0.025, 0.975])
    return RandomBaseline(mean, float(low), float(high), draws)


# -- per language --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LanguageStability:
    """How much one language's subnetwork agrees with itself across training seeds."""

    language: str
    jaccard_across_seeds: float
    """mean Jaccard over all pairs of seeds of this language's masks."""
    jaccard_to_other_languages: float
    """mean Jaccard of this language's masks with other languages' masks from other seeds."""
    random_jaccard: RandomBaseline
    disabled_in_every_seed: np.ndarray
    """L×H bool: heads no seed's subnetwork uses (a robust "not needed for this language")."""
    disabled_in_no_seed: np.ndarray
    """L×H bool: heads every seed's subnetwork uses (the robust core)."""
    enabled_heads: tuple[int, ...]
    """per seed, in ascending seed order: the number of enabled heads."""


def language_stability(masks: SeedMasks, draws: int = RANDOM_DRAWS) -> dict[str, LanguageStability]:
    """Per language: across-seed Jaccard, the heads that are always / never disabled, and chance.

    A subnetwork that is a property of the language (not of one training run) has a high
    across-seed Jaccard, well above both the random baseline and its Jaccard with other
    languages; the always-disabled and always-enabled heads are the part of it that
    does not depend on the seed.
    """
    seeds, languages, shape, flat = _stack(masks)
    per_language = _per_language(_pair_jaccard(flat), languages)
    out: dict[str, LanguageStability] = {}
    for g, lang in enumerate(languages):
        enabled = tuple(int(k) for k in flat[:, g, :].sum(axis=1))
        out[lang] = LanguageStability(
            language=lang,
            jaccard_across_seeds=per_language[lang][0],
            jaccard_to_other_languages=per_language[lang][1],
            random_jaccard=random_jaccard_baseline(enabled, flat.shape[2], lang, draws),
            disabled_in_every_seed=(~flat[:, g, :]).all(axis=0).reshape(shape),
            disabled_in_no_seed=flat[:, g, :].all(axis=0).reshape(shape),
            enabled_heads=enabled,
        )
    return out


def disabled_heads_over_seeds(
    masks: SeedMasks, degenerate: dict[int, dict[str, bool]] | None = None
) -> list[dict]:
    """Table 1 over seeds: per language, disabled heads min / max / mean and degenerate seeds.

    One seed's Table 1 can be a fluke of that run; the spread over seeds says how much of a
    language's sparsity is the language and how much the seed. Degenerate masks are
    counted, so a mean that hides them is visible.
    """
    seeds, languages, _, flat = _stack(masks)
    flags = _check_degenerate(degenerate, seeds, languages)
    total = flat.shape[2]
    rows = []
    for g, lang in enumerate(languages):
        off = total - flat[:, g, :].sum(axis=1)
        rows.append(
            {
                "language": lang,
                "total_heads": int(total),
                "disabled_min": int(off.min()),
                "disabled_max": int(off.max()),
                "disabled_mean": float(off.mean()),
                "degenerate_seeds": sum(flags[s][lang] for s in seeds),
            }
        )
    return rows


# -- modularity ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Modularity:
    """The modularity claim in numbers: same language across seeds vs other languages."""

    j_same: float
    """mean Jaccard over pairs (same language, different seeds)."""
    j_other: float
    """mean Jaccard over pairs (different languages, different seeds)."""
    j_within: float
    """mean Jaccard between different languages within one seed."""
    difference: float
    """j_same − j_other: > 0 when a language's masks are closer to each other than to others'."""
    same_by_language: dict[str, float]
    other_by_language: dict[str, float]
    """per language: mean Jaccard of its masks with other languages' masks from other seeds."""


def _need_two_languages(languages: list[str]) -> None:
    if len(languages) < 2:
        raise MaskError(f"modularity compares languages: need at least 2, got {languages}")


def modularity(masks: SeedMasks) -> Modularity:
    """J_same, J_other, J_within and J_same − J_other, overall and per language.

    J_other pairs different seeds as J_same does, so seed-level effects (one run pruning
    more than another) affect both alike and the difference is the language effect alone;
    J_within is the usual one-seed comparison, for reference.
    """
    seeds, languages, _, flat = _stack(masks)
    _need_two_languages(languages)
    pj = _pair_jaccard(flat)
    n_seeds, n_langs = len(seeds), len(languages)
    pairs = list(itertools.combinations(range(n_seeds), 2))
    off_diag = ~np.eye(n_langs, dtype=bool)
    same = np.mean([np.diag(pj[s, :, t, :]) for s, t in pairs])
    other = np.mean([pj[s, :, t, :][off_diag] for s, t in pairs])
    within = np.mean([pj[s, :, s, :][off_diag] for s in range(n_seeds)])
    stats = _per_language(pj, languages)
    return Modularity(
        j_same=float(same),
        j_other=float(other),
        j_within=float(within),
        difference=float(same - other),
        same_by_language={lang: v[0] for lang, v in stats.items()},
        other_by_language={lang: v[1] for lang, v in stats.items()},
    )


@dataclass(frozen=True)
class PermutationTest:
    """Is J_same − J_other larger than language labels shuffled within each seed would give?"""

    observed: float
    p_value: float
    """share of relabelings with J_same − J_other >= observed (Monte Carlo: (hits+1)/(n+1))."""
    n_permutations: int
    exact: bool
    """True when every distinct relabeling was enumerated (then ``p_value`` is exact)."""


def permutation_test(masks: SeedMasks, n_permutations: int = PERMUTATIONS) -> PermutationTest:
    """Permutation p-value of J_same − J_other under "the language label does not matter".

    Under that null, which of a seed's masks is called which language is arbitrary, so the
    labels are shuffled independently within each seed (keeping every seed's set of masks)
    and the statistic recomputed. Relabelings that apply one permutation to every seed give
    the same statistic, so seed 0 is held fixed: there are (G!)^(S−1) distinct ones, and
    when that is at most ``n_permutations`` they are all enumerated (exact p). Otherwise
    ``n_permutations`` are drawn from a generator seeded by ``name_seed``.
    """
    if n_permutations < 1:
        raise ValueError(f"permutation_test: n_permutations must be >= 1, got {n_permutations}")
    seeds, languages, _, flat = _stack(masks)
    _need_two_languages(languages)
    pj = _pair_jaccard(flat)
    n_seeds, n_langs = len(seeds), len(languages)
    pairs = list(itertools.combinations(range(n_seeds), 2))
    total_cross = float(sum(pj[s, :, t, :].sum() for s, t in pairs))
    n_same, n_other = n_langs * len(pairs), n_langs * (n_langs - 1) * len(pairs)

    def statistic(same_sum):
        return same_sum / n_same - (total_cross - same_sum) / n_other

    observed = statistic(float(sum(np.trace(pj[s, :, t, :]) for s, t in pairs)))
    distinct = math.factorial(n_langs) ** (n_seeds - 1)
    exact = distinct <= n_permutations
    if exact:
        each = list(itertools.permutations(range(n_langs)))
        perms = np.array(
            [[tuple(range(n_langs)), *rest] for rest in itertools.product(each, repeat=n_seeds - 1)],
            dtype=np.int64,
        ).reshape(distinct, n_seeds, n_langs)
    else:
        rng = np.random.default_rng(
            name_seed("mask-stability", "permutation", n_permutations, *seeds, *languages)
        )
        perms = rng.permuted(np.tile(np.arange(n_langs), (n_permutations, n_seeds, 1)), axis=2)
    # perms[p, s, g]: which of seed s's masks carries label g in relabeling p
    same_sums = np.zeros(len(perms))
    for s, t in pairs:
        same_sums += pj[s, :, t, :][perms[:, s, :], perms[:, t, :]].sum(axis=1)
    hits = int((statistic(same_sums) >= observed - 1e-12).sum())
    p = hits / len(perms) if exact else (hits + 1) / (len(perms) + 1)
    return PermutationTest(float(observed), float(p), int(len(perms)), exact)


def jaccard_matrix(masks: SeedMasks) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """Jaccard between every (language, seed) mask, ordered by language then seed.

    In this order modularity is block-diagonal structure: bright G blocks of S×S on the
    diagonal, darker between them. Returns the matrix and its (language, seed) labels.
    """
    seeds, languages, _, flat = _stack(masks)
    order = [(g, s) for g in range(len(languages)) for s in range(len(seeds))]
    rows = np.stack([flat[s, g] for g, s in order])
    return _jaccard_all(rows), [(languages[g], seeds[s]) for g, s in order]


# -- files ---------------------------------------------------------------------------------
