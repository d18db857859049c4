"""The synchronous engine: block pool, sequences, scheduler, runner, LLMEngine and the
offline `LLM`. Importable without fastapi (only torch, tokenizers, jinja2, gguf)."""
from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.llm import LLM
from server.engine.output import CompletionOutput, RequestOutput, StepOutput

__all__ = ["LLM", "LLMEngine", "EngineConfig", "RequestOutput", "CompletionOutput", "StepOutput"]
