"""Models and inference: GGUF files, the backends that run them, and how much memory they take.

`gguf_file.py` reads GGUF metadata (and writes tiny models for tests, benchmarks and the demo);
`backends.py` loads a model with llama-cpp-python or ctransformers and streams its text;
`sizing.py` estimates a model's memory before anything is loaded. Import the module you need:
this package's face imports nothing, so that a keeper or a queen never pulls numpy in.
"""
