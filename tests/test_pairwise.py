import numpy as np
import pytest

from emu.evaluation.pairwise import (A, B, BOTH, NEITHER, TIE, bootstrap_ci, faithfulness_to_ternary, fleiss_kappa,
                                     majority_vote, summarize, summarize_outcomes, to_markdown, win_rates)


def test_majority_vote_with_five_raters():
    votes = np.array([  # columns are pairs
        [A, A, A, B, A, TIE, A],
        [A, A, B, B, A, TIE, A],
        [A, B, B, B, TIE, A, A],
        [B, TIE, TIE, TIE, TIE, B, B],
        [TIE, TIE, A, A, B, TIE, B],
    ])
    # 3A 1B 1T; 2A 2T 1B (A and Tie share the top); 2A 2B 1T (split); 3B; 2A 2T 1B; 3T; 3A 2B
    assert majority_vote(votes).tolist() == [A, TIE, TIE, B, TIE, TIE, A]


def test_majority_vote_with_three_raters():
    votes = np.array([
        [A, A, A, B, A],
        [A, TIE, B, B, A],
        [B, TIE, TIE, TIE, A],
    ])
    # 2A 1B; 1A 2T; 1A 1B 1T (three-way split); 2B 1T; unanimous
    assert majority_vote(votes).tolist() == [A, TIE, TIE, B, A]


def test_majority_vote_rejects_unmapped_faithfulness_votes():
    with pytest.raises(ValueError):
        majority_vote(np.array([[A, BOTH], [A, NEITHER], [B, A]]))


def test_both_and_neither_count_as_ties():
    raw = np.array([[A, BOTH, NEITHER, B]])
    assert faithfulness_to_ternary(raw).tolist() == [[A, TIE, TIE, B]]
    with pytest.raises(ValueError):
        faithfulness_to_ternary(np.array([[5]]))


def test_win_rates_on_known_counts():
    outcomes = np.array([A] * 7 + [TIE] * 2 + [B])
    rates = win_rates(outcomes)
    assert rates == pytest.approx({"win": 70.0, "tie": 20.0, "lose": 10.0})


def test_bootstrap_ci_brackets_the_estimate_and_is_deterministic():
    rng = np.random.default_rng(0)
    outcomes = rng.choice([A, TIE, B], size=200, p=[0.5, 0.3, 0.2])
    rates = win_rates(outcomes)
    ci = bootstrap_ci(outcomes, n_boot=1000, seed=3)
    for k in ("win", "tie", "lose"):
        lo, hi = ci[k]
        assert lo <= rates[k] <= hi
        assert 2.0 < hi - lo < 25.0  # about +-7 points for 200 pairs at 50%
    assert bootstrap_ci(outcomes, n_boot=1000, seed=3) == ci
    assert bootstrap_ci(outcomes, n_boot=1000, seed=4) != ci


def test_bootstrap_ci_over_repeats_resamples_whole_prompts():
    rng = np.random.default_rng(3)
    outcomes = rng.choice([A, TIE, B], size=40)
    twice = np.stack([outcomes, outcomes], axis=1)  # each prompt judged twice with the same outcome
    assert bootstrap_ci(twice, n_boot=300, seed=1) == bootstrap_ci(outcomes, n_boot=300, seed=1)
    s = summarize_outcomes(twice, n_boot=300)
    assert s["n"] == 80 and s["win"] == pytest.approx(100 * np.mean(outcomes == A))
    # repeats that disagree: the rates pool both columns, the interval comes from whole rows
    other = np.where(outcomes == A, TIE, outcomes)
    mixed = summarize_outcomes(np.stack([outcomes, other], axis=1), n_boot=300)
    assert mixed["win"] == pytest.approx(50 * np.mean(outcomes == A))
    assert mixed["ci"]["win"][0] <= mixed["win"] <= mixed["ci"]["win"][1]


def test_bootstrap_ci_of_a_clean_sweep_is_a_point():
    ci = bootstrap_ci(np.full(50, A), n_boot=200, seed=0)
    assert ci == {"win": (100.0, 100.0), "tie": (0.0, 0.0), "lose": (0.0, 0.0)}


def test_summarize_and_markdown_report_the_numbers():
    appeal = np.tile(np.array([A] * 7 + [TIE] * 2 + [B]), (5, 1))  # 5 raters agree on 10 pairs
    faith = faithfulness_to_ternary(np.tile(np.array([BOTH] * 5 + [A] * 3 + [NEITHER, B]), (3, 1)))
    summary = summarize({"visual appeal": appeal, "text faithfulness": faith}, n_boot=500, seed=0)
    assert summary["visual appeal"]["n"] == 10 and summary["visual appeal"]["raters"] == 5
    assert summary["visual appeal"]["win"] == pytest.approx(70.0)
    assert summary["text faithfulness"]["tie"] == pytest.approx(60.0)
    lo, hi = summary["text faithfulness"]["ci"]["win"]
    assert lo <= 30.0 <= hi
    table = to_markdown({"all": summary}, "tuned", "base")
    assert "tuned" in table and "base" in table
    assert "| all | visual appeal | 10 | 70.0% [" in table
    assert "60.0%" in table and "10.0%" in table


def test_fleiss_kappa_matches_the_published_example():
    """Fleiss (1971) as worked in most textbooks: 10 subjects, 14 raters, 5 categories -> kappa 0.210."""
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
              [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    kappa, observed = fleiss_kappa(counts)
    assert kappa == pytest.approx(0.2099, abs=5e-4) and observed == pytest.approx(0.378, abs=5e-4)
    assert fleiss_kappa([[5, 0, 0], [0, 5, 0], [0, 0, 5]]) == (1.0, 1.0)  # perfect agreement
    kappa, _ = fleiss_kappa([[1, 1, 1]] * 4)  # every item split three ways: worse than chance
    assert kappa < 0
    assert fleiss_kappa([[2, 1], [1, 0]])[1] == pytest.approx(1 / 3)  # a lone rater's item is left out
