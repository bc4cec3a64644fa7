"""The Pallas paged MLA decode kernel (dsjax/model/kernels/paged_mla.py) in Pallas' interpreter
against the engine's XLA gather path (its pages gathered by `engine_programs`, then the model's
`attention` over the contiguous latent cache, as `MLA._absorbed` runs it), for one decode token
and for speculative verification (two tokens), pages scattered over the pool in any order and
rows of different lengths; and Mosaic compiles it for TPU at V3's widths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.inference.engine_programs import _gather
from dsjax.model.kernels.paged_mla import paged_mla_decode, paged_mla_decode_reference
from dsjax.model.layers.attention import attention

N, PAGE, C, R, H = 12, 8, 16, 8, 4
SCALE = 0.3


def gather_path(q_BTHL, latent, k_pe, table_BP, pos_BT):
    """The engine's path: gathered pages, `attention` in latent space -> [B, T, H, C]."""
    lat_BSC, pe_BSR = _gather(latent, table_BP, 0), _gather(k_pe, table_BP, 0)
    B, T = q_BTHL.shape[:2]
    S = lat_BSC.shape[1]
    out = attention(
        q_BTHL[:, :, None],
        jnp.concatenate([lat_BSC, pe_BSR], -1)[:, :, None],
        lat_BSC[:, :, None],
        q_idx_BT=pos_BT,
        k_idx_BS=jnp.broadcast_to(jnp.arange(S), (B, S)),
        scale=SCALE,
        impl="reference",
    )
    return out[:, :, 0]


@pytest.mark.parametrize("T", [1, 2, "mtp"], ids=["decode", "verify", "mtp"])
def test_kernel_equals_the_gather_path(T):
    """Layer 1 of a 2-layer pool; T = 1, T = 2 at consecutive positions, and the MTP module's
    two entries at one position (its no-catch-up case)."""
    rng = np.random.RandomState(7 if T == "mtp" else T)
    pool = jnp.asarray(rng.randn(2, N, PAGE, C), jnp.float32)
    pe_pool = jnp.asarray(rng.randn(2, N, PAGE, R), jnp.float32)
    latent, k_pe = pool[1], pe_pool[1]
    table = jnp.asarray([[3, 5, 7, 0], [1, 2, 0, 0], [11, 10, 9, 8]], jnp.int32)  # 0: TRASH
    pos = jnp.asarray([17, 3, 30], jnp.int32)  # the last row's queries reach its 4th page
    if T == "mtp":
        T, pos_BT = 2, jnp.stack([pos, pos], 1)
    else:
        pos_BT = pos[:, None] + jnp.arange(T)[None]
    q_BTHL = jnp.asarray(rng.randn(3, T, H, C + R), jnp.float32)
    q_BQL = q_BTHL.reshape(3, T * H, C + R)

    def kernel(pool):
        return paged_mla_decode(
            q_BQL, pool, pe_pool, table, pos_BT, jnp.int32(1), heads=H, scale=SCALE,
            interpret=True,
        )  # fmt: skip

    got = kernel(pool)
    want = gather_path(q_BTHL, latent, k_pe, table, pos_BT).reshape(3, T * H, C)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    ref = paged_mla_decode_reference(q_BQL, latent, k_pe, table, pos_BT, heads=H, scale=SCALE)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(want), rtol=1e-5, atol=1e-5)
    # TRASH, pages past a row's last position and the other layer do not matter.
    poisoned = pool.at[1, 0].set(1e4).at[1, 4].set(-1e4).at[0].set(1e4)
    np.testing.assert_array_equal(np.asarray(kernel(poisoned)), np.asarray(got))


