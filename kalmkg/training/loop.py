"""`kalmkg train`: KaLM fine-tuning, readable top to bottom.

    data (store -> examples -> token ids, once)  ->  model (base + LoRA)  ->  loop:
        batch -> one backbone pass over hr views, completion sequences and tail views
              -> L_exp (InfoNCE over the global batch) + lambda * L_imp (LM on the tail tokens)
              -> AdamW step, cosine schedule -> log, validate, checkpoint

Distributed: under torchrun / accelerate launch every process takes its slice of the same global
batch, embeddings are all-gathered with gradients so every process contrasts against the whole
batch, and gradients are averaged: the update equals the single-process update on that batch.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from kalmkg.errors import KalmkgError
from kalmkg.device import pick_device
from kalmkg.training.config import TrainConfig, saved_train_config
from kalmkg.workspace import Workspace


# ------------------------------------------------------------------ distributed
@dataclass
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world(device_type: str) -> World:
    """Join the process group that torchrun / accelerate launch describe in the environment."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def gather(x, world: World):
    """All-gather along dim 0 keeping gradients (each process's slice gets the sum of all grads)."""
    if world.size == 1:
        return x
    import torch
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def agree(flag: bool, world: World) -> bool:
    """The main process's decision, made known to every process (e.g. to stop early)."""
    if world.size == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0])
    dist.broadcast(t, src=0)
    return bool(t.item())


