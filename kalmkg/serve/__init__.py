"""`kalmkg serve`: the workspace's model and graph held warm behind an HTTP API (service.py: the model,
one caller at a time; app.py: the OpenAI-compatible and native endpoints on FastAPI)."""
