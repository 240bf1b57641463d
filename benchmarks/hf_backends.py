"""Training-step time of a small Llama-style Hugging Face model with each attention backend, as ratios to "sdpa".

    python benchmarks/hf_backends.py                       # CPU, default size
    python benchmarks/hf_backends.py --seq-len 512 --batch 4
    python benchmarks/hf_backends.py --device cuda

One training step = forward with labels (causal-LM loss), backward and an AdamW step, on a
``LlamaForCausalLM`` built from config (grouped-query attention, no download). Every backend runs on the
same weights and batch in the same process; the reference is transformers' own ``"sdpa"``. Time: median of
``--repeats`` blocks of ``--steps`` steps after a warm-up (``torch.utils.benchmark``). Needs the ``hf`` extra.
"""

from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils import benchmark  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from hopformer.integrations import transformers as hf  # noqa: E402

BACKENDS = ("sdpa", "eager", "hopfield_softmax", "hopfield_sparsemax", "hopfield_entmax15", "hopfield_alpha1.25_2steps")


def build(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 2),
        max_position_embeddings=max(args.seq_len, 128),
    )
    return LlamaForCausalLM(cfg).to(args.device)


def measure(model: LlamaForCausalLM, backend: str, ids: torch.Tensor, args: argparse.Namespace) -> float:
    model = copy.deepcopy(model).train()
    model.set_attn_implementation(backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def block() -> None:
        for _ in range(args.steps):
            step()
        if args.device == "cuda":
            torch.cuda.synchronize()

    block()  # warm-up
    timer = benchmark.Timer(stmt="block()", globals={"block": block})
    return timer.blocked_autorange(min_run_time=args.min_time).median / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed block")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per backend")
    parser.add_argument("--backends", nargs="*", default=list(BACKENDS))
    args = parser.parse_args()

    hf.register()
    hf.register_backend("hopfield_alpha1.25_2steps", 1.25, steps=2)
    model = build(args)
    ids = torch.randint(0, 256, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)).to(args.device)
    print(
        f"transformers {hf.transformers_version()}, torch {torch.__version__}, {args.device}, "
        f"{torch.get_num_threads()} threads; Llama {args.layers} layers, hidden {args.hidden}, {args.heads} heads "
        f"({max(1, args.heads // 2)} kv), batch {args.batch} x {args.seq_len} tokens; one training step (fwd+bwd+AdamW)"
    )
    times = {b: measure(model, b, ids, args) for b in args.backends}
    ref = times.get("sdpa")
    print(f"{'backend':<28} {'ms/step':>9} {'x sdpa':>8}")
    for name, t in times.items():
        ratio = f"{t / ref:8.2f}" if ref else "       -"
        print(f"{name:<28} {1e3 * t:9.1f} {ratio}")


if __name__ == "__main__":
    main()