# ------------------------------------------------------------------ the model pass
def run_backbone(backbone, rows: list[list[int]], pool_at: list[int], lm_spans: dict[int, tuple[int, int]],
                 pad_id: int, device, max_waste: float = 0.3, min_chunk: int = 8):
    """Encode token rows; returns (pooled [R, D], {row: hidden [span, D]} for the LM rows).

    Rows are sorted by length and run in a few chunks of similar length instead of one forward padded
    to the longest row: completion sequences are twice as long as views, and padding every view to
    them would double the work.
    """
    import torch

    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    chunks, current = [], []
    for i in order:
        if len(current) >= min_chunk and len(rows[i]) > (1 + max_waste) * len(rows[current[0]]):
            chunks.append(current)
            current = []
        current.append(i)
    if current:
        chunks.append(current)
    pooled: list = [None] * len(rows)
    lm_hidden: dict = {}
    from kalmkg.encode import pad_rows

    for chunk in chunks:
        ids, mask = pad_rows([rows[i] for i in chunk], pad_id)
        hidden = backbone(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        for j, i in enumerate(chunk):
            pooled[i] = hidden[j, pool_at[i]]
            if i in lm_spans:
                a, b = lm_spans[i]
                lm_hidden[i] = hidden[j, a:b]
    return torch.stack(pooled), lm_hidden


@dataclass
class StepInputs:
    """What one process feeds the model for its slice of a global batch.

    Identical rows (a tail entity twice in a batch, the same query twice) are encoded once;
    `hr`, `tail` and `self` give each example's row.
    """

    rows: list[list[int]]
    pool_at: list[int]
    lm_spans: dict[int, tuple[int, int]]  # row -> hidden positions that predict the target
    lm_labels: dict[int, list[int]]  # row -> target tokens
    hr: list[int]
    tail: list[int]
    self: list[int]


def build_inputs(tokens, examples: np.ndarray, lm_mask: np.ndarray, self_negatives: bool) -> StepInputs:
    """Token rows for a slice: hr views (or hr view + completion for LM examples), tail views,
    and optionally the head's own tail view (self-negative)."""
    inputs = StepInputs([], [], {}, {}, [], [], [])
    seen: dict[tuple, int] = {}

    def row(ids: list[int], pool: int, unique: bool = True) -> int:
        key = tuple(ids)
        if unique and key in seen:
            return seen[key]
        inputs.rows.append(ids)
        inputs.pool_at.append(pool)
        if unique:
            seen[key] = len(inputs.rows) - 1
        return len(inputs.rows) - 1

    for i, ((_q, _, a), hr_row) in enumerate(zip(examples.tolist(), tokens.hr_index_of(examples))):
        hr = tokens.hr_ids[hr_row]
        if lm_mask[i]:
            target = tokens.target_ids[a]
            r = row(hr + target, len(hr) - 1, unique=False)
            inputs.lm_spans[r] = (len(hr) - 1, len(hr) + len(target) - 1)
            inputs.lm_labels[r] = target
        else:
            r = row(hr, len(hr) - 1)
        inputs.hr.append(r)
    for q, _, a in examples.tolist():
        inputs.tail.append(row(tokens.tail_ids[a], len(tokens.tail_ids[a]) - 1))
        if self_negatives:
            inputs.self.append(row(tokens.tail_ids[q], len(tokens.tail_ids[q]) - 1))
    return inputs


def kalm_step(model, tokens, global_examples: np.ndarray, cfg: TrainConfig, temperature, known, world: World,
              prebatch: list | None = None, device="cpu") -> tuple:
    """Loss of one global batch as seen by this process; returns (loss, terms, tail vectors for pre-batch)."""
    import torch
    import torch.nn.functional as F

    from kalmkg.training import objective
    from kalmkg.training.data import lm_positions
    from kalmkg.models import backbone

    B = len(global_examples)
    local = B // world.size
    lo = world.rank * local
    mine = global_examples[lo:lo + local]
    lm_mask = np.zeros(B, dtype=bool)
    lm_mask[lm_positions(B, cfg.lm_examples if cfg.lm_weight > 0 else 0)] = True
    inputs = build_inputs(tokens, mine, lm_mask[lo:lo + local], cfg.self_negatives)

    pooled, lm_hidden = run_backbone(backbone(model), inputs.rows, inputs.pool_at, inputs.lm_spans,
                                     tokens.pad_id, device)
    pooled = F.normalize(pooled.float(), dim=-1)
    hr = gather(pooled[inputs.hr], world)
    tails = gather(pooled[inputs.tail], world)
    selfs = gather(pooled[inputs.self], world) if cfg.self_negatives else None

    ex = torch.as_tensor(global_examples)
    mask = objective.false_negative_mask(ex[:, :2], ex[:, 2], ex[:, 2], known).to(hr.device)
    extra = extra_mask = None
    if prebatch:
        extra = torch.cat([v for v, _ in prebatch]).to(hr.device)
        extra_ids = torch.cat([ids for _, ids in prebatch])
        extra_mask = objective.false_negative_mask(ex[:, :2], ex[:, 2], extra_ids, known,
                                                   positive_index=torch.full((B,), -1)).to(hr.device)
    self_mask = None
    if selfs is not None:
        self_mask = torch.tensor([q == a or q in known.get((q, r), ()) for q, r, a in global_examples.tolist()],
                                 device=hr.device)
    out = objective.info_nce(hr, tails, margin=cfg.margin, temperature=temperature(), mask=mask,
                             extra_negatives=extra, extra_mask=extra_mask,
                             self_negatives=selfs, self_negative_mask=self_mask)
    loss = out["loss"]
    l_imp = None
    if lm_hidden:
        head = model.get_output_embeddings()
        # Mean over tokens per example, then over examples: the same value however the examples are
        # spread over processes, so averaging across processes gives the single-process loss.
        per_example = [F.cross_entropy(head(h).float(), torch.tensor(inputs.lm_labels[i], device=h.device))
                       for i, h in lm_hidden.items()]
        l_imp = torch.stack(per_example).mean()
        loss = objective.kalm_loss(loss, l_imp, cfg.lm_weight)
    terms = {"loss": loss.item(), "l_exp": out["loss"].item(), "l_imp": l_imp.item() if l_imp is not None else None,
             "tau": temperature().item(), "acc": out["accuracy"].item()}
    return loss, terms, (tails.detach(), ex[:, 2].clone())


# ------------------------------------------------------------------ optimisation
def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, temperature, cfg: TrainConfig):
    import torch

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    temp_params = [p for p in temperature.parameters() if p.requires_grad]
    if temp_params:  # decay would pull 1/tau towards 0; tau gets its own group, undecayed
        groups.append({"params": temp_params, "weight_decay": 0.0})
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


# ------------------------------------------------------------------ the run
@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float = -1.0
    best_step: int = -1
    evals_without_improvement: int = 0
    history: list = field(default_factory=list)


class TrainProgress:
    """Callbacks the CLI implements; the default prints nothing."""

    def start(self, total_steps: int, state: TrainState) -> None: ...
    def step(self, state: TrainState, terms: dict, triples_per_s: float) -> None: ...
    def message(self, text: str) -> None: ...
    def stop(self) -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    run_id: str
    steps: int
    best_metric: float | None
    stopped_early: bool
    final_eval: dict | None


