"""A run as a merged, quantized GGUF file that llama.cpp runs."""
