"""Our task pipeline equals lm-eval's own Hugging Face adapter on real SmolLM2 (slow)."""

import pytest


@pytest.mark.slow
def test_arc_easy_matches_lm_eval_hflm():
    pytest.importorskip("lm_eval")
    from flextron_fx.eval.reference import compare_with_hflm

    row = compare_with_hflm("smollm2-135m", "arc_easy", limit=12)
    assert row["documents"] == 12 and row["requests"] >= 36
    assert row["max_abs_loglik_gap"] < 1e-3
    assert row["acc_ours"] == row["acc_lm_eval"]
    assert row["acc_norm_ours"] == row["acc_norm_lm_eval"]
