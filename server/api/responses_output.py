"""The core's events as Responses API output items and stream events.

    ReasoningDelta -> a `reasoning` item (content: one reasoning_text): output_item.added,
                     response.reasoning_text.delta ... .done, output_item.done
    TextDelta     -> a `message` item (opened on the first text): output_item.added,
                     content_part.added, output_text.delta ... (closed by what follows it:
                     output_text.done, content_part.done, output_item.done)
    ToolCallDone  -> a `function_call` item: output_item.added, function_call_arguments.delta
                     (the whole arguments), function_call_arguments.done, output_item.done
    the end       -> the open message closed; the lifecycle event (response.completed /
                     .incomplete / .failed) is the route's

Every event carries `sequence_number` (0, 1, ... over the whole stream).
"""
from __future__ import annotations

import copy
from typing import Any

from server.api.core import Usage
from server.api.responses_input import item_id
from server.api.turn import ReasoningDelta, TextDelta, ToolCallDone


class OutputItems:
    """A response's `output` list, built from core events, and the stream events saying so."""

    def __init__(self) -> None:
        self.output: list[dict[str, Any]] = []
        self._message: dict[str, Any] | None = None  # the open message item
        self._thought: dict[str, Any] | None = None  # the open reasoning item
        self._seq = 0

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return data

    def add(self, ev: TextDelta | ReasoningDelta | ToolCallDone) -> list[dict]:
        if isinstance(ev, ReasoningDelta):
            return self._reasoning(ev.text)
        if isinstance(ev, TextDelta):
            return self.close_reasoning() + self._text(ev.text)
        return self.close_reasoning() + self._call(ev.call)

    def _reasoning(self, delta: str) -> list[dict]:
        events = self.close()
        if self._thought is None:
            self._thought = {"id": item_id("rs"), "type": "reasoning", "status": "in_progress", "summary": [],
                             "content": [{"type": "reasoning_text", "text": ""}]}
            self.output.append(self._thought)
            events.append(self.event("response.output_item.added", output_index=len(self.output) - 1,
                                     item={**copy.deepcopy(self._thought), "content": []}))
        self._thought["content"][0]["text"] += delta
        events.append(self.event("response.reasoning_text.delta", item_id=self._thought["id"],
                                 output_index=self.output.index(self._thought), content_index=0, delta=delta))
        return events

    def close_reasoning(self) -> list[dict]:
        thought, self._thought = self._thought, None
        if thought is None:
            return []
        index = self.output.index(thought)
        thought["status"] = "completed"
        return [self.event("response.reasoning_text.done", item_id=thought["id"], output_index=index,
                           content_index=0, text=thought["content"][0]["text"]),
                self.event("response.output_item.done", output_index=index, item=copy.deepcopy(thought))]

    def _text(self, delta: str) -> list[dict]:
        events = []
        if self._message is None:
            self._message = {"id": item_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                             "content": []}
            self.output.append(self._message)
            events.append(self.event("response.output_item.added", output_index=len(self.output) - 1,
                                     item=copy.deepcopy(self._message)))
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            self._message["content"].append(part)
            events.append(self.event("response.content_part.added", item_id=self._message["id"],
                                     output_index=len(self.output) - 1, content_index=0, part=dict(part)))
        self._message["content"][0]["text"] += delta
        events.append(self.event("response.output_text.delta", item_id=self._message["id"],
                                 output_index=len(self.output) - 1, content_index=0, delta=delta, logprobs=[]))
        return events

    def finish(self, status: str = "completed") -> list[dict]:
        """Close whatever item is open (a message with `status`)."""
        return self.close_reasoning() + self.close(status)

    def close(self, status: str = "completed") -> list[dict]:
        """Close the open message item (if any) with `status`."""
        message, self._message = self._message, None
        if message is None:
            return []
        index, part = self.output.index(message), message["content"][0]
        message["status"] = status
        return [
            self.event("response.output_text.done", item_id=message["id"], output_index=index, content_index=0,
                       text=part["text"], logprobs=[]),
            self.event("response.content_part.done", item_id=message["id"], output_index=index, content_index=0,
                       part=dict(part)),
            self.event("response.output_item.done", output_index=index, item=copy.deepcopy(message)),
        ]

    def _call(self, call: dict) -> list[dict]:
        events = self.close()
        fn = call["function"]
        item = {"id": item_id("fc"), "type": "function_call", "status": "in_progress", "call_id": call["id"],
                "name": fn["name"], "arguments": ""}
        self.output.append(item)
        index = len(self.output) - 1
        events.append(self.event("response.output_item.added", output_index=index, item=dict(item)))
        events.append(self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                 delta=fn["arguments"]))
        item.update(arguments=fn["arguments"], status="completed")
        events.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                 name=fn["name"], arguments=fn["arguments"]))
        events.append(self.event("response.output_item.done", output_index=index, item=dict(item)))
        return events


def usage_object(usage: Usage, reasoning_tokens: int = 0) -> dict[str, Any]:
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


STATUS = {"stop": "completed", "tool_calls": "completed", "length": "incomplete", "abort": "cancelled"}
LIFECYCLE = {"completed": "response.completed", "incomplete": "response.incomplete", "failed": "response.failed",
             "cancelled": "response.failed"}
