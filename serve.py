"""Serve a dsjax model over an OpenAI-compatible HTTP API, or complete one prompt and exit.

    python serve.py --checkpoint=DIR [--host=127.0.0.1] [--port=8000] [--api-key=KEY]
                    [--slots=8] [--max-queue=64] [--max-len=N] [--cache-tokens=N]
                    [--page-size=N] [--paged-attention=auto] [--no-prefix-cache]
                    [--dtype=bfloat16]
                    [--max-body-bytes=4194304] [--mesh=expert=2,tensor=4 [--layout=decode]]
    python serve.py --checkpoint=DIR --prompt="Once upon a time" [--max-tokens=64]

DIR is a train.py workdir (checkpoints/ + tokenizer/), a Hugging Face directory (config.json,
safetensors, tokenizer.json) or a Hugging Face Hub id `org/name[@revision]` (downloaded through
huggingface_hub, or read from the local HF cache when HF_HUB_OFFLINE=1). The API is described in dsjax/serve/app.py. With --prompt, FastAPI is
not imported (dsjax.inference.loading loads the model).
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="train.py workdir, Hugging Face dir, or Hub id org/name[@revision] (HF cache when "
        "HF_HUB_OFFLINE=1)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together at most")
    p.add_argument(
        "--cache-tokens",
        type=int,
        default=None,
        help="latent cache size in tokens, shared by all requests in pages (default: slots x "
        "max-len); requests wait for pages",
    )
    p.add_argument(
        "--page-size",
        type=int,
        default=None,
        help="tokens per cache page (default 64; DeepSeek-V4: a multiple of every compression "
        "rate, default 128 for 4:1 and 128:1)",
    )
    p.add_argument(
        "--paged-attention",
        default="auto",
        choices=["auto", "xla", "pallas", "pallas_interpret"],
        help="how decode attention reads the cache pages: auto = the Pallas kernel on TPU "
        "(with --mesh: when --slots is a multiple of its row shards), else the XLA gather path",
    )
    p.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="do not reuse the cached pages of earlier prompts with the same prefix",
    )
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="context per request (default min(max_position_embeddings, 4096))",
    )
    p.add_argument(
        "--min-batch",
        type=int,
        default=1,
        help="smallest slot bucket a decode step runs over (fewer compilations)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="parameter and compute dtype (default: the checkpoint's)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 * 2**20,
        help="largest request body accepted; larger ones get 413 before parsing",
    )
    p.add_argument(
        "--speculative",
        default="auto",
        choices=["auto", "on", "off"],
        help="MTP speculative decoding by default (auto: on when the checkpoint has MTP layers);"
        " requests may override it with 'speculative'",
    )
    p.add_argument(
        "--mesh",
        default=None,
        help="decode on a device mesh, e.g. expert=2,tensor=4 (axes data, fsdp, expert, "
        "context, tensor; data takes the rest); default: one device",
    )
    p.add_argument(
        "--layout",
        default="decode",
        choices=["decode", "fsdp"],
        help="with --mesh: how weights are placed (decode: experts over expert, widths over "
        "tensor, no per-step weight gathers; fsdp: the training layout)",
    )
    p.add_argument("--model-name", default=None, help="name in the API (default: DIR's name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--prompt", default=None, help="complete this prompt, print it and exit")
    p.add_argument("--max-tokens", type=int, default=64, help="with --prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="with --prompt")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Loads the checkpoint, then completes --prompt or serves until interrupted."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    from pathlib import Path

    from dsjax.checkpoints.hub import is_hub_id
    from dsjax.inference.generate import generate
    from dsjax.inference.loading import load_model
    from dsjax.text.chat_template import encode_text

    if args.max_body_bytes < 1:
        print(f"error: --max-body-bytes={args.max_body_bytes}: must be >= 1", file=sys.stderr)
        return 2
    mesh = None
    if args.mesh is not None:
        from dsjax.inference.meshes import DecodeMesh

        try:
            mesh = DecodeMesh.parse(args.mesh, args.layout)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    try:
        cfg, variables, tokenizer, add_bos = load_model(args.checkpoint, args.dtype)
    except (ValueError, OSError) as err:  # a missing, damaged or unsupported checkpoint
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = args.model_name or (
        args.checkpoint
        if is_hub_id(args.checkpoint) and not Path(args.checkpoint).exists()
        else Path(args.checkpoint).resolve().name
    )
    has_mtp = cfg.num_mtp_layers > 0 and "mtp_0" in variables.get("params", {})
    speculative = {"auto": None, "on": True, "off": False}[args.speculative]
    if speculative and not has_mtp:
        print("error: --speculative=on: this checkpoint has no MTP layers", file=sys.stderr)
        return 2
    if args.prompt is not None:
        ids = encode_text(tokenizer, args.prompt, add_bos)  # as the server encodes a prompt
        if mesh is not None:
            variables = mesh.place(cfg, variables)
        result = generate(
            cfg,
            variables,
            [ids],
            args.max_tokens,
            temperature=args.temperature,
            rng=args.seed,  # the same seed -> the same samples as an HTTP request's
            eos_id=tokenizer.eos_id,
            speculative=has_mtp if speculative is None else speculative,  # as the server would
            mesh=mesh,
        )
        print(args.prompt + tokenizer.decode(result.tokens[0]))
        return 0

    import uvicorn

    from dsjax.inference.engine import Engine
    from dsjax.serve.app import create_app

    engine = Engine(
        cfg,
        variables,
        slots=args.slots,
        max_len=args.max_len,
        max_queue=args.max_queue,
        eos_id=tokenizer.eos_id,
        seed=args.seed,
        min_batch=args.min_batch,
        speculative=speculative,
        mesh=mesh,
        page_size=args.page_size,
        cache_tokens=args.cache_tokens,
        prefix_cache=args.prefix_cache,
        paged_attention=args.paged_attention,
    ).start()
    engine.warmup()
    app = create_app(
        engine,
        tokenizer,
        name,
        api_key=args.api_key,
        add_bos=add_bos,
        max_body_bytes=args.max_body_bytes,
    )
    print(
        f"serving {name} on http://{args.host}:{args.port} ({args.slots} slots, context "
        f"{engine.max_len}, cache {engine.stats()['cache_pages'] * engine.page_size} tokens)",
        flush=True,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
