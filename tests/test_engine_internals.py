"""The two places where metafleet changes Flower's Simulation Engine for large fleets (simulations/engine.py).

Each is pinned twice: by behaviour (the indexed LinkState hands out the same messages as Flower's; the node
map the ServerApp receives is the one the engine's ClientApps see) and by the source of the Flower code it
stands in for, so that a Flower upgrade fails here, naming what to re-read, instead of changing results.
"""

from __future__ import annotations

import hashlib
import inspect
import time

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import linkstate_factory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from metafleet.common.config import RunConfig
from metafleet.simulations import engine

# What each replaced or wrapped piece of Flower 1.42 looked like when engine.py was written against it.
PINNED_SOURCES = {
    "InMemoryLinkState.get_message_ins": (InMemoryLinkState.get_message_ins, "6547c8dcbc62e12f"),
    "InMemoryLinkState.store_message_ins": (InMemoryLinkState.store_message_ins, "a2b78afac51dc4a2"),
    "InMemoryLinkState._check_stored_messages": (InMemoryLinkState._check_stored_messages, "2be47567d2478a58"),
    "InMemoryLinkState.delete_messages": (InMemoryLinkState.delete_messages, "5cfa8be0fba08ae1"),
    "LinkStateFactory.state": (linkstate_factory.LinkStateFactory.state, "8b1e223d09999587"),
    "vce_api._register_nodes": (vce_api._register_nodes, "88a1cb6749e876ed"),
    "vce_api.add_messages_to_queue": (vce_api.add_messages_to_queue, "953f4bd41a931a77"),
}


@pytest.mark.parametrize("name", sorted(PINNED_SOURCES))
def test_the_flower_code_engine_py_stands_in_for_is_unchanged(name):
    function, pinned = PINNED_SOURCES[name]
    digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]
    assert digest == pinned, (f"Flower's {name} changed: re-read it against simulations/engine.py "
                              "(IndexedLinkState, _large_fleet_engine), then update the pin")


def test_the_engine_still_builds_its_state_and_nodes_through_the_names_engine_py_swaps():
    assert "InMemoryLinkState(" in inspect.getsource(linkstate_factory.LinkStateFactory.state)
    assert "_register_nodes(" in inspect.getsource(vce_api.start_vce)


def _fleet(indexed: bool, nodes: int):
    """A LinkState with one run and ``nodes`` nodes, built as the engine builds it, and a grid on it."""
    mapping = engine._NodeMapping()
    context = engine._large_fleet_engine(mapping) if indexed else engine.nullcontext()
    with context:
        factory = linkstate_factory.LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                                                     ObjectStoreFactory())
        state = factory.state()
        run = Run.create_empty(run_id=7)
        run.primary_task_id, run.federation_id = 8, NOOP_FEDERATION_ID
        # As _run_simulation pre-registers its run with its primary task.
        state.run_ids[run.run_id] = RunRecord(run=run)
        state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
        partitions = vce_api._register_nodes(num_nodes=nodes, state_factory=factory)
    # Server-side Message(...) reads the task identity, as under the engine.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 8, 7, SUPERLINK_NODE_ID
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, sorted(partitions, key=partitions.get), mapping


def _script(state, grid, nodes):
    """Pushes, deletions, expiries and pulls in one fixed order; what each pull handed out, by marker."""
    def push(marker, node, ttl=None):
        message = Message(RecordDict({"config": ConfigRecord({"marker": marker})}), node, "query", ttl=ttl)
        return list(grid.push_messages([message]))

    def pull(node, limit):
        # Node ids are random per state: a pull is recorded by the node's partition.
        return nodes.index(node), [m.content["config"]["marker"] for m in state.get_message_ins(node_id=node,
                                                                                              limit=limit)]

    seen = []
    ids = [push(i, nodes[i % len(nodes)]) for i in range(9)]
    push(100, nodes[1], ttl=0.05)  # expires before node 1 pulls
    state.delete_messages(set(ids[4]))  # node 1's second message: gone before delivery
    time.sleep(0.1)
    for node in nodes:
        seen.append(("limit 1", *pull(node, 1)))
    for node in reversed(nodes):
        seen.append(("all", *pull(node, None)))
    push(200, nodes[0])
    push(201, nodes[0])
    seen.append(("after more", *pull(nodes[0], None)))
    seen.append(("empty", *pull(nodes[2], 1)))
    return seen


def test_the_indexed_link_state_hands_out_the_messages_flowers_does_in_its_order():
    stock_state, stock_grid, stock_nodes, _ = _fleet(indexed=False, nodes=3)
    indexed_state, indexed_grid, indexed_nodes, _ = _fleet(indexed=True, nodes=3)
    assert type(stock_state) is InMemoryLinkState and type(indexed_state) is engine.IndexedLinkState
    expected = _script(stock_state, stock_grid, stock_nodes)
    assert _script(indexed_state, indexed_grid, indexed_nodes) == expected
    # The script reaches what it means to: node 0's three in order, node 1's expired and deleted ones absent.
    assert expected[:2] == [("limit 1", 0, [0]), ("limit 1", 1, [1])]
    assert ("all", 1, [7]) in expected and ("after more", 0, [200, 201]) in expected
    assert ("empty", 2, []) in expected
    assert len(stock_state.message_ins_store) == len(indexed_state.message_ins_store)


def test_the_engine_is_flowers_again_after_a_simulation():
    with engine._large_fleet_engine(engine._NodeMapping()):
        assert linkstate_factory.InMemoryLinkState is engine.IndexedLinkState
    assert linkstate_factory.InMemoryLinkState is InMemoryLinkState
    assert vce_api._register_nodes.__module__ == vce_api.__name__


def test_the_server_knows_each_ray_node_by_the_partition_its_client_app_simulates():
    """A real simulation: the map the ServerApp gets must match what every ClientApp says it is."""
    from metafleet.client.app import app as client_app

    config = RunConfig.resolve(dataset="sinusoid", algorithm="reptile", clients=5, held_out_clients=1, rounds=1)
    seen: dict[str, object] = {}
    server_app = ServerApp()

    @server_app.main()
    def _ask_everyone(grid: Grid, context) -> None:  # noqa: ANN001
        seen["identities"] = grid.simulated_identities()
        question = RecordDict({"config": ConfigRecord({"question": "who-are-you"})})
        replies = grid.send_and_receive([Message(question, node, "query") for node in grid.get_node_ids()],
                                        timeout=120)
        seen["answers"] = {r.metadata.src_node_id: int(r.content["info"]["client-id"]) for r in replies}

    engine.run_in_simulation(server_app, client_app, config.to_run_config(), num_supernodes=5, total_cpus=2)
    assert seen["identities"] == seen["answers"]
    assert sorted(seen["answers"].values()) == [0, 1, 2, 3, 4]
