"""The statistics of a pairwise A/B human evaluation (emu_paper.txt, section 4.1).

Each prompt gives one pair of images, one from model A and one from model B. Several raters vote
on the pair; the pair's outcome is their majority vote; the report is the share of pairs model A
wins, ties and loses, with bootstrap confidence intervals over prompts.

Vote encoding, shared with the judges:

    A = +1        A is better
    B = -1        B is better
    TIE = 0       no preference (visual appeal's "Tie")
    BOTH = 2      both images match the prompt (text faithfulness)
    NEITHER = 3   neither image matches the prompt (text faithfulness)

The paper counts "Both" and "Neither" as a tie, so faithfulness votes go through
`faithfulness_to_ternary` before the majority vote. Nothing here knows about images or the toy world.
"""
import numpy as np

A, B, TIE, BOTH, NEITHER = 1, -1, 0, 2, 3
RATES = ("win", "tie", "lose")


def faithfulness_to_ternary(votes):
    """Map faithfulness votes {A, B, BOTH, NEITHER} to {+1, -1, 0}: Both and Neither are ties."""
    votes = np.asarray(votes)
    unknown = ~np.isin(votes, (A, B, TIE, BOTH, NEITHER))
    if unknown.any():
        raise ValueError(f"faithfulness votes must be in {{A, B, TIE, BOTH, NEITHER}}, got {np.unique(votes[unknown])}")
    return np.where((votes == BOTH) | (votes == NEITHER), TIE, votes).astype(np.int64)


def majority_vote(votes):
    """The outcome of each pair from its raters' votes.

    Rule: for each pair, count the votes for A (+1), Tie (0) and B (-1); the option with the most
    votes is the outcome. If two options share the most votes, the pair is a Tie: 2 A, 2 B, 1 Tie
    is a Tie (the raters are split), and so is 2 A, 1 B, 2 Tie (no majority prefers A).
    With 3 raters 2 A + 1 Tie is an A win; 1 A, 1 B, 1 Tie is a Tie.

    :param votes: (n_raters, n_pairs) integers in {+1, 0, -1}.
    :return: (n_pairs,) int64 array in {+1, 0, -1}, +1 = model A wins.
    """
    votes = np.asarray(votes)
    if votes.ndim != 2 or not np.isin(votes, (A, TIE, B)).all():
        raise ValueError(f"majority_vote wants an (n_raters, n_pairs) array of +1/0/-1, got shape {votes.shape}"
                         f" with values {np.unique(votes)[:6]}")
    counts = np.stack([(votes == option).sum(axis=0) for option in (A, TIE, B)])  # (3, n_pairs)
    top = counts.max(axis=0)
    unique_top = (counts == top).sum(axis=0) == 1
    winner = np.array([A, TIE, B])[counts.argmax(axis=0)]
    return np.where(unique_top, winner, TIE).astype(np.int64)


def win_rates(outcomes):
    """Percentages of pairs model A wins, ties and loses: {"win": %, "tie": %, "lose": %}."""
    outcomes = np.asarray(outcomes)
    if outcomes.size == 0:
        raise ValueError("win_rates needs at least one pair")
    return {"win": 100.0 * np.mean(outcomes == A), "tie": 100.0 * np.mean(outcomes == TIE),
            "lose": 100.0 * np.mean(outcomes == B)}


