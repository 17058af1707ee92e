"""New entities without retraining: what a text encoder can do and an embedding table cannot.

    python bench/inductive.py                          # UMLS, 10 % of the entities held out
    python bench/inductive.py --steps 540 --json ind.json

A fixed-seed share of the entities is held out with every triple that touches them. kalmkg trains on
the rest (ingest, train: the text model and the structure model), and is evaluated on the seen test
triples (transductive). Then the held-out entities arrive as a user would add them: `kalmkg ingest` of
their texts, their train/valid triples (context) and their test triples; `kalmkg embed` encodes only
them; no training. The test triples with one held-out end are ranked (filtered, both directions) by the
text model alone, by the fusion (a new entity's structure row is folded in from its context facts,
`StructureModel.with_new_entities`), and by the structure model alone, beside the transductive
figures of the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from link_prediction import DATASETS, KALMKG_ARGS, kalmkg, read_split  # noqa: E402


def hold_out(split: dict, share: float, seed: int) -> tuple[set[str], dict, dict]:
    """(held-out entities, the seen graph by split, what arrives later: context and test triples)."""
    entities = sorted({x for rows in split.values() for h, _, t in rows for x in (h, t)})
    in_test = sorted({x for h, _, t in split["test"] for x in (h, t)})
    rng = np.random.default_rng(seed)
    held = set(rng.choice(in_test, max(1, round(share * len(entities))), replace=False).tolist())
    touches = lambda row: row[0] in held or row[2] in held  # noqa: E731
    seen = {s: [r for r in rows if not touches(r)] for s, rows in split.items()}
    later = {"train": [r for s in ("train", "valid") for r in split[s] if touches(r)],
             "test": [r for r in split["test"] if (r[0] in held) != (r[2] in held)]}
    return held, seen, later


def write_folder(folder: Path, splits: dict, texts: dict[str, str], relation_texts: Path) -> None:
    folder.mkdir(parents=True)
    names = {"train": "train.tsv", "valid": "dev.tsv", "test": "test.tsv"}
    for split, rows in splits.items():
        (folder / names[split]).write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "entity2text.txt").write_text("".join(f"{k}\t{v}\n" for k, v in texts.items()), encoding="utf-8")
    shutil.copy(relation_texts, folder / "relation2text.txt")


def entity_texts(graph: Path) -> dict[str, str]:
    lines = (graph / "entity2text.txt").read_text(encoding="utf-8").splitlines()
    return dict(line.split("\t", 1) for line in lines if "\t" in line)


def rank_new(ws: Path, triples: list[list[str]]) -> dict:
    """Filtered ranks of `triples` (keys) by text alone, fused, and structure alone, in-process."""
    from kalmkg.evaluation.metrics import known_answers
    from kalmkg.evaluation.ranking import by_direction, rank_with_vectors
    from kalmkg.index import EntityIndex
    from kalmkg.loaded import load_model, torch_encoder
    from kalmkg.store import Store
    from kalmkg.structure.fusion import open_fusion
    from kalmkg.workspace import Workspace

    workspace = Workspace(ws)
    with Store.open(workspace) as store:
        all_triples = store.triples_array()
    loaded = load_model(workspace, run="bench")
    ent = {k: i for i, k in enumerate(loaded.entity_keys)}
    rel = {k: i for i, k in enumerate(loaded.relation_keys)}
    ids = np.array([[ent[h], rel[r], ent[t]] for h, r, t in triples], dtype=np.int64)
    vectors = EntityIndex.open(workspace, loaded).vectors()
    fusion, note = open_fusion(loaded, all_triples)
    if fusion is None or fusion.weight is None:
        raise SystemExit(f"no fitted structure model: {note}")
    text = rank_with_vectors(torch_encoder(loaded), loaded.texts, ids, all_triples, vectors)
    fused = rank_with_vectors(None, loaded.texts, ids, all_triples, vectors, fusion=fusion,
                              query_vectors=text["query_vectors"])
    R = len(loaded.relation_keys)
    alone = fusion.structure.ranks(text["queries"], text["targets"], known_answers(all_triples, R), R,
                                   len(loaded.entity_keys))
    return {"text": by_direction(text["ranks"]), "fused": by_direction(fused["ranks"]),
            "structure": by_direction(alone), "weight": fusion.weight}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--graph", type=Path, default=DATASETS / "UMLS")
    parser.add_argument("--holdout", type=float, default=0.1, help="share of the entities held out")
    parser.add_argument("--steps", type=int, default=270)
    parser.add_argument("--kalmkg-args", default=KALMKG_ARGS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "inductive")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    split = read_split(args.graph)
    held, seen, later = hold_out(split, args.holdout, args.seed)
    texts = entity_texts(args.graph)
    shutil.rmtree(args.work, ignore_errors=True)
    seen_entities = {x for rows in seen.values() for h, _, t in rows for x in (h, t)}
    write_folder(args.work / "seen", seen, {k: v for k, v in texts.items() if k in seen_entities},
                 args.graph / "relation2text.txt")
    write_folder(args.work / "later", later, {k: v for k, v in texts.items() if k in held},
                 args.graph / "relation2text.txt")
    print(f"{len(held)} entities held out; seen: {len(seen['train']):,} train, {len(seen['test']):,} test triples; "
          f"later: {len(later['train']):,} context, {len(later['test']):,} test triples", file=sys.stderr)

    ws = args.work / "ws"
    kalmkg(ws, "ingest", str(args.work / "seen"))
    kalmkg(ws, "train", "--max-steps", str(args.steps), "--eval-every", str(max(1, args.steps // 3)),
           "--seed", str(args.seed), "--run-name", "bench", *args.kalmkg_args.split())
    transductive = json.loads(kalmkg(ws, "evaluate", "--run", "bench", "--json"))
    kalmkg(ws, "ingest", str(args.work / "later"))
    embedded = json.loads(kalmkg(ws, "embed", "--run", "bench", "--json"))
    new = rank_new(ws, later["test"])

    rows = [("seen test triples (transductive): fused", transductive["metrics"]),
            ("... text alone", transductive["components"]["text"]),
            ("... structure alone", transductive["components"]["structure"]),
            ("new entities' test triples: fused", new["fused"]),
            ("... text alone", new["text"]), ("... structure alone", new["structure"])]
    print(f"embed after the new ingest: {embedded['encoded']} encoded, {embedded['unchanged']} unchanged; "
          f"structure weight {new['weight']:g}")
    print("| triples ranked | queries | MRR | Hits@1 | Hits@3 | Hits@10 | MR | tail MRR | head MRR |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m in rows:
        b = m["both"]
        print(f"| {name} | {b['count']:,} | {b['mrr']:.3f} | {b['hits@1']:.3f} | {b['hits@3']:.3f} | "
              f"{b['hits@10']:.3f} | {b['mr']:.1f} | {m['tail']['mrr']:.3f} | {m['head']['mrr']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"held_out": sorted(held), "embedded": embedded, "weight": new["weight"],
                                         "rows": [{"name": n, **m} for n, m in rows]},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