def train(workspace: Workspace, cfg: TrainConfig, *, run_id: str | None = None, resume: str | None = None,
          progress: TrainProgress | None = None, dry_run: Callable[[dict], None] | None = None,
          stop_after: int | None = None) -> TrainResult | None:
    """Fine-tune `cfg.base` on the workspace's train split. `stop_after` ends the process's work after
    that many steps as if it had been killed (for resume tests)."""
    import torch

    from kalmkg import runs
    from kalmkg.text import graph_texts
    from kalmkg.training.data import epoch_batches
    from kalmkg.evaluation.metrics import known_answers
    from kalmkg.models import LoraSettings, apply_lora, load_base, resolve_base
    from kalmkg.training.objective import LearnableTemperature
    from kalmkg.store import Store

    progress = progress or TrainProgress()
    if resume is not None:
        rdir = runs.find_run(workspace, resume)
        saved = runs.read_config(rdir)
        cfg = saved_train_config(saved)
        run_id = rdir.name
        if not (rdir / "checkpoint" / "state.pt").exists():
            raise KalmkgError(f"run {run_id} has no checkpoint to resume from")
    else:
        run_id = run_id or runs.new_run_id(cfg.base)
        rdir = runs.run_dir(workspace, run_id)
        if rdir.exists() and not dry_run:
            raise KalmkgError(f"run folder {rdir} already exists (pick another --run-name or --resume it)")
    _validate(cfg)

    device = pick_device(cfg.device)
    world = init_world(torch.device(device).type)
    torch.manual_seed(cfg.seed)

    # ---- data: read the store once, then let it go (other commands may use the workspace meanwhile)
    with Store.open(workspace) as store:
        train_triples = store.triples_array(("train",))
        valid_triples = store.triples_array(("valid",))
        all_triples = store.triples_array()
        graph_fp = store.fingerprint()
        entity_table, relation_table = store.entity_table(), store.relation_table()
    if len(train_triples) == 0:
        raise KalmkgError("the train split is empty: ingest a graph (and `kalmkg split` if needed) first")
    resolved = resolve_base(cfg.base)
    model, tokenizer = load_base(resolved, device=device)
    texts = graph_texts(entity_table, relation_table, tokenizer, cfg.max_entity_tokens)
    if world.main and not dry_run:
        rdir.mkdir(parents=True, exist_ok=True)
    tokens = _tokens(texts, train_triples, tokenizer, cfg, rdir if world.main and not dry_run else None)
    if len(tokens.examples) < cfg.batch_size:
        raise KalmkgError(f"--batch-size {cfg.batch_size} is larger than the {len(tokens.examples)} training examples")
    if cfg.batch_size % world.size:
        raise KalmkgError(f"--batch-size {cfg.batch_size} must be divisible by the {world.size} processes")
    known = {k: frozenset(v) for k, v in known_answers(train_triples, texts.num_relations).items()}

    steps_per_epoch = len(tokens.examples) // cfg.batch_size // cfg.grad_accum
    total_steps = cfg.max_steps or max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
    if dry_run is not None:
        first = epoch_batches(len(tokens.examples), cfg.batch_size, cfg.seed, 0, tokens.lengths, cfg.bucket)[0]
        dry_run({"config": runs.as_dict(cfg), "base": resolved.name, "device": device,
                 "train_examples": len(tokens.examples), "steps": total_steps,
                 "first_batch": _describe(first, tokens, tokenizer, cfg)})
        return None

    model = apply_lora(model, LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_targets),
                                           cfg.full, cfg.lora_layers))
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.to(device)
    if use_bf16(device, cfg.precision) and not cfg.full:
        freeze_in_bf16(model)
    temperature = LearnableTemperature(cfg.temperature, cfg.learn_temperature).to(device)
    optimizer = make_optimizer(model, temperature, cfg)
    warmup = int(cfg.warmup * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    state = TrainState()
    prebatch: list = []

    if resume is not None:
        state, prebatch = _load_checkpoint(rdir, model, temperature, optimizer, scheduler, device)
    elif world.main:
        _write_config(rdir, cfg, resolved, graph_fp, world)
        tokenizer.save_pretrained(rdir / "tokenizer")
    barrier(world)  # every process has read the store before the first one writes to it
    if world.main and resume is None:
        _record_run(workspace, run_id, cfg, rdir, graph_fp)

    autocast = make_autocast(device, cfg.precision)
    eval_every = cfg.eval_every or steps_per_epoch
    has_valid = len(valid_triples) > 0
    progress.start(total_steps, state)
    model.train()
    stopped_early = False
    window_t, window_n = time.perf_counter(), 0
    done_here = 0
    while state.step < total_steps:
        batches = epoch_batches(len(tokens.examples), cfg.batch_size, cfg.seed, state.epoch, tokens.lengths, cfg.bucket)
        while state.batch_in_epoch + cfg.grad_accum <= len(batches) and state.step < total_steps:
            optimizer.zero_grad(set_to_none=True)
            terms_acc: list[dict] = []
            for k in range(cfg.grad_accum):
                batch = tokens.examples[batches[state.batch_in_epoch + k]]
                with autocast:
                    loss, terms, tail_vecs = kalm_step(model, tokens, batch, cfg, temperature, known, world,
                                                       prebatch, device)
                (loss / cfg.grad_accum).backward()
                terms_acc.append(terms)
                if cfg.prebatch:
                    prebatch = (prebatch + [tail_vecs])[-cfg.prebatch:]
            _average_gradients(model, temperature, world)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            state.step += 1
            state.batch_in_epoch += cfg.grad_accum
            done_here += 1
            window_n += cfg.batch_size * cfg.grad_accum
            terms = _mean_terms(terms_acc)
            elapsed = time.perf_counter() - window_t
            rate = window_n / elapsed if elapsed > 0 else 0.0
            progress.step(state, terms, rate)
            if world.main and (state.step % cfg.log_every == 0 or state.step == total_steps):
                runs.append_jsonl(rdir / "metrics.jsonl", {"step": state.step, "epoch": state.epoch,
                                                           "lr": scheduler.get_last_lr()[0],
                                                           "triples_per_s": round(rate, 2), **terms})
            if has_valid and (state.step % eval_every == 0 or state.step == total_steps):
                stopped_early = _validate_and_keep_best(model, temperature, tokenizer, texts, valid_triples,
                                                        all_triples, cfg, state, rdir, world, device, progress)
                model.train()
                window_t, window_n = time.perf_counter(), 0  # triples/s counts training time only
            if world.main and (state.step % cfg.checkpoint_every == 0 or state.step == total_steps):
                _save_checkpoint(rdir, model, temperature, optimizer, scheduler, state, prebatch)
            if stopped_early or (stop_after is not None and done_here >= stop_after):
                break
        if stopped_early or (stop_after is not None and done_here >= stop_after):
            break
        if state.batch_in_epoch + cfg.grad_accum > len(batches):
            state.epoch += 1
            state.batch_in_epoch = 0
    progress.stop()

    finished = state.step >= total_steps or stopped_early
    if world.main:
        if finished and not has_valid:  # nothing to select on: the last weights are the result
            _save_adapter(model, rdir / "adapter")
        if finished:
            _plot(rdir)
        _finish_run(workspace, run_id, "finished" if finished else "interrupted", state)
    final_eval = state.history[-1] if state.history else None
    return TrainResult(rdir, run_id, state.step, state.best_metric if has_valid else None, stopped_early, final_eval)


# ------------------------------------------------------------------ pieces of the run
def _validate(cfg: TrainConfig) -> None:
    from kalmkg.training.objective import TEMPERATURE_RANGE

    low, high = TEMPERATURE_RANGE
    checks = [
        (cfg.batch_size >= 2, "--batch-size must be at least 2 (in-batch negatives)"),
        (low <= cfg.temperature <= high, f"--temperature must be in [{low:g}, {high:g}]"),
        (cfg.lr > 0, "--lr must be positive"),
        (cfg.grad_accum >= 1, "--grad-accum must be at least 1"),
        (cfg.epochs > 0 or cfg.max_steps > 0, "give --epochs > 0 or --max-steps > 0"),
        (0 <= cfg.lm_examples <= cfg.batch_size, "--lm-examples must be between 0 and --batch-size"),
        (cfg.max_entity_tokens >= 1, "--max-entity-tokens must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise KalmkgError(message)


def use_bf16(device: str, precision: str) -> bool:
    import torch

    if precision in ("fp32", "bf16"):
        return precision == "bf16"
    if precision != "auto":
        raise KalmkgError(f"unknown precision '{precision}'; use auto, fp32 or bf16")
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    if kind == "cpu":  # oneDNN runs bf16 matmuls at about twice the fp32 speed on these CPUs
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def freeze_in_bf16(model) -> None:
    """Store the frozen base weights in bf16 (the trainable ones stay fp32): autocast would otherwise
    re-cast every frozen matrix at every use, and they take half the memory."""
    import torch

    for p in model.parameters():
        if not p.requires_grad and p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)


def make_autocast(device: str, precision: str):
    """Mixed precision: weights and optimizer stay fp32, matmuls run in bf16; the loss is fp32."""
    import torch

    kind = torch.device(device).type
    return torch.autocast(kind if kind in ("cuda", "cpu") else "cpu", dtype=torch.bfloat16,
                          enabled=use_bf16(device, precision))


def _tokens(texts, train_triples, tokenizer, cfg: TrainConfig, rdir: Path | None):
    """Token ids for every view, cached in the run folder (resume reuses them)."""
    import torch

    from kalmkg.training.data import tokenize_examples, with_inverses

    cache = rdir / "tokens.pt" if rdir is not None else None
    if cache is not None and cache.exists():
        return _Tokens(torch.load(cache, weights_only=False))
    try:
        tok = tokenize_examples(texts, with_inverses(train_triples, texts.num_relations), tokenizer, cfg.max_seq_len)
    except ValueError as exc:  # a head-relation view longer than the sequence
        raise KalmkgError(f"--max-seq-len {cfg.max_seq_len} is too small: {exc} (raise --max-seq-len or "
                          "lower --max-entity-tokens)") from None
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(tok, tmp)
        os.replace(tmp, cache)
    return _Tokens(tok)


class _Tokens:
    """TokenizedExamples plus the lookup the step needs."""

    def __init__(self, tok):
        self.__dict__.update(tok.__dict__)
        self._hr_of = {tuple(k): i for k, i in zip(tok.examples[:, :2].tolist(), tok.hr_index.tolist())}

    def hr_index_of(self, examples: np.ndarray) -> list[int]:
        return [self._hr_of[(q, r)] for q, r in examples[:, :2].tolist()]


def _describe(batch_idx, tokens, tokenizer, cfg) -> list[dict]:
    from kalmkg.training.data import lm_positions

    lm = set(lm_positions(cfg.batch_size, cfg.lm_examples if cfg.lm_weight > 0 else 0).tolist())
    out = []
    for pos, i in enumerate(batch_idx.tolist()[:8]):
        q, r, a = tokens.examples[i].tolist()
        hr = tokens.hr_ids[tokens.hr_index[i]]
        out.append({"hr_view": tokenizer.decode(hr), "tail_view": tokenizer.decode(tokens.tail_ids[a]),
                    "lm_target": tokenizer.decode(tokens.target_ids[a]) if pos in lm else None})
    return out


def _average_gradients(model, temperature, world: World) -> None:
    if world.size == 1:
        return
    import torch.distributed as dist

    for p in list(model.parameters()) + list(temperature.parameters()):
        if p.requires_grad and p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world.size


def _mean_terms(terms: list[dict]) -> dict:
    out = {}
    for k in terms[0]:
        vals = [t[k] for t in terms if t[k] is not None]
        out[k] = round(sum(vals) / len(vals), 6) if vals else None
    return out


def _write_config(rdir: Path, cfg: TrainConfig, resolved, graph_fp: str, world: World) -> None:
    import torch
    import transformers

    from kalmkg import __version__, runs

    runs.atomic_write_text(rdir / "config.toml", runs.config_to_toml({
        "train": runs.as_dict(cfg),
        "base": {"name": resolved.name, "path": str(resolved.path), "source": resolved.source,
                 "fingerprint": resolved.fingerprint},
        "graph": {"fingerprint": graph_fp},
        "environment": {"kalmkg": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                        "world_size": world.size},
    }))


def _record_run(workspace, run_id, cfg, rdir, graph_fp) -> None:
    from kalmkg import runs
    from kalmkg.store import Store

    with Store.open(workspace, write=True) as store:
        store.add_run(run_id, cfg.base, str(rdir), graph_fp, json.dumps(runs.as_dict(cfg)))


def _finish_run(workspace, run_id, status: str, state: TrainState) -> None:
    from kalmkg.store import Store

    with Store.open(workspace, write=True) as store:
        store.update_run(run_id, status=status, steps=state.step,
                         best_metric=state.best_metric if state.best_metric >= 0 else None)


def _trainable_state(model, temperature) -> dict:
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state["__temperature__"] = temperature.state_dict()
    return state


def _save_checkpoint(rdir, model, temperature, optimizer, scheduler, state: TrainState, prebatch) -> None:
    import torch

    from kalmkg.runs import atomic_path

    payload = {
        "trainable": _trainable_state(model, temperature),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": state.__dict__,
        "prebatch": [(v.cpu(), ids) for v, ids in prebatch],
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    with atomic_path(rdir / "checkpoint") as tmp:
        tmp.mkdir()
        torch.save(payload, tmp / "state.pt")


def _load_checkpoint(rdir, model, temperature, optimizer, scheduler, device):
    import torch

    payload = torch.load(rdir / "checkpoint" / "state.pt", weights_only=False, map_location="cpu")
    trainable = dict(payload["trainable"])
    temperature.load_state_dict(trainable.pop("__temperature__"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"]["torch"])
    if payload["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    state = TrainState(**payload["state"])
    prebatch = [(v.to(device), ids) for v, ids in payload["prebatch"]]
    return state, prebatch


def _save_adapter(model, path: Path) -> None:
    from kalmkg.runs import atomic_path

    with atomic_path(path) as tmp:
        model.save_pretrained(tmp)


def _validate_and_keep_best(model, temperature, tokenizer, texts, valid_triples, all_triples, cfg, state,
                            rdir, world, device, progress) -> bool:
    """Filtered MRR on a fixed sample of valid; keeps the best adapter; True when patience ran out."""
    if not world.main:
        return agree(False, world)  # the main process decides
    stop = _evaluate_main(model, temperature, tokenizer, texts, valid_triples, all_triples, cfg, state, rdir,
                          device, progress)
    return agree(stop, world)


def _evaluate_main(model, temperature, tokenizer, texts, valid_triples, all_triples, cfg, state, rdir, device,
                   progress) -> bool:
    from kalmkg.evaluation.ranking import rank_queries, sample_triples
    from kalmkg.runs import append_jsonl

    sample = sample_triples(valid_triples, cfg.eval_limit, seed=cfg.seed)
    result = rank_queries(model, tokenizer, texts, sample, all_triples, device=device)
    metrics = {"step": state.step, "epoch": state.epoch, "valid": result["both"]}
    state.history.append(metrics)
    append_jsonl(rdir / "metrics.jsonl", metrics)
    mrr = result["both"]["mrr"]
    progress.message(f"step {state.step}: valid MRR {mrr:.4f}  Hits@1 {result['both']['hits@1']:.4f}  "
                     f"Hits@10 {result['both']['hits@10']:.4f}  (n={result['both']['count']})")
    if mrr > state.best_metric:
        state.best_metric, state.best_step = mrr, state.step
        state.evals_without_improvement = 0
        _save_adapter(model, rdir / "adapter")
        return False
    state.evals_without_improvement += 1
    return cfg.patience > 0 and state.evals_without_improvement >= cfg.patience


def _plot(rdir: Path) -> None:
    """Loss terms and validation MRR against steps, as training.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in open(rdir / "metrics.jsonl")] if (rdir / "metrics.jsonl").exists() else []
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "valid" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("loss", "l_exp", "l_imp"):
        pts = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts), label=key)
    ax1.set_xlabel("step")
    ax1.set_title("training loss")
    ax1.legend()
    if evals:
        ax2.plot([r["step"] for r in evals], [r["valid"]["mrr"] for r in evals], marker="o", label="MRR")
        ax2.plot([r["step"] for r in evals], [r["valid"]["hits@10"] for r in evals], marker="o", label="Hits@10")
        ax2.legend()
    ax2.set_xlabel("step")
    ax2.set_title("validation (filtered)")
    fig.tight_layout()
    tmp = rdir / ".training.png.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, rdir / "training.png")
