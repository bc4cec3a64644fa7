"""The schedule simulator against the published bubble and activation formulas (SPEC §13)."""

import pytest

from dsjax.train.pipeline_schedule import (
    SCHEDULES,
    make_schedule,
    pipeline_figures,
    simulate,
    ticks,
)

N, M = 4, 8  # PP=4 ranks, 8 micro-batches


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("f,b", [(1.0, 2.0), (1.0, 1.0), (2.0, 3.0)])
def test_gpipe_1f1b_bubble_is_pp_minus_1_times_f_plus_b(name, f, b):
    sim = simulate(make_schedule(name, N, M), f, b)
    assert sim.bubble == pytest.approx([(N - 1) * (f + b)] * N)
    assert sim.bubble_fraction == pytest.approx((N - 1) / (M + N - 1))


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("fb_ratio", [1.0, 0.75])
def test_dualpipe_bubble_formula(ranks, fb_ratio):
    """DualPipe README: bubble (PP/2-1)(F&B+B-3W) with PP = 2·ranks chunks. dsjax runs every
    backward whole (W=0); with F = B the simulated bubble of the worst rank is the formula exactly;
    with F < B it is below it by B-F (the formula counts the last rank's unpaired F at B's cost)."""
    s = make_schedule("dualpipe", ranks, 2 * ranks)
    pp = 2 * ranks
    for f, b in [(1.0, 1.0), (2.0, 2.0)]:
        fb = fb_ratio * (f + b)
        assert max(simulate(s, f, b, 0.0, fb).bubble) == pytest.approx((pp / 2 - 1) * (fb + b))
    f, b = 1.0, 2.0
    fb = fb_ratio * (f + b)
    assert max(simulate(s, f, b, 0.0, fb).bubble) == pytest.approx(
        (pp / 2 - 1) * (fb + b) - (b - f)
    )


def test_activation_memory():
    """1F1B: PP micro-batches on the first rank; GPipe: all M; DualPipe: PP+1 chunk inputs."""
    assert simulate(make_schedule("1f1b", N, M)).peak_activations == (4, 3, 2, 1)
    assert simulate(make_schedule("gpipe", N, M)).peak_activations == (M,) * N
    assert simulate(make_schedule("dualpipe", N, M)).peak_activations == (2 * N + 1,) * N
    assert simulate(make_schedule("dualpipe", N, 3 * M)).peak_activations == (2 * N + 1,) * N


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("ranks,micro", [(4, 8), (2, 4), (2, 6), (1, 3)])
def test_tick_table_runs_every_chunk_once_in_order(name, ranks, micro):
    if name == "dualpipe" and micro < 2 * ranks:
        return
    table = ticks(make_schedule(name, ranks, micro))
    s = table.schedule
    when: dict = {}
    for t in range(table.length):
        for r in range(ranks):
            for kind, row in (("F", table.fwd[t]), ("B", table.bwd[t])):
                if row[r] is None:
                    continue
                mb, c = row[r]
                assert s.chunk_rank[c] == r, f"chunk {c} ran on rank {r}"
                assert (kind, mb, c) not in when, f"{kind}{(mb, c)} twice"
                when[(kind, mb, c)] = t
    chunks = s.chunks
    assert len(when) == 2 * micro * chunks
    for mb in range(micro):
        for c in range(chunks):
            assert when[("F", mb, c)] < when[("B", mb, c)]
            if c:
                assert when[("F", mb, c - 1)] < when[("F", mb, c)]
            if c + 1 < chunks:
                assert when[("B", mb, c + 1)] < when[("B", mb, c)]
    assert table.slots == max(simulate(s).peak_activations)


def test_dualpipe_pairs_forward_and_backward_of_different_micro_batches():
    table = ticks(make_schedule("dualpipe", 4, 8))
    pairs = [
        (f, b)
        for fr, br in zip(table.fwd, table.bwd, strict=True)
        for f, b in zip(fr, br, strict=True)
        if f is not None and b is not None
    ]
    assert pairs and all(f[0] != b[0] or f[1] != b[1] for f, b in pairs)
    # Rank r holds chunks r and 2N-1-r.
    assert table.schedule.rank_chunks(1) == (1, 6)


def test_refusals():
    with pytest.raises(ValueError, match="microbatches=4 must be >= 2 x ranks=8"):
        make_schedule("dualpipe", 4, 4)
    with pytest.raises(ValueError, match="must be one of"):
        make_schedule("zb", 4, 8)


def test_pipeline_figures():
    f = pipeline_figures("1f1b", 4, 8, 100.0)
    assert f["bubble_fraction"] == pytest.approx(3 / 11)
    assert (f["chunks"], f["peak_activations"], f["activation_bytes"]) == (4, 4, 400.0)
    assert f["stage_transfer_bytes"] == 2 * 3 * 8 * 100.0
    d = pipeline_figures("dualpipe", 4, 8, 100.0)
    # 8 chunks, 7 boundaries, one of them on the last rank (chunk 3 -> 4): 6 cross ranks.
    assert (d["chunks"], d["peak_activations"]) == (8, 9)
    assert d["stage_transfer_bytes"] == 2 * 6 * 8 * 100.0
