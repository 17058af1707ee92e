"""Link prediction, generative evaluation, metrics and the model-free ranking."""
