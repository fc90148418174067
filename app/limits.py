"""Every bound the service puts on what a client controls, each one constant
(docs/api.md, "What a client controls")."""

# A request head (request line and header lines) larger than this, or with
# more header lines than this, is refused with 431 before it is parsed
# (docs/api.md, "What a client controls").
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADER_LINES = 100
# A connection must deliver each complete request head within this many
# seconds, each body within this many seconds of its head (the application
# answers 408 after BODY_READ_TIMEOUT, sooner), and take each response within
# this many seconds of the server's first wait to send it.
HEAD_TIMEOUT_SECONDS = 10.0
BODY_TIMEOUT_SECONDS = 10.0
SEND_TIMEOUT_SECONDS = 10.0
# A PUT body larger than this is refused with 413.
MAX_BODY_BYTES = 1024
# Bytes a connection may send as one request's chunked body, framing
# included (each chunk costs the server a step to follow); beyond, the
# connection is closed (the application has answered 413 by then).
MAX_BODY_WIRE_BYTES = 64 * 1024
# A chunk-size line (the size and its extensions) longer than this is not one.
MAX_CHUNK_LINE = 1024
# Requests that may arrive in one read: a client keeping more than this many
# pipelined requests on the wire is cut (each is queued with its state until
# the ones before it are answered).
MAX_PIPELINED = 64
# Client-controlled text in a log line or an echoed `instance` is cut at this
# many characters: a 64-letter username (up to 4 code points each before NFC)
# with its path fits.
MAX_ECHOED_CHARS = 300
# The User-Agent is logged up to this many characters.
MAX_LOGGED_USER_AGENT = 512
