"""DeepSeek-V4 decode-cache bytes per token (V4-Flash, V4-Pro) beside V3's latent cache, from
the cache shapes (`dsjax.model.v4_cache.cache_bytes`; nothing is allocated).

    python benchmarks/v4_cache_bytes.py [--dtype=bfloat16]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import deepseek_v3, deepseek_v4_flash, deepseek_v4_pro  # noqa: E402
from dsjax.model.v4_cache import cache_bytes, latent_cache_bytes_per_token  # noqa: E402
from dsjax.train import step as ts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    v3 = ts.model_config(deepseek_v3.get_config()).replace(dtype=args.dtype)
    v3_tok = latent_cache_bytes_per_token(v3)
    print(f"V3 latent cache: {v3_tok:,} bytes/token")
    for name, mod in (("V4-Flash", deepseek_v4_flash), ("V4-Pro", deepseek_v4_pro)):
        cfg = ts.model_config(mod.get_config()).replace(dtype=args.dtype)
        for ctx in (131072, 1048576):
            b = cache_bytes(cfg, 1, ctx)
            avg = b["total"] / ctx
            print(
                f"{name} {ctx // 1024}K: {avg:,.0f} bytes/token on average "
                f"({avg / v3_tok:.1%} of V3), growing {b['per_token']:,.0f}/token, "
                f"fixed {b['fixed'] / 2**20:.1f} MiB, {b['total'] / 2**30:.2f} GiB per request"
            )


if __name__ == "__main__":
    main()
