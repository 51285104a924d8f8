"""Config files and the paths they name: ``load_config_file`` reads a ``get_config(arg)``
file as the ``--config`` flags do; every path a config names is checked before anything
compiles and made absolute for the saved ``WORKDIR/config.json`` (so every tool works from
any directory).

A typo found hours into a run loses the run; found here it costs a second, and the message
names the config field to fix.
"""

from __future__ import annotations

import importlib.util
import os

from exgra_jax import paths

# (field, kind): 'file' | 'dir'; list-valued fields hold several paths.
_ALWAYS = (
    ("data.json_paths", "file"),
    ("data.image_folder", "dir"),
    ("eval.json_paths", "file"),
    ("eval.image_folder", "dir"),
    ("eval.candidates", "file"),
    ("tokenizer", "dir"),
)
# Init directories matter only for the source that reads them.
_INIT = {
    "llava_hf": (("init.hf_dir", "dir"),),
    "llava_med": (("init.hf_dir", "dir"), ("init.clip_dir", "dir")),
    "clip_llama": (("init.clip_dir", "dir"), ("init.llama_dir", "dir")),
    "workdir": (("init.workdir", "dir"),),
    "random": (),
}


class ConfigPathError(FileNotFoundError):
    """One or more config fields name paths that do not exist."""


def _get(config, field: str):
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def path_fields(config) -> tuple[tuple[str, str], ...]:
    source = config.init.source
    if source not in _INIT:
        raise ValueError(f"config.init.source must be one of {sorted(_INIT)}, got {source!r}")
    fields = list(_ALWAYS) + list(_INIT[source])
    if config.data.tfds_name:
        fields.append(("data.tfds_data_dir", "dir"))
    return tuple(fields)


def _values(config, field: str) -> list[tuple[str, str]]:
    """(label, path) pairs of a field; empty strings are unset fields."""
    value = _get(config, field)
    if isinstance(value, (tuple, list)):
        return [(f"{field}[{i}]", str(v)) for i, v in enumerate(value) if v]
    return [(field, str(value))] if value else []


EVAL_FIELDS = ("eval.json_paths", "eval.image_folder", "eval.candidates", "tokenizer")


def check_config_paths(config, only: tuple[str, ...] | None = None) -> None:
    """Raise ConfigPathError listing every config path (of the fields ``only``, default
    all) that is missing or of the wrong kind."""
    problems = []
    for field, kind in path_fields(config):
        if only is not None and field not in only:
            continue
        for label, path in _values(config, field):
            if not paths.exists(path):
                problems.append(f"config.{label} = {path!r} does not exist")
            elif kind == "dir" and not paths.is_dir(path):
                problems.append(f"config.{label} = {path!r} is not a directory")
            elif kind == "file" and paths.is_dir(path):
                problems.append(f"config.{label} = {path!r} is a directory, not a file")
    if problems:
        raise ConfigPathError("fix these config paths (--config.FIELD=...):\n  "
                              + "\n  ".join(problems))


def default_tokenizer(config) -> None:
    """An unset ``config.tokenizer`` means the tokenizer saved with the Hugging Face weights
    the run starts from (``convert_checkpoint.py to-hf`` writes it there), in place."""
    if not config.tokenizer and config.init.source in ("llava_hf", "llava_med"):
        config.tokenizer = config.init.hf_dir


def absolutize_config_paths(config) -> None:
    """Make every local path field absolute, in place (the config must be unlocked)."""
    for field, _ in path_fields(config):
        parent_name, _, leaf = field.rpartition(".")
        parent = _get(config, parent_name) if parent_name else config
        value = parent[leaf]
        if isinstance(value, (tuple, list)):
            parent[leaf] = tuple(paths.absolute(str(v)) for v in value)
        else:
            parent[leaf] = paths.absolute(str(value))


def _load_module(path: str, name: str):
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config_file(spec: str):
    """``get_config(arg)`` of ``path[:arg]``, as the ``--config`` flag of launch/*.py reads it."""
    path, _, arg = spec.partition(":")
    module = _load_module(path, "exgra_config_file")
    return module.get_config(arg) if arg else module.get_config()


def load_sibling(config_file: str, name: str):
    """The module ``name``.py beside ``config_file`` (a config's ``__file__``): how config
    files share a recipe, loaded by path as the config itself is (configs/ is not a
    package on the import path)."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    return _load_module(path, f"exgra_config_{name}")
