"""Flower messages and contexts outside the Flower runtime, through public API only."""

from __future__ import annotations

import itertools
import time

from flwr.app import Context, Message, MessageType, Metadata, RecordDict

_ids = itertools.count(1)


def instruction(content: RecordDict, message_type: str = MessageType.TRAIN, dst_node_id: int = 7) -> Message:
    metadata = Metadata(
        run_id=1, message_id=f"ins-{next(_ids)}", src_node_id=1, dst_node_id=dst_node_id, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type,
    )
    return Message(content, metadata=metadata)


def reply_from(node_id: int, content: RecordDict, message_type: str = MessageType.TRAIN) -> Message:
    return Message(content, reply_to=instruction(RecordDict(), message_type, dst_node_id=node_id))


def device_context(partition_id: int, run_config: dict, node_id: int = 7) -> Context:
    return Context(
        run_id=1, node_id=node_id, node_config={"partition-id": partition_id, "num-partitions": 0},
        state=RecordDict(), run_config=run_config,
    )
