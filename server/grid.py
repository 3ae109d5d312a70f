"""A Grid that counts what crosses it: bytes of message content each way, and the errors nodes reply with.

Both aggregation paths send through it, so bytes_up / bytes_down compare plain and secure rounds (SecAgg+'s
key exchange included), and a secure round that halts can still say which node failed and why.

``PollingGrid`` waits for replies itself, through the Grid's public ``push_messages`` and ``pull_messages``:
Flower 1.42's deployed grid (``flwr.superlink.grid.http_grid``) sleeps a hard-coded 3 s between pulls, so
every exchange took a multiple of 3 s, and a SecAgg+ round has four. The ServerApp puts it around the grid
Flower hands it, where run config ``reply-poll-seconds`` is set (``metafleet server``, ``simulate`` on Ray).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from metafleet.common.records import TrainingReply, reply_content_bytes
from metafleet.server.strategy import short_reason


def content_bytes(message: Message | TrainingReply) -> int:
    """Serialized size of a message's content: what Flower puts on the wire, less the envelope. For a reply
    that no Message carried (the vectorized simulation's), the size its Message would have had."""
    if isinstance(message, TrainingReply):
        return reply_content_bytes(message.arrays, message.metrics)
    return recorddict_to_proto(message.content).ByteSize() if message.has_content() else 0


class _DelegatingGrid(Grid):
    """A Grid around another: everything it does not change, delegated."""

    def __init__(self, grid: Grid):
        self._grid = grid

    def set_run(self, run) -> None:  # noqa: ANN001 - Flower's Run type
        self._grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201 - Flower's Run type
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:  # noqa: ANN002, ANN003
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):  # noqa: ANN201
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def simulated_identities(self) -> dict[int, int] | None:
        """Node id → client id where the wrapped grid simulates its devices and knows them (the vectorized
        backend); None where only asking the nodes tells."""
        known = getattr(self._grid, "simulated_identities", None)
        return known() if known is not None else None


class MeteredGrid(_DelegatingGrid):
    def __init__(self, grid: Grid):
        super().__init__(grid)
        self.bytes_down = 0
        self.bytes_up = 0
        self.errors: list[tuple[int, str]] = []

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message | TrainingReply]:
        messages = list(messages)
        # A round sends one θ record and one config record to every device: sized once, not once per device.
        sizes: dict[tuple[tuple[str, int], ...], int] = {}
        for message in messages:
            if not message.has_content():
                continue
            shared = tuple((key, id(record)) for key, record in message.content.items())
            if shared not in sizes:
                sizes[shared] = content_bytes(message)
            self.bytes_down += sizes[shared]
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if isinstance(reply, Message) and reply.has_error():
                self.errors.append((reply.metadata.src_node_id, short_reason(reply.error.reason)))
            else:
                self.bytes_up += content_bytes(reply)
        return replies

    def take_bytes(self) -> tuple[int, int]:
        """(up, down) since the last call."""
        counts = (self.bytes_up, self.bytes_down)
        self.bytes_up = self.bytes_down = 0
        return counts

    def take_errors(self) -> list[tuple[int, str]]:
        """(node, reason) of the error replies since the last call."""
        errors, self.errors = self.errors, []
        return errors


class PollingGrid(_DelegatingGrid):
    """Flower's ``send_and_receive`` (push, then pull until every reply is in or the timeout passes; no timeout
    waits for all), pulling every ``poll_seconds`` instead of the deployed grid's 3 s."""

    def __init__(self, grid: Grid, poll_seconds: float):
        if not poll_seconds > 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        super().__init__(grid)
        self.poll_seconds = poll_seconds

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        waiting = set(self._grid.push_messages(list(messages)))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            pulled = list(self._grid.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            pause = self.poll_seconds
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
        return replies
