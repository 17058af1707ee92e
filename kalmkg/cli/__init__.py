"""The command line: `kalmkg` and its commands.

app.py       the Typer app, the --workspace option, `main` and its last-resort error handler
options.py   options several commands share, and `config_options` (a config dataclass's fields as options)
output.py    consoles, JSON and warnings
progress.py  one progress base and the displays the library's progress callbacks talk to
graph.py     ingest, stats, entities, split
train.py     train (its options come from kalmkg.training.config.TrainConfig)
links.py     embed, predict, evaluate
offline.py   export, ask, doctor
"""
