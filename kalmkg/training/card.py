"""The model card of a run's adapter folder (`runs/<id>/adapter/README.md`, Hugging Face's convention): what
the adapter is, the base and graph it was trained on, the objective and settings, the validation figures,
and how to load and reproduce it. Written when the run ends, in place of peft's empty template."""

from __future__ import annotations

from pathlib import Path

from kalmkg import runs
from kalmkg.files import atomic_write_text

# the Hugging Face repositories the embedded bases were converted from
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def model_card(run: Path, counts: dict[str, int] | None = None, merged: bool = False) -> str:
    """The card's Markdown (YAML front matter, then sections), from the run folder alone; `merged`: of the
    folder `kalmkg export --hf` keeps (the adapter merged into the base), else of the adapter."""
    summary = runs.run_summary(run)
    config, base = summary["config"], runs.read_config(run).get("base", {})
    base_id = HUB_IDS.get(str(config.get("base", "")).lower()) or base.get("name") or config.get("base")
    best = summary["best_valid"]
    lines = ["---", f"base_model: {base_id}", f"library_name: {'transformers' if merged else 'peft'}",
             "pipeline_tag: feature-extraction",
             "tags:", "- kalmkg", "- kalm", "- knowledge-graph", "- link-prediction", "- lora", "---", "",
             f"# {run.name}", "",
             f"{'The merged weights' if merged else 'A LoRA adapter'} of {base_id} trained by [kalmkg](https://pypi.org/project/kalmkg/) with the KaLM "
             "objective (Yu et al., COLING 2025) to know one knowledge graph: its last-token states embed "
             "\"head, relation\" queries and entity texts so that the true tail is the nearest entity.", "",
             "## Training", "",
             f"- Graph: fingerprint `{summary['graph_fingerprint']}`"
             + (f", {counts['entities']:,} entities, {counts['relations']:,} relations, "
                f"{counts['train']:,} training triples" if counts else ""),
             f"- Objective: L_exp (InfoNCE, margin {config.get('margin')}, temperature {config.get('temperature')}) "
             f"+ {config.get('lm_weight')} x L_imp (triple completion)",
             f"- LoRA r {config.get('lora_r')}, alpha {config.get('lora_alpha')}, layers {config.get('lora_layers')}; "
             f"lr {config.get('lr')}, batch {config.get('batch_size')}, {summary['steps']:,} steps "
             f"({summary['examples']:,} examples)"]
    if best:
        lines.append(f"- Validation (filtered, both directions, {config.get('eval_limit')} triples): MRR "
                     f"{best['mrr']:.3f}, Hits@1 {best.get('hits@1', float('nan')):.3f}, Hits@10 "
                     f"{best.get('hits@10', float('nan')):.3f} at step {best['step']}")
    use = (["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")'] if merged else
           ["from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
            f"base = AutoModelForCausalLM.from_pretrained({str(base.get('path') or base_id)!r})",
            f"model = PeftModel.from_pretrained(base, {str(run / 'adapter')!r})"])
    lines += ["", "## Use", "", "```python", *use, "```", "",
              "With kalmkg: `kalmkg predict HEAD RELATION ? --run " + run.name + "`, `kalmkg export --run "
              + run.name + "` (a GGUF for llama.cpp and `kalmkg ask`).", "",
              "## Reproduce", "", f"`kalmkg train --config {run.resolve() / 'config.toml'}` on the same graph "
              "(the settings above are that file's `[train]` table).", ""]
    return "\n".join(lines)


def write_model_card(run: Path, counts: dict[str, int] | None = None) -> None:
    if (run / "adapter").is_dir():
        atomic_write_text(run / "adapter" / "README.md", model_card(run, counts))
