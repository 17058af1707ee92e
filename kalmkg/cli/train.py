"""`kalmkg train`: its training options are TrainConfig's fields (kalmkg/training/config.py), made by
`config_options`; the options about the run itself (name, resume, dry run, the index after) are here."""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from typing import Optional

import typer

from kalmkg.cli.links import embed_after_training
from kalmkg.cli.options import config_options, json_option
from kalmkg.cli.output import console, print_json
from kalmkg.cli.progress import TrainBar
from kalmkg.runs import config_to_toml, find_run
from kalmkg.training.config import TrainConfig

RUN = "Run"  # the help panel of the run options, beside TrainConfig's checkpoint and validation fields


@config_options(TrainConfig, short={"base": "-b"}, from_file="train")
def train(
    ctx: typer.Context,
    config: TrainConfig,
    run_name: Optional[str] = typer.Option(None, "--run-name", help="Run folder name under runs/.", show_default="time + base", rich_help_panel=RUN),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue a killed run (its id, or 'latest') exactly where it stopped.", rich_help_panel=RUN),
    embed_after: bool = typer.Option(True, "--embed/--no-embed", help="Encode every entity into the index at the end (for predict).", rich_help_panel=RUN),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and the first batch's texts, then stop.", rich_help_panel=RUN),
    as_json: bool = json_option("Print the run's result (and the dry run's plan) as JSON."),
) -> None:
    """Fine-tune a causal LLM on the graph with KaLM (contrastive views + triple completion, LoRA).

    \b
    Writes runs/<id>/ (config.toml, adapter/, tokenizer/, metrics.jsonl, training.png, checkpoint/),
    validates on the valid split (filtered MRR) and keeps the best adapter.
    Under torchrun / accelerate launch the same command trains data-parallel.

    \b
    Examples:
      kalmkg train --max-steps 50
      kalmkg train --epochs 3 --batch-size 32 --lr 2e-4 --learn-temperature
      kalmkg train --base meta-llama/Llama-2-7b-hf --grad-checkpointing
      kalmkg train --resume latest
      torchrun --nproc-per-node 4 -m kalmkg train --batch-size 96
    """
    from kalmkg.training.loop import train as run_train

    if dry_run:
        run_train(ctx.obj, config, run_id=run_name, dry_run=print_json if as_json else print_dry_run)
        return
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun the main process holds the lock
    with ctx.obj.writer("train") if main_process else nullcontext():
        with TrainBar(console(stderr=True)) as bar:
            if resume is not None:
                resume_id = find_run(ctx.obj, None if resume == "latest" else resume).name
                result = run_train(ctx.obj, config, resume=resume_id, progress=bar)
            else:
                result = run_train(ctx.obj, config, run_id=run_name, progress=bar)
        if result is None:
            return
        done = {"run_id": result.run_id, "run_dir": str(result.run_dir), "steps": result.steps,
                "best_metric": result.best_metric, "stopped_early": result.stopped_early,
                "out_of_time": result.out_of_time}
        if not as_json:
            best = f"best valid MRR {result.best_metric:.4f}" if result.best_metric is not None else "no valid split"
            console().print(f"run {result.run_id}: {result.steps} steps, {best}"
                            f"{' (stopped early)' if result.stopped_early else ''}"
                            f"{' (time limit)' if result.out_of_time else ''} -> {result.run_dir}")
        # The main process builds the entity index for predict (other torchrun processes just end).
        if embed_after and (result.run_dir / "adapter").is_dir() and main_process:
            # a run trained in fp32 gets an fp32 index; else the inference default (bf16 on a native-bf16 GPU)
            precision = "fp32" if config.precision == "fp32" else "auto"
            done.update(embed_after_training(ctx.obj, result.run_id, config.device, calibrate_on=config.eval_limit,
                                             quiet=as_json, precision=precision))
        if as_json and main_process:
            print_json(done)


def print_dry_run(info: dict) -> None:
    """The resolved config as the run's config.toml would hold it, then the first batch's texts."""
    out = [f"# base {info['base']} on {info['device']}: {info['train_examples']:,} training examples "
           f"(both directions), {info['steps']:,} steps"]
    if info.get("by_size"):
        out.append(f"# {', '.join(info['by_size'])}: the defaults for a base of {info['parameters'] / 1e6:,.0f}M "
                   f"parameters (--preset {info['config']['preset']})")
    if info.get("memory"):
        each = " each" if info["memory"]["processes"] > 1 else ""
        out.append(f"# memory{each}: {info['memory']['text']}")
    out += [config_to_toml({"train": info["config"]}),
           "# first batch (8 examples shown)"]
    for i, ex in enumerate(info["first_batch"]):
        out.append(f"[{i}] hr view:   {ex['hr_view']}\n    tail view: {ex['tail_view']}")
        if ex["lm_target"]:
            out.append(f"    LM target: {ex['lm_target']}")
    if info.get("questions"):
        out.append(f"# questions: {info['questions']['queries']:,} train queries asked (both directions); "
                   "first batch:")
        out += [f"  Q: {q}\n  A: {a}" for q, a in info["questions"]["first_batch"]]
    if info.get("reading"):
        out.append("# fact-reading turns (ask's prompts), first batch:")
        for turn in info["reading"]:
            prompt = "\n".join(f"  | {line}" for line in turn["prompt"].splitlines())
            out.append(f"  [{turn['kind']}]\n{prompt}\n  A: {turn['reply']}")
    sys.stdout.write("\n".join(out) + "\n")
