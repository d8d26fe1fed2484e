// Talking to the trainjob API from the page: JSON requests, the error envelope, the
// API key (kept in this tab's sessionStorage only) and a job's event stream.

const KEY_STORAGE = "trainjob.apiKey";
const RETRY_MS = 2000;
const STREAM_TYPES = [
  "status", "metrics", "checkpoint", "oom_backoff", "overflow_skip", "warning", "error",
];

export class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

function authHeaders() {
  const key = apiKey();
  return key ? { authorization: `Bearer ${key}` } : {};
}

// GET (or POST) a path of this origin; the error envelope becomes an ApiError.
export async function api(path, { method = "GET" } = {}) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: { accept: "application/json", ...authHeaders() },
      cache: "no-store",
    });
  } catch (error) {
    throw new ApiError(0, "unreachable", "the service does not answer");
  }
  let payload = null;
  try {
    payload = await response.json();
  } catch {
    payload = null;
  }
  if (!response.ok) {
    const error = payload && payload.error;
    throw new ApiError(
      response.status,
      (error && error.type) || "http_error",
      (error && error.message) || `HTTP ${response.status}`,
    );
  }
  return payload;
}

// A job's Server-Sent Events. Without an API key the browser's EventSource does the
// work, reconnects included (it sends Last-Event-ID itself). EventSource cannot send an
// Authorization header, so with a key the same protocol is read through fetch.
// `onEvent({id, type, data})`, `onState("open" | "retrying" | "closed")`.
export function openEventStream(path, { onEvent, onState, onFatal }) {
  return apiKey()
    ? fetchStream(path, { onEvent, onState, onFatal })
    : eventSourceStream(path, { onEvent, onState });
}

function eventSourceStream(path, { onEvent, onState }) {
  const source = new EventSource(path);
  source.addEventListener("open", () => onState("open"));
  for (const type of STREAM_TYPES) {
    source.addEventListener(type, (message) => {
      // The server's `event: error` and the connection's own error share a name.
      if (!(message instanceof MessageEvent)) {
        onState(source.readyState === EventSource.CLOSED ? "closed" : "retrying");
        return;
      }
      onEvent({ id: Number(message.lastEventId), type, data: JSON.parse(message.data) });
    });
  }
  return { close: () => { source.close(); onState("closed"); } };
}

function fetchStream(path, { onEvent, onState, onFatal }) {
  const controller = new AbortController();
  let lastId = null;
  let closed = false;

  const dispatch = (block) => {
    const fields = {};
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const name = colon < 0 ? line : line.slice(0, colon);
      fields[name] = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    }
    if (fields.id !== undefined) lastId = fields.id;
    if (fields.event && fields.data !== undefined) {
      onEvent({ id: Number(fields.id), type: fields.event, data: JSON.parse(fields.data) });
    }
  };

  const run = async () => {
    while (!closed) {
      try {
        const headers = { accept: "text/event-stream", ...authHeaders() };
        if (lastId !== null) headers["last-event-id"] = lastId;
        const response = await fetch(path, { headers, signal: controller.signal });
        if (response.status === 401 || response.status === 404) {
          onFatal(new ApiError(response.status, "stream", `HTTP ${response.status}`));
          return;
        }
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        onState("open");
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          const blocks = buffer.split(/\r?\n\r?\n/);
          buffer = blocks.pop();
          blocks.forEach(dispatch);
        }
      } catch (error) {
        if (closed) return;
      }
      if (closed) return;
      // The server ended the stream or the link dropped: the protocol's retry delay.
      onState("retrying");
      await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
    }
  };
  run();
  return { close: () => { closed = true; controller.abort(); onState("closed"); } };
}
