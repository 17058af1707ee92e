"""`kalmkg train`: KaLM fine-tuning, read top to bottom as a sequence of stages.

    open the run -> load data (store -> examples -> token ids, once) -> build the model (base + LoRA,
    temperature, AdamW, cosine schedule) -> start or resume -> the loop: a group of batches ->
    the step (L_exp + lambda * L_imp) -> log, validate (early stopping), checkpoint -> finish

This module holds the order; each stage's parts live in their own module of this package:
data, learner, step (+ objective), checkpoint, stopping, distributed, precision, record, plot.
Under torchrun / accelerate launch every process runs the same stages on its slice of each global
batch (see distributed.py); the main process alone writes the run folder.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from kalmkg import runs
from kalmkg.device import pick_device
from kalmkg.errors import KalmkgError
from kalmkg.evaluation.ranking import rank_queries, sample_triples
from kalmkg.models import (apply_lora, load_base, num_layers, parameter_count, quantized_kind, quantized_weights,
                           resolve_base)
from kalmkg.text import graph_texts
from kalmkg.training.checkpoint import load_checkpoint, save_adapter, save_checkpoint
from kalmkg.training.config import SIZED, TrainConfig, with_size_defaults
from kalmkg.training.data import QuestionData, ReadingData, batch_groups, describe_batch, epoch_batches, load_tokens, read_graph
from kalmkg.training.distributed import World, agree, barrier, init_world, replicate, shard
from kalmkg.training.learner import build_learner
from kalmkg.training.memory import MemoryEstimate, ModelShape, estimate_memory
from kalmkg.training.card import write_model_card
from kalmkg.training.plot import plot_metrics
from kalmkg.training.report import Reporter, check_reporter, open_reporter
from kalmkg.training.precision import make_autocast, use_bf16
from kalmkg.training.record import open_run, record_end, record_start, write_config
from kalmkg.training.stopping import EarlyStopper
from kalmkg.workspace import Workspace


@dataclass
class TrainState:
    """The loop's counters: where the run is (what a checkpoint saves and a resume starts from) and
    the early stopper's memory."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float = -1.0
    best_step: int = -1
    evals_without_improvement: int = 0
    history: list = field(default_factory=list)
    seconds: float = 0.0  # the loop's time (steps and validations) over every process that ran it: --max-minutes


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
    out_of_time: bool = False  # --max-minutes ended it


