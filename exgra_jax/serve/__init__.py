"""OpenAI-compatible HTTP server over ``exgra_jax.inference`` and the chat page it serves.

    python -m exgra_jax.serve --workdir DIR [--step N|best] | --hf_dir D [--host 127.0.0.1 --port N]

Modules: ``protocol`` (request validation, OpenAI-style errors), ``media`` (image sources
and limits), ``engine`` (prompts by the project's one prompt builder, batched generation),
``app`` (the ASGI routes), ``page`` (the web chat).
"""
