"""The Server-Sent Events parser keeps the WHATWG event-stream rules."""

from __future__ import annotations

from cli.sse import ServerSentEvent, SSEParser, iter_events


def events_of(text: str) -> list[ServerSentEvent]:
    # Split like httpx's iter_lines does: on CRLF, LF and CR, terminators removed.
    return list(iter_events(text.replace("\r\n", "\n").replace("\r", "\n").split("\n")))


def test_an_event_has_its_id_type_and_data() -> None:
    stream = 'id: 7\nevent: metrics\ndata: {"step": 3, "loss": 1.5}\n\n'
    assert events_of(stream) == [
        ServerSentEvent(event="metrics", data='{"step": 3, "loss": 1.5}', id="7")
    ]


def test_data_lines_of_one_event_join_with_newlines() -> None:
    stream = "event: warning\ndata: first\ndata:second\ndata:  third\n\n"
    [event] = events_of(stream)
    # One leading space is the separator; the rest belongs to the value.
    assert event.data == "first\nsecond\n third"


def test_comments_are_keep_alives_and_never_events() -> None:
    stream = ": keep-alive\n\n:\nid: 1\nevent: status\n: in the middle\ndata: {}\n\n: bye\n\n"
    assert events_of(stream) == [ServerSentEvent(event="status", data="{}", id="1")]


def test_crlf_and_lone_cr_line_endings_read_like_lf() -> None:
    lf = "id: 1\nevent: status\ndata: a\ndata: b\n\nid: 2\ndata: c\n\n"
    assert events_of(lf.replace("\n", "\r\n")) == events_of(lf) == events_of(lf.replace("\n", "\r"))
    assert [event.data for event in events_of(lf)] == ["a\nb", "c"]


def test_lines_that_keep_their_carriage_return_are_still_read() -> None:
    # A reader splitting on "\n" alone leaves "\r" at the end of each line.
    lines = ["id: 4\r", "event: metrics\r", "data: x\r", "\r"]
    assert list(iter_events(lines)) == [ServerSentEvent(event="metrics", data="x", id="4")]


def test_the_last_id_carries_over_to_events_without_one() -> None:
    parser = SSEParser()
    events = list(iter_events(["id: 5", "data: a", "", "data: b", ""], parser))
    assert [event.id for event in events] == ["5", "5"]
    assert parser.last_event_id == "5"


def test_an_event_without_a_type_is_a_message() -> None:
    assert events_of("data: hello\n\n")[0].event == "message"


def test_an_event_type_does_not_leak_into_the_next_event() -> None:
    events = events_of("event: status\ndata: a\n\ndata: b\n\n")
    assert [event.event for event in events] == ["status", "message"]


def test_a_block_without_data_is_not_dispatched() -> None:
    parser = SSEParser()
    assert list(iter_events(["id: 9", "event: status", "", "data: x", ""], parser)) == [
        ServerSentEvent(event="message", data="x", id="9")
    ]


def test_an_event_cut_off_by_the_end_of_the_stream_is_dropped() -> None:
    assert events_of("id: 1\ndata: whole\n\nid: 2\ndata: half") == [
        ServerSentEvent(event="message", data="whole", id="1")
    ]


def test_retry_is_kept_and_unknown_fields_are_ignored() -> None:
    parser = SSEParser()
    events = list(iter_events(["retry: 2500", "colour: blue", "data", "", "retry: soon"], parser))
    # A bare field name is the field with an empty value.
    assert events == [ServerSentEvent(event="message", data="", id=None)]
    assert parser.retry_ms == 2500


def test_a_byte_order_mark_at_the_start_is_skipped() -> None:
    assert events_of("\ufeffdata: x\n\n")[0].data == "x"


def test_an_id_with_nul_is_ignored() -> None:
    parser = SSEParser()
    list(iter_events(["id: 3", "data: a", "", "id: 4\0", "data: b", ""], parser))
    assert parser.last_event_id == "3"


def test_the_last_event_id_moves_only_when_an_event_completes() -> None:
    # A reconnect after a drop mid-event must ask for that event again.
    parser = SSEParser()
    list(iter_events(["id: 1", "data: a", "", "id: 2", "data: {half"], parser))
    assert parser.last_event_id == "1"
    assert list(iter_events(["id: 2", "data: whole", ""], parser)) == [
        ServerSentEvent(event="message", data="whole", id="2")
    ]


def test_a_half_received_event_does_not_run_into_the_next_stream() -> None:
    parser = SSEParser()
    assert parser.feed("data: {half") is None
    parser.discard_pending()
    assert list(iter_events(["data: new", ""], parser)) == [
        ServerSentEvent(event="message", data="new", id=None)
    ]