def train(workspace: Workspace, cfg: TrainConfig, *, run_id: str | None = None, resume: str | None = None,
          progress: TrainProgress | None = None, dry_run: Callable[[dict], None] | None = None,
          stop_after: int | None = None) -> TrainResult | None:
    """Fine-tune `cfg.base` on the workspace's train split. `dry_run` gets what the run would do
    instead (nothing is written); `stop_after` ends the process's work after that many steps as if
    it had been killed (for resume tests)."""
    import torch

    from kalmkg.training.prefix import prefix_for  # these import torch: loaded when training starts
    from kalmkg.training.step import KaLMStep, StepContext

    progress = progress or TrainProgress()

    # open the run: a new folder, or the one to resume with the config it was started with
    run = open_run(workspace, cfg, run_id, resume, dry_run=dry_run is not None)
    cfg = run.cfg
    if dry_run is None:
        check_reporter(cfg.report_to)  # a missing library or a tracking server that refuses: before any work
    device = pick_device(cfg.device)
    world = init_world(torch.device(device).type)
    torch.manual_seed(cfg.seed)
    writes = world.main and dry_run is None
    if cfg.precision == "auto":  # decided once, by the main process for all, and recorded: a resume keeps it
        cfg = run.cfg = replace(cfg, precision="bf16" if agree(use_bf16(device, "auto"), world) else "fp32")

    # load data: the graph read once, its texts cut with the base's tokenizer, token ids (kept in the run)
    graph = read_graph(workspace)
    resolved = resolve_base(cfg.base)
    # frozen weights that train in bf16 load in bf16 (LoRA's own weights are made in fp32 by peft):
    # a 7B base never exists in float32 on the host
    frozen_bf16 = use_bf16(device, cfg.precision) and not cfg.full
    model, tokenizer = load_base(resolved, dtype=torch.bfloat16 if frozen_bf16 else None, device=device,
                                 quantize=cfg.quantize)
    # settings left unset take the defaults for the base's size (what config.toml then records)
    n_params = parameter_count(model)
    by_size = [name for name in SIZED if getattr(cfg, name) is None]
    cfg = run.cfg = with_size_defaults(cfg, n_params, num_layers(model))
    texts = graph_texts(graph.entity_table, graph.relation_table, tokenizer, cfg.max_entity_tokens)
    if writes:
        run.path.mkdir(parents=True, exist_ok=True)
    # the examples and the entities' token ids: in the run folder (a resume reuses them), or in this
    # process's own folder for a dry run and the other processes of a distributed run
    tokens = load_tokens(texts, graph.examples, tokenizer, cfg.max_seq_len,
                         (run.path if writes else graph.folder) / "tokens")
    _check_batch_size(cfg, len(tokens.examples), world)
    known = graph.known_train
    steps_per_epoch = len(tokens.examples) // cfg.batch_size // cfg.grad_accum
    total_steps = cfg.max_steps or max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
    questions = QuestionData.build(graph, tokenizer) if cfg.question_weight > 0 and cfg.question_examples else None
    reading = ReadingData.build(graph, tokenizer) if cfg.reading_weight > 0 and cfg.reading_examples else None
    if dry_run is not None:
        first = epoch_batches(len(tokens.examples), cfg.batch_size, cfg.seed, 0, tokens.lengths, cfg.bucket)[0]
        chats = [batch for data, k in ((questions, cfg.question_examples), (reading, cfg.reading_examples))
                 if data is not None for batch in [data.batch(k, cfg.seed, 0)]]
        memory = plan_memory(model, cfg, tokens, tokens.examples[first], chats, world, device)
        dry_run({"config": runs.as_dict(cfg), "base": resolved.name, "device": device, "parameters": n_params,
                 "by_size": by_size, "memory": memory and {"bytes": asdict(memory), "total": memory.total,
                                                           "text": memory.describe(), "processes": world.size},
                 "train_examples": len(tokens.examples), "steps": total_steps,
                 "first_batch": describe_batch(tokens, first, tokenizer, cfg),
                 "questions": None if questions is None else questions.describe(cfg.question_examples, cfg.seed),
                 "reading": None if reading is None else reading.describe(cfg.reading_examples, cfg.seed)})
        return None

    # build the model: LoRA on the base, the temperature, AdamW and its schedule
    learner = build_learner(model, cfg, total_steps, device)

    # start or resume: a resumed run goes on from its checkpoint's weights, counters and random state
    state, prebatch = TrainState(), []
    if run.resuming:
        counters, prebatch = load_checkpoint(run.checkpoint, learner, device)
        state = TrainState(**counters)
    elif world.main:
        write_config(run, resolved, graph.fingerprint, world.size)
        tokenizer.save_pretrained(run.path / "tokenizer")
    barrier(world)  # every process has read the store before the first one writes to it
    if world.main and not run.resuming:
        record_start(workspace, run, graph.fingerprint)
    # metrics.jsonl, and --report-to's library beside it (the main process writes both)
    reporter = open_reporter(cfg.report_to, run.path, runs.as_dict(run.cfg)) if world.main else Reporter()

    def record(entry: dict) -> None:
        runs.append_jsonl(run.path / "metrics.jsonl", entry)
        reporter.log(entry)

    # validation through the stopping object: filtered MRR on a fixed sample of valid, best adapter kept;
    # it reuses the frozen layers' kept outputs (every entity is encoded at every validation)
    prefix = prefix_for(learner.model, cfg.frozen_cache_mb)
    stopper = None
    if len(graph.valid):
        sample = sample_triples(graph.valid, cfg.eval_limit, seed=cfg.seed)
        stopper = EarlyStopper(
            validate=lambda: rank_queries(learner.model, tokenizer, texts, sample, graph.known_all, device=device,
                                          prefix=prefix, shard=shard(len(texts.entities), world),
                                          scratch=graph.folder)["both"],
            keep_best=lambda: save_adapter(learner.model, run.path / "adapter"),
            log=lambda entry: (record(entry), plot_metrics(run.path)),  # the plot drawn again at each validation
            say=progress.message, patience=cfg.patience, world=world)
    eval_every = cfg.eval_every or steps_per_epoch

    # the loop: one optimizer step per group of grad_accum batches, from where the run stands
    step_context = StepContext(learner.model, learner.temperature, tokens, known, cfg, world, device, prefix)
    stepper = replicate(KaLMStep(step_context), world, device)  # gradients averaged over the processes
    autocast = make_autocast(device, cfg.precision)
    groups = batch_groups(tokens, cfg, state.epoch, state.batch_in_epoch)
    rate = _Rate()
    clock = _Clock(state.seconds, cfg.max_minutes, world)
    _, out_of_time = clock.read()  # a resumed run may have spent its time already
    stopped_early, steps_here = False, 0
    progress.start(total_steps, state)
    learner.model.train()
    while (state.step < total_steps and not stopped_early and not out_of_time
           and (stop_after is None or steps_here < stop_after)):
        epoch, next_batch, group = next(groups)

        # the step: gradients of every batch of the group, averaged over processes (by the last batch's
        # backward), one update
        learner.optimizer.zero_grad(set_to_none=True)
        batch_terms = []
        for j, examples in enumerate(group):
            index = state.step * cfg.grad_accum + j
            chats = {"l_qa": questions.batch(cfg.question_examples, cfg.seed, index) if questions else None,
                     "l_read": reading.batch(cfg.reading_examples, cfg.seed, index) if reading else None}
            views = questions.views(cfg.question_examples, cfg.seed, index) \
                if questions and cfg.question_view_weight > 0 else None
            accumulating = world.size > 1 and j < len(group) - 1
            with stepper.no_sync() if accumulating else contextlib.nullcontext():
                with autocast:
                    out = stepper(examples, prebatch, chats, views)
                (out.loss / cfg.grad_accum).backward()
            batch_terms.append(out.terms)
            if cfg.prebatch:
                prebatch = (prebatch + [out.tails])[-cfg.prebatch:]
        learner.update(cfg.grad_clip)
        state.step, state.epoch, state.batch_in_epoch = state.step + 1, epoch, next_batch
        steps_here += 1
        state.seconds, out_of_time = clock.read()
        # the time limit ends the run at this step: it is validated and checkpointed as a last step is
        last = state.step if out_of_time else total_steps
        terms = _mean_terms(batch_terms)
        triples_per_s = rate.add(cfg.batch_size * cfg.grad_accum)
        progress.step(state, terms, triples_per_s)

        # log, validate, checkpoint
        if world.main and _due(state.step, cfg.log_every, last):
            record({"step": state.step, "epoch": state.epoch, "lr": learner.scheduler.get_last_lr()[0],
                    "triples_per_s": round(triples_per_s, 2), **terms})
        if stopper is not None and _due(state.step, eval_every, last):
            stopped_early = stopper.should_stop(state)
            learner.model.train()
            rate.restart()  # triples/s counts training time only
            state.seconds, _ = clock.read()
        if world.main and _due(state.step, cfg.checkpoint_every, last):
            save_checkpoint(run.checkpoint, learner, asdict(state), prebatch)
    progress.stop()
    if out_of_time:
        progress.message(f"stopped at the {cfg.max_minutes:g}-minute limit (--max-minutes), step {state.step:,} "
                         f"of {total_steps:,}")

    # finish: with nothing to select on, the last weights are the result; the plot; the run's status
    finished = state.step >= total_steps or stopped_early or out_of_time
    if world.main:
        if finished and stopper is None:
            save_adapter(learner.model, run.path / "adapter")
        if finished and cfg.structure != "none":
            _train_structure(run.path, graph, cfg, progress, device)
        if finished:
            plot_metrics(run.path)
        _check_graph_unchanged(workspace, run, graph.fingerprint, progress)
        try:
            record_end(workspace, run, "finished" if finished else "interrupted", state.step,
                       state.best_metric if state.best_metric >= 0 else None)
        except (KalmkgError, OSError) as exc:  # the run folder holds the result; the store's row is a record
            progress.message(f"warning: the run's end is not recorded in the store ({exc}); its folder is whole")
        reporter.close()
        if finished:
            write_model_card(run.path, {"entities": len(graph.entity_table), "relations": len(graph.relation_table),
                                        "train": len(graph.train)})
    final_eval = state.history[-1] if state.history else None
    best_metric = state.best_metric if stopper is not None else None
    return TrainResult(run.path, run.run_id, state.step, best_metric, stopped_early, final_eval, out_of_time)


