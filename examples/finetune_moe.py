"""LoRA fine-tune of a tiny random-init Qwen3-MoE on CPU with PEFT ``target_parameters`` (the experts' 3-D
``gate_up_proj`` / ``down_proj``) plus attention LoRA, and the same run after one added line: ``lorafast.patch``.

No download: the model is built from a small ``Qwen3MoeConfig`` with random weights and learns a synthetic task
(next token = a fixed random permutation of the current one). With ``--impl both`` the PEFT model and the patched
one start from the same weights and take the same batches in lockstep, one step each in turn, so their step times
are measured under the same machine load (median over steps after a warm-up); without dropout their losses agree
to rounding. ``--expert-dropout p`` turns on lorafast's dropout on the expert LoRA (PEFT rejects ``lora_dropout`` on
``target_parameters``; the adapter files stay ones vanilla PEFT loads: ``--save DIR`` writes them and reloads them
into a fresh vanilla PEFT model to check).

    python examples/finetune_moe.py --impl both
    python examples/finetune_moe.py --impl lorafast --expert-dropout 0.1 --steps 200 --save /tmp/moe-adapter
    python examples/finetune_moe.py --impl both --experts 64 --hidden 256 --expert-width 128 --top-k 8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

WARMUP_STEPS = 2  # not counted in the median step time


@dataclass
class Run:
    """One implementation's model, optimizer and measurements."""

    impl: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    losses: List[float] = field(default_factory=list)
    step_s: List[float] = field(default_factory=list)

    @property
    def median_step_ms(self) -> float:
        timed = self.step_s[WARMUP_STEPS:] or self.step_s
        return 1e3 * statistics.median(timed)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=["peft", "lorafast", "both"], default="both")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-width", type=int, default=32, help="moe_intermediate_size")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--expert-dropout", type=float, default=0.0, help="lorafast only: dropout on the expert LoRA")
    p.add_argument("--backend", default="auto", help="lorafast backend (auto: aten on CPU)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="save the lorafast adapter here and reload it in vanilla PEFT")
    return p.parse_args(argv)


def build_base(args: argparse.Namespace) -> torch.nn.Module:
    """A tiny random-init Qwen3-MoE causal LM (seeded: every call gives the same weights)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.expert_width, num_hidden_layers=args.layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=args.hidden // 4, num_experts=args.experts, num_experts_per_tok=args.top_k,
        max_position_embeddings=4 * args.seq_len, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    return Qwen3MoeForCausalLM(cfg)


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """:func:`build_base` with PEFT LoRA on attention q/v and on both expert weights (``target_parameters``)."""
    from peft import LoraConfig, get_peft_model

    model = build_base(args)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "v_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    return get_peft_model(model, config)


def batches(args: argparse.Namespace):
    """Endless batches of the synthetic task: x_{t+1} = perm[x_t] from a random start token."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    perm = torch.randperm(args.vocab, generator=gen)
    while True:
        tokens = torch.empty(args.batch_size, args.seq_len, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, args.vocab, (args.batch_size,), generator=gen)
        for t in range(1, args.seq_len):
            tokens[:, t] = perm[tokens[:, t - 1]]
        yield tokens


def make_runs(args: argparse.Namespace) -> List[Run]:
    import lorafast

    peft_model = build_model(args)
    impls = ["peft", "lorafast"] if args.impl == "both" else [args.impl]
    runs = []
    for impl in impls:
        model = copy.deepcopy(peft_model) if impl == "lorafast" and len(impls) == 2 else peft_model
        if impl == "lorafast":
            lorafast.patch(model, backend=args.backend)  # the one added line
            if args.expert_dropout:
                lorafast.set_expert_dropout(model, args.expert_dropout)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        runs.append(Run(impl, model, optimizer))
    return runs


def train(runs: List[Run], args: argparse.Namespace) -> None:
    data = batches(args)
    for step in range(args.steps):
        tokens = next(data)
        for run in runs:
            torch.manual_seed(args.seed + step)  # the same dropout draws per step, whichever runs first
            start = time.perf_counter()
            run.optimizer.zero_grad(set_to_none=True)
            loss = run.model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            run.optimizer.step()
            run.step_s.append(time.perf_counter() - start)
            run.losses.append(loss.item())


def save_and_reload(run: Run, args: argparse.Namespace) -> float:
    """Save the adapter, load it into a fresh vanilla PEFT model (unpatched), return the logits' max difference."""
    from peft import PeftModel

    run.model.save_pretrained(args.save)
    vanilla = PeftModel.from_pretrained(build_base(args), args.save)
    tokens = next(batches(args))
    run.model.eval()
    vanilla.eval()
    with torch.no_grad():
        return (run.model(input_ids=tokens).logits - vanilla(input_ids=tokens).logits).abs().max().item()


def main(argv: Optional[Sequence[str]] = None) -> List[Run]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = make_runs(args)
    train(runs, args)
    print(f"Qwen3-MoE (random init): {args.layers} layers, {args.experts} experts top-{args.top_k}, hidden "
          f"{args.hidden}, expert width {args.expert_width}; LoRA r={args.rank} on q/v and the experts; "
          f"{args.steps} steps of {args.batch_size}×{args.seq_len} tokens, {torch.get_num_threads()} thread(s)")
    print("| impl | first loss | final loss | median step ms |")
    print("|---|---|---|---|")
    for run in runs:
        print(f"| {run.impl} | {run.losses[0]:.4f} | {run.losses[-1]:.4f} | {run.median_step_ms:.1f} |")
    if len(runs) == 2:
        print(f"step time lorafast / PEFT: {runs[1].median_step_ms / runs[0].median_step_ms:.2f}")
    if args.save:
        fused = next((r for r in runs if r.impl == "lorafast"), runs[-1])
        print(f"saved to {args.save}; reloaded in vanilla PEFT: max |Δlogits| = {save_and_reload(fused, args):.2e}")
    return runs


if __name__ == "__main__":
    main()
