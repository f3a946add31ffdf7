"""Talking to models: the OpenAI-compatible client, local generation, adapters, the VLM family registry and
image helpers. Core code and `finer.train` both use this layer; it never imports `finer.train`."""