# ------------------------------------------------------------------ pieces of the run
def plan_memory(model, cfg: TrainConfig, tokens, examples, chats: list, world: World,
                device: str) -> MemoryEstimate | None:
    """The memory one process of this run needs at its first step (training/memory.py), from the loaded
    base with the run's LoRA applied (a dry run's model, which it changes) and the first batch's rows."""
    from kalmkg.training.data import lm_flags
    from kalmkg.training.step import build_inputs

    mine = world.slice(len(examples))
    inputs = build_inputs(tokens, examples[mine], lm_flags(len(examples), cfg)[mine], cfg.self_negatives)
    for pairs in chats:
        inputs.add_chat("chat", pairs[world.slice(len(pairs))])
    lm_positions = sum(b - a for a, b in inputs.lm_spans.values())
    kl_positions = sum(inputs.lm_spans[r][1] - inputs.lm_spans[r][0] for r in inputs.chat.get("chat", ()))
    n_layers = num_layers(model)
    c = model.config
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None)
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None)
    if not (hidden and heads and n_layers):
        return None  # a decoder whose config names its shape otherwise: no estimate rather than a wrong one
    intermediate = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or \
        getattr(c, "n_inner", None) or 4 * hidden
    model = apply_lora(model, cfg)
    quantized = quantized_weights(model)
    shape = ModelShape(parameters=parameter_count(model),
                       trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                       hidden=hidden, intermediate=intermediate, heads=heads, layers=n_layers, vocab=c.vocab_size)
    bf16 = use_bf16(device, cfg.precision)
    return estimate_memory(shape, [len(r) for r in inputs.rows], lm_positions,
                           adapted_layers=n_layers if cfg.full else (cfg.lora_layers or n_layers),
                           frozen_bf16=bf16 and not cfg.full, activation_bytes=2 if bf16 else 4,
                           quantized=quantized, quantize=quantized_kind(model),
                           grad_checkpointing=cfg.grad_checkpointing,
                           kl_positions=kl_positions if cfg.base_kl_weight > 0 else 0,
                           cache_mb=cfg.frozen_cache_mb if cfg.lora_layers else 0.0)


