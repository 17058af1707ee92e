"""What a text encoder cannot know about a graph's structure: a small graph-embedding model (ComplEx),
trained next to the LLM by `kalmkg train`, whose scores are fused with the text scores for link
prediction (`predict`, `evaluate`, validation, `ask`'s predicted answers).

    complex.py  the score function (numpy or torch) and its N3 penalty: pure math
    model.py    the trained tables and their file in the run folder
    train.py    1-N training with reciprocal relations, early stopping on valid MRR
    fusion.py   text + weight x structure, the weight fitted on the valid split, and its file

A KaLM run alone ranks by the cosine of a head-relation view and a tail view: it reads the entities'
names and descriptions. What the graph says about an entity beyond its text (which relations it takes
part in, with whom) it learns only slowly through the LoRA weights. One embedding per entity learns that
directly and cheaply (UMLS: seconds on a CPU); the product of the two experts ranks better than either.
`--structure none` keeps the paper's method alone.
"""
