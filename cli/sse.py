"""A Server-Sent Events parser: lines of a `text/event-stream` in, events out.

It follows the WHATWG "event stream interpretation" rules, so that any conforming
server works, not only ours: `data` lines of one event join with newlines, a blank
line ends an event, lines starting with `:` are comments (keep-alives), the last
`id` carries over to later events, and a field's value loses one leading space.
`last_event_id` changes only when an event completes, so an event cut off by a
dropped connection is asked for again: it is what a reconnect sends as `Last-Event-ID`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str
    id: str | None


class SSEParser:
    """Feed it the stream's lines one at a time; it returns each event as it completes."""

    def __init__(self) -> None:
        self.last_event_id: str | None = None
        self._id: str | None = None
        # The server's `retry:` advice, in milliseconds, for the reconnect delay.
        self.retry_ms: int | None = None
        self._event = ""
        self._data: list[str] = []
        self._first_line = True

    def feed(self, line: str) -> ServerSentEvent | None:
        # Readers that split on "\n" alone leave the "\r" of a CRLF stream behind.
        line = line.rstrip("\r\n")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id":
            # An id with NUL in it is ignored, as the spec says.
            if "\0" not in value:
                self._id = value
        elif field == "retry" and value.isdigit():
            self.retry_ms = int(value)
        # Other field names are ignored, for servers that send more than we know.
        return None

    def discard_pending(self) -> None:
        """Forget a half-received event: call it when a stream ends, before the next one."""
        self._id = self.last_event_id
        self._event, self._data = "", []
        self._first_line = True

    def _dispatch(self) -> ServerSentEvent | None:
        event, data = self._event, self._data
        self._event, self._data = "", []
        self.last_event_id = self._id
        # An event with no data line is not dispatched; its type is dropped with it.
        if not data:
            return None
        return ServerSentEvent(
            event=event or "message", data="\n".join(data), id=self.last_event_id
        )


def iter_events(lines: Iterable[str], parser: SSEParser | None = None) -> Iterator[ServerSentEvent]:
    """The events in `lines`; an event the stream ends in the middle of is never yielded."""
    parser = parser or SSEParser()
    for line in lines:
        event = parser.feed(line)
        if event is not None:
            yield event
    parser.discard_pending()
