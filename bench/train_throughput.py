"""Training throughput: kalmkg's KaLM step vs a naive implementation, same model, same examples.

    python bench/train_throughput.py                         # sample graph, embedded SmolLM2, CPU, one epoch
    python bench/train_throughput.py --graph ../shared/datasets/WN18RR --steps 10 --device cuda

Naive = what a first implementation does: every view through the full causal LM with
`output_hidden_states=True` (LM head over the whole vocabulary at every position), separate padded
passes for hr views, tail views and the LM examples, random batches (no length bucketing: the same
examples per epoch, grouped differently).
kalmkg = no LM head for views (LM head only at the target positions), the hr view shared as the
prefix of the completion sequence, length-bucketed batches and length-grouped chunks, attention as
plain matmuls on a CPU (SDPA elsewhere), and (last row) the frozen layers below --lora-layers run once
per text, their outputs kept for later steps. All compute the same loss (L_exp + lambda L_imp) with the same LoRA settings (the defaults
`kalmkg train` picks for the embedded model: top 8 layers, entity texts of 16 tokens); the table
shows triples/s (both directions count), peak memory and, for the cache, the share of rows it held.
The steps are one epoch's batches in training order (the cache's gain depends on how often a text
comes back, so a few first steps would understate it); more steps than an epoch go on into the next
epochs, reshuffled as training does, and the cache's row then also gives its s/step in the first epoch
and in the later ones. The untimed warm-up step keeps nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def naive_step(ctx, batch: np.ndarray):
    """One step the straightforward way (reference for the speed-up); `ctx`: the step's StepContext."""
    import torch
    import torch.nn.functional as F

    from kalmkg.encode import pad_rows
    from kalmkg.training import objective
    from kalmkg.training.data import lm_positions

    model, tokens, cfg, device = ctx.model, ctx.tokens, ctx.cfg, ctx.device

    def pad(rows):
        ids, mask = pad_rows(rows, tokens.pad_id)
        return ids.to(device), mask.to(device)

    def embed(rows):
        ids, mask = pad(rows)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return F.normalize(objective.last_token_pool(out.hidden_states[-1], mask).float(), dim=-1)

    hr_rows = [tokens.hr_ids[i] for i in tokens.hr_index_of(batch)]
    hr = embed(hr_rows)
    tails = embed([tokens.tail_ids[a] for a in batch[:, 2].tolist()])
    ex = torch.as_tensor(batch)
    mask = objective.false_negative_mask(ex[:, :2], ex[:, 2], ex[:, 2], ctx.known)
    out = objective.info_nce(hr, tails, margin=cfg.margin, temperature=ctx.temperature(), mask=mask)
    loss = out["loss"]
    lm_idx = lm_positions(len(batch), cfg.lm_examples).tolist()
    if lm_idx:
        targets = [tokens.target_ids[batch[i, 2]] for i in lm_idx]
        ids, attn = pad([hr_rows[i] + t for i, t in zip(lm_idx, targets)])
        logits = model(input_ids=ids, attention_mask=attn).logits
        # the logits that predict each target: from the prompt's last token on
        predicted = [logits[j, len(hr_rows[i]) - 1: len(hr_rows[i]) + len(t) - 1]
                     for j, (i, t) in enumerate(zip(lm_idx, targets))]
        l_imp = objective.completion_loss(predicted, [torch.tensor(t, device=device) for t in targets])
        loss = objective.kalm_loss(loss, l_imp, cfg.lm_weight)
    return loss


