"""CI benchmark of the host work before any backend runs: `prepare_study` (checks, node measurements and
patches) on a 24-node study of the demo's grid, recorded per node beside the backends' times. On a GPU
it, not the forward, bounds whole-study prediction. Recorded, not gated: nothing in the same run is a
fair reference for it (tests/bench/study_preprocess.py compares it with an earlier revision)."""

from m2anet.data import make_study
from m2anet.preprocess import prepare_study

NODES = 24


def test_prepare_study(benchmark):
    ct, labels, _ = make_study(seed=3, n_nodes=NODES)
    prepared = benchmark.pedantic(prepare_study, args=(ct, labels), rounds=5, warmup_rounds=1)
    benchmark.extra_info["ms_per_node"] = benchmark.stats.stats.median * 1e3 / NODES
    assert len(prepared.classified) == NODES and not prepared.warnings