def _train_structure(folder: Path, graph, cfg: TrainConfig, progress: TrainProgress, device: str) -> None:
    """The structure model fused with the text scores (kalmkg/structure), trained on the same split,
    validated on the same sample of valid."""
    from kalmkg.structure.train import StructureSettings, train_structure

    settings = StructureSettings(dim=cfg.structure_dim, epochs=cfg.structure_epochs, reg=cfg.structure_reg,
                                 minutes=cfg.structure_minutes, seed=cfg.seed)
    keys = lambda table: table.column("key").to_pylist()  # noqa: E731
    model = train_structure(graph.train, sample_triples(graph.valid, cfg.eval_limit, seed=cfg.seed), graph.all,
                            keys(graph.entity_table), keys(graph.relation_table), settings, device=device)
    model.save(folder)
    info = model.info
    mrr = f", valid MRR {info['valid_mrr']:.3f} (epoch {info['best_epoch']})" if info["valid_mrr"] is not None else ""
    progress.message(f"structure model (ComplEx, rank {info['dim']}): {info['epochs']} epochs in "
                     f"{info['seconds']:.1f} s{mrr}")


def _check_graph_unchanged(workspace: Workspace, run, fingerprint: str, progress: TrainProgress) -> None:
    """A graph changed while the run trained (by a process that took no writer lock) is said and recorded
    in metrics.jsonl: the run learned the graph it read at its start, not what the store holds now."""
    from kalmkg.store import Store

    try:
        with Store.open(workspace) as store:
            now = store.fingerprint()
    except KalmkgError as exc:  # busy or damaged: the run's results are saved; say it and go on
        progress.message(f"warning: could not check whether the graph changed during training: {exc}")
        return
    if now != fingerprint:
        progress.message(f"warning: the graph changed while this run trained (fingerprint {fingerprint} -> {now}); "
                         "the run learned the graph as it was at its start")
        runs.append_jsonl(run.path / "metrics.jsonl", {"event": "graph_changed", "trained_on": fingerprint,
                                                       "store_now": now})


def _check_batch_size(cfg: TrainConfig, n_examples: int, world: World) -> None:
    if n_examples < cfg.batch_size:
        raise KalmkgError(f"--batch-size {cfg.batch_size} is larger than the {n_examples} training examples")
    if n_examples < cfg.batch_size * cfg.grad_accum:  # no full group of batches would ever form
        raise KalmkgError(f"--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} is larger than the "
                          f"{n_examples} training examples")
    if cfg.batch_size % world.size:
        raise KalmkgError(f"--batch-size {cfg.batch_size} must be divisible by the {world.size} processes")
    for weight, examples, flag in ((cfg.question_weight, cfg.question_examples, "--question-examples"),
                                   (cfg.reading_weight, cfg.reading_examples, "--reading-examples")):
        if weight > 0 and examples % world.size:  # each process takes an equal share
            raise KalmkgError(f"{flag} {examples} must be divisible by the {world.size} processes")


def _due(step: int, every: int, total_steps: int) -> bool:
    """Every `every` steps, and at the last one."""
    return step % every == 0 or step == total_steps


def _mean_terms(terms: list[dict]) -> dict:
    out = {}
    for k in terms[0]:
        vals = [t[k] for t in terms if t.get(k) is not None]
        out[k] = round(sum(vals) / len(vals), 6) if vals else None
    return out


class _Clock:
    """The loop's time: what earlier processes of the run spent plus this one's, and whether it has passed
    the limit. Every process takes the main process's answer, so all stop at the same step."""

    def __init__(self, spent: float, max_minutes: float, world: World) -> None:
        self.spent, self.limit, self.world = spent, 60 * max_minutes, world
        self.start = time.perf_counter()

    def read(self) -> tuple[float, bool]:
        seconds = self.spent + time.perf_counter() - self.start
        over = self.limit > 0 and seconds >= self.limit
        return seconds, agree(over, self.world) if self.limit > 0 else False


class _Rate:
    """Triples per second since the last restart."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.start, self.count = time.perf_counter(), 0

    def add(self, count: int) -> float:
        self.count += count
        elapsed = time.perf_counter() - self.start
        return self.count / elapsed if elapsed > 0 else 0.0
