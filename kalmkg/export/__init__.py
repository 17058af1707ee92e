"""A run as a merged, quantized GGUF file that llama.cpp runs.

pipeline (export_run: the stages in order, the publish step), source (the run, its base, the merge),
convert (llama.cpp's converter and quantizer), gguf_meta (kalmkg's keys in a GGUF), verify (torch vs
llama.cpp), ollama (the Modelfile), registry (names and files in models/, list_exports).
"""
