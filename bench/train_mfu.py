"""Training throughput and model FLOPs utilisation (MFU) of the KaLM step at a few batch sizes, so the
figures exist the day a GPU is lent.

    python bench/train_mfu.py                        # CPU, small: batch 8 and 16, 2 steps each (it runs)
    python bench/train_mfu.py --device cuda          # a GPU: batch 32 ... 512 within --minutes 5
    python bench/train_mfu.py --device cuda --graph ../shared/datasets/WN18RR --json mfu.json

Each batch size trains `--steps` timed steps (after one untimed warm-up) with what `kalmkg train` runs
for the embedded model (LoRA on the FFN of the top 8 layers, entity texts of 16 tokens, bf16 autocast
where the hardware has it), and reports s/step, triples/s, tokens/s (the rows' real tokens, padding not
counted) and achieved TFLOP/s. MFU divides that by the device's peak dense bf16 rate (a table of known
GPUs below, or `--peak-tflops`); it is left out where the peak is unknown (a CPU, unless given).

The FLOPs are counted from the rows each step runs (`step_flops`): forward 2 x (weights of a layer) per
token per layer plus attention 4 x T x (heads x head width) per token per layer, the LM head at the
positions that predict a target; backward from the lowest adapted layer up, the activations' gradients
only (the weights are frozen: about the forward's matmuls again, twice its attention), none below. The frozen-layer cache is off: every step does the
whole model's work, so MFU means what it says. A sweep stops early when the next batch size would not
finish inside `--minutes`, or when the device runs out of memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a name in the device's name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0,
                    "RTX 4090": 165.0}
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Shape:
    """What the FLOP count needs to know of a decoder."""

    layers: int
    width: int
    vocab: int
    layer_weights: int  # multiply-adds per token of one layer's projections
    down_weights: int  # the FFN's output projection's part of them
    attention_width: int  # heads x head width (the width of QK^T and AV)
    lora_weights: int  # LoRA's multiply-adds per token in one adapted layer: r x (in + out) per module
    trained_from: int  # lowest adapted layer
    attention_adapted: bool  # whether LoRA adapts an attention projection


def step_flops(shape: Shape, lengths: list[int], lm_positions: int) -> float:
    """FLOPs of one training step over rows of `lengths` tokens, `lm_positions` of them under the LM head.

    forward, per row of T tokens and per layer:   2 W T  +  4 T^2 A   (QK^T and AV, not halved for causal;
        W: the layer's projection weights, A: heads x head width)
    backward of a layer above the lowest adapted:   2 W T  +  8 T^2 A   (activation gradients only: the
        weights are frozen; LoRA's own gradients, 2 r (in + out) per token, are left out)
    backward of the lowest adapted layer: its input needs no gradient, so with only FFN projections
        adapted just the down projection's input gradient, 2 W_down T (else counted as a layer above)
    LoRA, in each adapted layer: 2 L T forward and about twice that backward (L: its weights per token).
    LM head: 2 vocab width forward and backward per LM position.
    """
    forward = sum(shape.layers * (2 * shape.layer_weights * t + 4 * t * t * shape.attention_width) for t in lengths)
    above = shape.layers - shape.trained_from
    backward = 0.0
    for t in lengths:
        full_layer = 2 * shape.layer_weights * t + 8 * t * t * shape.attention_width
        lowest = full_layer if shape.attention_adapted else 2 * shape.down_weights * t
        backward += lowest + (above - 1) * full_layer if above else 0
        forward += above * 2 * shape.lora_weights * t
        backward += above * 4 * shape.lora_weights * t
    head = 2 * 2 * shape.vocab * shape.width * lm_positions
    return float(forward + backward + head)


def model_shape(model, cfg) -> Shape:
    """The Shape of a (peft-wrapped) causal LM as `cfg` adapts it."""
    import torch

    from kalmkg.models import backbone, num_layers
    from kalmkg.training.prefix import lowest_trained

    decoder = backbone(model)
    layer = decoder.layers[0]
    # base projections only: peft's LoRA matrices are Linear modules too
    linear = {n: m.in_features * m.out_features for n, m in layer.named_modules()  # not the packed bytes of 4 bits
              if isinstance(m, torch.nn.Linear) and "lora_" not in n}
    down = sum(v for n, v in linear.items() if n.startswith("mlp.down_proj"))
    config = model.config
    heads = config.num_attention_heads
    head_width = getattr(config, "head_dim", None) or config.hidden_size // heads
    n_layers = num_layers(model)
    lowest = lowest_trained(decoder)
    adapted = decoder.layers[lowest] if lowest is not None else None
    lora = 0 if adapted is None else sum(m.weight.numel() for n, m in adapted.named_modules()
                                         if isinstance(m, torch.nn.Linear) and "lora_" in n)
    return Shape(layers=n_layers, width=config.hidden_size, vocab=config.vocab_size,
                 layer_weights=sum(linear.values()), down_weights=down, attention_width=heads * head_width,
                 lora_weights=lora,
                 trained_from=n_layers if lowest is None else lowest,
                 attention_adapted=any(t in ATTENTION_PROJECTIONS for t in cfg.lora_targets))


def peak_tflops(device: str, given: float | None) -> tuple[float | None, str]:
    """The device's peak bf16 TFLOP/s and its name (None: unknown)."""
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        found = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        return given or found, name
    return given, "cpu"


def measure(setup, batch_size: int, steps: int, shape: Shape) -> dict:
    """Time `steps` training steps at `batch_size` after one warm-up step."""
    import torch

    from kalmkg.training.data import epoch_batches, lm_flags
    from kalmkg.training.step import build_inputs, kalm_step

    tokens, cfg, ctx = setup.tokens, setup.cfg, setup.ctx
    cfg_b = replace(cfg, batch_size=batch_size)
    ctx.cfg = cfg_b
    batches = epoch_batches(len(tokens.examples), batch_size, 0, 0, tokens.lengths, bucket=True)
    cuda = setup.device.startswith("cuda")
    times, flops, real_tokens = [], 0.0, 0
    for step in range(steps + 1):
        batch = tokens.examples[batches[step % len(batches)]]
        inputs = build_inputs(tokens, batch, lm_flags(len(batch), cfg_b), cfg_b.self_negatives)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with setup.autocast:
            loss = kalm_step(ctx, batch).loss
        setup.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        setup.optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if step:  # the first step warms up (kernels, allocator) and is not timed
            times.append(time.perf_counter() - t0)
            lengths = [len(r) for r in inputs.rows]
            real_tokens += sum(lengths)
            flops += step_flops(shape, lengths, sum(b - a for a, b in inputs.lm_spans.values()))
    total = sum(times)
    return {"batch_size": batch_size, "steps": steps, "s_per_step": total / steps,
            "triples_per_s": steps * batch_size / total, "tokens_per_s": real_tokens / total,
            "tflops": flops / total / 1e12,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


@dataclass
class Setup:
    device: str
    cfg: object
    tokens: object
    ctx: object
    optimizer: object
    autocast: object
    model: object
    tokenizer: object
    texts: object  # text.GraphTexts of the graph, cut as cfg says


def prepare(graph: Path, workdir: Path, device: str, precision: str, base: str = "smollm2-135m",
            **settings) -> Setup:
    """The graph ingested, the base with the run's default LoRA for its size (or the TrainConfig
    `settings` given), a step context."""
    import torch

    from kalmkg.evaluation.metrics import known_answers
    from kalmkg.ingestion import ingest, resolve_sources
    from kalmkg.models import load_base, num_layers, parameter_count, resolve_base
    from kalmkg.store import Store
    from kalmkg.text import graph_texts
    from kalmkg.training.config import TrainConfig, with_size_defaults
    from kalmkg.training.data import load_tokens, with_inverses
    from kalmkg.training.learner import build_learner
    from kalmkg.training.precision import make_autocast, use_bf16
    from kalmkg.training.step import StepContext
    from kalmkg.workspace import Workspace

    ws = Workspace(workdir / "ws")
    with Store.open(ws, create=True) as store:
        ingest(store, resolve_sources([graph]))
        train = store.triples_array(("train",))
        entities, relations = store.entity_table(), store.relation_table()
    torch.manual_seed(0)
    cfg = TrainConfig(**{"base": base, "precision": precision, "device": device, **settings, "frozen_cache_mb": 0})
    resolved = resolve_base(base)
    # as `kalmkg train` loads it: frozen weights in bf16 where the step runs in it, or quantized
    model, tokenizer = load_base(resolved, device=device, quantize=cfg.quantize,
                                 dtype=torch.bfloat16 if use_bf16(device, precision) else None)
    cfg = with_size_defaults(cfg, parameter_count(model), num_layers(model))
    texts = graph_texts(entities, relations, tokenizer, cfg.max_entity_tokens)
    tokens = load_tokens(texts, with_inverses(train, texts.num_relations), tokenizer, cfg.max_seq_len, None)
    known = {k: frozenset(v) for k, v in known_answers(train, texts.num_relations).items()}
    learner = build_learner(model, cfg, total_steps=1000, device=device)
    learner.model.train()
    ctx = StepContext(learner.model, learner.temperature, tokens, known, cfg, device=device)
    return Setup(device, cfg, tokens, ctx, learner.optimizer, make_autocast(device, precision), learner.model,
                 tokenizer, texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    umls = ROOT.parent / "shared" / "datasets" / "UMLS"
    parser.add_argument("--graph", type=Path, default=None,
                        help="default: the sample graph on a CPU, ../shared/datasets/UMLS on a GPU")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="default: 8 16 on a CPU, 32 64 128 256 512 on a GPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per batch size (CPU 2, GPU 10)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--minutes", type=float, default=5.0, help="the whole sweep's time budget")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak (for MFU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    started = time.perf_counter()
    gpu = args.device.startswith("cuda")
    graph = args.graph or (umls if gpu and umls.exists() else ROOT / "sample_graphs" / "world.ttl")
    batch_sizes = args.batch_sizes or ([32, 64, 128, 256, 512] if gpu else [8, 16])
    steps = args.steps or (10 if gpu else 2)

    import torch

    from kalmkg.training.precision import use_bf16

    with tempfile.TemporaryDirectory() as tmp:
        setup = prepare(graph, Path(tmp), args.device, args.precision, args.base)
        shape = model_shape(setup.model, setup.cfg)
        peak, device_name = peak_tflops(args.device, args.peak_tflops)
        budget = args.minutes * 60
        print(f"graph {graph.name} ({len(setup.tokens.examples)} training examples), {args.base}, {device_name}, "
              f"{'bf16' if use_bf16(args.device, args.precision) else 'fp32'}, LoRA on the top "
              f"{shape.layers - shape.trained_from} of {shape.layers} layers, {steps} timed steps per batch size, "
              f"budget {args.minutes:g} min (set-up took {time.perf_counter() - started:.0f} s)", flush=True)
        rows, last = [], None
        for b in batch_sizes:
            if b > len(setup.tokens.examples):
                print(f"batch {b}: more than the graph's training examples, skipped")
                continue
            elapsed = time.perf_counter() - started
            if last is not None:
                expected = last["s_per_step"] * (steps + 1) * b / last["batch_size"]
                if elapsed + expected > budget:
                    print(f"batch {b}: expected {expected:.0f} s, past the {args.minutes:g}-minute budget; stopped")
                    break
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            try:
                last = measure(setup, b, steps, shape)
            except torch.cuda.OutOfMemoryError:
                print(f"batch {b}: out of device memory; stopped")
                break
            last["mfu"] = last["tflops"] / peak if peak else None
            rows.append(last)
            _print_row(last, header=len(rows) == 1)
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "graph": graph.name, "peak_tflops": peak,
                                         "rows": rows}, indent=2))


def _print_row(r: dict, header: bool) -> None:
    if header:
        line = f"{'batch':>6}{'s/step':>9}{'triples/s':>11}{'tokens/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'peak GB':>9}"
        print(line)
        print("-" * len(line))
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    memory = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
    print(f"{r['batch_size']:>6}{r['s_per_step']:>9.3f}{r['triples_per_s']:>11.1f}{r['tokens_per_s']:>10.0f}"
          f"{r['tflops']:>9.3f}{mfu:>7}{memory:>9}", flush=True)


if __name__ == "__main__":
    main()
