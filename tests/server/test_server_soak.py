"""The short fault-injection soak (``preft.server.soak``): concurrent streams, adapter churn, poison requests and
poisoned adapters; every good request gets the tokens it gets alone, and the server ends clean and answering."""

from __future__ import annotations

from preft.server.soak import run_soak


def test_short_soak_with_poison_and_churn_loses_nothing_and_harms_no_good_request():
    report = run_soak(seconds=10, streams=6)
    summary = report.summary()
    assert report.ok, summary["failures"]
    kinds = summary["by_kind"]
    assert kinds["good"] >= 50 and kinds["churn"] >= 3 and kinds.get("poison-rotten-adapter", 0) >= 1, kinds
    assert sum(v for k, v in kinds.items() if k.startswith("poison-")) >= 10, kinds
