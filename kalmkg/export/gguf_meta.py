"""kalmkg's keys inside a GGUF: written into the converter's file (which takes only authorship overrides)
and read back. `gguf` is imported inside the functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kalmkg import __version__
from kalmkg.export.registry import ExportSource

METADATA_PREFIX = "kalmkg."


def kalmkg_metadata(run: ExportSource, quant: str) -> dict[str, Any]:
    """kalmkg's keys: enough for a GGUF-only consumer to embed texts exactly as training did."""
    embedding = run.embedding()
    return {
        "kalmkg.version": __version__,
        "kalmkg.run_id": run.run_id,
        "kalmkg.graph_fingerprint": run.graph_fingerprint,
        "kalmkg.base.name": run.base.name,
        "kalmkg.base.fingerprint": run.base.fingerprint,
        "kalmkg.quantization": quant,
        # Not llama.cpp's `<arch>.pooling_type`: a model with that key is treated as embedding-only by
        # Ollama (no generation); consumers pass pooling_type=LAST themselves.
        "kalmkg.pooling": embedding["pooling"],
        "kalmkg.normalize": embedding["normalize"],
        "kalmkg.add_bos": embedding["add_bos"],
        "kalmkg.max_entity_tokens": embedding["max_entity_tokens"],
        **{f"kalmkg.template.{view}": template for view, template in embedding["templates"].items()},
    }


def write_metadata(src: Path, dst: Path, extra: dict[str, Any]) -> None:
    """Copy a GGUF with ``extra`` key-value pairs added (the converter takes only authorship overrides)."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    writer = gguf.GGUFWriter(dst, arch=arch_field.contents(), endianess=reader.endianess)
    try:
        for f in reader.fields.values():
            # GGUF.* are the reader's virtual fields; the writer writes the architecture and alignment itself
            if f.name.startswith("GGUF.") or f.name in (gguf.Keys.General.ARCHITECTURE, "general.alignment") \
                    or f.name in extra:
                continue
            vtype = f.types[0]
            sub_type = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub_type)
        for key, value in extra.items():
            vtype = (gguf.GGUFValueType.BOOL if isinstance(value, bool) else
                     gguf.GGUFValueType.UINT32 if isinstance(value, int) else gguf.GGUFValueType.STRING)
            writer.add_key_value(key, value, vtype)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    finally:
        writer.close()
        del reader  # its memory map


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The ``kalmkg.*`` and ``general.*`` keys of a GGUF (small values only)."""
    import gguf

    reader = gguf.GGUFReader(path)
    out = {}
    for f in reader.fields.values():
        if f.name.startswith((METADATA_PREFIX, "general.")):
            out[f.name] = f.contents()
    return out