def test_kernel_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="paged_mla_decode: q"):
        paged_mla_decode(
            jnp.zeros((1, 4, C)), jnp.zeros((1, N, PAGE, C)), jnp.zeros((1, N, PAGE, R)),
            jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 1), jnp.int32), jnp.int32(0),
            heads=H, scale=1.0,
        )  # fmt: skip


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("libtpu") is None, reason="libtpu not installed"
)
def test_kernel_compiles_for_v5p_with_mosaic():
    """XLA:TPU (libtpu, abstract v5p:2x2x1) compiles the kernel at V3's widths (C 512, R 64,
    16 heads, bf16 pages of 64, verification T = 2), requests split over the chips."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as Ps

    from dsjax.model import sharding
    from dsjax.plan import planner as plan

    mesh = sharding.make_mesh(data=-1, devices=plan.make_target("v5p:2x2x1").devices)
    B, Q, P = 4, 32, 8
    kernel = jax.shard_map(
        lambda *a: paged_mla_decode(*a, heads=16, scale=0.1),
        mesh=mesh,
        in_specs=(Ps("data"), Ps(), Ps(), Ps("data"), Ps("data"), Ps()),
        out_specs=Ps("data"),
        check_vma=False,
    )
    rep = NamedSharding(mesh, Ps())
    shapes = [((B, Q, 576), jnp.bfloat16), ((3, 64, 64, 512), jnp.bfloat16)]
    shapes += [((3, 64, 64, 64), jnp.bfloat16), ((B, P), jnp.int32), ((B, 2), jnp.int32)]
    shapes += [((), jnp.int32)]
    with jax.set_mesh(mesh):
        args = [jax.ShapeDtypeStruct(s, d, sharding=rep) for s, d in shapes]
        text = jax.jit(kernel).lower(*args).compile().as_text()
    assert sum('custom_call_target="tpu_custom_call"' in line for line in text.splitlines()) == 1


@pytest.mark.parametrize("T", [1, 2], ids=["decode", "verify"])
def test_kernel_and_gather_under_a_decode_mesh_keep_pages_local(T):
    """Under a decode mesh (expert 2 x tensor 4 on 8 CPU devices, rows and pool pages split over
    every chip, tables shard-local: `paged.shard_tables`) the page writes, the gather path and
    the kernel (interpreted) run in shard_map and equal one device over the same pool with
    global page ids."""
    from dsjax.inference.meshes import DecodeMesh
    from dsjax.model import sharding
    from dsjax.model.layers import paged

    dm = DecodeMesh.parse("expert=2,tensor=4")
    shards = sharding.DECODE_CACHE_AXES
    B, Pn, pos0 = 16, 3, np.arange(16) + 5  # 2 rows per chip, positions 5..20 of 24
    local, n_pool = paged.shard_tables(B, Pn, 8)
    per_shard = n_pool // 8
    global_table = jnp.asarray(local + (np.arange(B) // 2)[:, None] * per_shard, jnp.int32)
    rng = np.random.RandomState(3)
    pool = jnp.asarray(rng.randn(2, n_pool, PAGE, C), jnp.float32)
    pe_pool = jnp.asarray(rng.randn(2, n_pool, PAGE, R), jnp.float32)
    pos_BT = jnp.asarray(pos0[:, None] + np.arange(T)[None], jnp.int32)
    q_BTHL = jnp.asarray(rng.randn(B, T, H, C + R), jnp.float32)
    new_lat = jnp.asarray(rng.randn(B, T, C), jnp.float32)
    new_pe = jnp.asarray(rng.randn(B, T, R), jnp.float32)

    def run(table, shards, impl):
        pages = paged.Pages(table, layer=jnp.int32(1), impl=impl, shards=shards)
        lat = paged.write(pool, pages, pos_BT, new_lat)
        pe = paged.write(pe_pool, pages, pos_BT, new_pe)
        out = paged.kernel_attention(q_BTHL, lat, pe, pages, pos_BT, scale=SCALE)
        return lat, pe, out, paged.gather(lat, pages)

    want_lat, want_pe, want, want_view = jax.jit(run, static_argnums=(1, 2))(
        global_table, (), "pallas_interpret"
    )
    # One device, global ids: the kernel equals the gather path.
    ref = gather_path(q_BTHL, want_lat[1], want_pe[1], global_table, pos_BT)
    np.testing.assert_allclose(np.asarray(want), np.asarray(ref), rtol=1e-5, atol=1e-5)
    with dm.context():
        got_lat, _, got, got_view = jax.jit(run, static_argnums=(1, 2))(
            jnp.asarray(local), shards, "pallas_interpret"
        )
    np.testing.assert_array_equal(np.asarray(got_lat), np.asarray(want_lat))
    np.testing.assert_array_equal(np.asarray(got_view), np.asarray(want_view))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert got.sharding.shard_shape(got.shape)[0] == B // 8  # each chip its own rows' outputs
    assert got_lat.sharding.shard_shape(got_lat.shape)[1] == per_shard  # and its own pages
