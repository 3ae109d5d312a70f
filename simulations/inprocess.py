"""A Grid that delivers messages to ClientApps in this process: Flower's real SecAgg+ workflow on the server
side and the real ``secaggplus_mod`` on the clients, with only the transport replaced (every message is
serialized and parsed as on the wire). Tests use it to see every byte a client sends and to make a client
vanish at a chosen protocol stage; the secure-aggregation benchmark, to time the protocol at fleet sizes
whose devices would not fit this machine as Ray workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 4242


def stage_of(message: Message) -> str | None:
    """The SecAgg+ stage a training message belongs to (None for a plain message)."""
    # Looked up by key: RecordDict.config_records builds a new filtered view on every call (30 us a message).
    if not message.has_content() or RECORD_KEY_CONFIGS not in message.content:
        return None
    record = message.content[RECORD_KEY_CONFIGS]
    return str(record.get(Key.STAGE)) if isinstance(record, ConfigRecord) else None


@dataclass
class InProcessGrid(Grid):
    client_app: ClientApp
    contexts: Mapping[int, Context]  # node id -> the node's context (its state persists between messages)
    vanish_at: dict[int, str] = field(default_factory=dict)  # node id -> stage from which it never answers
    replies: list[Message] = field(default_factory=list)  # every reply a client sent, for inspection

    def __post_init__(self) -> None:
        # Server-side Message(...) construction reads the task identity, as under flwr-simulation (private
        # API, set here alone for the tests).
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, 0
        self._run = Run.create_empty(run_id=RUN_ID)
        self._vanished: set[int] = set()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        answers = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self.vanish_at and self.vanish_at[node] == stage_of(message):
                self._vanished.add(node)
            if node in self._vanished:
                continue  # as if the device lost power: no reply, the server's wait times out
            try:
                reply = self.client_app(_over_the_wire(message), self.contexts[node])
            except Exception as error:  # noqa: BLE001 - as Flower's runtime, turn it into an error reply
                reply = Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=message)
            reply = _over_the_wire(reply)
            self.replies.append(reply)
            answers.append(reply)
        return answers

    # The rest of Grid.
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def get_nodes(self):  # noqa: ANN201
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError


def _over_the_wire(message: Message) -> Message:
    # Serialized and parsed as the real transport does: every node gets its own copy (the workflow sends
    # one content object to all, and secaggplus_mod edits what it receives).
    return message_from_proto(message_to_proto(message))


def device_contexts(run_config: dict, client_ids: Iterable[int], node_config: dict | None = None) -> DeviceContexts:
    """One device per entry of ``client_ids`` (an id may repeat: devices sharing a client's data), with node
    id 1000 + position, so that node and client ids cannot be confused."""
    return DeviceContexts(run_config, list(client_ids), node_config)


class DeviceContexts(Mapping[int, Context]):
    """Node id → the simulated device's Context, each made when the device is first addressed and kept (its
    state persists between messages). A fleet of 100,000 then costs only the devices a run reaches, and the
    devices share one copy of the run config."""

    def __init__(self, run_config: dict, client_ids: list[int], node_config: dict | None = None):
        self._run_config, self._client_ids, self._node_config = dict(run_config), client_ids, node_config or {}
        self._made: dict[int, Context] = {}

    def __getitem__(self, node: int) -> Context:
        context = self._made.get(node)
        if context is None:
            position = node - 1000
            if not 0 <= position < len(self._client_ids):
                raise KeyError(node)
            context = Context(run_id=RUN_ID, node_id=node, state=RecordDict(), run_config=self._run_config,
                              node_config={"partition-id": self._client_ids[position], "num-partitions": 0,
                                           **self._node_config})
            self._made[node] = context
        return context

    def __iter__(self) -> Iterator[int]:
        return iter(range(1000, 1000 + len(self._client_ids)))

    def __len__(self) -> int:
        return len(self._client_ids)

    def client_ids(self) -> dict[int, int]:
        """Node id → client id, without making any Context."""
        return {1000 + position: client_id for position, client_id in enumerate(self._client_ids)}