def bootstrap_ci(outcomes, n_boot=2000, seed=0, level=0.95):
    """Percentile bootstrap confidence intervals of the win / tie / lose rates.

    The unit of resampling is the prompt: each resample draws len(outcomes) prompts with
    replacement, and the interval is the central `level` range of the resampled rates.
    `outcomes` is (n_prompts,), or (n_prompts, n_repeats) when every prompt was judged several times
    (other seeds): a prompt's row is drawn whole, so its repeats, which are not independent, stay together.

    :return: {"win": (lo, hi), "tie": (lo, hi), "lose": (lo, hi)} in percent.
    """
    outcomes = np.asarray(outcomes)
    rng = np.random.default_rng(seed)
    resampled = outcomes[rng.integers(0, len(outcomes), size=(n_boot, len(outcomes)))]  # (n_boot, n_prompts[, n_repeats])
    resampled = resampled.reshape(n_boot, -1)
    tail = 100.0 * (1.0 - level) / 2
    intervals = {}
    for name, option in zip(RATES, (A, TIE, B)):
        rates = 100.0 * (resampled == option).mean(axis=1)
        intervals[name] = (float(np.percentile(rates, tail)), float(np.percentile(rates, 100.0 - tail)))
    return intervals


def summarize_outcomes(outcomes, n_boot=2000, seed=0, level=0.95):
    """Rates and intervals of one task's pair outcomes ((n_prompts,) or (n_prompts, n_repeats), see
    bootstrap_ci), as plain JSON-ready values: {"n": pairs, "win": %, "tie": %, "lose": %, "ci": {"win": [lo, hi], ...}, "level": level}."""
    rates = win_rates(outcomes)
    ci = bootstrap_ci(outcomes, n_boot=n_boot, seed=seed, level=level)
    return {"n": int(np.size(outcomes)), **{k: float(v) for k, v in rates.items()},
            "ci": {k: [lo, hi] for k, (lo, hi) in ci.items()}, "level": level}


def summarize(votes_by_task, n_boot=2000, seed=0, level=0.95):
    """Majority vote, rates and intervals for every task.

    :param votes_by_task: {task name: (n_raters, n_pairs) votes in {+1, 0, -1}}.
    :return: {task: summarize_outcomes(...) plus "raters": raters per pair}.
    """
    return {task: {**summarize_outcomes(majority_vote(votes), n_boot, seed, level), "raters": int(np.shape(votes)[0])}
            for task, votes in votes_by_task.items()}


def fleiss_kappa(counts):
    """Fleiss' kappa: how much raters agree beyond what chance would give.

    :param counts: (n_items, n_categories) array; counts[i, j] = raters who put item i in category j.
        Items may have different numbers of raters; items with fewer than two are ignored.
    :return: (kappa, observed agreement). The observed agreement of an item is the share of its
        ordered pairs of raters who agree; chance agreement comes from the pooled category shares.
        With the same number of raters on every item this is Fleiss (1971) exactly. kappa is NaN
        when chance agreement is 1 (every vote in one category).
    """
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum(axis=1)
    counts, n = counts[n >= 2], n[n >= 2]
    if len(counts) == 0:
        return float("nan"), float("nan")
    observed = float(np.mean((counts * (counts - 1)).sum(axis=1) / (n * (n - 1))))
    shares = counts.sum(axis=0) / counts.sum()
    chance = float((shares ** 2).sum())
    kappa = (observed - chance) / (1.0 - chance) if chance < 1.0 else float("nan")
    return kappa, observed


def to_markdown(by_category, name_a, name_b):
    """A Markdown table of {category: summarize(...)}: category | task | pairs | win | tie | lose."""
    lines = [f"Pairwise preference of **{name_a}** (A) over **{name_b}** (B): win = A preferred, lose = B preferred.",
             "", "| prompts | task | pairs | win | tie | lose |", "|---|---|---|---|---|---|"]
    level = 0.95
    for category, summary in by_category.items():
        for task, s in summary.items():
            cells = [f"{s[k]:.1f}% [{s['ci'][k][0]:.1f}, {s['ci'][k][1]:.1f}]" for k in RATES]
            name = str(category).replace("|", "\\|")  # a category is user data: keep the table whole
            lines.append(f"| {name} | {task} | {s['n']} | " + " | ".join(cells) + " |")
            level = s["level"]
    lines.append("")
    lines.append(f"Brackets: {100 * level:.0f}% bootstrap confidence intervals over prompts.")
    return "\n".join(lines)
