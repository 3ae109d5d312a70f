"""The server's grid wrapper waiting for replies itself (``reply_poll_seconds``) instead of Flower's 3 s sleep."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from metafleet.server.grid import MeteredGrid, PollingGrid
from metafleet.simulations.inprocess import RUN_ID, InProcessGrid

_ = RUN_ID  # InProcessGrid sets Flower's task identity, which Message(...) needs outside Flower's runtime


class SlowLink(InProcessGrid):
    """Replies become available ``delay`` seconds after the push, as on a SuperLink whose devices poll."""

    def __init__(self, delay: float):
        super().__init__(client_app=None, contexts={})
        self.delay, self.pending, self.pulls = delay, {}, 0

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        ids = []
        for index, message in enumerate(messages):
            message_id = f"m{index}"
            message.metadata.__dict__["_message_id"] = message_id
            reply = Message(RecordDict({"c": ConfigRecord({"node": message.metadata.dst_node_id})}), reply_to=message)
            self.pending[message_id] = (time.monotonic() + self.delay * (index + 1), reply)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        self.pulls += 1
        now = time.monotonic()
        ready = [i for i in message_ids if i in self.pending and self.pending[i][0] <= now]
        return [self.pending.pop(i)[1] for i in ready]

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        raise AssertionError("the wrapper must poll itself")


def _messages(count: int) -> list[Message]:
    return [Message(RecordDict({"c": ConfigRecord({"x": 1})}), 100 + i, MessageType.TRAIN) for i in range(count)]


def test_replies_are_pulled_every_poll_interval_until_all_are_in():
    link = SlowLink(delay=0.05)
    grid = MeteredGrid(PollingGrid(link, 0.01))
    started = time.monotonic()
    replies = grid.send_and_receive(_messages(3), timeout=5)
    elapsed = time.monotonic() - started
    assert sorted(r.content["c"]["node"] for r in replies) == [100, 101, 102]
    assert 0.15 <= elapsed < 1.0 and link.pulls >= 5  # answered as the last reply came, not 3 s later
    up, down = grid.take_bytes()
    assert up > 0 and down > 0


def test_the_timeout_returns_the_replies_that_came():
    grid = PollingGrid(SlowLink(delay=0.2), 0.02)
    started = time.monotonic()
    replies = grid.send_and_receive(_messages(3), timeout=0.3)
    assert len(replies) == 1 and time.monotonic() - started < 0.6
