"""KaLM fine-tuning, one job per module, in the order `loop.train` runs them:

    config      TrainConfig: every setting, declared once
    record      the run's folder, config.toml and row in the store
    data        the graph from the store -> examples -> token ids; the batches of an epoch
    learner     model (base + LoRA), temperature, AdamW and its schedule
    checkpoint  save and resume; the adapter
    stopping    early stopping as an object (validate, keep the best, patience)
    step        one fast KaLM step (torch at import)   objective  its losses, pure (torch at import)
    distributed processes of one run                   precision  bf16 autocast
    plot        training.png                           loop       `train()`: the stages in order
"""