def run(mode: str, args, workspace, cfg, n_steps: int, precision: str = "fp32", cache_mb: int = 0) -> dict:
    import torch

    from kalmkg.evaluation.metrics import known_answers
    from kalmkg.models import apply_lora, load_base, resolve_base
    from kalmkg.store import Store
    from kalmkg.text import graph_texts
    from kalmkg.training.data import epoch_batches, load_tokens, with_inverses
    from kalmkg.training.dropout import use_word_dropout
    from kalmkg.training.learner import make_optimizer, use_plain_attention
    from kalmkg.training.objective import LearnableTemperature
    from kalmkg.training.precision import freeze_in_bf16, make_autocast, use_bf16
    from kalmkg.training.prefix import prefix_for
    from kalmkg.training.step import StepContext, kalm_step

    with Store.open(workspace) as store:
        train = store.triples_array(("train",))
        ents, rels = store.entity_table(), store.relation_table()
    torch.manual_seed(0)
    model, tokenizer = load_base(resolve_base(cfg.base), device=args.device)
    texts = graph_texts(ents, rels, tokenizer, cfg.max_entity_tokens)
    tokens = load_tokens(texts, with_inverses(train, texts.num_relations), tokenizer, cfg.max_seq_len, None)
    known = {k: frozenset(v) for k, v in known_answers(train, texts.num_relations).items()}
    if mode == "kalmkg" and args.device == "cpu":
        use_plain_attention(model)
    model = apply_lora(model, cfg).to(args.device)
    if mode == "kalmkg" and args.device == "cpu":
        use_word_dropout(model)
    if mode == "kalmkg" and use_bf16(args.device, precision):
        freeze_in_bf16(model)
    model.train()
    temperature = LearnableTemperature(cfg.temperature, False).to(args.device)
    opt = make_optimizer(model, temperature, cfg)
    ctx = StepContext(model, temperature, tokens, known, cfg, device=args.device)
    def batches_of(epoch: int) -> list:  # as training orders them, reshuffled every epoch
        return epoch_batches(len(tokens.examples), cfg.batch_size, 0, epoch, tokens.lengths, bucket=(mode == "kalmkg"))

    batches = batches_of(0)
    n_steps = n_steps or len(batches)
    cuda = args.device.startswith("cuda")
    autocast = make_autocast(args.device, "fp32" if mode == "naive" else precision)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, tokens_seen = [], 0
    for step in range(n_steps + 1):  # the first step warms up and is not timed
        epoch, at = divmod(step - 1, len(batches))
        batch = tokens.examples[batches_of(epoch)[at] if step else batches[-1]]
        if step == 1 and cache_mb:
            ctx.prefix = prefix_for(model, cache_mb)  # from empty: the warm-up step keeps nothing
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = kalm_step(ctx, batch).loss if mode == "kalmkg" else naive_step(ctx, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
            tokens_seen += sum(len(tokens.hr_ids[i]) + len(tokens.tail_ids[a])
                               for i, a in zip(tokens.hr_index_of(batch), batch[:, 2].tolist()))
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = sum(times)
    label = f"{mode} {'bf16' if use_bf16(args.device, precision) and mode != 'naive' else 'fp32'}"
    kept = ctx.prefix.stats() if ctx.prefix is not None else None
    if kept:  # s/step while the cache fills (the first pass over the epoch's batches) and after
        first = times[: len(batches)]
        kept["first_pass"] = sum(first) / len(first)
        kept["later"] = sum(times[len(batches):]) / len(times[len(batches):]) if len(times) > len(batches) else None
    return {"mode": label + (" + kept" if kept else ""), "steps": n_steps, "seconds": total,
            "triples_per_s": n_steps * cfg.batch_size / total, "view_tokens_per_s": tokens_seen / total,
            "peak_mb": peak, "kept": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graph", default=str(ROOT / "sample_graphs" / "world.ttl"))
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (0: one epoch)")
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lora-layers", type=int, default=8)
    parser.add_argument("--max-entity-tokens", type=int, default=16)
    parser.add_argument("--cache-mb", type=int, default=2048, help="the frozen-layer cache of the last row")
    parser.add_argument("--_child", nargs=3, metavar=("MODE", "PRECISION", "CACHE_MB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child is None:
        # Each measurement in a fresh process, so peak memory is its own.
        # The naive step in fp32 (what a first implementation runs), kalmkg in fp32 (the same
        # arithmetic) and with its default precision (bf16 autocast where the hardware is fast at it),
        # then that with the frozen-layer cache (what `kalmkg train` runs by default).
        rows = []
        for mode, precision, cache in (("naive", "fp32", 0), ("kalmkg", "fp32", 0), ("kalmkg", "auto", 0),
                                       ("kalmkg", "auto", args.cache_mb)):
            if cache and not args.lora_layers:
                continue  # every layer trains: nothing is frozen to keep
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--_child", mode, precision, str(cache)],
                                 check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        _print_table(args, rows)
        return

    from kalmkg.ingestion import ingest, resolve_sources
    from kalmkg.store import Store
    from kalmkg.training.loop import TrainConfig
    from kalmkg.workspace import Workspace

    # lr as the README's table was measured with (it does not change a step's cost)
    cfg = TrainConfig(base=args.base, batch_size=args.batch_size, lora_layers=args.lora_layers,
                      max_entity_tokens=args.max_entity_tokens, lr=1e-4)
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp) / "ws")
        with Store.open(ws, create=True) as store:
            ingest(store, resolve_sources([Path(args.graph)]))
        mode, precision, cache = args._child
        print(json.dumps(run(mode, args, ws, cfg, args.steps, precision, int(cache))))


def _print_table(args, rows: list[dict]) -> None:
    base = rows[0]["triples_per_s"]
    base_s = rows[0]["seconds"] / rows[0]["steps"]
    print(f"graph {Path(args.graph).name}, base {args.base}, device {args.device}, batch {args.batch_size}, "
          f"lora layers {args.lora_layers or 'all'}, {rows[0]['steps']} timed steps each")
    header = (f"{'implementation':<23}{'s/step':>9}{'triples/s':>11}{'view tok/s':>12}{'peak MB':>9}"
              f"{'speed-up':>10}  kept rows")
    print(header)
    print("-" * len(header))
    for r in rows:
        kept = r["kept"]
        held = "" if kept is None else (f"  {kept['hits'] / max(1, kept['hits'] + kept['misses']):.0%} held, "
                                        f"{kept['rows']} rows in {kept['mb']:.0f} MB")
        if kept and kept["later"]:
            held += (f"; first epoch {kept['first_pass']:.2f} s/step ({base_s / kept['first_pass']:.2f}x), "
                     f"later epochs {kept['later']:.2f} s/step ({base_s / kept['later']:.2f}x)")
        print(f"{r['mode']:<23}{r['seconds'] / r['steps']:>9.2f}{r['triples_per_s']:>11.2f}"
              f"{r['view_tokens_per_s']:>12.0f}{r['peak_mb']:>9.0f}{r['triples_per_s'] / base:>9.2f}x{held}")


if __name__ == "__main__":
    main()
