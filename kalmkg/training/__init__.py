"""Training's parts, moving here from train.py stage by stage (issue 11); `config` is the first."""
